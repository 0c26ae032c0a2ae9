"""``prune=magnitude``: one-shot and iterative magnitude pruning (Han et al., NeurIPS 2015), and
iterative magnitude pruning with weight rewinding (the lottery ticket, Frankle & Carbin, ICLR 2019).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compresslab.compress.common import dense_state
from compresslab.compress.prune.masks import magnitude_masks
from compresslab.compress.prune.nm import nm_mask
from compresslab.compress.prune.oneshot import check_pattern, pattern_export, pattern_report, split_by_multiple
from compresslab.compress.prune.options import MagnitudeOptions
from compresslab.compress.prune.unstructured import UnstructuredPruning
from compresslab.errors import ConfigError


class MagnitudePruning(UnstructuredPruning):
    """One-shot magnitude pruning (Han et al., NeurIPS 2015) at time ``at``, then fine-tuning.

    ``rounds`` > 1 is Han et al.'s iterative pruning (Sec. 3.3, "Iterative Pruning"): train → prune
    → retrain, repeated: ``rounds`` rounds of ``at`` units; at the end of round r the weights are
    pruned to 1 − (1 − s_f)^(r/R) and training continues from the surviving weights.

    ``lottery.enabled`` turns it into iterative magnitude pruning with weight rewinding
    (Frankle & Carbin, "The Lottery Ticket Hypothesis", ICLR 2019; rewinding to an early
    iterate: Frankle et al., "Linear Mode Connectivity and the Lottery Ticket Hypothesis",
    ICML 2020): ``lottery.rounds`` rounds of ``at`` units each, pruned on the same schedule, and
    after each pruning the surviving weights are reset to their values at time
    ``lottery.rewind_to`` (0 = initialization), with the optimizer state of the student's
    parameters cleared. The learning-rate schedule is not restarted.
    ``lottery.reinit: random`` is the paper's control: the mask is found exactly as for the
    winning ticket, but after the last pruning the surviving weights are re-drawn from the
    initialization distribution instead of rewound — each tensor's values at ``rewind_to`` in a
    random order (seeded by ``lottery.reinit_seed``), i.e. a fresh i.i.d. sample of the same
    distribution, unrelated to the mask.

    ``at: null`` is one-shot post-training magnitude pruning (the baseline of Wanda and SparseGPT,
    Sun et al. 2024 Table 3): after training, each selected layer loses its ``final_sparsity``
    smallest-|w| weights (or, with ``n``/``m``, all but the ``n`` largest of every ``m``
    consecutive input weights), with no fine-tuning; the same layers, patterns and artifacts as
    :mod:`compresslab.compress.prune.oneshot`.
    """

    options = MagnitudeOptions

    def __init__(self, name: str, at: int | None = 5, rounds: int = 1, lottery: dict | None = None,
                 n: int | None = None, m: int | None = None, **kwargs: Any) -> None:
        kwargs["final_sparsity"] = check_pattern(n, m, kwargs.get("final_sparsity", 0.9))
        super().__init__(name, **kwargs)
        self.n, self.m = (None, None) if n is None else (int(n), int(m))
        if self.n is not None and at is not None:
            raise ConfigError(f"prune.n/prune.m with prune=magnitude need prune.at=null (one-shot after training); "
                              f"for N:M during training use prune=nm (got prune.at={at})")
        self.post_training = at is None
        self.codec_kind = "nm" if self.n is not None else "sparse"
        self._skipped: list[str] = []
        if self.post_training:
            if rounds != 1 or (lottery or {}).get("enabled"):
                raise ConfigError("prune.at=null prunes once after training: prune.rounds must be 1 and "
                                  "prune.lottery.enabled false")
            self.scope = "layer" if self.n is not None else self.scope
            self.rounds, self.rewind_to, self.lottery, self.at, self._points = 1, 0, False, None, []
            return
        self.at = int(at)
        lot = dict(lottery or {})
        self.lottery = bool(lot.get("enabled", False))
        self.reinit = str(lot.get("reinit", "rewind"))
        self.reinit_seed = int(lot.get("reinit_seed", 1))
        if self.lottery:
            if int(rounds) != 1:
                raise ConfigError("prune.rounds is the number of prune-retrain rounds without rewinding; with "
                                  "prune.lottery.enabled=true set prune.lottery.rounds instead")
            self.rounds = int(lot.get("rounds", 3))
            self.rewind_to = int(lot.get("rewind_to", 0))
        else:
            self.rounds = int(rounds)
            self.rewind_to = 0
        if (self.lottery or self.rounds > 1) and self.at < 1:
            raise ConfigError(f"prune.at must be >= 1 with several rounds, got {at}")
        if self.lottery and not 0 <= self.rewind_to < self.at:
            raise ConfigError(f"prune.lottery.rewind_to must be in [0, prune.at={self.at}), got {self.rewind_to}")
        s_f = self.final_sparsity
        self._points = [(self.at * r, 1.0 - (1.0 - s_f) ** (r / self.rounds)) for r in range(1, self.rounds + 1)]
        self._check_schedule()

    def points(self) -> list[tuple[int, float]]:
        return list(self._points)

    def prunable(self, model: nn.Module) -> dict[str, nn.Module]:
        layers, self._skipped = split_by_multiple(super().prunable(model), self.m)
        return layers

    @torch.no_grad()
    def prune_after_training(self, student: nn.Module, datamodule) -> None:
        weights = {k: v.weight for k, v in self.prunable(student).items()}
        if self.n is None:
            masks = magnitude_masks(weights, self.final_sparsity, self.scope)
        else:
            masks = {k: nm_mask(w, self.n, self.m) for k, w in weights.items()}
        for k, w in weights.items():
            w.masked_fill_(~masks[k], 0.0)

    def finalize(self, student: nn.Module, datamodule) -> nn.Module:
        student = super().finalize(student, datamodule)
        if self.post_training:
            self._report.update(pattern_report(self, student))
        return student

    def export(self, student: nn.Module, context: dict[str, Any]) -> dict | None:
        return pattern_export(self, student, context, lambda: super(MagnitudePruning, self).export(student, context))

    def before_point(self, cb, trainer, pl_module, t: int) -> None:
        if self.lottery and cb.rewind_state is None and t >= self.rewind_to:
            cb.rewind_state = dense_state(pl_module.model.state_dict())

    def reinit_state(self, state: dict[str, torch.Tensor], parameter_names) -> dict[str, torch.Tensor]:
        """``state`` with every parameter tensor's values in a seeded random order (buffers kept)."""
        g = torch.Generator().manual_seed(self.reinit_seed)
        out = dict(state)
        for key in sorted(parameter_names):
            if key in out and out[key].is_floating_point() and out[key].numel() > 1:
                flat = out[key].flatten()
                out[key] = flat[torch.randperm(flat.numel(), generator=g)].reshape(out[key].shape)
        return out

    @torch.no_grad()
    def after_point(self, cb, trainer, pl_module, t: int) -> None:
        if not self.lottery or cb.rewind_state is None:
            return
        model = pl_module.model
        device = next(model.parameters()).device
        state = cb.rewind_state
        last = t >= self._points[-1][0]
        if last and self.reinit == "random":
            state = self.reinit_state(state, [n for n, _ in model.named_parameters()])
        model.load_state_dict({k: v.to(device) for k, v in state.items()})
        cb.apply_masks(model)
        params = set(model.parameters())
        for opt in trainer.optimizers:
            for p in [p for p in opt.state if p in params]:
                del opt.state[p]
        cb.history[-1]["rewound_to"] = "random re-init" if last and self.reinit == "random" else self.rewind_to
