"""Calibration for post-training methods: the input batches, and statistics of the inputs of
``nn.Linear`` layers captured with forward hooks, group by group (layer by layer).

Shared by the one-shot LLM methods (``quant=rtn|gptq|awq|smoothquant``, ``prune=wanda|sparsegpt``);
it works on any model whose Linear layers see their inputs through ``forward`` (a Hugging Face
causal LM, an image MLP), and never names an architecture.

- :func:`calibration_batches`: ``n`` input batches from the datamodule: for a text datamodule,
  ``n × batch_size`` sequences drawn at random from the training split by its
  ``calibration_sequences`` (cut into batches of ``batch_size``), else the inputs of the first
  ``n`` batches of its ``split`` loader.
- :class:`InputStats`: per Linear, over every input row ``x`` (token positions are rows: a
  ``[B, T, C]`` input counts ``B*T`` rows) — ``xtx = Σ x xᵀ`` (the GPTQ / SparseGPT Hessian is
  ``2 · xtx / count``; Wanda's column norm is ``sqrt(diag(xtx))``), ``abs_sum`` (AWQ's mean
  activation magnitude is ``abs_sum / count``), ``abs_max`` (SmoothQuant's per-channel max) and ``count``.
- :func:`input_groups`: the selected Linears in the order a forward pass calls them, grouped by
  the tensor they read (q/k/v of one attention read the same normed input; gate/up of a Llama MLP
  too): the unit in which AWQ and SmoothQuant share a scale, and the sequential unit of all methods.
- :func:`sequential`: for each group in call order, capture its input statistics with the groups
  before it *already transformed* (the inputs the compressed model really sees: GPTQ's "sequential"
  mode, Frantar et al. 2023, sec. 4), then hand them to the method's ``transform``. Each forward
  stops (:class:`StopForward`) once the group's last layer has seen its input, so a model of ``G``
  groups costs about ``G/2`` full passes over the calibration set.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from compresslab.errors import ConfigError


class StopForward(Exception):
    """Raised by a capture hook to end a forward pass once every wanted input has been seen."""


def calibration_batches(datamodule, n: int, split: str = "train") -> list[torch.Tensor]:
    """``n`` calibration input batches (CPU tensors): ``n × batch_size`` random training sequences
    from ``datamodule.calibration_sequences`` when it has one (a text datamodule), else the inputs
    of the first ``n`` batches of its ``split`` loader."""
    if split not in ("train", "val"):
        raise ConfigError(f"quant.calibration_split must be train or val, got {split!r}")
    sequences = getattr(datamodule, "calibration_sequences", None)
    if callable(sequences) and split == "train" and int(n) > 0:
        size = max(1, int(getattr(datamodule, "batch_size", 1)))
        return [b.cpu() for b in sequences(int(n) * size).split(size)]
    loader = datamodule.train_dataloader() if split == "train" else datamodule.val_dataloader()
    return [batch[0].cpu() for batch in itertools.islice(loader, max(0, int(n)))]


@dataclass
class InputStats:
    """Running statistics of one Linear's input rows (see the module docstring); float64 sums."""

    xtx: torch.Tensor
    abs_sum: torch.Tensor
    abs_max: torch.Tensor
    count: int = 0
    calls: int = field(default=0, repr=False)

    @classmethod
    def empty(cls, width: int) -> "InputStats":
        z = torch.zeros(width, dtype=torch.float64)
        return cls(torch.zeros(width, width, dtype=torch.float64), z.clone(), z.clone())

    def add(self, x: torch.Tensor) -> None:
        """Add the rows of ``x`` (``[..., width]``)."""
        rows = x.detach().reshape(-1, x.shape[-1]).to(device="cpu", dtype=torch.float64)
        self.xtx += rows.T @ rows
        a = rows.abs()
        self.abs_sum += a.sum(0)
        self.abs_max = torch.maximum(self.abs_max, a.amax(0))
        self.count += rows.shape[0]
        self.calls += 1

    @property
    def hessian(self) -> torch.Tensor:
        """``2 · XᵀX / n`` (float64): the Hessian of the layer-output squared error ``||W X - Ŵ X||²/n``."""
        return 2.0 * self.xtx / max(1, self.count)

    @property
    def abs_mean(self) -> torch.Tensor:
        """Mean ``|x_j|`` per input channel."""
        return self.abs_sum / max(1, self.count)


def _run(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with torch.no_grad():
        for x in batches:
            try:
                model(x.to(device))
            except StopForward:
                pass


def _linears(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Linear]:
    out = {}
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise ConfigError(f"{name} is a {type(module).__name__}, not an nn.Linear")
        out[name] = module
    return out


def input_groups(model: nn.Module, names: Sequence[str], example: torch.Tensor) -> list[list[str]]:
    """``names`` (Linear layers) in the order one forward of ``example`` calls them, consecutive
    layers reading the same input tensor grouped together. A layer never called is left out."""
    order: list[tuple[str, torch.Tensor]] = []  # the inputs are held, so no id is reused
    handles = []
    for name, module in _linears(model, names).items():
        def hook(mod, args, name=name):
            if all(n != name for n, _ in order):
                order.append((name, args[0]))
        handles.append(module.register_forward_pre_hook(hook))
    try:
        _run(model.eval(), [example])
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    last = None
    for name, key in order:
        if groups and key is last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = key
    return groups


def capture_stats(model: nn.Module, names: Sequence[str], batches: Sequence[torch.Tensor],
                  stop_early: bool = True) -> dict[str, InputStats]:
    """:class:`InputStats` of each named Linear's input over ``batches`` (forward hooks). With
    ``stop_early`` a forward ends once every named layer has been called (right for layers called
    once per forward; calls after that point are not counted)."""
    layers = _linears(model, names)
    stats = {n: InputStats.empty(m.in_features) for n, m in layers.items()}
    seen: set[str] = set()
    handles = []
    for name, module in layers.items():
        def hook(mod, args, name=name):
            stats[name].add(args[0])
            seen.add(name)
            if stop_early and len(seen) == len(layers):
                raise StopForward
        handles.append(module.register_forward_pre_hook(hook))
    try:
        for x in batches:
            seen.clear()
            _run(model.eval(), [x])
    finally:
        for h in handles:
            h.remove()
    return stats


def sequential(model: nn.Module, names: Sequence[str], batches: Sequence[torch.Tensor],
               transform: Callable[[list[str], Mapping[str, InputStats]], None]) -> list[list[str]]:
    """Call ``transform(group, stats)`` for each :func:`input_groups` group in forward order, its
    statistics captured after every earlier group was transformed; returns the groups."""
    if not batches:
        raise ConfigError("no calibration batches: the datamodule gave none (check the calibration size)")
    groups = input_groups(model, names, batches[0])
    for group in groups:
        transform(group, capture_stats(model, group, batches))
    return groups
