"""The teacher of a distillation: frozen, in eval mode, on the student's device, and its outputs.

The teacher is held outside ``nn.Module`` registration, so it is in neither the distillation
module's state dict nor its optimizer. It follows the student to its device for the fit and
goes back to where it came from afterwards; it always runs in eval mode under
``torch.no_grad``, and answers from the teacher-output cache when one is open.
"""

from __future__ import annotations

import torch
from torch import nn

from compresslab.distill.cache import TeacherOutputCache
from compresslab.distill.taps import capture

__all__ = ["FrozenTeacher"]


class FrozenTeacher:
    """A frozen ``teacher`` network, the taps it is read at, and the optional output cache.

    ``taps`` and ``shapes`` (per-sample shape of each tap) are set when the feature-loss entries
    are resolved; ``cache`` is open only during a fit with ``cache_teacher_outputs``.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module.eval()
        self.home: torch.device | None = None  # where it was before it followed the student
        self.taps: list[str] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.cache: TeacherOutputCache | None = None

    def device(self) -> torch.device | None:
        """The device of the teacher's first parameter (or buffer); None for a stateless teacher."""
        for t in self.module.parameters():
            return t.device
        for t in self.module.buffers():
            return t.device
        return None

    def follow(self, device: torch.device) -> None:
        """Move the teacher to ``device`` (remembering its first home) and keep it in eval mode."""
        current = self.device()
        if current is not None and current != device:
            if self.home is None:
                self.home = current
            self.module.to(device)
        if self.module.training:
            self.module.eval()

    def go_home(self) -> None:
        """Move the teacher back to where it was before it first followed the student."""
        if self.home is not None:
            self.module.to(self.home)
            self.home = None

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The teacher's logits and tapped features for ``x`` (no gradient)."""
        with torch.no_grad(), capture(self.module, self.taps) as feats:
            logits = self.module(x)
        return logits, dict(feats)

    def outputs(self, x: torch.Tensor, index: torch.Tensor | None = None):
        """Logits and tapped features for ``x``, from the cache when it is open and ``index`` is known."""
        self.follow(x.device)
        if self.cache is not None and index is not None:
            return self.cache.get(index, x, self.run)
        return self.run(x)
