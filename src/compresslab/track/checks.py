"""Which results records a report can use: every record is checked before it is tabulated.

A record with a field of the wrong shape (``axes`` a string), a metric that is not a finite number
(``NaN``, ``1e400`` read back as ``inf``, a string) or a ``schema_version`` this code does not read
is skipped with a warning naming its file and the field (:func:`usable_records`), instead of
killing the report, being bolded as best, or being counted as a completed run.
:func:`unknown_key` tells a ``--rows`` / ``--cols`` key that no run has from one that some lack.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

from compresslab.track.metrics import LATENCY_METRICS, LOWER_IS_BETTER, record_value

#: results.json schema versions this code reads (track/results.py documents them; later ones extend).
READABLE_SCHEMA_VERSIONS = (1, 2, 3)
#: Top-level fields that are objects when present.
OBJECT_FIELDS = ("axes", "config", "teacher", "reference", "student", "measured_together")
#: Row fields that are numbers when present (besides any float, which must be finite).
NUMERIC_FIELDS = LOWER_IS_BETTER | LATENCY_METRICS | {
    "acc_top1", "acc_top1_last", "acc_top1_fit", "val_acc_top1", "size_ratio", "sparsity",
    "expected_speedup_macs", "expected_speedup_bytes", "weight_bytes", "epochs_run", "best_epoch"}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _row_problem(row: Any, where: str) -> str | None:
    """The first bad field of one row (``student``, ``student.backends.onnxruntime``...), or None."""
    if row is None:
        return None
    if not isinstance(row, dict):
        return f"{where} is a {type(row).__name__}, not an object"
    for key, value in row.items():
        if key == "backends" and value is not None:
            if not isinstance(value, dict):
                return f"{where}.backends is a {type(value).__name__}, not an object"
            for backend, figures in value.items():
                problem = _row_problem(figures, f"{where}.backends.{backend}")
                if problem:
                    return problem
        elif isinstance(value, float) and not math.isfinite(value):
            return f"{where}.{key} is {value} (not a finite number)"
        elif key in NUMERIC_FIELDS and value is not None and not _is_number(value):
            return f"{where}.{key} is {value!r} (a {type(value).__name__}, not a number)"
    return None


def record_problem(record: dict) -> str | None:
    """Why ``record`` can't be tabulated, naming the field; None for a usable record."""
    if record.get("status") == "unreadable":
        return str(record.get("error"))
    version = record.get("schema_version")
    if version is not None and (isinstance(version, bool) or version not in READABLE_SCHEMA_VERSIONS):
        return (f"schema_version is {version!r}; this compresslab reads versions "
                f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))} (a newer compresslab wrote it?)")
    if not isinstance(record.get("status"), str):
        return f"status is {record.get('status')!r}, not a string"
    for field in OBJECT_FIELDS:
        value = record.get(field)
        if value is not None and not isinstance(value, dict):
            return f"{field} is a {type(value).__name__} ({str(value)[:40]!r}), not an object"
    if record["status"] != "completed":
        return None
    if not _is_number((record.get("student") or {}).get("acc_top1")):
        return f"student.acc_top1 is {(record.get('student') or {}).get('acc_top1')!r} in a completed run"
    together = record.get("measured_together") or {}
    for where, row in [(r, record.get(r)) for r in ("teacher", "reference", "student")] + \
            [(f"measured_together.{r}", together.get(r)) for r in ("teacher", "reference", "student")]:
        problem = _row_problem(row, where)
        if problem:
            return problem
    return None


def usable_records(records: Iterable[dict], warn: Callable[[str], Any]) -> list[dict]:
    """``records`` without those :func:`record_problem` refuses, each reported through ``warn``
    with its file (``_path``, or the run dir / W&B run) and the field."""
    out = []
    for record in records:
        problem = record_problem(record)
        if problem:
            where = record.get("_path") or record.get("run_dir") or record.get("run_id") or "a record"
            warn(f"skipped {where}: {problem}")
        else:
            out.append(record)
    return out


def unknown_key(records: Iterable[dict], key: str) -> str | None:
    """The part of a grouping key (``distill``, ``prune.final_sparsity``, ``distill+quant``) that no
    completed record has as an axis or config key, or None."""
    completed = [r for r in records if r.get("status") == "completed"]
    for part in key.split("+"):
        if completed and all(record_value(r, part) is None for r in completed):
            return part
    return None
