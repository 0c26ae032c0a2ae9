"""Every console command of compresslab, in one place (``[project.scripts]`` in pyproject.toml).

- ``compresslab``: the Hydra app over ``conf/`` that runs one experiment per job (:func:`main`);
- ``compresslab-report``: ablation tables and plots from many runs (:func:`report_main`);
- ``compresslab-measure``: re-time the saved artifacts of many runs in one process (:func:`measure_main`);
- ``compresslab-reproduce``: the paper-claim reproduction suite (:func:`reproduce_main`);
- ``compresslab-sensitivity``: per-layer pruning sensitivity of a saved model file (:func:`sensitivity_main`);
- ``compresslab-sbatch``: the sbatch script a SLURM sweep would submit, not submitted (:func:`sbatch_main`).

Each parses its arguments and calls the library; nothing below imports this module.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from functools import partial
from pathlib import Path
from typing import Sequence

import hydra
from omegaconf import DictConfig

from compresslab.config_utils import CONFIG_DIR


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> dict | None:
    """Run the composed experiment; returns its results record (None for a failed or pruned sweep job).
    A search (``hydra/sweeper=optuna*``) reads its objectives from each job's results.json."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from compresslab.pipeline import run_experiment
    from compresslab.search.pruning import pruned_epoch

    from compresslab.errors import Interrupted

    try:
        record = run_experiment(cfg)
    except Interrupted as exc:  # a signal stops the whole process, sweep included, with a non-zero status
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from exc
    except Exception as exc:
        if pruned_epoch(exc) is not None:  # a search trial its pruner stopped: recorded as pruned, not failed
            logging.getLogger(__name__).info("%s", exc)
            return None
        # In a sweep a failed job is recorded (results.json, W&B) and the others go on;
        # the SweepSummary callback lists it at the end. A single run fails loudly.
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            logging.getLogger(__name__).exception("job failed; the sweep goes on")
            return None
        raise
    return record


