"""The whole method catalogue of issue #15 in one benchmark run: every new distillation, pruning,
quantization and low-rank method (and the baseline of its axis) as a real pipeline run
(``compresslab.pipeline.run_experiment`` on a config composed from ``conf/``, exactly what the
``compresslab`` command runs per job), then every resulting artifact timed together in one
interleaved session by ``compresslab-measure`` (:mod:`compresslab.measure.together`, in a fresh
process), so the speed figures of all rows come from the same rounds and compare across methods.
Prints one markdown table: accuracy (test split), artifact size and ratio, params, MACs, latency at
batch 1 / batch N and the speed-ups with their 5-95% bootstrap intervals, and the noise gate's flag.

The axes (digits, one seed, the project's default student recipe: AdamW 3e-3, cosine):

- distill: the default digits pair, teacher ``convnet`` -> student ``lenet5`` (every feature method's
  taps pair on it: docs/distillation.md, "Feature taps"); baseline ``distill=none`` (the student trained
  from scratch, same seed); ``cc vid ab ft fsp nst ofd reviewkd dist`` with their conf/distill presets,
  the stages of AB/FSP/FT (RepDistiller's 30 of 240 epochs) and ReviewKD's warm-up (20 of 240) scaled to
  the same fraction of ``--epochs`` (at least 1), as in benchmarks/distill_mnist1d.py;
- prune: ``student=resnet20 teacher=none``; baseline dense; ``prune=slimming`` (pruning at mid-run);
  ``prune=structured`` with each ``prune.importance`` (ratio 0.5 in 2 steps, ``lamp`` with ``scope=global``,
  which it needs);
- quant: the CNN ``student=lenet5 teacher=none``; baseline fp32; ``quant=lsq`` and ``quant=pact`` at W4A4 and
  W2A2, and ``quant=lsq`` with ``bits_per_layer=sensitivity`` under a 3-bit budget;
- lowrank: ``student=resnet20`` (baseline: the prune axis's dense resnet20); ``lowrank=tucker`` (VBMF ranks)
  and ``lowrank=cp`` (a quarter of the parameters), factorized at mid-run.

Jobs run ``--workers`` at a time, each in a worker process with ``--threads`` torch threads, with their
own latency deferred (``measure.defer=true``); the distillation jobs start after the first one has
trained (and cached) the teacher. Speed-ups are each run's student over that run's dense fp32
reference (the same architecture, untrained weights: latency does not depend on them), both timed in
the one session.

    .venv/bin/python benchmarks/catalogue.py [--epochs 6] [--workers 2] [--out DIR] [--md FILE]
        [--only ab,lsq,...] [--rounds 11] [--threads-bN auto|N] [--measure-only DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
import time
import traceback
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

from bench_config import ratio_cell  # benchmarks/ is on sys.path when this file runs as a script

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
DISTILL = ("cc", "vid", "ab", "ft", "fsp", "nst", "ofd", "reviewkd", "dist")
IMPORTANCES = ("l1", "l2", "bn_scale", "taylor", "hessian", "lamp", "random", "group_norm")
STAGED = ("ab", "fsp", "ft")  # feature-loss entries with RepDistiller's 30 init epochs (of 240)


@dataclass
class Job:
    name: str                   # the table's method column
    axis: str                   # distill | prune | quant | lowrank
    overrides: list[str]        # what this job sets beyond the common overrides (the config column)
    baseline: str               # name of the job this one is compared with (itself for a baseline)
    teacher: bool = False       # needs the cached teacher
    slug: str = ""
    base: list[str] = field(default_factory=list)   # the axis's model overrides (listed once, in the header)


def jobs(epochs: int) -> list[Job]:
    """Every job of the run, baselines first within each axis."""
    e = int(epochs)
    mid = max(1, e // 2)
    stage = max(1, round(e * 30 / 240))
    warmup = max(1, round(e * 20 / 240))
    out = [Job("scratch (distill=none)", "distill", ["distill=none"], "scratch (distill=none)", teacher=True)]
    for m in DISTILL:
        ov = [f"distill={m}"]
        if m in STAGED:
            ov.append(f"distill.feature_losses.{m}.init_epochs={stage}")
        if m == "reviewkd":
            ov.append(f"distill.feature_losses.reviewkd.loss.warmup_epochs={warmup}")
        out.append(Job(f"distill={m}", "distill", ov, "scratch (distill=none)", teacher=True))
    r20 = ["student=resnet20", "teacher=none"]
    dense = "resnet20 dense"
    out.append(Job(dense, "prune", [], dense, base=r20))
    out.append(Job("prune=slimming", "prune", ["prune=slimming", f"prune.start={mid}"], dense, base=r20))
    structured = ["prune=structured", "prune.ratio=0.5", "prune.steps=2", f"prune.start={max(1, e // 4)}",
                  f"prune.end={mid}"]
    for imp in IMPORTANCES:
        scope = ["prune.scope=global"] if imp == "lamp" else []
        out.append(Job(f"structured importance={imp}", "prune", [f"prune.importance={imp}", *scope], dense,
                       base=[*r20, *structured]))
    out.append(Job("lowrank=tucker (vbmf)", "lowrank", ["lowrank=tucker", f"lowrank.start_epoch={mid}"], dense,
                   base=r20))
    out.append(Job("lowrank=cp (params 0.25)", "lowrank", ["lowrank=cp", f"lowrank.start_epoch={mid}"], dense,
                   base=r20))
    l5 = ["student=lenet5", "teacher=none"]
    fp32 = "lenet5 fp32"
    out.append(Job(fp32, "quant", [], fp32, base=l5))
    for scheme in ("lsq", "pact"):
        for bits in (4, 2):
            out.append(Job(f"quant={scheme} W{bits}A{bits}", "quant",
                           [f"quant={scheme}", f"quant.weight_bits={bits}", f"quant.act_bits={bits}"], fp32, base=l5))
    out.append(Job("quant=lsq mixed (sensitivity, 3 bits)", "quant",
                   ["quant=lsq", "quant.bits_per_layer=sensitivity", "quant.sensitivity.budget_bits=3.0",
                    f"quant.start_epoch={mid}"], fp32, base=l5))
    for i, job in enumerate(out):
        job.slug = f"{i:02d}_" + "".join(c if c.isalnum() else "_" for c in job.name).strip("_")
    return out


def common_overrides(args) -> list[str]:
    return ["logger=none", f"seed={args.seed}", f"student.epochs={args.epochs}", "resume=false",
            "measure.defer=true",  # no per-job latency: all artifacts are timed together at the end
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
            f"paths.teacher_cache={args.out / 'teachers'}"]


def run_job(job: Job, overrides: list[str], run_dir: Path, threads: int) -> dict:
    """One pipeline run (in a worker process): compose conf/config.yaml with the overrides, run it;
    returns status, seconds, error. The record itself is the run's results.json."""
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from compresslab.pipeline import run_experiment

    torch.set_num_threads(threads)
    t0 = time.time()
    try:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=[*overrides, f"paths.run_dir={run_dir}"])
        run_experiment(cfg)
        return {"status": "completed", "seconds": time.time() - t0}
    except BaseException as exc:  # noqa: BLE001 - a failed job is a row of the table, the others go on
        return {"status": "failed", "seconds": time.time() - t0, "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc()}


def train_all(args, selected: list[Job]) -> dict[str, dict]:
    """Run the jobs, ``args.workers`` at a time; the teacher jobs after the first has cached the teacher."""
    runs = args.out / "runs"
    common = common_overrides(args)
    todo = [j for j in selected if not j.teacher]
    teacher_jobs = [j for j in selected if j.teacher]
    first, waiting = (teacher_jobs[:1], teacher_jobs[1:])
    done: dict[str, dict] = {}
    with ProcessPoolExecutor(max_workers=max(1, args.workers), mp_context=get_context("spawn")) as pool:
        def submit(job: Job):
            return pool.submit(run_job, job, [*common, *job.base, *job.overrides], runs / job.axis / job.slug,
                               args.threads)

        futures = {submit(j): j for j in first + todo}
        while futures:
            finished, _ = wait(futures, return_when=FIRST_COMPLETED)
            for future in finished:
                job = futures.pop(future)
                done[job.name] = res = future.result()
                msg = f"{res['status']}" + (f": {res['error'][:300]}" if res["status"] != "completed" else "")
                print(f"[{time.strftime('%H:%M:%S')}] {job.axis:8s} {job.name}: {msg} ({res['seconds']:.0f} s)",
                      flush=True)
                if job in first:  # the teacher is cached now (or failed: the others then say so themselves)
                    futures.update({submit(j): j for j in waiting})
    return done


def measure(args) -> int:
    """Every artifact under <out>/runs timed together in one fresh process (compresslab-measure)."""
    from compresslab.measure.together import measure_in_subprocess

    extra = ["--rounds", str(args.rounds)] + (["--round-ms", str(args.round_ms)] if args.round_ms else [])
    extra += ["--threads-bN", str(args.threads_bN)]
    print(f"[{time.strftime('%H:%M:%S')}] compresslab-measure {args.out / 'runs'} {' '.join(extra)}", flush=True)
    return measure_in_subprocess([args.out / "runs"], extra, timeout_s=3600)


def rows_from_runs(args, selected: list[Job], done: dict[str, dict]) -> list[dict]:
    """One row per job (and the distillation teacher), from each run's results.json."""
    rows, records = [], {}
    for job in selected:
        path = args.out / "runs" / job.axis / job.slug / "results.json"
        record = json.loads(path.read_text()) if path.exists() else {}
        records[job.name] = record
        st, tog = record.get("student") or {}, record.get("measured_together") or {}
        row = {"method": job.name, "axis": job.axis, "config": " ".join(job.overrides), "baseline": job.baseline,
               "status": record.get("status") or (done.get(job.name) or {}).get("status", "not run"),
               "error": record.get("error") or (done.get(job.name) or {}).get("error"),
               "job_s": (done.get(job.name) or {}).get("seconds"), "run_dir": str(path.parent)}
        if row["status"] == "completed":
            t = tog.get("student") or {}
            row.update(acc=st.get("acc_top1"), val_acc=st.get("val_acc_top1"), size_bytes=st.get("size_bytes"),
                       size_ratio=st.get("size_ratio"), params=st.get("params"), macs=st.get("macs"),
                       bits=(st.get("quant") or {}).get("bits_per_layer"), ranks=(st.get("lowrank") or {}).get("ranks"),
                       **_timing(t))
        rows.append(row)
    by_name = {r["method"]: r for r in rows}
    for r in rows:
        base = by_name.get(r["baseline"])
        if r.get("acc") is not None and base and base.get("acc") is not None:
            r["delta_acc"] = r["acc"] - base["acc"]
    # the teacher of the distillation axis, timed in the same session (ratios vs the lenet5 reference)
    teacher_src = next((records[j.name] for j in selected if j.teacher and (records[j.name].get("teacher") or {})
                        .get("acc_top1") is not None and "measured_together" in records[j.name]), None)
    if teacher_src:
        te, t = teacher_src["teacher"], teacher_src["measured_together"].get("teacher") or {}
        rows.insert(0, {"method": "teacher (convnet)", "axis": "distill",
                        "config": "the distillation teacher; ratios vs the lenet5 reference",
                        "baseline": None, "status": "completed", "acc": te.get("acc_top1"),
                        "size_bytes": te.get("size_bytes"), "size_ratio": te.get("size_ratio"),
                        "params": te.get("params"), "macs": te.get("macs"), **_timing(t)})
    return rows


def _timing(t: dict) -> dict:
    return {"lat_b1": t.get("latency_ms_b1"), "lat_b1_iqr": t.get("latency_ms_b1_iqr"),
            "lat_bN": t.get("latency_ms_bN"), "lat_bN_iqr": t.get("latency_ms_bN_iqr"),
            "speedup_b1": t.get("speedup_b1"), "speedup_b1_ci": t.get("speedup_b1_ci"),
            "speedup_bN": t.get("speedup"), "speedup_bN_ci": t.get("speedup_ci"),
            "reliable": t.get("latency_reliable"), "unreliable": t.get("latency_unreliable_short")}


def markdown(rows: list[dict], batch: int) -> str:
    lines = [f"| method | axis | config | test acc | Δ acc vs baseline | size (B) | size ratio | params | MACs "
             f"| latency b1 (ms) | latency b{batch} (ms) | speed-up b1 [5–95%] | speed-up b{batch} [5–95%] | reliable |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["method"].startswith("teacher"):
            cfg = r["config"]
        else:
            cfg = f"`{r['config']}`" if r["config"] else "(axis default)"
        if r["status"] != "completed":
            err = (r.get("error") or "").replace("|", "\\|").replace("\n", " ")[:200]
            lines.append(f"| {r['method']} | {r['axis']} | {cfg} | **{r['status']}**: {err} "
                         "| | | | | | | | | | |")
            continue
        delta = f"{100 * r['delta_acc']:+.1f} pt" if r.get("delta_acc") is not None and r["baseline"] != r["method"] \
            else ("baseline" if r.get("baseline") == r["method"] else "–")
        b1 = f"{r['lat_b1']:.3f}" if r.get("lat_b1") is not None else "–"
        bn = f"{r['lat_bN']:.2f}" if r.get("lat_bN") is not None else "–"
        rel = "–" if r.get("reliable") is None else ("yes" if r["reliable"] else f"no ({r.get('unreliable')})")
        lines.append(f"| {r['method']} | {r['axis']} | {cfg} | {r['acc']:.4f} | {delta} | {r['size_bytes']:,} "
                     f"| {r['size_ratio']:.2f}× | {r['params']:,} | {r['macs']:,} | {b1} | {bn} "
                     f"| {ratio_cell(r.get('speedup_b1'), r.get('speedup_b1_ci'))} "
                     f"| {ratio_cell(r.get('speedup_bN'), r.get('speedup_bN_ci'))} | {rel} |")
    return "\n".join(lines) + "\n"


def session_line(args) -> tuple[str, int]:
    """One line on the measurement session (from any run's measured_together block), and batch N."""
    for path in sorted((args.out / "runs").rglob("results.json")):
        block = json.loads(path.read_text()).get("measured_together")
        if block:
            s = block["session"]
            groups = "; ".join(f"input {g['input_shape']} batch {g['batch']}: {g['models']} models, threads b1/bN "
                               f"{g['threads_b1']}/{g['threads_bN']}, clock {g['clock']}, self-check "
                               f"{g['self_check']}, {'reliable' if g['reliable'] else 'UNRELIABLE: ' + str(g['reason'])}"
                               for g in s["groups"])
            batch = s["groups"][0]["batch"] if s["groups"] else 0
            return (f"Timing: one compresslab-measure session ({s['id']}, {s['measured_at']}), {s['runs']} runs, "
                    f"{s['models']} distinct files, {s['settings']['rounds']} interleaved rounds x "
                    f"{s['settings']['round_ms']} ms per model, warm-up {s['settings']['warmup']}; {groups}.", batch)
    return "Timing: no measured_together block found (compresslab-measure failed or was not run).", 0


def axes_line(args, selected: list[Job]) -> str:
    """The overrides every job shares, and each axis's model overrides (the config column has the rest)."""
    common = [o for o in common_overrides(args) if not o.startswith("paths.")]
    axes = {}
    for j in selected:
        label = f"{j.axis} (structured rows)" if "prune=structured" in j.base else j.axis
        axes.setdefault(label, " ".join(j.base) or "teacher=convnet student=lenet5 (digits' default pair)")
    return (f"Every job: `{' '.join(common)}`, teacher cached under the run dir. Axes: "
            + "; ".join(f"{axis}: `{base}`" for axis, base in axes.items()) + ".")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=6, help="student epochs of every job")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="jobs trained at once (each in its own process)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training job")
    parser.add_argument("--rounds", type=int, default=11, help="interleaved rounds of the timing session")
    parser.add_argument("--round-ms", type=float, default=None, help="timed work per model per round (default 20)")
    parser.add_argument("--threads-bN", dest="threads_bN", default="auto",
                        help="threads at batch N in the timing session: a number or auto (physical cores - 1 when idle); "
                             "1 on a shared 2-core machine, where 2 threads time bimodally")
    parser.add_argument("--only", default="", help="comma-separated substrings of method names (baselines always run)")
    parser.add_argument("--out", type=Path, default=None,
                        help="run directory (default outputs/benchmarks/catalogue/<date>_<time>)")
    parser.add_argument("--md", type=Path, default=None, help="also write the report to this file")
    parser.add_argument("--measure-only", type=Path, default=None,
                        help="an earlier run's --out: skip training, time its artifacts again and print the table")
    args = parser.parse_args()
    start = time.time()
    if args.measure_only:
        args.out = args.measure_only
        if (args.out / "catalogue.json").exists():  # the settings of the run being re-timed
            meta = json.loads((args.out / "catalogue.json").read_text())["args"]
            args.epochs, args.seed, args.workers, args.threads = (meta["epochs"], meta["seed"], meta["workers"],
                                                                  meta["threads"])
    args.out = (args.out or ROOT / "outputs" / "benchmarks" / "catalogue"
                / dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    all_jobs = jobs(args.epochs)
    baselines = {j.baseline for j in all_jobs}
    selected = [j for j in all_jobs if not args.only or j.name in baselines
                or any(s in j.name for s in args.only.split(","))]
    done: dict[str, dict] = {}
    if not args.measure_only:
        if (args.out / "runs").exists():
            raise SystemExit(f"{args.out / 'runs'} exists: pass a new --out (or --measure-only {args.out})")
        args.out.mkdir(parents=True, exist_ok=True)
        print(f"{len(selected)} jobs, {args.epochs} epochs, seed {args.seed}, {args.workers} workers x {args.threads} "
              f"thread(s); runs under {args.out / 'runs'}", flush=True)
        done = train_all(args, selected)
    train_s = time.time() - start
    if args.measure_only and (args.out / "catalogue.json").exists():  # keep the original run's training time
        train_s = json.loads((args.out / "catalogue.json").read_text()).get("train_s", train_s)
    code = measure(args)
    total_s = time.time() - start
    rows = rows_from_runs(args, selected, done)
    line, batch = session_line(args)
    command = "benchmarks/catalogue.py " + " ".join(sys.argv[1:])
    header = (f"`.venv/bin/python {command}`: digits, seed {args.seed}, {args.epochs} student epochs (AdamW 3e-3, "
              f"cosine), {args.workers} worker(s) x {args.threads} thread(s); training {train_s / 60:.1f} min, "
              f"total {total_s / 60:.1f} min on {os.cpu_count()} CPUs (load average at the end "
              f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}).\n{line}"
              + ("" if code == 0 else f"\ncompresslab-measure exited {code}: latency columns may be missing.") + "\n"
              + axes_line(args, selected) + "\n")
    table = markdown(rows, batch)
    report = header + "\n" + table
    (args.out / "catalogue.json").write_text(json.dumps(
        {"args": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}},
         "jobs": [asdict(j) for j in selected], "rows": rows, "train_s": train_s, "total_s": total_s,
         "measure_exit": code}, indent=1, default=str))
    (args.out / "catalogue.md").write_text(report)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(report)
    print()
    print(report)
    failed = [r["method"] for r in rows if r["status"] != "completed"]
    if failed:
        print(f"{len(failed)} job(s) did not complete: {', '.join(failed)} (see their results.json / the log above)")


if __name__ == "__main__":
    main()
