"""Re-time a finished run's saved artifacts: the dense reference vs the (pruned) student.

The pipeline times the reference and the student once each, back to back; on a busy
machine one of them can catch a load spike. This script reloads both artifacts from
``<run dir>/artifacts`` (``load_model_file``, as the pipeline does) and times them in
interleaved rounds (median of per-round medians) at batch 1 and batch N, on inputs of the
run's shape, and prints params, MACs and the speed-ups side by side.

    .venv/bin/python benchmarks/prune_run_latency.py <run dir> [--batch 256] [--rounds 9] [--iters 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from compresslab.artifact import load_model_file, read_payload
from compresslab.measure import count_macs
from compresslab.measure.core import mean_call_ms


@torch.no_grad()
def _median_ms(model, x, iters: int) -> float:
    return mean_call_ms(model, x, iters)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--batch", type=int, default=None, help="batch N (default: the run's latency_batch)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--iters", type=int, default=30)
    args = ap.parse_args()
    record = json.loads((args.run_dir / "results.json").read_text())
    batch = args.batch or int(record["student"]["latency_batch"])
    artifacts = args.run_dir / "artifacts"
    paths = {"reference": artifacts / "reference.pt", "student": artifacts / "student.pt"}
    models = {k: load_model_file(p).eval() for k, p in paths.items()}
    shape = read_payload(paths["reference"])["input_shape"]
    torch.manual_seed(0)
    x1, xn = torch.randn(1, *shape), torch.randn(batch, *shape)
    for m in models.values():
        _median_ms(m, x1, 10)
        _median_ms(m, xn, 3)
    rounds = {k: {"b1": [], "bN": []} for k in models}
    for _ in range(args.rounds):
        for k, m in models.items():
            rounds[k]["b1"].append(_median_ms(m, x1, args.iters))
            rounds[k]["bN"].append(_median_ms(m, xn, max(3, args.iters // 3)))
    out = {}
    for k, m in models.items():
        out[k] = {"params": sum(p.numel() for p in m.parameters()),
                  "nonzero": sum(int(p.count_nonzero()) for p in m.parameters()),
                  "macs": count_macs(m, x1), "size": paths[k].stat().st_size,
                  "b1": statistics.median(rounds[k]["b1"]), "bN": statistics.median(rounds[k]["bN"])}
    ref, st = out["reference"], out["student"]
    print(f"run {args.run_dir} (prune={record['axes']['prune']}, student={record['axes']['student']}, "
          f"input {tuple(shape)}), CPU {torch.get_num_threads()} threads, {args.rounds} interleaved rounds")
    print(f"| model | params | nonzero | MACs | size (B) | lat b1 (ms) | lat b{batch} (ms) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for k, s in out.items():
        print(f"| {k} | {s['params']:,} | {s['nonzero']:,} | {s['macs']:,} | {s['size']:,} | {s['b1']:.3f} | "
              f"{s['bN']:.3f} |")
    print(f"params reduction {1 - st['params'] / ref['params']:.1%}, MACs ratio {ref['macs'] / st['macs']:.2f}x, "
          f"size ratio {ref['size'] / st['size']:.2f}x, speed-up b1 {ref['b1'] / st['b1']:.2f}x, "
          f"speed-up b{batch} {ref['bN'] / st['bN']:.2f}x, student acc {record['student']['acc_top1']:.4f}")


if __name__ == "__main__":
    main()
