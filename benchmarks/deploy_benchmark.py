"""Deployment benchmark: how fast is the compressed model where it will run?

For resnet20, convnet and a structured-pruned resnet20 on digits, one trained fp32 student
(a real ``run_experiment``) becomes every contender of the deployment table:

- torch fp32 (the reference of every speed-up), torch fp32 with ``fuse=bn`` (BatchNorm folded);
- torch int8: our PT2E ``ptq_int8`` on oneDNN kernels, and the same graph through ``torch.compile``
  (inductor's x86 int8 lowering, ``freezing=True``) with ``--compile``;
- ONNX Runtime fp32 (exported), ORT fp32 of the BN-folded model;
- ORT int8, ours: the PT2E int8 exported as QDQ, exact graph and completed for ORT fusion;
- ORT int8 by ORT's own ``quantize_static``: its default (QDQ S8S8 per-tensor) and U8S8 per-channel.

All contenders are timed in **one** :func:`compresslab.measure.latency.measure_latencies` call
(interleaved rotating rounds, CPU clock, 1 thread at batch 1, physical cores - 1 at batch N when idle),
first on the machine as it is ("idle"), then with one busy-loop process per core ("loaded").
Accuracy is the test split; bytes are the files (``.pt`` for torch, ``.onnx`` for ORT).

    .venv/bin/python benchmarks/deploy_benchmark.py                       # all three models
    .venv/bin/python benchmarks/deploy_benchmark.py --models resnet20 --epochs 5 --no-load
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_config import compose_run  # noqa: E402

from compresslab.artifact import load_model_file, read_payload  # noqa: E402
from compresslab.files import atomic_torch_save  # noqa: E402
from compresslab.compress.fuse.bn import fold_bn  # noqa: E402
from compresslab.compress.codecs import int8_pt2e  # noqa: E402
from compresslab.compress.quant.ptq import PTQInt8  # noqa: E402
from compresslab.compress.quant.ort_int8 import quantize_with_ort  # noqa: E402
from compresslab.deploy.export import export_payload  # noqa: E402
from compresslab.runtime.onnx_export import onnx_bytes  # noqa: E402
from compresslab.runtime.ort import OrtModel, optimized_ops  # noqa: E402
from compresslab.measure.core import evaluate_accuracy  # noqa: E402
from compresslab.measure.latency import LatencySettings, measure_latencies, physical_cores  # noqa: E402
from compresslab.pipeline import build_datamodule, run_experiment  # noqa: E402

SETUPS = {
    "resnet20": ["student=resnet20"],
    "convnet": ["student=convnet"],
    "resnet20_structured": ["student=resnet20", "prune=structured"],
}
REFERENCE = "torch fp32"


def train(out: Path, tag: str, overrides: list[str], epochs: int):
    """The trained fp32 student of one pipeline run (reused when the run exists) and its datamodule."""
    run_dir = out / tag
    cfg = compose_run(run_dir, out / "teachers", epochs, [
        "measure.latency_round_ms=2", "measure.latency_rounds=2", "measure.fresh_process=false", *overrides])
    done = run_dir / "results.json"
    if not (done.exists() and json.loads(done.read_text()).get("status") == "completed"):
        run_experiment(cfg)
    dm = build_datamodule(cfg)
    dm.setup("fit")
    return run_dir / "artifacts" / "student.pt", dm


def _busy(stop) -> None:
    while not stop.is_set():
        sum(i * i for i in range(10000))


class Load:
    """One busy-loop process per CPU while the block runs."""

    def __enter__(self):
        self.stop = mp.Event()
        self.procs = [mp.Process(target=_busy, args=(self.stop,), daemon=True) for _ in range(os.cpu_count() or 1)]
        for p in self.procs:
            p.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for p in self.procs:
            p.join(5)


def contenders(student_pt: Path, dm, work: Path, compile_int8: bool) -> tuple[dict, dict]:
    """``{name: callable}`` and ``{name: facts}`` (bytes, accuracy, ORT operators) for one model."""
    work.mkdir(parents=True, exist_ok=True)
    fp32 = load_model_file(student_pt).eval()
    shape = list(dm.input_shape)
    example = torch.zeros(2, *shape)
    fused, pairs = fold_bn(fp32, dm.example_batch(8))
    # our int8 is the project's quant=ptq_int8 (its defaults: 16 training batches), applied to this
    # student and saved as the pipeline saves it; both ORT forms are exported from that saved file
    method = PTQInt8("ptq_int8")
    method.quantize(fp32, dm)
    context = {"arch": read_payload(student_pt)["arch"], "input_shape": shape, "num_classes": dm.num_classes}
    int8_pt = work / "int8.pt"
    atomic_torch_save(method.export(fp32, context), int8_pt)
    int8 = load_model_file(int8_pt)
    calibration = method.calibration
    files = {"ort fp32": onnx_bytes(fp32, example), "ort fp32 fuse=bn": onnx_bytes(fused, example)}
    for name, complete in (("ort int8 ours (exact PT2E QDQ)", False), ("ort int8 ours (QDQ completed)", True)):
        out = work / f"int8_{'completed' if complete else 'exact'}.onnx"
        export_payload(read_payload(int8_pt), out, calibration, {"int8_complete_qdq": complete})
        files[name] = out.read_bytes()
    files["ort int8 ort_int8 S8S8 default"] = quantize_with_ort(fp32, shape, calibration, "int8", "int8", False)
    files["ort int8 ort_int8 U8S8 per-channel"] = quantize_with_ort(fp32, shape, calibration)
    models = {REFERENCE: fp32, "torch fp32 fuse=bn": fused, "torch int8 (PT2E, oneDNN)": int8}
    facts = {REFERENCE: {"bytes": student_pt.stat().st_size}, "torch fp32 fuse=bn": {"bn_folded": len(pairs)},
             "torch int8 (PT2E, oneDNN)": {"bytes": int8_pt.stat().st_size}}
    if compile_int8:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        reference_graph = int8_pt2e.rebuild_converted(read_payload(int8_pt))
        from torchao.quantization.pt2e import allow_exported_model_train_eval

        allow_exported_model_train_eval(reference_graph)  # the accuracy loop and the engine call .eval()
        compiled = torch.compile(reference_graph, dynamic=False)
        start = time.perf_counter()
        try:
            with torch.no_grad():
                for batch in (1, 256):
                    compiled(dm.example_batch(batch))
            models["torch int8 + torch.compile (inductor)"] = compiled
            facts["torch int8 + torch.compile (inductor)"] = {"bytes": int8_pt.stat().st_size,
                                                              "compile_s": round(time.perf_counter() - start, 1)}
        except Exception as exc:  # noqa: BLE001 - reported, the other contenders still run
            print(f"torch.compile of the int8 graph failed: {type(exc).__name__}: {exc}", flush=True)
    for name, data in files.items():
        path = work / (name.replace(" ", "_").replace("(", "").replace(")", "").replace("=", "") + ".onnx")
        path.write_bytes(data)
        models[name] = OrtModel(path)
        ops = optimized_ops(path)
        facts[name] = {"bytes": path.stat().st_size,
                       "ort_ops": {k: v for k, v in ops.items() if k in ("QLinearConv", "QLinearAdd", "Conv",
                                                                        "FusedConv", "QGemm", "Gemm")}}
    for name, model in models.items():
        with torch.no_grad():
            facts[name]["acc"] = evaluate_accuracy(model, dm.test_dataloader())  # OrtModel too: a callable
    return models, facts


def measure(models: dict, dm, batch: int, rounds: int, round_ms: float) -> dict:
    settings = LatencySettings(warmup=5, rounds=rounds, round_ms=round_ms)
    return measure_latencies(models, dm.example_batch(1), dm.example_batch(batch), settings,
                             references={n: REFERENCE for n in models}, twin=REFERENCE)


def table(title: str, facts: dict, result: dict) -> str:
    gate = result["gate"]
    lines = [f"**{title}** — threads b1={gate['threads_b1']} bN={gate['threads_bN']}, clock={gate['clock']}, "
             f"reliable={gate['reliable']}" + (f" ({gate['reason']})" if gate["reason"] else ""), "",
             "| contender | bytes | acc | ms b1 | ms bN | speed-up b1 / bN vs torch fp32 | ORT ops |",
             "|---|---|---|---|---|---|---|"]
    for name, row in result["models"].items():
        f = facts[name]
        ops = ", ".join(f"{k} {v}" for k, v in f.get("ort_ops", {}).items())
        lines.append(f"| {name} | {f.get('bytes', '') and format(f['bytes'], ',')} | {f['acc']:.4f} | "
                     f"{row['latency_ms_b1']:.3f} | {row['latency_ms_bN']:.2f} | "
                     f"{row['speedup_b1']:.2f} [{row['speedup_b1_ci'][0]:.2f}, {row['speedup_b1_ci'][1]:.2f}] / "
                     f"{row['speedup']:.2f} [{row['speedup_ci'][0]:.2f}, {row['speedup_ci'][1]:.2f}] | {ops} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--round-ms", type=float, default=30.0)
    parser.add_argument("--no-load", action="store_true", help="skip the loaded-machine measurement")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the int8 graph")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "benchmarks" / "deploy")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    report, data = [], {}
    for tag in args.models:
        student_pt, dm = train(args.out, tag, SETUPS[tag], args.epochs)
        models, facts = contenders(student_pt, dm, args.out / tag / "deploy", not args.no_compile)
        data[tag] = {"facts": facts}
        for state in ("idle", "loaded") if not args.no_load else ("idle",):
            if state == "loaded":
                with Load():
                    result = measure(models, dm, args.batch, args.rounds, args.round_ms)
            else:
                result = measure(models, dm, args.batch, args.rounds, args.round_ms)
            data[tag][state] = result
            text = table(f"{tag}, digits, batch N = {args.batch}, {state} machine "
                         f"(physical cores {physical_cores()})", facts, result)
            report.append(text)
            print(text + "\n", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "deploy_benchmark.json").write_text(json.dumps(data, indent=1, default=str))
    (args.out / "deploy_benchmark.md").write_text("\n\n".join(report) + "\n")
    print(f"written: {args.out / 'deploy_benchmark.md'}")


if __name__ == "__main__":
    main()
