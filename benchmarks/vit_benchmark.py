"""ViT benchmark on CPU: vit_tiny on digits, fp32 against every transformer compression of issue 26
— dynamic int8 (PT2E), weight-only int8 and int4 (torchao), 2:4 sparsity, 50% of the heads removed,
int8 QAT — with size, accuracy and latency at batch 1 and batch N in torch and in ONNX Runtime.

Every contender is a real ``compresslab`` run (``run_experiment``: train, compress, save, reload) of
the same recipe and seed; its artifact file is loaded back here, exported to ONNX with the
project's exporter (:func:`compresslab.deploy.export.export_payload`, what ``export=onnx`` writes),
and all torch and ORT contenders are timed in **one** interleaved
:func:`~compresslab.measure.latency.measure_latencies` session (rotating rounds, CPU clock, the
noise gate), every speed-up relative to torch fp32 with its bootstrap interval. Accuracy is the test
split (torch: the run's ``student.acc_top1``; ORT: the exported file on the same split).

    .venv/bin/python benchmarks/vit_benchmark.py                       # 15 epochs per run
    .venv/bin/python benchmarks/vit_benchmark.py --epochs 3 --rounds 3 # quicker
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_config import compose_run, ratio_cell  # noqa: E402

from compresslab.artifact import load_model_file, read_payload  # noqa: E402
from compresslab.deploy.export import export_payload  # noqa: E402
from compresslab.runtime.ort import OrtModel  # noqa: E402
from compresslab.measure.core import evaluate_accuracy  # noqa: E402
from compresslab.measure.latency import LatencySettings, measure_latencies  # noqa: E402
from compresslab.pipeline import build_datamodule, run_experiment  # noqa: E402

SETUPS = {
    "fp32": [],
    "dynamic int8": ["quant=dynamic_int8"],
    "weight-only int8": ["quant=weight_only", "quant.bits=8"],
    "weight-only int4": ["quant=weight_only", "quant.bits=4"],
    "2:4 sparse": ["prune=nm"],
    "heads 50%": ["prune=heads", "prune.ratio=0.5"],
    "int8 QAT": ["quant=qat_int8"],
}
REFERENCE = "torch fp32"


def run(out: Path, tag: str, overrides: list[str], epochs: int) -> tuple[dict, object]:
    """One pipeline run (a completed results.json is reused) and its config."""
    run_dir = out / tag.replace(" ", "_").replace(":", "").replace("%", "pct")
    cfg = compose_run(run_dir, out / "teachers", epochs, [
        "student=vit_tiny", "measure.latency_round_ms=2", "measure.latency_rounds=2", "measure.fresh_process=false",
        *overrides])
    done = run_dir / "results.json"
    if done.exists() and json.loads(done.read_text()).get("status") == "completed":
        return json.loads(done.read_text()), cfg
    start = time.perf_counter()
    record = run_experiment(cfg)
    print(f"  [{tag}] {record['status']} in {time.perf_counter() - start:.0f}s", flush=True)
    if record["status"] != "completed":
        raise RuntimeError(f"{tag}: {record.get('error')}")
    return record, cfg


def contenders(records: dict[str, dict], dm, work: Path) -> tuple[dict, dict]:
    """``{name: callable}`` and ``{name: facts}``: each artifact in torch and, exported, in ORT."""
    work.mkdir(parents=True, exist_ok=True)
    models, facts = {}, {}
    for tag, rec in records.items():
        path = Path(rec["student"]["artifact"])
        name = "torch fp32" if tag == "fp32" else f"torch {tag}"
        models[name] = load_model_file(path)
        facts[name] = {"bytes": path.stat().st_size, "acc": rec["student"]["acc_top1"],
                       "params": rec["student"]["params"], "macs": rec["student"]["macs"]}
        onnx_path = work / (path.parent.parent.name + ".onnx")
        ort_name = f"ORT {tag}"
        try:
            info = export_payload(read_payload(path), onnx_path, [dm.example_batch(32)])
        except Exception as exc:  # noqa: BLE001 - a contender ORT cannot take is reported, not fatal
            facts[name]["onnx"] = f"export failed: {type(exc).__name__}: {str(exc)[:120]}"
            continue
        models[ort_name] = OrtModel(onnx_path)
        with torch.no_grad():
            acc = evaluate_accuracy(models[ort_name], dm.test_dataloader())
        facts[ort_name] = {"bytes": onnx_path.stat().st_size, "acc": acc, "onnx_weights": info.get("weights")}
    return models, facts


def table(facts: dict, result: dict, batch: int) -> str:
    gate = result["gate"]
    lines = [f"vit_tiny on digits, batch N = {batch}; threads b1={gate['threads_b1']} bN={gate['threads_bN']}, "
             f"clock={gate['clock']}, reliable={gate['reliable']}" + (f" ({gate['reason']})" if gate["reason"] else ""),
             "", "| contender | bytes | test acc | params | MACs | ms b1 | ms bN | speed-up b1 vs torch fp32 | "
             "speed-up bN vs torch fp32 |", "|---|---|---|---|---|---|---|---|---|"]
    for name, row in result["models"].items():
        f = facts[name]
        lines.append(
            f"| {name} | {f['bytes']:,} | {f['acc']:.4f} | {f.get('params', '') and format(f['params'], ',')} | "
            f"{f.get('macs', '') and format(f['macs'], ',')} | {row['latency_ms_b1']:.3f} | {row['latency_ms_bN']:.2f} | "
            f"{ratio_cell(row.get('speedup_b1'), row.get('speedup_b1_ci'))} | "
            f"{ratio_cell(row.get('speedup'), row.get('speedup_ci'))} |")
    notes = [f"- {n}: ONNX {f['onnx']}" for n, f in facts.items() if "onnx" in f]
    notes += [f"- {n}: ONNX weights are {f['onnx_weights']}" for n, f in facts.items() if f.get("onnx_weights")]
    return "\n".join(lines + [""] + notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--round-ms", type=float, default=40.0)
    parser.add_argument("--only", nargs="+", choices=list(SETUPS), default=list(SETUPS))
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "benchmarks" / "vit")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    records, cfg = {}, None
    for tag in ["fp32"] + [t for t in args.only if t != "fp32"]:
        records[tag], cfg = run(args.out, tag, SETUPS[tag], args.epochs)
    dm = build_datamodule(cfg)
    dm.setup("fit")
    dm.setup("test")
    models, facts = contenders(records, dm, args.out / "onnx")
    settings = LatencySettings(warmup=5, rounds=args.rounds, round_ms=args.round_ms)
    result = measure_latencies(models, dm.example_batch(1), dm.example_batch(args.batch), settings,
                               references={n: REFERENCE for n in models}, twin=REFERENCE)
    text = table(facts, result, args.batch)
    print(text, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vit_benchmark.json").write_text(json.dumps({"facts": facts, "result": result}, indent=1, default=str))
    (args.out / "vit_benchmark.md").write_text(text + "\n")
    print(f"written: {args.out / 'vit_benchmark.md'}")


if __name__ == "__main__":
    main()
