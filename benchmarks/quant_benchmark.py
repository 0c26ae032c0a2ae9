"""Quantization benchmark on CPU: fp32 vs int8 (PTQ and QAT) latency and size for two CNNs, and the
accuracy/size table of the low-bit and weight-sharing methods on digits.

Every row is a real ``compresslab`` run (``run_experiment``: train, compress, save the artifact,
reload it); sizes are the artifact files' bytes. Latency is re-measured here on the reloaded
artifacts, *interleaved* (fp32, PTQ, QAT, fp32, ...) over ``--rounds`` rounds so that load from
other processes on the machine hits all variants alike; the median of the per-round medians is
printed with the thread count.

    .venv/bin/python benchmarks/quant_benchmark.py                 # full (15 epochs per run)
    .venv/bin/python benchmarks/quant_benchmark.py --epochs 3 --rounds 3   # quicker
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

from compresslab.artifact import load_model_file  # noqa: E402
from compresslab.measure.core import mean_call_ms  # noqa: E402
from compresslab.pipeline import build_datamodule, run_experiment  # noqa: E402


def run(out: Path, tag: str, overrides: list[str], epochs: int) -> dict:
    """One pipeline run (results.json cached: re-running the benchmark reuses finished runs)."""
    run_dir = out / tag
    cached = run_dir / "results.json"
    if cached.exists():
        rec = json.loads(cached.read_text())
        if rec.get("status") == "completed":
            return rec
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[
            f"paths.run_dir={run_dir}", f"paths.teacher_cache={out / 'teachers'}", "logger=none", "teacher=none",
            f"student.epochs={epochs}", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
            "measure.latency_round_ms=5", "measure.latency_warmup=3", "resume=false", *overrides])
    start = time.perf_counter()
    rec = run_experiment(cfg)
    print(f"  [{tag}] done in {time.perf_counter() - start:.0f}s", flush=True)
    return rec


def interleaved_latency(paths: dict[str, str], x1: torch.Tensor, xn: torch.Tensor, rounds: int,
                        iters: int) -> dict[str, dict]:
    """Median over rounds of each model's median latency at batch 1 and batch N, measured in turn."""
    models = {k: load_model_file(p) for k, p in paths.items()}
    samples = {k: {"b1": [], "bN": []} for k in models}
    for _ in range(rounds):
        for k, m in models.items():
            samples[k]["b1"].append(mean_call_ms(m, x1, iters))
            samples[k]["bN"].append(mean_call_ms(m, xn, max(5, iters // 2)))
    return {k: {b: statistics.median(v) for b, v in s.items()}
            | {"b1_min": min(s["b1"]), "bN_min": min(s["bN"]), "bN_max": max(s["bN"])}
            for k, s in samples.items()}


def int8_section(out: Path, models: list[str], epochs: int, rounds: int, iters: int) -> None:
    print(f"\n== fp32 vs int8 on CPU (digits, torch threads={torch.get_num_threads()}) ==", flush=True)
    rows = []
    for model in models:
        recs = {
            "fp32": run(out, f"{model}_fp32", [f"student={model}"], epochs),
            "ptq_int8": run(out, f"{model}_ptq", [f"student={model}", "quant=ptq_int8"], epochs),
            "qat_int8": run(out, f"{model}_qat", [f"student={model}", "quant=qat_int8"], epochs),
        }
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            dm = build_datamodule(compose("config", overrides=[f"student={model}"]))
        dm.setup()
        batch = int(recs["fp32"]["student"]["latency_batch"])
        x1, xn = dm.example_batch(1), dm.example_batch(batch)
        load = _loadavg()
        lat = interleaved_latency({k: r["student"]["artifact"] for k, r in recs.items()}, x1, xn, rounds, iters)
        print(f"  {model}: latency measured with {torch.get_num_threads()} threads, load average {load} -> "
              f"{_loadavg()}", flush=True)
        ref = recs["fp32"]["student"]
        for k, r in recs.items():
            s = r["student"]
            rows.append([model, k, f"{100 * s['acc_top1']:.2f}", f"{s['size_bytes'] / 1024:.1f}",
                         f"{ref['size_bytes'] / s['size_bytes']:.2f}x", f"{lat[k]['b1']:.3f}", f"{lat[k]['bN']:.3f}",
                         f"{lat['fp32']['b1'] / lat[k]['b1']:.2f}x", f"{lat['fp32']['bN'] / lat[k]['bN']:.2f}x",
                         f"{lat['fp32']['bN_min'] / lat[k]['bN_min']:.2f}x",
                         f"{lat[k]['bN_min']:.2f}-{lat[k]['bN_max']:.2f}", s.get("compute", "fp32"),
                         f"{s['int8_load_time_s']:.1f}" if "int8_load_time_s" in s else "-"])
    _table(["model", "method", "acc %", "size KB", "size ratio", "b1 ms", "bN ms", "speedup b1", "speedup bN",
            "speedup bN (min)", "bN range ms", "compute", "load s"], rows)
    print("  (batch N = eval batch size = 256; medians of per-round medians; 'min' compares the fastest round of each, the least disturbed by other"
          " load; acc is the reloaded artifact's test accuracy; load s = rebuild + x86 lowering at load time)")


def lowbit_section(out: Path, epochs: int) -> None:
    print("\n== low-bit weights on digits (student=lenet5; compute is simulated: dequantized fp32) ==", flush=True)
    rows = []
    variants = [("fp32", []), ("lowbit 8", ["quant=lowbit", "quant.bits=8"]), ("lowbit 4", ["quant=lowbit", "quant.bits=4"]),
                ("lowbit 3", ["quant=lowbit", "quant.bits=3"]), ("lowbit 2", ["quant=lowbit", "quant.bits=2"]),
                ("ternary", ["quant=ternary"]), ("binary", ["quant=binary"])]
    for name, ov in variants:
        r = run(out, f"lenet5_{name.replace(' ', '')}", ["student=lenet5", *ov], epochs)
        s = r["student"]
        q = s.get("size_ratio_quantized_layers")
        rows.append([name, f"{100 * s['acc_top1']:.2f}", s["size_bytes"], f"{s['size_ratio']:.2f}x",
                     f"{q:.2f}x" if q else "-", f"{s['lowbit_bits_per_weight']:.2f}" if "lowbit_bits_per_weight" in s else "32"])
    _table(["method", "acc %", "size B", "file ratio", "quantized-layer ratio", "bits/weight"], rows)

    print("\n== Deep Compression on digits (student=lenet300): prune -> share -> Huffman ==", flush=True)
    rows = []
    variants = [("dense", []), ("prune=agp", ["prune=agp"]), ("quant=weight_sharing", ["quant=weight_sharing"]),
                ("prune=agp quant=weight_sharing", ["prune=agp", "quant=weight_sharing"])]
    for name, ov in variants:
        r = run(out, "lenet300_" + name.replace(" ", "_").replace("=", "-"), ["student=lenet300", *ov], epochs)
        s = r["student"]
        dc = [f"{s[k]:.2f}" if k in s else "-" for k in ("dc_pruning_ratio", "dc_sharing_ratio", "dc_huffman_ratio",
                                                         "dc_total_ratio")]
        rows.append([name, f"{100 * s['acc_top1']:.2f}", s["size_bytes"], f"{s['size_ratio']:.2f}x", *dc])
    _table(["method", "acc %", "size B", "file ratio", "DC prune", "DC share", "DC huffman", "DC total (weights)"],
           rows)


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def _table(header: list[str], rows: list[list]) -> None:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for i, r in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/benchmarks/quant", help="run directory (finished runs are reused)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--models", default="resnet20,convnet", help="CNNs for the int8 section")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds")
    parser.add_argument("--iters", type=int, default=30, help="timed iterations per round (batch 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for everything (default: as is)")
    parser.add_argument("--skip-int8", action="store_true")
    parser.add_argument("--skip-lowbit", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, epochs per run {args.epochs}, out {out}")
    if not args.skip_int8:
        int8_section(out, [m for m in args.models.split(",") if m], args.epochs, args.rounds, args.iters)
    if not args.skip_lowbit:
        lowbit_section(out, args.epochs)


if __name__ == "__main__":
    main()
