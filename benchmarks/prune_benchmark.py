"""What pruning buys for real: measured CPU latency vs MACs for channel pruning, and accuracy
and bytes on disk vs sparsity for unstructured pruning.

Part ``structured``: a CIFAR-style ResNet (3x32x32 input, default resnet56) pruned with
torch-pruning to 25/50/75% fewer channels (L1 filter norms), saved as the
``compresslab.structured/1`` artifact and *reloaded* (what the pipeline measures), then
timed on CPU at batch 1 and batch N. Timings are interleaved across the models in rounds
(median of per-round medians), so machine-load drift hits all of them alike. Latency does
not depend on trained weights, so the weights are the initialization.

Part ``unstructured``: ``student=lenet300`` on digits through the real pipeline
(``run_experiment``) with ``prune=agp`` and ``prune=magnitude`` at several sparsities,
against the unpruned student with the same recipe and seed: test accuracy of the reloaded
artifact, measured sparsity of the prunable weights, and the sparse artifact's bytes.

    .venv/bin/python benchmarks/prune_benchmark.py [--part structured|unstructured|all]
        [--arch resnet56] [--batch 64] [--rounds 7] [--sparsities 0.5,0.8,0.9,0.95,0.98] [--epochs 15]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from compresslab.artifact import load_model_file
from compresslab.compress.prune import prune_channels
from compresslab.compress.prune.structured import structured_payload
from compresslab.measure import count_macs
from compresslab.measure.core import mean_call_ms

RESNETS = {f"resnet{d}": {"_target_": "compresslab.models.CifarResNet", "depth": d} for d in (20, 32, 56, 110)}
SHAPE = (3, 32, 32)


@torch.no_grad()
def _median_ms(model, x, iters: int) -> float:
    return mean_call_ms(model, x, iters)


def structured(arch: str, ratios, batch: int, rounds: int, iters: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="prune_bench_"))
    models = {}
    for ratio in ratios:
        torch.manual_seed(0)
        from compresslab.models import build_model

        model = build_model(RESNETS[arch], SHAPE, 10).eval()
        prune_channels(model, torch.randn(1, *SHAPE), ratio, "l1")
        path = tmp / f"{arch}_{ratio}.pt"
        torch.save(structured_payload(model, RESNETS[arch], SHAPE, 10), path)
        models[ratio] = (load_model_file(path).eval(), path.stat().st_size)
    x1, xn = torch.randn(1, *SHAPE), torch.randn(batch, *SHAPE)
    per_round = {r: {"b1": [], "bN": []} for r in ratios}
    for m, _ in models.values():  # warm-up
        _median_ms(m, x1, 10)
        _median_ms(m, xn, 3)
    for _ in range(rounds):
        for r, (m, _) in models.items():
            per_round[r]["b1"].append(_median_ms(m, x1, iters))
            per_round[r]["bN"].append(_median_ms(m, xn, max(3, iters // 4)))
    base = ratios[0]
    stats = {}
    for r, (m, size) in models.items():
        stats[r] = {"params": sum(p.numel() for p in m.parameters()), "macs": count_macs(m, x1), "size": size,
                    "b1": statistics.median(per_round[r]["b1"]), "bN": statistics.median(per_round[r]["bN"])}
    print(f"\n## Structured channel pruning: {arch} on {SHAPE}, CPU, {torch.get_num_threads()} threads, "
          f"reloaded artifacts, median of {rounds} interleaved rounds")
    print("| channels removed | params | MACs | MACs ratio | size (B) | lat b1 (ms) | speed-up b1 |"
          f" lat b{batch} (ms) | speed-up b{batch} |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    b = stats[base]
    for r, s in stats.items():
        print(f"| {r:.0%} | {s['params']:,} | {s['macs']:,} | {b['macs'] / s['macs']:.2f}x | {s['size']:,} | "
              f"{s['b1']:.3f} | {b['b1'] / s['b1']:.2f}x | {s['bN']:.2f} | {b['bN'] / s['bN']:.2f}x |")


def unstructured(sparsities, methods, epochs: int, seed: int) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from compresslab.config_utils import CONFIG_DIR
    from compresslab.pipeline import run_experiment

    tmp = Path(tempfile.mkdtemp(prefix="prune_bench_"))
    common = ["teacher=none", "student=lenet300", "dataset=digits", "logger=none", f"student.epochs={epochs}",
              f"seed={seed}", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
              f"paths.teacher_cache={tmp / 'teachers'}"]
    end = max(1, int(epochs * 0.55))
    runs = [("none", None, [])]
    for method in methods:
        for s in sparsities:
            extra = [f"prune={method}", f"prune.final_sparsity={s}"]
            extra += [f"prune.end={end}"] if method == "agp" else [f"prune.at={max(1, epochs // 3)}"]
            runs.append((method, s, extra))
    rows = []
    for i, (method, s, extra) in enumerate(runs):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("config", overrides=common + extra + [f"paths.run_dir={tmp / f'run{i}'}"])
        start = time.perf_counter()
        rec = run_experiment(cfg)
        st, ref = rec["student"], rec["reference"]
        rows.append((method, s, st["acc_top1"], st.get("sparsity_prunable", 0.0), st["size_bytes"],
                     ref["size_bytes"], time.perf_counter() - start))
    base_acc = rows[0][2]
    print(f"\n## Unstructured pruning: lenet300 on digits, {epochs} epochs, seed {seed} "
          "(test accuracy of the reloaded artifact)")
    print("| method | target | measured sparsity | test acc | Δ acc (points) | size (B) | dense size (B) | "
          "size / dense | run (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for method, s, acc, sp, size, dense, secs in rows:
        tgt = "-" if s is None else f"{s:.2f}"
        print(f"| {method} | {tgt} | {sp:.4f} | {acc:.4f} | {100 * (acc - base_acc):+.2f} | {size:,} | {dense:,} | "
              f"{size / dense:.1%} | {secs:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("structured", "unstructured", "all"), default="all")
    ap.add_argument("--arch", choices=sorted(RESNETS), default="resnet56")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--ratios", default="0,0.25,0.5,0.75")
    ap.add_argument("--sparsities", default="0.5,0.8,0.9,0.95,0.98")
    ap.add_argument("--methods", default="agp,magnitude")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.part in ("structured", "all"):
        structured(args.arch, [float(r) for r in args.ratios.split(",")], args.batch, args.rounds, args.iters)
    if args.part in ("unstructured", "all"):
        unstructured([float(s) for s in args.sparsities.split(",")], args.methods.split(","), args.epochs,
                     args.seed)


if __name__ == "__main__":
    main()