def _number(kind: type, low: float, high: float | None = None, low_open: bool = False, high_open: bool = True):
    """An argparse ``type`` accepting a ``kind`` number in [low, high) (bounds as flagged); argparse
    turns its ValueError into a usage error naming the option and the value."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        too_low = value <= low if low_open else value < low
        too_high = high is not None and (value >= high if high_open else value > high)
        if value != value or too_low or too_high:  # NaN fails every comparison
            where = (f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}" if high is not None
                     else f"{'>' if low_open else '>='} {low:g}")
            raise argparse.ArgumentTypeError(f"{text!r} is out of range: must be {where}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its message
    return parse


def _sparsity_list(text: str) -> list[float]:
    """``--sparsities``: comma-separated fractions, each in [0, 1)."""
    one = _number(float, 0.0, 1.0)
    values = [one(part.strip()) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError("give at least one sparsity, e.g. 0.5,0.9")
    return values


def report_main(argv: Sequence[str] | None = None) -> None:
    """``compresslab-report``: ablation tables and accuracy/size/latency plots from many runs
    (:mod:`compresslab.track.report`)."""
    from compresslab.track.checks import unknown_key, usable_records
    from compresslab.track.report import build_report
    from compresslab.track.results import collect_job_results
    from compresslab.track.wandb_records import load_wandb_records, log_report_to_wandb

    parser = argparse.ArgumentParser(prog="compresslab-report",
                                     description="Ablation tables and accuracy/size/latency plots from many runs.")
    parser.add_argument("paths", nargs="*", type=Path, help="run or sweep directories (searched for results.json)")
    parser.add_argument("--wandb-project", help="read runs from this W&B project (entity/project) instead")
    parser.add_argument("--rows", help="axis or dotted config key for table rows (default: student)")
    parser.add_argument("--cols", help="axis or config key for columns ('' for none; default: distill)")
    parser.add_argument("--metric", action="append", dest="metrics",
                        help="metric(s) of the student to tabulate (default: acc_top1); e.g. size_ratio, speedup, "
                             "deployed_speedup, or a dotted path such as backends.onnxruntime.speedup")
    parser.add_argument("--backend", help="tabulate and plot the student's figures in this backend "
                                          "(student.backends.<backend>: latency, speed-up, accuracy, size), "
                                          "e.g. onnxruntime; default: the torch figures")
    parser.add_argument("--out", type=Path, help="output directory (default: the first path)")
    parser.add_argument("--format", action="append", dest="formats", choices=["md", "latex", "csv"])
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--log-wandb", metavar="PROJECT", help="also log the table and plots to this W&B project")
    args = parser.parse_args(argv)
    if args.wandb_project:
        records = load_wandb_records(args.wandb_project)
    else:
        if not args.paths:
            parser.error("give run/sweep directories, or --wandb-project")
        _require_dirs(parser, args.paths)
        records = [r for p in args.paths for r in collect_job_results(p)]
    records = usable_records(records, lambda message: print(f"warning: {message}", file=sys.stderr))
    for option, key in (("--rows", args.rows), ("--cols", args.cols)):  # a key the user named: some run has it
        missing = unknown_key(records, key) if key else None
        if missing:
            axes = sorted({a for r in records if r.get("status") == "completed" for a in r.get("axes") or {}})
            parser.error(f"argument {option}: no completed run has {missing!r} as an axis or config key "
                         f"(axes: {', '.join(axes)}; or a dotted config key such as prune.final_sparsity)")
    failed = [r for r in records if r.get("status") not in ("completed", "pruned")]
    pruned = [r for r in records if r.get("status") == "pruned"]
    out_dir = args.out or (args.paths[0] if args.paths else Path("outputs/report"))
    rows, cols = args.rows or "student", "distill" if args.cols is None else args.cols
    report = build_report(records, rows, cols or None, args.metrics or ["acc_top1"], out_dir,
                          args.formats or ("md", "latex", "csv"), plots=not args.no_plots, backend=args.backend)
    print(f"{len(records) - len(failed) - len(pruned)} completed runs, {len(pruned)} pruned by the search, "
          f"{len(failed)} failed")
    for r in failed:
        print(f"  failed: {r.get('_path', r.get('run_dir'))}: {str(r.get('error'))[:160]}")
    for path in args.paths:  # a search dir: the Pareto front its study found
        _print_search_front(path, out_dir, plots=not args.no_plots)
    if report["frame"].empty:
        raise SystemExit("no completed runs to tabulate")
    print("\n\n".join(report["markdown"]))
    for line in ([report["latency_source"]] if report["latency_source"] else []) + report["notes"] + report["paper"]:
        print(line)
    for path in report["paths"]:
        print(f"wrote {path}")
    if args.log_wandb:
        log_report_to_wandb(report, args.log_wandb)


def _print_search_front(sweep_dir: Path, out_dir: Path, plots: bool = True) -> None:
    """Print the Pareto front of the study behind a search dir and draw ``pareto_front.png`` (nothing
    for a dir that is not a search)."""
    from compresslab.search.pareto import front_markdown, load_search, plot_front

    found = load_search(sweep_dir)
    if found is None:
        return
    study, paths = found
    print(front_markdown(study, paths))
    plot = plot_front(study, paths, out_dir) if plots else None
    if plot is not None:
        print(f"wrote {plot}")


def _require_dirs(parser: argparse.ArgumentParser, paths: Sequence[Path]) -> None:
    """A usage error naming the paths that don't exist."""
    missing = [p for p in paths if not p.exists()]
    if missing:
        parser.error(f"no such directory: {', '.join(map(str, missing))}")


