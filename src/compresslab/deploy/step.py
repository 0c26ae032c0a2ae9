"""The pipeline's deployment step: export, check, and ONNX Runtime as a measured backend.

Called from :mod:`compresslab.pipeline` at three points:

1. :func:`validate` (before any training): the ``export`` / ``fuse`` / ``measure.backends`` settings.
2. :func:`export_step` (after the artifacts are saved): ``artifacts/<name>.onnx`` for the student,
   the reference and the teacher, each checked against its ``.pt`` in a fresh process
   (:mod:`compresslab.deploy.check`) on the test split; a failed check raises
   :class:`~compresslab.deploy.check.ExportCheckError`, which fails the run.
3. measurement: :func:`contenders` / :func:`attach` put ``<name>@onnxruntime`` beside the torch
   models into *one* :func:`~compresslab.measure.latency.measure_latencies` call (same interleaved
   rounds, same thread counts; ORT's intra-op threads follow the engine's), and :func:`merge` puts
   the figures under ``<name>.backends.<backend>`` in results.json.

results.json keys (per model ``teacher`` / ``reference`` / ``student``):

- ``<name>.onnx``: ``path``, ``size_bytes``, ``kind``, ``weights``, ``lossless``, ``opset``, ``exporter``,
  ``max_abs_diff``, ``top1_agreement``, ``acc_top1`` (ORT), ``acc_top1_torch``, ``checked_inputs``,
  ``int8_added_qdq`` / ``int8_qdq`` (int8), ``ort_ops`` (the operators ORT runs after its fusions);
- ``<name>.backends.<backend>``: ``latency_ms_b1``/``_p90``/``_iqr``, the same for ``bN``,
  ``speedup``/``speedup_b1`` (+ ``_ci``) relative to the reference *in the same backend*, ``threads_b1``,
  ``threads_bN``, ``acc_top1``, ``size_bytes``; for onnxruntime also ``settings`` and ``versions``;
- ``student.deployed_speedup`` / ``_ci`` / ``deployed_backend`` (batch N) and ``deployed_speedup_b1`` /
  ``_ci`` / ``deployed_backend_b1``: the fastest backend's student relative to the torch fp32 reference.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf

from compresslab.errors import ConfigError
from compresslab.measure.latency import TIMED_FIGURES

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime")
VS_TORCH = "#vs-torch-reference"


def export_enabled(cfg: DictConfig) -> bool:
    node = cfg.get("export")
    return bool(node is not None and node.get("onnx", False))


def validate(cfg: DictConfig) -> None:
    """Clear errors for impossible export/backend/fuse settings, before any training."""
    from compresslab.compress.fuse import check_fuse_combination

    check_fuse_combination(cfg)
    backends = list(cfg.measure.get("backends") or ["torch"])
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ConfigError(f"measure.backends: unknown backend(s) {unknown}; choose from {list(BACKENDS)}")
    if "torch" not in backends:
        raise ConfigError("measure.backends must include torch (every artifact is measured in torch; "
                          "the others are timed beside it)")
    if len(set(backends)) != len(backends):
        raise ConfigError(f"measure.backends lists a backend twice: {backends}")
    if "onnxruntime" in backends and not export_enabled(cfg):
        raise ConfigError("measure.backends=[torch,onnxruntime] times the exported .onnx files: add export.onnx=true")
    if not export_enabled(cfg):
        return
    node = cfg.export
    opset = node.get("opset", 18)
    if isinstance(opset, bool) or not isinstance(opset, int) or not 17 <= opset <= 23:
        raise ConfigError(f"export.opset must be an integer opset 17..23, got {opset!r}")
    check = node.get("check") or {}
    agree = check.get("min_top1_agreement", 0.995)
    if isinstance(agree, bool) or not isinstance(agree, (int, float)) or not 0.0 <= agree <= 1.0:
        raise ConfigError(f"export.check.min_top1_agreement must be in [0, 1], got {agree!r}")
    tol = check.get("max_abs_diff_lossless", 1e-3)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or tol < 0:
        raise ConfigError(f"export.check.max_abs_diff_lossless must be >= 0, got {tol!r}")
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"export.onnx=true needs onnx, onnxruntime and onnxscript ({exc}); "
                          "they are compresslab dependencies: pip install -e .") from exc


def _calibration_of(methods) -> list[torch.Tensor]:
    for method in methods:
        batches = getattr(method, "calibration", None)
        if batches:
            return list(batches)
    return []


def export_step(cfg: DictConfig, files: Mapping[str, Path | None], models: Mapping[str, torch.nn.Module],
                datamodule, methods, artifacts: Path) -> dict[str, dict]:
    """Export and check every model (see the module doc); returns ``{name: onnx info}``."""
    import tempfile

    from compresslab.artifact import read_payload, save_model_file
    from compresslab.deploy import check as chk
    from compresslab.deploy.export import export_module, export_payload
    from compresslab.deploy.ort import optimized_ops
    from compresslab.teacher import arch_spec

    node = cfg.export
    opset = int(node.get("opset", 18))
    infos: dict[str, dict] = {}
    pairs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="compresslab-export-") as tmp:
        for name, path in files.items():
            onnx_path = Path(artifacts) / f"{name}.onnx"
            if path is None:  # a teacher from a user's Lightning checkpoint: no compresslab file
                path = save_model_file(Path(tmp) / f"{name}.pt", models[name], arch_spec(cfg[name]),
                                       datamodule.input_shape, datamodule.num_classes)
                infos[name] = export_module(models[name], datamodule.input_shape, onnx_path, opset)
            else:
                calibration = _calibration_of(methods) if name == "student" else []
                infos[name] = export_payload(read_payload(path), onnx_path, calibration,
                                             bool(node.get("int8_complete_qdq", True)), opset)
            infos[name]["ort_ops"] = optimized_ops(onnx_path)
            pairs[name] = {"pt": str(path), "onnx": str(onnx_path)}
        xs, ys = [], []
        for x, y in datamodule.test_dataloader():
            xs.append(x.cpu())
            ys.append(y.cpu())
        checked = chk.run_check(pairs, torch.cat(xs), torch.cat(ys))
    check = node.get("check") or {}
    failures = []
    for name, info in infos.items():
        info.update(checked[name])
        why = chk.verdict(name, info, float(check.get("min_top1_agreement", 0.995)),
                          float(check.get("max_abs_diff_lossless", 1e-3)))
        info["check_passed"] = why is None
        if why:
            failures.append(why)
        log.info("export: %s.onnx (%s) top-1 agreement %.4f, max abs diff %.3g, ORT acc %.4f", name, info["kind"],
                 info["top1_agreement"], info["max_abs_diff"], info["acc_top1"])
    if failures:
        raise chk.ExportCheckError("export check failed: " + "; ".join(failures))
    return infos


def onnx_files(infos: Mapping[str, Mapping] | None, cfg: DictConfig) -> dict[str, dict[str, Path]] | None:
    """``{backend: {name: onnx path}}`` for the non-torch backends of ``measure.backends``."""
    if not infos or "onnxruntime" not in list(cfg.measure.get("backends") or []):
        return None
    return {"onnxruntime": {name: Path(info["path"]) for name, info in infos.items()}}


def load_backends(spec: Mapping[str, Mapping[str, str]] | None) -> dict[str, dict[str, Any]] | None:
    """The callables of :func:`onnx_files`' mapping (in the measuring process)."""
    if not spec:
        return None
    from compresslab.deploy.ort import OrtModel

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
        from compresslab.deploy.ort import SETTINGS, versions

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


def merge(record_rows: dict[str, dict | None], infos: Mapping[str, dict] | None) -> None:
    """Put the export/check figures under ``<name>.onnx`` and the ORT accuracy and file size under
    ``<name>.backends.onnxruntime`` (the torch ones under ``backends.torch``)."""
    if not infos:
        return
    for name, info in infos.items():
        row = record_rows.get(name)
        if not row:
            continue
        row["onnx"] = dict(info)
        backends = row.setdefault("backends", {})
        backends.setdefault("torch", {}).update(acc_top1=row.get("acc_top1"), size_bytes=row.get("size_bytes"))
        backends.setdefault("onnxruntime", {}).update(acc_top1=info["acc_top1"], size_bytes=info["size_bytes"])
