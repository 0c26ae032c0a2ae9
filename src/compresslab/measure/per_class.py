"""Per-class accuracy, and the class-bias adjustment of Hinton et al. 2015 (§3).

A student distilled on a transfer set without some class learns that class from the teacher's
soft targets, but its bias for the class stays too low; Hinton, Vinyals & Dean add a constant
to that class's logit at evaluation time ("if the bias is increased by 3.5 ... 98.6% of the
test 3s" are right). ``eval.class_bias`` does the same: ``{label: value}`` adds ``value`` to the
label's logit, and ``{label: val}`` chooses the value on the validation split from
``eval.class_bias_grid`` (the one with the best val accuracy; never on the test split).
Accuracy is reported with and without the adjustment.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from compresslab.errors import ConfigError

#: ``eval.class_bias`` value that means "choose it on the validation split".
CHOOSE_ON_VAL = "val"


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, labels)`` of ``model`` (eval mode) over (x, y) batches, on the CPU, float32."""
    model.eval()
    logits, labels = [], []
    for x, y in batches:
        logits.append(model(x.to(device)).float().cpu())
        labels.append(torch.as_tensor(y).cpu())
    if not logits:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(logits), torch.cat(labels).long()


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy (nan for no samples)."""
    return float((logits.argmax(1) == labels).float().mean()) if len(labels) else float("nan")


def per_class_accuracy(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float | None]:
    """Top-1 accuracy of each class (index = label; None for a class without samples)."""
    pred = logits.argmax(1)
    out: list[float | None] = []
    for c in range(int(num_classes)):
        member = labels == c
        n = int(member.sum())
        out.append(float((pred[member] == c).float().mean()) if n else None)
    return out


def apply_bias(logits: torch.Tensor, bias: Mapping[int, float]) -> torch.Tensor:
    """``logits`` with ``bias[label]`` added to column ``label``."""
    out = logits.clone()
    for label, value in bias.items():
        out[:, int(label)] += float(value)
    return out


def parse_class_bias(spec: Any, num_classes: int) -> dict[int, float | str]:
    """``eval.class_bias`` as ``{label: float | "val"}``, checked against the class labels."""
    if spec is None:
        return {}
    if not isinstance(spec, Mapping):
        raise ConfigError(f"eval.class_bias must map class labels to a value (or '{CHOOSE_ON_VAL}'), got {spec!r}")
    out: dict[int, float | str] = {}
    for key, value in spec.items():
        try:
            label = int(key)
        except (TypeError, ValueError):
            raise ConfigError(f"eval.class_bias: {key!r} is not a class label") from None
        if not 0 <= label < int(num_classes):
            raise ConfigError(f"eval.class_bias: {label} is not a class label (0..{num_classes - 1})")
        if isinstance(value, str):
            if value != CHOOSE_ON_VAL:
                raise ConfigError(f"eval.class_bias.{label} must be a number or '{CHOOSE_ON_VAL}' (chosen on the "
                                  f"validation split), got {value!r}")
            out[label] = value
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"eval.class_bias.{label} must be a number or '{CHOOSE_ON_VAL}', got {value!r}")
        else:
            out[label] = float(value)
    return out


def choose_bias(val_logits: torch.Tensor, val_labels: torch.Tensor, spec: Mapping[int, float | str],
                grid: Sequence[float]) -> dict[int, float]:
    """The bias per label: fixed values as given; ``"val"`` labels chosen one after the other (in label
    order, the others at their current value) as the grid value with the best validation accuracy,
    ties going to the smallest |bias|."""
    if any(v == CHOOSE_ON_VAL for v in spec.values()) and not grid:
        raise ConfigError("eval.class_bias_grid is empty: there is nothing to choose the bias from")
    bias = {label: (0.0 if v == CHOOSE_ON_VAL else float(v)) for label, v in spec.items()}
    for label in sorted(spec):
        if spec[label] != CHOOSE_ON_VAL:
            continue
        scored = []
        for value in grid:
            trial = {**bias, label: float(value)}
            scored.append((accuracy(apply_bias(val_logits, trial), val_labels), -abs(float(value)), float(value)))
        bias[label] = max(scored)[2]
    return bias


def class_metrics(model: nn.Module, datamodule, num_classes: int, eval_cfg: Mapping | None = None,
                  with_bias: bool = True) -> dict[str, Any]:
    """``acc_per_class`` on the test split and, when ``eval.class_bias`` is set (and ``with_bias``),
    the chosen bias with the accuracies it gives on val and test."""
    test_logits, test_labels = predict(model, datamodule.test_dataloader())
    out: dict[str, Any] = {"acc_per_class": per_class_accuracy(test_logits, test_labels, num_classes)}
    eval_cfg = eval_cfg or {}
    spec = parse_class_bias(eval_cfg.get("class_bias"), num_classes)
    if not with_bias or not spec:
        return out
    grid = list(eval_cfg.get("class_bias_grid") or [])
    val_logits, val_labels = predict(model, datamodule.val_dataloader())
    bias = choose_bias(val_logits, val_labels, spec, grid)
    biased = apply_bias(test_logits, bias)
    out.update({
        "class_bias": {str(k): v for k, v in bias.items()},
        "class_bias_chosen_on": "val" if any(v == CHOOSE_ON_VAL for v in spec.values()) else "config",
        "val_acc_top1_nobias": accuracy(val_logits, val_labels),
        "val_acc_top1_bias": accuracy(apply_bias(val_logits, bias), val_labels),
        "acc_top1_bias": accuracy(biased, test_labels),
        "acc_per_class_bias": per_class_accuracy(biased, test_labels, num_classes),
    })
    return out
