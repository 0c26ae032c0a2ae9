"""Every artifact kind exported to ONNX and checked, with its latency in both backends.

One real pipeline run per artifact format (``run_experiment`` on a config composed from ``conf/``
with ``export.onnx=true measure.backends=[torch,onnxruntime]``, digits, ``teacher=none``), then one
table from the runs' results.json: the export check done in a fresh process on the whole test split
(top-1 agreement, max |logit difference|, accuracy in ORT and in torch), the file sizes, and the
latency of the student in torch and in ONNX Runtime with the speed-ups *within* each backend (vs the
run's fp32 reference in the same backend) and the deployed speed-up (the best backend vs torch fp32).
Each run's timing is its own interleaved session (its student and reference, both backends); ratios
compare within a row, not milliseconds across rows.

    .venv/bin/python benchmarks/export_kinds.py [--epochs 6] [--only int8,lowbit] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_config import ratio_cell  # noqa: E402

#: case -> overrides (the resnet20 / convnet rows need BatchNorm or residual structure)
CASES = {
    "dense": ["student=convnet"],
    "fused (fuse=bn)": ["student=convnet", "fuse=bn"],
    "sparse (magnitude 90%)": ["student=convnet", "prune=magnitude", "prune.at=2"],
    "structured (ratio 0.5)": ["student=resnet20", "prune=structured", "prune.start=2"],
    "lowrank svd": ["student=convnet", "lowrank=svd"],
    "lowrank tucker": ["student=resnet20", "lowrank=tucker", "lowrank.rank_mode=ratio", "lowrank.rank_ratio=0.5",
                       "lowrank.start_epoch=2"],
    "lowrank cp": ["student=resnet20", "lowrank=cp", "lowrank.start_epoch=2"],
    "lowbit W4": ["student=convnet", "quant=lowbit"],
    "ternary": ["student=convnet", "quant=ternary"],
    "lsq W4A4": ["student=convnet", "quant=lsq"],
    "weight sharing": ["student=convnet", "quant=weight_sharing"],
    "ptq_int8": ["student=resnet20", "quant=ptq_int8"],
    "qat_int8": ["student=resnet20", "quant=qat_int8"],
    "ort_int8": ["student=resnet20", "quant=ort_int8"],
}


def run_case(name: str, overrides: list[str], out: Path, epochs: int) -> dict:
    from bench_config import compose_run

    from compresslab.pipeline import run_experiment

    run_dir = out / "".join(c if c.isalnum() else "_" for c in name)
    done = run_dir / "results.json"
    if done.exists() and json.loads(done.read_text()).get("status") == "completed":
        return json.loads(done.read_text())
    cfg = compose_run(run_dir, out / "teachers", epochs, [
        "export.onnx=true", "measure.backends=[torch,onnxruntime]", "measure.threads_bN=1", *overrides])
    try:
        run_experiment(cfg)
    except Exception as exc:  # noqa: BLE001 - a failed kind is a row of the table
        print(f"{name}: {type(exc).__name__}: {exc}", flush=True)
    return json.loads(done.read_text()) if done.exists() else {"status": "failed"}


def row(name: str, record: dict) -> str:
    if record.get("status") != "completed":
        return f"| {name} | **{record.get('status')}**: {str(record.get('error'))[:160]} |" + " |" * 10
    st = record["student"]
    onnx, ort, torch_ = st["onnx"], st["backends"]["onnxruntime"], st["backends"]["torch"]
    reliable = "yes" if st.get("latency_reliable") else f"no ({st.get('latency_unreliable_short')})"
    return (f"| {name} | {onnx['kind']} | {onnx['top1_agreement']:.4f} | {onnx['max_abs_diff']:.2g} "
            f"| {onnx['acc_top1']:.4f} / {onnx['acc_top1_torch']:.4f} | {st['size_bytes']:,} / {onnx['size_bytes']:,} "
            f"| {torch_['latency_ms_b1']:.3f} / {torch_['latency_ms_bN']:.2f} "
            f"| {ort['latency_ms_b1']:.3f} / {ort['latency_ms_bN']:.2f} "
            f"| {ratio_cell(torch_['speedup'], torch_['speedup_ci'])} | {ratio_cell(ort['speedup'], ort['speedup_ci'])} "
            f"| {ratio_cell(st['deployed_speedup_b1'])} ({st['deployed_backend_b1']}) / {ratio_cell(st['deployed_speedup'])} "
            f"({st['deployed_backend']}) | {reliable} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--only", default="", help="comma-separated substrings of case names")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "benchmarks" / "export_kinds")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    cases = {k: v for k, v in CASES.items() if not args.only or any(s in k for s in args.only.split(","))}
    start = time.time()
    records = {name: run_case(name, overrides, args.out, args.epochs) for name, overrides in cases.items()}
    batch = next((r["config"]["measure"]["latency_batch"] for r in records.values() if r.get("config")), "N")
    lines = [f"`.venv/bin/python benchmarks/export_kinds.py --epochs {args.epochs}`: digits, teacher=none, "
             f"{len(records)} runs in {(time.time() - start) / 60:.1f} min; latency: each run's own session, "
             f"1 thread, batch 1 / batch {batch}.", "",
             f"| case | kind | top-1 agreement | max abs diff | acc ORT / torch | bytes .pt / .onnx | torch ms b1 / b{batch} "
             f"| ORT ms b1 / b{batch} | speed-up b{batch} torch | speed-up b{batch} ORT | deployed b1 / b{batch} "
             "| reliable |", "|" + "---|" * 12]
    lines += [row(name, record) for name, record in records.items()]
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "export_kinds.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
