"""Every artifact kind, exported and checked: ``compresslab ... export.onnx=true
measure.backends=[torch,onnxruntime]`` for each compression method that writes its own artifact
format. Each run writes ``student.onnx``, the export check loads it in ONNX Runtime in a fresh
process against the ``.pt`` on the whole test split (top-1 agreement 1.0 for lossless kinds,
>= 0.995 for int8), and the ORT latency lands in results.json (issue #12)."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from compresslab.artifact import read_payload
from compresslab.pipeline import run_experiment

#: one run per artifact format: (overrides, the payload format, the kind the export records).
#: dense: every case's reference.onnx (asserted below); fused (fuse=bn): tests/test_deploy.py's pipeline run.
CASES = {
    "sparse": (["teacher=convnet", "prune=magnitude", "prune.at=0"], "compresslab.sparse/1", "sparse"),  # + a teacher
    "structured": (["student=convnet", "prune=structured", "prune.start=0"], "compresslab.structured/1",
                   "structured"),
    "lowrank_svd": (["lowrank=svd"], "compresslab.lowrank/1", "lowrank"),
    "lowrank_tucker": (["student=convnet", "lowrank=tucker", "lowrank.rank_mode=ratio",
                        "lowrank.rank_ratio=0.5", "lowrank.start_epoch=0"],
                       "compresslab.lowrank/1", "lowrank"),
    "lowbit_w2": (["quant=lowbit", "quant.bits=2"], "compresslab.lowbit/1", "lowbit"),
    "lsq_w4a4": (["quant=lsq"], "compresslab.actquant/1", "actquant"),
    "weight_shared": (["quant=weight_sharing", "quant.start_epoch=0"], "compresslab.shared/1", "weight_shared"),
    "ptq_int8": (["quant=ptq_int8"], "compresslab.int8_pt2e/1", "int8"),
    "qat_int8": (["quant=qat_int8"], "compresslab.int8_pt2e/1", "int8"),
    "ort_int8": (["quant=ort_int8"], "compresslab.onnx_qdq/1", "ort_int8"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_every_artifact_kind_exports_checks_and_times_in_onnxruntime(case, make_cfg):
    overrides, fmt, kind = CASES[case]
    teacher = [] if any(o.startswith("teacher=") for o in overrides) else ["teacher=none"]
    cfg = make_cfg([*teacher, "export.onnx=true", "measure.backends=[torch,onnxruntime]", *overrides])
    run_experiment(cfg)
    run_dir = Path(cfg.paths.run_dir)
    record = json.loads((run_dir / "results.json").read_text())  # what a researcher reads, not the return value
    assert record["status"] == "completed", record.get("error")
    student = record["student"]
    assert read_payload(run_dir / "artifacts" / "student.pt")["format"] == fmt
    info = student["onnx"]
    path = run_dir / "artifacts" / "student.onnx"
    assert Path(info["path"]) == path and path.stat().st_size == info["size_bytes"]
    assert info["kind"] == kind and info["checked_in"] == "fresh_process" and info["check_passed"] is True
    assert info["checked_inputs"] > 300  # the whole digits test split
    if info["lossless"]:
        # fp32 in both runtimes: only summation order differs (benchmarks/export_kinds.py measured <= 1.7e-5)
        assert info["top1_agreement"] == 1.0 and info["max_abs_diff"] < 1e-4
    else:
        assert info["top1_agreement"] >= 0.995
    # the batch dimension is dynamic: one graph serves batch 1 and batch N
    dim = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param and not dim.dim_value
    ort = student["backends"]["onnxruntime"]
    assert ort["latency_ms_b1"] > 0 and ort["latency_ms_bN"] > 0
    lo, hi = ort["speedup_ci"]
    assert lo <= ort["speedup"] <= hi  # vs the fp32 reference, also timed in ONNX Runtime
    assert ort["acc_top1"] == pytest.approx(info["acc_top1"]) and ort["size_bytes"] == info["size_bytes"]
    assert record["reference"]["onnx"]["kind"] == "dense" and record["reference"]["onnx"]["top1_agreement"] == 1.0
    assert student["deployed_backend"] in ("torch", "onnxruntime")
    if not teacher:  # the teacher is exported, checked and timed in both backends too
        t = record["teacher"]
        assert t["onnx"]["kind"] == "dense" and t["onnx"]["top1_agreement"] == 1.0 and t["onnx"]["check_passed"]
        assert t["backends"]["onnxruntime"]["latency_ms_bN"] > 0 and t["backends"]["torch"]["latency_ms_bN"] > 0
    if kind == "structured":
        assert student["params"] < record["reference"]["params"]  # the smaller shapes are what was exported
    if case == "lsq_w4a4":  # fake-quantized activations: one rounding step may differ between runtimes
        assert "activations fake-quantized" in info["weights"] and info["lossless"] is False
