"""One benchmark run of the pruning / quantization / low-rank catalogue (issue #15): every new
method through the real pipeline (``run_experiment``) on the embedded digits dataset, with the
same recipe and seed, and one table of accuracy, params, MACs, artifact size and latency.

- pruning and low rank on ``student=resnet20``: dense baseline, ``prune=slimming``, ``prune=structured``
  with each ``prune.importance`` (iterative: ``steps`` pruning steps with fine-tuning in between;
  ``lamp`` with ``scope=global``, which it needs), ``lowrank=tucker`` (VBMF ranks) and ``lowrank=cp``;
- quantization on the CNN ``student=lenet5``: dense baseline, ``quant=lsq`` and ``quant=pact`` at W4A4
  and W2A2, and ``quant=lsq`` with ``bits_per_layer=sensitivity`` under a 3-bit budget.

Accuracy is the test split at the val-selected epoch; size is the saved artifact's bytes and its
ratio to the dense fp32 reference; latency is CPU batch 1 (median) of the reloaded artifact,
interleaved with its reference in the same job (so `speedup` compares like with like; absolute
milliseconds of different rows were measured at different times, and with ``--workers`` > 1 beside
other jobs). By default the reloaded artifact is measured in the benchmark's own process
(``measure.fresh_process=false``); ``--fresh-process`` uses the pipeline's fresh-process measurement.

    .venv/bin/python benchmarks/catalogue_compress.py [--epochs 8] [--workers 1] [--out outputs/bench_catalogue]
        [--only slimming,tucker,...] [--fresh-process]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # conftest.compose_config: the real config tree


def jobs(epochs: int) -> list[tuple[str, list[str]]]:
    e = int(epochs)
    mid = max(1, e // 2)
    prune_common = ["prune=structured", "prune.ratio=0.5", "prune.steps=2", f"prune.start={max(1, e // 4)}",
                    f"prune.end={mid}"]
    out = [("resnet20 dense", ["student=resnet20"]),
           ("prune=slimming", ["student=resnet20", "prune=slimming", f"prune.start={mid}"])]
    for imp in ("l1", "l2", "bn_scale", "taylor", "hessian", "lamp", "random", "group_norm"):
        scope = ["prune.scope=global"] if imp == "lamp" else []
        out.append((f"importance={imp}", ["student=resnet20", *prune_common, f"prune.importance={imp}", *scope]))
    out += [("lowrank=tucker (vbmf)", ["student=resnet20", "lowrank=tucker", f"lowrank.start_epoch={mid}"]),
            ("lowrank=cp (params 0.25)", ["student=resnet20", "lowrank=cp", f"lowrank.start_epoch={mid}"]),
            ("lenet5 dense", ["student=lenet5"])]
    for scheme in ("lsq", "pact"):
        for bits in (4, 2):
            out.append((f"quant={scheme} W{bits}A{bits}", ["student=lenet5", f"quant={scheme}",
                                                          f"quant.weight_bits={bits}", f"quant.act_bits={bits}"]))
    out.append(("quant=lsq mixed (sens., 3 bits)", ["student=lenet5", "quant=lsq", "quant.bits_per_layer=sensitivity",
                                                    "quant.sensitivity.budget_bits=3.0", f"quant.start_epoch={mid}"]))
    return out


def row(name: str, record: dict, seconds: float) -> dict:
    st, ref = record["student"], record["reference"]
    return {
        "method": name, "acc": st["acc_top1"], "params": st["params"], "params_ref": ref["params"],
        "macs": st["macs"], "macs_ref": ref["macs"], "size_bytes": st["size_bytes"], "size_ratio": st["size_ratio"],
        "latency_b1_ms": st.get("latency_ms_b1"), "speedup_b1": st.get("speedup_b1"),
        "bits": st.get("bits_per_layer"), "ranks": st.get("lowrank_ranks"), "job_s": round(seconds, 1),
    }


def markdown(rows: list[dict]) -> str:
    lines = ["| method | test acc | params | MACs | size (B) | size ratio | latency b1 (ms) | speed-up b1 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lat = f"{r['latency_b1_ms']:.3f}" if r["latency_b1_ms"] else "-"
        sp = f"{r['speedup_b1']:.2f}x" if r["speedup_b1"] else "-"
        lines.append(f"| {r['method']} | {r['acc']:.4f} | {r['params']:,} | {r['macs']:,} | {r['size_bytes']:,} | "
                     f"{r['size_ratio']:.2f}x | {lat} | {sp} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench_catalogue"))
    parser.add_argument("--only", default="", help="comma-separated substrings of method names to run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="jobs run at once (each in its own process)")
    parser.add_argument("--fresh-process", action="store_true",
                        help="measure each artifact in a fresh Python process (the pipeline's default; slower)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    selected = [j for j in jobs(args.epochs) if not args.only or any(s in j[0] for s in args.only.split(","))]
    common = ["teacher=none", "logger=none", f"seed={args.seed}", f"student.epochs={args.epochs}",
              "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
    if not args.fresh_process:
        common.append("measure.fresh_process=false")
    done: dict[str, dict] = {}
    with ProcessPoolExecutor(max_workers=max(1, args.workers), mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(_run_job, name, common + overrides): name for name, overrides in selected}
        for future in as_completed(futures):
            name = futures[future]
            done[name] = future.result()
            print(f"{name}: acc {done[name]['acc']:.4f}, size ratio {done[name]['size_ratio']:.2f}x, "
                  f"{done[name]['job_s']} s", flush=True)
            rows = [done[n] for n, _ in selected if n in done]  # table in job order
            (out / "catalogue.json").write_text(json.dumps({"epochs": args.epochs, "seed": args.seed,
                                                           "workers": args.workers, "rows": rows}, indent=1))
            (out / "catalogue.md").write_text(markdown(rows))
    print(markdown([done[n] for n, _ in selected]))


def _run_job(name: str, overrides: list[str]) -> dict:
    """One pipeline run in a worker process; returns its table row."""
    logging.disable(logging.WARNING)
    from conftest import compose_config

    from compresslab.pipeline import run_experiment

    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="bench_catalogue_") as tmp:
        record = run_experiment(compose_config(Path(tmp), overrides, fast=False))
    return row(name, record, time.time() - t0)


if __name__ == "__main__":
    main()
