"""Feature taps: module paths from config, validated against a model, and the forward hooks that capture them.

A tap is written in config as a module path from ``model.named_modules()``
(``layer3``, ``features.3``), optionally suffixed ``:in`` to capture the module's
input instead of its output (``fc:in`` is the penultimate embedding of a ResNet).
The special taps (``auto``, ``embedding``, ``stages``, ``stages_preact``, ``sections``) are
resolved per model by a probe forward: see :mod:`compresslab.distill.tap_probe`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from compresslab.errors import ConfigError

SPECIAL_TAPS = ("auto", "embedding", "stages", "stages_preact", "sections")
EXPANDING_TAPS = ("stages", "stages_preact", "sections")


def module_names(model: nn.Module) -> list[str]:
    """Every non-root module path of ``model``, in registration order."""
    return [name for name, _ in model.named_modules() if name]


def describe_module_names(model: nn.Module, limit: int = 80) -> str:
    """The valid tap names of ``model`` for an error message (shortened for very deep models)."""
    names = module_names(model)
    if len(names) <= limit:
        shown = names
        more = ""
    else:
        shown = [n for n in names if n.count(".") <= 1][:limit]
        more = f" ... ({len(names)} paths in all; deeper ones such as {names[-1]!r} are valid too)"
    return ", ".join(shown) + more


def split_tap(tap: str) -> tuple[str, str]:
    """``"layer3"`` -> ``("layer3", "out")``; ``"fc:in"`` -> ``("fc", "in")``."""
    path, _, kind = str(tap).partition(":")
    kind = kind or "out"
    if kind not in ("in", "out"):
        raise ConfigError(f"tap {tap!r}: the suffix must be ':in' or ':out'")
    return path, kind


def validate_taps(model: nn.Module, taps: Sequence[str], role: str) -> None:
    """Fail with the list of valid module names when a tap names no module of ``model``."""
    modules = dict(model.named_modules())
    for tap in taps:
        if tap in SPECIAL_TAPS:
            continue
        path, _ = split_tap(tap)
        if not path or path not in modules:
            raise ConfigError(
                f"{role} tap {tap!r} is not a module of the {role} ({type(model).__name__}). "
                f"Use 'auto' (last feature map), 'embedding' (classifier input), or one of: "
                f"{describe_module_names(model)}"
            )


class _StopForward(Exception):
    """Raised by a capture hook to cut a forward short once every tap is captured."""


@contextmanager
def capture(model: nn.Module, taps: Sequence[str], stop_when_done: bool = False,
            calls: Mapping[str, int] | None = None) -> Iterator[dict]:
    """Within the block, forwards of ``model`` store the tapped tensors in the yielded dict.

    Captured tensors are cloned, so later in-place ops (``ReLU(inplace=True)``) cannot
    change them. If a module runs several times in one forward the last call wins. With
    ``stop_when_done`` the forward raises :class:`_StopForward` once all taps are captured,
    each as often as ``calls[tap]`` says (default once; a ReLU module reused inside a block
    runs twice): use :func:`run_until_captured`.
    """
    feats: dict[str, torch.Tensor] = {}
    if not taps:
        yield feats
        return
    modules = dict(model.named_modules())
    wanted = {tap: int((calls or {}).get(tap, 1)) for tap in taps}
    seen: dict[str, int] = {}
    handles = []

    def store(tap, tensor):
        feats[tap] = tensor.clone()
        seen[tap] = seen.get(tap, 0) + 1
        if stop_when_done and all(seen.get(t, 0) >= n for t, n in wanted.items()):
            raise _StopForward

    for tap in dict.fromkeys(taps):
        path, kind = split_tap(tap)
        module = modules[path]
        if kind == "out":
            handles.append(module.register_forward_hook(lambda m, i, o, tap=tap: store(tap, o)))
        else:
            handles.append(module.register_forward_pre_hook(lambda m, i, tap=tap: store(tap, i[0])))
    try:
        yield feats
    finally:
        for h in handles:
            h.remove()


def run_until_captured(model: nn.Module, x: torch.Tensor, taps: Sequence[str],
                       calls: Mapping[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Run ``model`` on ``x`` only as far as needed to capture ``taps`` (``calls``: how often
    each tapped module runs in a full forward, from :meth:`ProbeResult.calls_of`)."""
    with capture(model, taps, stop_when_done=True, calls=calls) as feats:
        try:
            model(x)
        except _StopForward:
            pass
    missing = [t for t in taps if t not in feats]
    if missing:
        raise RuntimeError(f"taps {missing} were not reached by the forward pass")
    return feats


def check_expanding_taps(s_layers: Sequence[str], t_layers: Sequence[str], what: str) -> None:
    """``stages``/``stages_preact`` expand to several taps: both sides need one at the same position."""
    for a, b in zip(s_layers, t_layers):
        if (a in EXPANDING_TAPS) != (b in EXPANDING_TAPS):
            raise ConfigError(f"{what}: student tap {a!r} is paired with teacher tap {b!r}; 'stages' and "
                              "'stages_preact' expand to several taps, so both sides need one at the same position")
