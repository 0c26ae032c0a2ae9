"""results.json files as files: written atomically, read back, and collected from a sweep's job dirs.

A leaf (it imports nothing of compresslab above ``files``), so both :mod:`compresslab.track.results`
(which assembles a record) and :mod:`compresslab.measure.together` (which adds the sweep-level
figures to every job's record) use it without importing each other.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

from compresslab.files import atomic_write_bytes


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):  # numpy / torch scalars
        return _jsonable(value.item())
    return str(value)


def write_results(path: Path, record: Mapping[str, Any]) -> Path:
    """Write ``record`` as JSON to ``path`` atomically (temp file in the same dir + rename)."""
    text = json.dumps(_jsonable(record), indent=2, sort_keys=False) + "\n"
    return atomic_write_bytes(Path(path), text.encode("utf-8"))


def read_results(path: Path) -> dict:
    """Read one results.json."""
    return json.loads(Path(path).read_text())


def collect_job_results(sweep_dir: Path, job_dirs: Iterable[Path] = ()) -> list[dict]:
    """Every ``results.json`` under ``sweep_dir`` (one per job), in job order (``2/`` before ``10/``).

    ``job_dirs`` are the directories of jobs that were launched: one without a results.json
    (a job that died before writing it) is listed as failed, so no launched job goes uncounted.
    A results.json that can't be read or parsed is kept as ``status: unreadable`` with the reason.
    """
    paths = {p.resolve() for p in Path(sweep_dir).rglob("results.json")}
    paths |= {(Path(d) / "results.json").resolve() for d in job_dirs}
    records = []
    for path in sorted(paths, key=_natural_key):
        if not path.exists():
            record = {"status": "failed", "error": f"the job left no results.json (see {path.parent}/*.log)"}
        else:
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(record, dict):
                    raise ValueError(f"holds a JSON {type(record).__name__}, not an object")
            except (OSError, ValueError) as exc:  # ValueError: bad UTF-8 or JSON
                record = {"status": "unreadable", "error": f"{type(exc).__name__}: {exc}"}
        record["_path"] = str(path)
        records.append(record)
    return records


def _natural_key(path: Path) -> tuple:
    """Sort key comparing numeric path parts as numbers."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.parts)
