"""``compresslab-measure``: re-measure the saved artifacts of many runs together, in one process.

Each job of a sweep measures its own teacher, reference and student, interleaved — so ratios
*within* a job are sound, but absolute milliseconds of two jobs come from two processes at two
moments on a machine whose load changed in between. This command loads every run's artifacts
into this one (fresh) process and times them all in the same interleaved rotating rounds
(:func:`compresslab.measure.latency.time_models`), so latencies are comparable *across* jobs.

Per run it writes a ``measured_together`` block into that run's ``results.json`` (the
training-time figures stay untouched)::

    measured_together:
      session: {id, measured_at, pid, runs, models, settings, threads_b1, threads_bN, clock,
                load, self_check, reliable, reason, input}
      teacher / reference / student: latency_ms_b1/_p90/_iqr, latency_ms_bN/..., speedup,
                speedup_ci, speedup_b1, speedup_b1_ci (vs the run's own reference),
                latency_reliable, latency_unreliable_reason

Runs whose config has ``measure.backends`` with ``onnxruntime`` and whose rows record their
exported ``<row>.onnx.path`` have those ``.onnx`` files loaded in ONNX Runtime
(:class:`compresslab.runtime.ort.OrtModel`, the per-job session settings) and timed in the same
rounds as the ``.pt`` files, which adds per row::

      <row>.backends.onnxruntime: latency_ms_b1/..., speedup, speedup_ci, speedup_b1, speedup_b1_ci
                (vs the run's reference *in ONNX Runtime*), threads_b1, threads_bN,
                intra_op_num_threads_b1/_bN, settings, versions, model_key
      <row>.backends.torch: the row's torch figures above
      student.deployed_speedup/_ci, deployed_backend, deployed_speedup_b1/_ci, deployed_backend_b1:
                the fastest backend's student vs the run's torch fp32 reference

Identical files (same bytes: the cached teacher, the references of jobs with one seed; ``.pt``
and ``.onnx`` alike) are loaded and timed once. Inputs are seeded standard-normal tensors of each artifact's recorded
input shape (latency of these models does not depend on the input values); runs whose inputs
differ in shape are timed in separate groups of rounds, each with its own reference twin.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from compresslab.measure.latency import LatencySettings, time_models

ROWS = ("teacher", "reference", "student")
#: Backends besides torch that compresslab-measure times (their files: ``<row>.onnx.path``).
ORT = "onnxruntime"

#: drops the records a caller can't use (``track.checks.usable_records``)
RecordFilter = Callable[[list[dict]], list[dict]]


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def completed_runs(paths: Sequence[Path], usable: RecordFilter | None = None) -> list[tuple[Path, dict]]:
    """(results.json path, record) of every completed run under ``paths`` whose artifacts exist.
    ``usable`` drops the records a caller can't trust (``track.checks.usable_records``, with its
    warnings: ``measure/`` sits below ``track/`` and does not import it)."""
    from compresslab.records import collect_job_results

    out = []
    for root in paths:
        records = collect_job_results(Path(root))
        for record in (usable(records) if usable is not None else records):
            path = Path(record.pop("_path"))
            ref, student = record.get("reference") or {}, record.get("student") or {}
            if record.get("status") == "completed" and ref.get("artifact") and student.get("artifact"):
                out.append((path, record))
    return out


def _resolve(results_path: Path, value: str) -> Path:
    path = Path(value)
    if not path.is_absolute() and not path.exists():
        path = results_path.parent / path
    return path


def wants_ort(record: dict) -> bool:
    """Whether the run asked for ONNX Runtime as a measured backend (``measure.backends``)."""
    return ORT in list((((record.get("config") or {}).get("measure") or {}).get("backends")) or [])


def plan(runs: list[tuple[Path, dict]]) -> tuple[dict[tuple, dict[str, Path]], dict[Path, dict[str, str]], list[str]]:
    """Which files to time: ``(groups, per_run, skipped)``. ``groups`` maps (input shape, batch)
    to {model key: file}, one key per distinct file (``.pt`` artifacts and, for runs with
    ``onnxruntime`` in ``measure.backends``, the rows' ``.onnx`` files); ``per_run`` maps a
    results.json to {row: model key} with the ONNX files under ``<row>@onnxruntime``;
    ``skipped`` says which files couldn't be timed and why."""
    from compresslab.artifact import read_payload
    from compresslab.runtime.ort import refuse_external_data
    from compresslab.errors import CheckpointError

    groups: dict[tuple, dict[str, Path]] = {}
    per_run: dict[Path, dict[str, str]] = {}
    skipped: list[str] = []
    for results_path, record in runs:
        rows = {}
        batch = int((record.get("student") or {}).get("latency_batch") or
                    ((record.get("config") or {}).get("measure") or {}).get("latency_batch") or 1)
        for row in ROWS:
            artifact = (record.get(row) or {}).get("artifact")
            if not artifact:
                continue
            path = _resolve(results_path, artifact)
            try:
                shape = tuple(int(v) for v in read_payload(path)["input_shape"])
            except Exception as exc:  # a Lightning checkpoint as teacher, a file gone: say so, time the rest
                skipped.append(f"{path}: {type(exc).__name__}: {exc}")
                continue
            key = f"{path.stem}@{_digest(path)}"
            groups.setdefault((shape, batch), {})[key] = path
            rows[row] = key
            onnx = ((record.get(row) or {}).get("onnx") or {}).get("path")
            if not wants_ort(record):
                continue
            if not onnx:
                skipped.append(f"{results_path}: {row} has no onnx.path (measure.backends has {ORT}; was it "
                               "exported with export.onnx=true?)")
                continue
            onnx_path = _resolve(results_path, onnx)
            if not onnx_path.is_file():
                skipped.append(f"{onnx_path}: no such ONNX file ({row} of {results_path}); not timed in {ORT}")
                continue
            try:
                refuse_external_data(onnx_path.read_bytes(), str(onnx_path))
            except CheckpointError as exc:  # a crafted or foreign file: say why, time the rest
                skipped.append(f"{exc} ({row} of {results_path}); not timed in {ORT}")
                continue
            onnx_key = f"{onnx_path.name}@{_digest(onnx_path)}"
            groups[(shape, batch)][onnx_key] = onnx_path
            rows[f"{row}@{ORT}"] = onnx_key
        if "reference" in rows and "student" in rows:
            per_run[results_path] = rows
    return groups, per_run, skipped


def _load(path: Path):
    """A callable for one file: an ONNX Runtime session wrapper for ``.onnx``, the module otherwise."""
    if path.suffix == ".onnx":
        from compresslab.runtime.ort import OrtModel

        return OrtModel(path)
    from compresslab.artifact import load_model_file

    return load_model_file(path).eval()


def run_block(measured, rows: dict[str, str], session: dict) -> dict[str, Any]:
    """One run's ``measured_together`` block from the session that timed its files (module doc);
    the backend blocks and the deployed speed-up as the per-job measurement writes them
    (:func:`compresslab.measure.backends.backend_figures`, :func:`~compresslab.measure.backends.set_deployed`)."""
    from compresslab.measure.backends import backend_figures, set_deployed

    gate = measured.gate(list(rows.values()))
    common = {"latency_reliable": gate["reliable"], "latency_unreliable_reason": gate["reason"],
              "latency_unreliable_short": gate["short_reason"], "threads_b1": gate["threads_b1"],
              "threads_bN": gate["threads_bN"], "latency_clock": gate["clock"]}
    block: dict[str, Any] = {"session": session}
    ref, ort_ref = rows["reference"], rows.get(f"reference@{ORT}")
    for row in ROWS:
        key = rows.get(row)
        if key is None:
            continue
        block[row] = {**measured.figures(key), **measured.speedups(key, ref), **common, "model_key": key}
        ort_key = rows.get(f"{row}@{ORT}")
        if ort_key is None:
            continue
        ort = {**measured.figures(ort_key), **(measured.speedups(ort_key, ort_ref) if ort_ref else {})}
        block[row]["backends"] = {"torch": {**backend_figures("torch", block[row], gate), "model_key": key},
                                  ORT: {**backend_figures(ORT, ort, gate), "model_key": ort_key}}
    ort_student = rows.get(f"student@{ORT}")
    if ort_student is not None:  # ORT's student vs the torch fp32 reference, from the same rounds
        set_deployed(block["student"], {ORT: measured.speedups(ort_student, ref)})
    return block


def measure_together(paths: Sequence[Path], settings: LatencySettings | None = None,
                     seed: int = 0, write: bool = True, usable: RecordFilter | None = None) -> dict[str, Any]:
    """Time the artifacts of every completed run under ``paths`` in this process, interleaved,
    and (``write``) add the ``measured_together`` block to each run's results.json.
    Returns ``{"session": ..., "runs": {results.json: block}, "skipped": [...]}``."""
    from compresslab.records import write_results

    runs = completed_runs(paths, usable)
    if not runs:
        raise SystemExit(f"no completed runs with saved artifacts under {', '.join(map(str, paths))}")
    if settings is None:
        settings = LatencySettings.from_config((runs[0][1].get("config") or {}).get("measure") or {})
    groups, per_run, skipped = plan(runs)
    session = {
        "id": uuid.uuid4().hex[:12], "measured_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "pid": os.getpid(), "runs": len(per_run), "models": sum(len(g) for g in groups.values()),
        "settings": asdict(settings), "input": f"seeded standard normal (seed {seed}) of each artifact's input shape",
        "backends": ["torch"] + ([ORT] if any(k.endswith(f"@{ORT}") for rows in per_run.values() for k in rows) else []),
        "groups": [],
    }
    sessions = {}
    gen = torch.Generator().manual_seed(seed)
    for (shape, batch), files in groups.items():
        models = {key: _load(path) for key, path in files.items()}
        refs = [rows["reference"] for rows in per_run.values() if rows["reference"] in files]
        twin = max(set(refs), key=refs.count) if refs else None
        ex1, exn = torch.randn((1, *shape), generator=gen), torch.randn((batch, *shape), generator=gen)
        sessions[(shape, batch)] = measured = time_models(models, ex1, exn, settings, twin)
        gate = measured.gate()
        session["groups"].append({"input_shape": list(shape), "batch": batch, "models": len(models), "twin": twin,
                                  **{k: gate[k] for k in ("threads_b1", "threads_bN", "clock", "load", "self_check",
                                                          "reliable", "reason")}})
    session["reliable"] = all(g["reliable"] for g in session["groups"])
    blocks = {}
    for results_path, rows in per_run.items():
        measured = next(s for s in sessions.values() if rows["student"] in s.timed["b1"])
        block = run_block(measured, rows, session)
        blocks[str(results_path)] = block
        if write:
            record = json.loads(results_path.read_text(encoding="utf-8"))
            record["measured_together"] = block
            write_results(results_path, record)
    return {"session": session, "runs": blocks, "skipped": skipped}


def measure_in_subprocess(paths: Sequence[Path], extra_args: Sequence[str] = (), timeout_s: float = 1800) -> int:
    """Run ``compresslab-measure`` on ``paths`` in a fresh Python process (so nothing the caller
    loaded or trained shares its memory or threads); returns its exit code."""
    entry = "import sys; from compresslab.cli import measure_main; measure_main(sys.argv[1:])"
    cmd = [sys.executable, "-c", entry, *map(str, paths), *extra_args]
    return subprocess.run(cmd, timeout=timeout_s, env={**os.environ, "PYTHONWARNINGS": "ignore"}).returncode


def print_measured(result: dict) -> None:
    """Print a :func:`measure_together` result: the session, its groups and each run's figures."""
    s = result["session"]
    print(f"measured together: {s['runs']} runs, {s['models']} distinct files, one process (pid {s['pid']}, "
          f"session {s['id']}), {s['settings']['rounds']} rounds x {s['settings']['round_ms']} ms, clock "
          f"{s['settings']['clock']}")
    for g in s["groups"]:
        state = "reliable" if g["reliable"] else f"UNRELIABLE: {g['reason']}"
        print(f"  input {g['input_shape']} batch {g['batch']}: {g['models']} models, threads b1/bN "
              f"{g['threads_b1']}/{g['threads_bN']}, self-check {g['self_check']}, {state}")
    for path, block in result["runs"].items():
        st = block["student"]
        lo, hi = st["speedup_ci"]
        flag = "" if st["latency_reliable"] else f"  (unreliable: {st['latency_unreliable_short']})"
        print(f"  {path}: student {st['latency_ms_b1']:.3f} ms b1, {st['latency_ms_bN']:.3f} ms bN, "
              f"speed-up {st['speedup']:.2f}x [{lo:.2f}, {hi:.2f}]{flag}")
        ort = (st.get("backends") or {}).get(ORT)
        if ort:
            within = (f", speed-up {ort['speedup']:.2f}x [{ort['speedup_ci'][0]:.2f}, {ort['speedup_ci'][1]:.2f}] "
                      f"vs the reference in {ORT}" if "speedup" in ort else "")
            print(f"    {ORT}: {ort['latency_ms_b1']:.3f} ms b1, {ort['latency_ms_bN']:.3f} ms bN{within}; deployed "
                  f"{st['deployed_speedup']:.2f}x ({st['deployed_backend']}) vs the torch fp32 reference")
    for line in result["skipped"]:
        print(f"  not timed: {line}")
