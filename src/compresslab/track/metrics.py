"""What a report's metrics are: which are timed, which are better lower, and reading a grouping key from a record."""

from __future__ import annotations

from typing import Any

from compresslab.measure.latency import DERIVED_TIMED_FIGURES, TIMED_FIGURES


#: Metrics where smaller is better (everything else: larger is better). A dotted metric
#: (``backends.onnxruntime.latency_ms_bN``) is judged by its last part (:func:`base_metric`).
LOWER_IS_BETTER = {"size_bytes", "params", "params_nonzero", "macs", "latency_ms_b1", "latency_ms_bN",
                   "latency_ms_b1_p90", "latency_ms_bN_p90", "latency_ms_b1_iqr", "latency_ms_bN_iqr",
                   "train_time_s", "perplexity", "nll_per_token"}


def base_metric(metric: str) -> str:
    """What a metric measures: its last dotted part (``backends.onnxruntime.speedup`` -> ``speedup``)."""
    return str(metric).rsplit(".", 1)[-1]


def lower_is_better(metric: str) -> bool:
    return base_metric(metric) in LOWER_IS_BETTER


def dotted(data: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def record_value(record: dict, key: str) -> Any:
    """A grouping key's value: an axis name (``distill``), a dotted path into the config, or
    several of these joined by ``+`` (``distill+quant`` -> ``kd/ptq_int8``)."""
    if "+" in key:
        return "/".join(str(record_value(record, part)) for part in key.split("+"))
    axes = record.get("axes") or {}
    if key in axes:
        return axes[key]
    return dotted(record.get("config") or {}, key)


#: Figures that come from the clock (the rest — sizes, MACs, accuracies — are exact); a dotted
#: metric (``backends.onnxruntime.speedup``) by its last part. Derived from the vocabulary of
#: :mod:`compresslab.measure.latency` (the ``_ci`` intervals are tabulated as their own columns).
LATENCY_METRICS = frozenset(k for k in TIMED_FIGURES + DERIVED_TIMED_FIGURES if not k.endswith("_ci"))


#: The student's exact figures that each backend has its own of besides the timed ones
#: (:data:`~compresslab.measure.latency.TIMED_FIGURES`): the file's accuracy in that backend and its size.
BACKEND_EXACT = ("acc_top1", "size_bytes")


#: Speed-ups with a 5-95% interval (``<key>_ci``), tabulated as ``<key>_ci_lo`` / ``<key>_ci_hi``.
CI_KEYS = ("speedup", "speedup_b1", "deployed_speedup", "deployed_speedup_b1")


def is_timed(metric: str) -> bool:
    return base_metric(metric) in LATENCY_METRICS
