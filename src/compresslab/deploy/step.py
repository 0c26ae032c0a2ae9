"""The pipeline's deployment step: export, check, and ONNX Runtime as a measured backend.

Called from :mod:`compresslab.pipeline` at three points:

1. :func:`validate` (before any training): the ``export`` / ``measure.backends`` settings.
2. :func:`export_step` (after the artifacts are saved): ``artifacts/<name>.onnx`` for the student,
   the reference and the teacher, each checked against its ``.pt`` in a fresh process
   (:mod:`compresslab.deploy.check`) on the test split; a failed check raises
   :class:`~compresslab.deploy.check.ExportCheckError`, which fails the run.
3. measurement: :func:`onnx_files` names the exported files that
   :mod:`compresslab.measure.backends` times beside the torch models in the same interleaved rounds,
   and :func:`merge` puts the export/check figures under ``<name>.onnx`` and ``<name>.backends.<backend>``.

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
from typing import Mapping, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from compresslab.errors import ConfigError

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime")


def export_enabled(cfg: DictConfig) -> bool:
    node = cfg.get("export")
    return bool(node is not None and node.get("onnx", False))


def validate(cfg: DictConfig) -> None:
    """Clear errors for impossible export/backend settings, before any training."""
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


def export_step(cfg: DictConfig, files: Mapping[str, Path | None], models: Mapping[str, torch.nn.Module],
                datamodule, calibration: Sequence[torch.Tensor], artifacts: Path) -> dict[str, dict]:
    """Export and check every model (see the module doc); returns ``{name: onnx info}``.
    ``calibration``: the student's methods' ``calibration_data()``, handed to its codec's ONNX form."""
    import tempfile

    from compresslab.artifact import read_payload, save_model_file
    from compresslab.deploy import check as chk
    from compresslab.deploy.export import export_module, export_payload
    from compresslab.runtime.ort import optimized_ops
    from compresslab.config_utils import arch_spec

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
                options = OmegaConf.to_container(node, resolve=True)
                infos[name] = export_payload(read_payload(path), onnx_path,
                                             calibration if name == "student" else [], options, opset)
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
