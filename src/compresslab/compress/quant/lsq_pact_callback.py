"""The Lightning callback of ``quant=lsq`` / ``quant=pact`` (:class:`~compresslab.compress.quant.lsq_pact.ActQuant`):
QAT switched on at ``start_epoch`` (after the sensitivity-based bit allocation, when configured),
earlier epochs kept out of the val selection, PACT's α L2-regularized. Its state (the allocated
bits, the sensitivity table) is part of Lightning's checkpoint, so a resumed run keeps them.
"""

from __future__ import annotations

from typing import Any

import torch
from pytorch_lightning.callbacks import Callback
from torch import nn

from compresslab.compress.common import hide_epoch_from_selection


class ActQuantCallback(Callback):
    """Turns QAT on at ``start_epoch`` (the sensitivity allocation runs then); earlier epochs
    cannot become the val-selected checkpoint; PACT's α gets its L2 regularizer."""

    def __init__(self, method: "ActQuant") -> None:
        self.method = method
        self.assigned = False

    @property
    def state_key(self) -> str:
        return f"compresslab.quant.{self.method.name}"

    def state_dict(self) -> dict[str, Any]:
        return {"assigned": self.assigned, "layer_bits": {k: list(v) for k, v in self.method.layer_bits.items()},
                "sensitivity": list(self.method.sensitivity_table)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.assigned = bool(state_dict.get("assigned", False))
        self.method.layer_bits.update({k: tuple(v) for k, v in state_dict.get("layer_bits", {}).items()})
        self.method.sensitivity_table = list(state_dict.get("sensitivity", []))

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        m = self.method
        if trainer.current_epoch >= m.start_epoch and m.sensitivity_mode and not self.assigned:
            dm = trainer.datamodule
            device = next(pl_module.model.parameters()).device
            batches = []
            for i, (x, y) in enumerate(dm.val_dataloader()):
                if i >= m.sens_batches:
                    break
                batches.append((x.to(device), y.to(device)))
            m.assign_by_sensitivity(pl_module.model, batches)
            modules = dict(pl_module.model.named_modules())
            for name in m.layer_bits:  # quantizers re-initialise from the next training batch at their bits
                modules[name].aq_signed.copy_(torch.tensor([-1, 0]))
            self.assigned = True
        m.active = trainer.current_epoch >= m.start_epoch

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.method.scheme != "pact" or not self.method.active or self.method.alpha_decay == 0:
            return
        for module in pl_module.model.modules():
            alpha = getattr(module, "aq_alpha", None)
            if isinstance(alpha, nn.Parameter) and alpha.grad is not None:
                alpha.grad.add_(self.method.alpha_decay * alpha.detach())

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch < self.method.start_epoch:
            hide_epoch_from_selection(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        self.method.active = trainer.current_epoch >= self.method.start_epoch