def measure_main(argv: Sequence[str] | None = None) -> None:
    """``compresslab-measure``: time the saved artifacts of many runs together, in this one process
    (:mod:`compresslab.measure.together`), and write each run's ``measured_together`` block."""
    from dataclasses import asdict

    from compresslab.measure.latency import LatencySettings
    from compresslab.measure.together import completed_runs, measure_together, print_measured
    from compresslab.track.checks import usable_records

    parser = argparse.ArgumentParser(prog="compresslab-measure",
                                     description="Re-measure the saved artifacts of many runs together, in one process.")
    parser.add_argument("paths", nargs="+", type=Path, help="run or sweep directories (searched for results.json)")
    parser.add_argument("--rounds", type=_number(int, 1), help="interleaved rounds (default: the runs' measure.latency_rounds)")
    parser.add_argument("--round-ms", type=_number(float, 0.0, low_open=True), help="timed work per model per round")
    parser.add_argument("--warmup", type=_number(int, 0), help="untimed calls per model first")
    parser.add_argument("--clock", choices=["cpu", "wall"])
    parser.add_argument("--threads-bN", type=_threads_value, help="threads at batch N: a number >= 1 or auto")
    parser.add_argument("--dry-run", action="store_true", help="measure and print, don't write results.json")
    args = parser.parse_args(argv)
    _require_dirs(parser, args.paths)
    usable = partial(usable_records, warn=lambda message: print(f"warning: {message}", file=sys.stderr))
    runs = completed_runs(args.paths, usable)
    if not runs:
        raise SystemExit(f"no completed runs with saved artifacts under {', '.join(map(str, args.paths))}")
    settings = LatencySettings.from_config((runs[0][1].get("config") or {}).get("measure") or {})
    for field, value in (("rounds", args.rounds), ("round_ms", args.round_ms), ("warmup", args.warmup),
                         ("clock", args.clock)):
        if value is not None:
            setattr(settings, field, value)
    if args.threads_bN is not None:
        settings.threads_bN = args.threads_bN
    LatencySettings(**asdict(settings))  # re-validate the overridden values
    print_measured(measure_together(args.paths, settings, write=not args.dry_run, usable=usable))


def _threads_value(text: str) -> int | str:
    """``--threads-bN``: ``auto`` or a thread count >= 1."""
    return text if text == "auto" else _number(int, 1)(text)


def reproduce_main(argv: list[str] | None = None) -> int:
    """``compresslab-reproduce``: run the paper-claim suite (:mod:`compresslab.reproduce`) and print
    one table (paper | claim | paper number | ours | verdict); writes ``reproduce.json``/``.md`` and a
    figure per claim into ``--out``."""
    import datetime as dt
    import shlex
    import time

    from compresslab.reproduce.output import print_table, write_outputs
    from compresslab.reproduce.suite import Suite, available_claims

    parser = argparse.ArgumentParser(prog="compresslab-reproduce",
                                     description="The paper-claim reproduction suite (conf/experiment/repro/).")
    parser.add_argument("--only", default="", help="comma-separated claim ids (default: all)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per claim (default 3)")
    parser.add_argument("--out", type=Path, default=None, help="output dir (default outputs/reproduce/<date>_<time>)")
    parser.add_argument("--teacher-cache", type=Path, default=None, help="teacher cache (default <out>/teachers)")
    parser.add_argument("--quick", action="store_true", help="one seed per claim on a shortened schedule")
    parser.add_argument("--list", action="store_true", help="list the claims and exit")
    parser.add_argument("--scale", choices=["digits", "paper"], default="digits",
                        help="digits (default: 8x8 digits, no files) or paper (the MNIST claims at the papers' "
                             "scale and architectures; needs --data-root)")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="dataset.root of every job (paper scale: the folder holding MNIST/raw/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="a Hydra override added to every job, last (repeatable), e.g. "
                             "--set dataset.path=../shared/data/text/shakespeare.txt")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    if args.scale == "paper" and not args.list:
        if args.data_root is None:
            parser.error("--scale paper needs --data-root DIR (the folder holding MNIST/raw/*-ubyte)")
        if not (args.data_root / "MNIST" / "raw").is_dir():
            parser.error(f"--data-root {args.data_root}: no MNIST/raw/ folder there (the four IDX files of MNIST "
                         "go in <DIR>/MNIST/raw/)")

    claims = available_claims(args.scale)
    if args.list:
        for c in claims.values():
            print(f"{c.claim:24s} {c.paper}: {c.statement}")
        return 0
    wanted = [c.strip() for c in args.only.split(",") if c.strip()] or list(claims)
    unknown = [c for c in wanted if c not in claims]
    if unknown:
        parser.error(f"unknown claim(s) {unknown}; the suite has {list(claims)}")
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    out = args.out or Path("outputs/reproduce") / dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    suite = Suite(out=out, teacher_cache=args.teacher_cache, quick=args.quick, n_seeds=args.seeds,
                  log=lambda msg: print(msg, flush=True), data_root=args.data_root,
                  overrides=list(args.overrides))
    start = time.perf_counter()
    rows = suite.run(claims[c] for c in wanted)
    wall = time.perf_counter() - start
    command = "compresslab-reproduce " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    paths = write_outputs(out, rows, claims, wall, command.strip())
    print_table(rows, wall)
    print(f"wall time {wall:.0f} s; {paths['json']}, {paths['md']}, figures in {out}")
    return 1 if any(r["errors"] for r in rows) else 0


