"""Pruning sensitivity analysis (Han et al., NeurIPS 2015, Fig. 6; Intel Distiller's
``sensitivity_analysis``): prune each layer *alone* to a range of sparsities by magnitude,
evaluate, and restore it. The per-layer table and an accuracy-vs-sparsity plot show which
layers tolerate pruning and which need a lower target.

Three ways to run it:

- ``compresslab prune=sensitivity ...``: the pipeline trains the student, then this method's
  ``finalize`` analyses it on the validation split and writes ``<run dir>/pruning/sensitivity.*``
  (the student itself is saved unpruned);
- ``compresslab-sensitivity MODEL_FILE dataset=digits --out DIR``
  on any saved compresslab model file (e.g. a run's ``artifacts/student.pt`` or a cached teacher);
- :func:`layer_sensitivity` + :func:`write_sensitivity` from Python.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from compresslab.compress.base import CompressionMethod
from compresslab.compress.common import CONV_LINEAR, select_layers
from compresslab.compress.prune.common import write_table
from compresslab.compress.prune.masks import magnitude_masks
from compresslab.compress.prune.options import SensitivityOptions
from compresslab.errors import ConfigError
from compresslab.measure import evaluate_accuracy

DEFAULT_SPARSITIES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


@torch.no_grad()
def layer_sensitivity(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    layers: Iterable[str] | None = None,
    include_classifier: bool = True,
) -> tuple[float, list[dict]]:
    """Accuracy of ``model`` with each layer alone magnitude-pruned to each sparsity.

    ``evaluate(model) -> accuracy``. ``layers``: module names (default: every conv/linear
    layer, the classifier too unless ``include_classifier=False``). Returns the unpruned
    accuracy and one row per (layer, sparsity); the model is left as it was.
    """
    candidates = select_layers(model, types=CONV_LINEAR, include_classifier=include_classifier, case_sensitive=True)
    names = list(layers) if layers is not None else list(candidates)
    unknown = [n for n in names if n not in candidates]
    if unknown:
        raise ConfigError(f"sensitivity: {unknown} are not conv/linear layers; choose from {list(candidates)}")
    baseline = float(evaluate(model))
    rows = []
    for name in names:
        weight = candidates[name].weight
        original = weight.detach().clone()
        try:
            for s in sparsities:
                mask = magnitude_masks({name: original}, float(s))[name]
                weight.copy_(original * mask)
                acc = float(evaluate(model))
                rows.append({"layer": name, "params": original.numel(), "sparsity": float(s), "acc": acc,
                             "acc_drop": baseline - acc})
        finally:
            weight.copy_(original)
    return baseline, rows


def plot_sensitivity(rows: Sequence[Mapping[str, Any]], baseline: float, path: Path, title: str = "") -> Path:
    """Accuracy vs sparsity, one line per layer (matplotlib, Agg backend), saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    by_layer: dict[str, list] = {}
    for r in rows:
        by_layer.setdefault(r["layer"], []).append((r["sparsity"], r["acc"]))
    for layer, pts in by_layer.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=layer)
    ax.axhline(baseline, color="gray", linestyle="--", linewidth=1, label="unpruned")
    ax.set_xlabel("sparsity of the layer (others dense)")
    ax.set_ylabel("accuracy")
    ax.set_title(title or "Pruning sensitivity per layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(by_layer) > 8 else 1, loc="lower left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_sensitivity(rows: Sequence[Mapping[str, Any]], baseline: float, out_dir: Path,
                      title: str = "") -> dict[str, str]:
    """Write ``sensitivity.csv``, ``sensitivity.md`` and ``sensitivity.png`` into ``out_dir``."""
    out_dir = Path(out_dir)
    paths = write_table(list(rows), out_dir / "sensitivity", title=title or f"Pruning sensitivity "
                        f"(unpruned accuracy {baseline:.4f})")
    paths["png"] = str(plot_sensitivity(rows, baseline, out_dir / "sensitivity.png", title))
    return paths


def summarize(rows: Sequence[Mapping[str, Any]], tolerance: float = 0.01) -> dict[str, float]:
    """Per layer: the highest tested sparsity whose accuracy drop is within ``tolerance``."""
    best: dict[str, float] = {}
    for r in rows:
        if r["acc_drop"] <= tolerance:
            best[r["layer"]] = max(best.get(r["layer"], 0.0), r["sparsity"])
        else:
            best.setdefault(r["layer"], 0.0)
    return best


def batch_evaluator(batches_fn: Callable[[], Iterable], max_batches: int | None) -> Callable[[nn.Module], float]:
    """A model -> top-1 accuracy function over ``batches_fn()``'s batches (the first ``max_batches``)."""
    def evaluate(model: nn.Module) -> float:
        batches = batches_fn()
        if max_batches:
            batches = itertools.islice(batches, int(max_batches))
        return evaluate_accuracy(model, batches)

    return evaluate


class SensitivityAnalysis(CompressionMethod):
    """``prune=sensitivity``: analyse the trained student layer by layer (it is saved unpruned).

    ``sparsities``: the tested sparsities; ``split``: ``val`` (default: choose targets
    without looking at test) or ``test``; ``max_batches``: evaluate on that many batches only;
    ``tolerance``: accuracy drop that still counts as safe in the summary.
    """

    options = SensitivityOptions

    def __init__(self, name: str, sparsities: Sequence[float] = DEFAULT_SPARSITIES, split: str = "val",
                 max_batches: int | None = None, include_classifier: bool = True, tolerance: float = 0.01) -> None:
        super().__init__(name)
        self.sparsities = [float(s) for s in sparsities]
        self.split = split
        self.max_batches = max_batches
        self.include_classifier = bool(include_classifier)
        self.tolerance = float(tolerance)
        self._rows: list[dict] = []
        self._baseline = float("nan")
        self._report: dict[str, Any] = {}

    def finalize(self, student: nn.Module, datamodule) -> nn.Module:
        loader_fn = datamodule.val_dataloader if self.split == "val" else datamodule.test_dataloader
        self._baseline, self._rows = layer_sensitivity(student, batch_evaluator(loader_fn, self.max_batches),
                                                       self.sparsities, include_classifier=self.include_classifier)
        safe = summarize(self._rows, self.tolerance)
        self._report = {"prune_method": self.name, "sensitivity_split": self.split,
                        "sensitivity_baseline_acc": self._baseline,
                        "sensitivity_safe_sparsity": safe,
                        "most_sensitive_layer": min(safe, key=safe.get) if safe else None}
        return student

    def export(self, student: nn.Module, context: dict[str, Any]) -> None:
        run_dir = context.get("run_dir")
        if run_dir is not None and self._rows:
            paths = write_sensitivity(self._rows, self._baseline, Path(run_dir) / "pruning")
            self._report.update({"sensitivity_csv": paths["csv"], "sensitivity_png": paths["png"]})
        return None

    def report(self) -> dict[str, Any]:
        return dict(self._report)
