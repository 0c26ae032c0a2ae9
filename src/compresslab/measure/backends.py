"""Timing deployment backends (ONNX Runtime) in the same rounds as the torch models.

:func:`contenders` puts ``<name>@<backend>`` beside the torch models into *one*
:func:`~compresslab.measure.latency.measure_latencies` call (same interleaved rounds, same thread
counts; ORT's intra-op threads follow the engine's), and :func:`attach` nests the figures under each
row's ``backends.<backend>`` and adds the student's ``deployed_speedup`` (the fastest backend's
student relative to the torch fp32 reference). The keys are listed in :mod:`compresslab.deploy.step`.
"""

from __future__ import annotations

from typing import Any, Mapping

from compresslab.errors import ConfigError
from compresslab.measure.latency import TIMED_FIGURES

#: suffix of the key under which each backend's student is timed against the *torch* reference
VS_TORCH = "#vs-torch-reference"


def load_backends(spec: Mapping[str, Mapping[str, str]] | None) -> dict[str, dict[str, Any]] | None:
    """The callables of :func:`onnx_files`' mapping (in the measuring process)."""
    if not spec:
        return None
    from compresslab.runtime.ort import OrtModel

    out: dict[str, dict[str, Any]] = {}
    for backend, files in spec.items():
        if backend != "onnxruntime":
            raise ConfigError(f"unknown backend {backend!r}")
        out[backend] = {name: OrtModel(path) for name, path in files.items()}
    return out


def contenders(models: Mapping[str, Any], backends: Mapping[str, Mapping[str, Any]]) -> tuple[dict, dict]:
    """All callables for one interleaved measurement, and each one's reference: torch models as they
    are (vs ``reference``), ``<name>@<backend>`` (vs ``reference@<backend>``), and the student of each
    backend once more as ``student@<backend>#vs-torch-reference`` (vs the torch ``reference``)."""
    timed = dict(models)
    refs = {n: "reference" for n in models if "reference" in models}
    for backend, runners in backends.items():
        for name, runner in runners.items():
            key = f"{name}@{backend}"
            timed[key] = runner
            if "reference" in runners:
                refs[key] = f"reference@{backend}"
        if "student" in runners and "reference" in models:
            timed[f"student@{backend}{VS_TORCH}"] = runners["student"]
            refs[f"student@{backend}{VS_TORCH}"] = "reference"
    return timed, refs


def backend_figures(backend: str, figures: Mapping[str, Any], gate: Mapping[str, Any]) -> dict[str, Any]:
    """One model's ``backends.<backend>`` block: its timed figures (:data:`TIMED_FIGURES`) and the
    session's threads; for onnxruntime also its intra-op threads, session settings and versions."""
    out = {k: figures[k] for k in TIMED_FIGURES if k in figures}
    out.update(threads_b1=gate["threads_b1"], threads_bN=gate["threads_bN"])
    if backend == "onnxruntime":
        from compresslab.runtime.ort import SETTINGS, versions

        out.update(intra_op_num_threads_b1=gate["threads_b1"], intra_op_num_threads_bN=gate["threads_bN"],
                   settings=dict(SETTINGS), versions=versions())
    return out


def set_deployed(student: dict, vs_torch_reference: Mapping[str, Mapping[str, Any]]) -> None:
    """``deployed_speedup`` / ``_ci`` / ``deployed_backend`` (and ``_b1``): the fastest of the torch
    student and each backend's student (``vs_torch_reference[backend]``: its speed-ups against the
    *torch* fp32 reference, timed in the same rounds)."""
    for tag, key in (("", "speedup"), ("_b1", "speedup_b1")):
        options = {"torch": (student[key], student.get(f"{key}_ci"))}
        for backend, vs in vs_torch_reference.items():
            if vs and key in vs:
                options[backend] = (vs[key], vs.get(f"{key}_ci"))
        best = max(options, key=lambda b: options[b][0])
        student[f"deployed_speedup{tag}"], student[f"deployed_speedup{tag}_ci"] = options[best]
        student[f"deployed_backend{tag}"] = best


def attach(rows: dict[str, dict], result: Mapping[str, Any], backends: Mapping[str, Mapping[str, Any]]) -> None:
    """Nest the per-backend figures of ``result`` under ``rows[name]["backends"]`` and add the
    student's ``deployed_speedup`` (see the module doc)."""
    figures, gate = result["models"], result["gate"]
    for name, row in rows.items():
        row["backends"] = {"torch": backend_figures("torch", row, gate)}
        row["backends"].update({backend: backend_figures(backend, figures[f"{name}@{backend}"], gate)
                                for backend, runners in backends.items() if name in runners})
    student = rows.get("student")
    if student is not None and "speedup" in student:
        set_deployed(student, {b: figures.get(f"student@{b}{VS_TORCH}") for b in backends})