def sensitivity_main(argv: Sequence[str] | None = None) -> None:
    """``compresslab-sensitivity MODEL [overrides] --out DIR``: prune each layer of a saved model file
    alone to a range of sparsities and tabulate the accuracy (:func:`run_sensitivity`); exits 0."""
    run_sensitivity(argv)


def run_sensitivity(argv: Sequence[str] | None = None) -> dict[str, str]:
    """:func:`sensitivity_main`'s work; returns the written paths (:mod:`compresslab.compress.prune.sensitivity`)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from compresslab.artifact import load_model_file
    from compresslab.compress.prune import sensitivity
    from compresslab.pipeline import build_datamodule

    parser = argparse.ArgumentParser(prog="compresslab-sensitivity",
                                     description="Per-layer pruning sensitivity (Han et al. 2015, Fig. 6).")
    parser.add_argument("model", help="a compresslab model file (artifacts/student.pt, a cached teacher .pt, ...)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides picking the data, e.g. dataset=digits")
    parser.add_argument("--out", default="sensitivity", help="output directory (default: ./sensitivity)")
    parser.add_argument("--sparsities", type=_sparsity_list, default=list(sensitivity.DEFAULT_SPARSITIES),
                        help="comma-separated fractions in [0, 1) (default: 0,0.1,...,0.9,0.95)")
    parser.add_argument("--split", choices=("val", "test"), default="val")
    parser.add_argument("--max-batches", type=_number(int, 1), default=None)
    parser.add_argument("--no-classifier", action="store_true", help="leave the classifier out")
    args = parser.parse_args(argv)

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=list(args.overrides))
    dm = build_datamodule(cfg)
    dm.setup("fit")
    model = load_model_file(Path(args.model))
    loader_fn = dm.val_dataloader if args.split == "val" else dm.test_dataloader
    sparsities = args.sparsities
    baseline, rows = sensitivity.layer_sensitivity(model, sensitivity.batch_evaluator(loader_fn, args.max_batches),
                                                   sparsities, include_classifier=not args.no_classifier)
    paths = sensitivity.write_sensitivity(rows, baseline, Path(args.out),
                                          title=f"{Path(args.model).name} on {cfg.dataset.name}")
    print(f"unpruned {args.split} accuracy: {baseline:.4f}")
    print(Path(paths["md"]).read_text())
    print("safe sparsity per layer (drop <= 1 point):", sensitivity.summarize(rows))
    print("wrote", paths["csv"], paths["md"], paths["png"])
    return paths


def sbatch_main(argv: Sequence[str] | None = None) -> None:
    """``compresslab-sbatch <overrides>``: print the sbatch script ``hydra/launcher=slurm`` would
    submit for these overrides, without submitting it (:func:`compresslab.cluster.sbatch_preview`)."""
    from compresslab.cluster import compose_launcher, sbatch_preview

    print(sbatch_preview(compose_launcher(list(argv if argv is not None else sys.argv[1:]))))


if __name__ == "__main__":
    main()
