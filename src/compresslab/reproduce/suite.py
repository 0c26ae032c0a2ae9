"""Run the reproduction suite: every claim's jobs for every seed, in this process, one at a time.

Each job is the preset ``experiment=repro/<claim>`` plus the job's overrides and the seed,
composed from ``conf/`` and run by :func:`compresslab.pipeline.run_experiment`, so it leaves its
own ``results.json``. A job's run dir is ``<out>/runs/<hash of its resolved config>``: two claims
that need the same run (a dense baseline) share it, and a completed run found there is reused
(re-running the suite into the same ``--out`` resumes it). Teachers come from the teacher cache
(``<out>/teachers`` unless ``--teacher-cache``). Every number of the table is computed from the
records the jobs wrote.

A job may use an earlier job's run dir (same seed) in an override as ``{run:<job>}``: the
post-training claims train ONE model in a first job and compress that very model in the next ones
(``student=hf_causal_lm student.arch.path={run:train}/artifacts/student_hf student.epochs=0``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from omegaconf import OmegaConf

from compresslab.reproduce.claims import Claim, mean_std

#: What every job of the suite sets: no W&B, quiet trainer, and no latency measurement in a fresh
#: process (no claim of the suite is about speed; sizes and accuracies are measured as usual).
JOB_SETTINGS = [
    "logger=none",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "measure.fresh_process=false",
]
#: Shorter latency loops where the config has these keys (the figures are not used by any claim).
LATENCY_SETTINGS = {"measure.latency_warmup": 1, "measure.latency_rounds": 1,
                    "measure.latency_batch": 8, "measure.latency_round_ms": 1.0, "measure.defer": True}


def config_dir() -> Path:
    from compresslab.config_utils import CONFIG_DIR

    return Path(CONFIG_DIR)


def _compose(overrides: Sequence[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=list(overrides))


#: Where each scale's presets live under ``conf/experiment/``: digits (the default, no files needed)
#: and paper (the papers' own data, MNIST, and architectures; needs ``--data-root``).
SCALES = {"digits": "repro", "paper": "repro/paper"}


def available_claims(scale: str = "digits") -> dict[str, Claim]:
    """Every preset of ``scale`` (``conf/experiment/repro/`` or ``repro/paper/``), parsed, in suite order."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; one of {list(SCALES)}")
    claims = []
    for path in sorted((config_dir() / "experiment" / SCALES[scale]).glob("*.yaml")):
        preset = f"{SCALES[scale]}/{path.stem}"
        cfg = _compose([f"experiment={preset}"])
        claim = Claim.from_config(OmegaConf.to_container(cfg, resolve=False))
        if claim.claim != path.stem:
            raise ValueError(f"{path}: repro.claim is {claim.claim!r}, the file name says {path.stem!r}")
        if claim.scale != scale:
            raise ValueError(f"{path}: repro.scale is {claim.scale!r}, its folder says {scale!r}")
        claim.preset = preset
        claims.append(claim)
    return {c.claim: c for c in sorted(claims, key=lambda c: (c.order, c.claim))}


def _settings(base_cfg) -> list[str]:
    out = list(JOB_SETTINGS)
    for key, value in LATENCY_SETTINGS.items():
        if OmegaConf.select(base_cfg, key, default="__missing__") != "__missing__":
            out.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    return out


def earlier_runs(overrides: Sequence[str], dirs: dict[str, Path]) -> list[str]:
    """``overrides`` with each ``{run:<job>}`` replaced by that earlier job's run dir."""
    out = []
    for item in overrides:
        for name, path in dirs.items():
            item = item.replace("{run:" + name + "}", str(path))
        if "{run:" in item:
            raise ValueError(f"override {item!r} names a job that has not run before it (jobs run in their "
                             f"listed order; done: {list(dirs)})")
        out.append(item)
    return out


@dataclass
class Job:
    claim: str
    name: str
    seed: int
    overrides: list[str]
    run_dir: Path | None = None
    record: dict | None = None
    wall_s: float = 0.0
    reused: bool = False
    error: str | None = None


@dataclass
class Suite:
    out: Path
    teacher_cache: Path | None = None
    quick: bool = False
    n_seeds: int = 3
    log: Any = print
    data_root: Path | None = None
    overrides: list[str] = field(default_factory=list)  # --set: added to every job, last
    jobs: list[Job] = field(default_factory=list)

    def job_overrides(self, claim: Claim, job: str, seed: int, settings: Sequence[str]) -> list[str]:
        cache = self.teacher_cache or self.out / "teachers"
        root = [f"dataset.root={Path(self.data_root).resolve()}"] if self.data_root is not None else []
        return [f"experiment={claim.preset or 'repro/' + claim.claim}", *settings, *root, *claim.jobs[job],
                *(claim.quick_overrides(job) if self.quick else []), *self.overrides, f"seed={seed}",
                f"paths.teacher_cache={cache}"]

    def seeds(self, claim: Claim) -> list[int]:
        seeds = list(claim.seeds)
        if self.quick:
            return seeds[:1]
        while len(seeds) < self.n_seeds:
            seeds.append(seeds[-1] + 1 if seeds else 0)
        return seeds[:self.n_seeds]

    def run_job(self, job: Job) -> None:
        from compresslab.pipeline import run_experiment

        cfg = _compose([*job.overrides, "paths.run_dir=__suite__"])
        plain = OmegaConf.to_container(cfg, resolve=True)
        for key in ("paper", "repro"):
            plain.pop(key, None)
        plain["paths"].pop("run_dir", None)
        digest = hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:12]
        job.run_dir = self.out / "runs" / digest
        results = job.run_dir / "results.json"
        if results.exists():
            try:
                record = json.loads(results.read_text())
            except json.JSONDecodeError:
                record = {}
            if record.get("status") == "completed":
                job.record, job.reused = record, True
                return
        cfg.paths.run_dir = str(job.run_dir)
        job.run_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        quiet = [logging.getLogger(n) for n in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric",
                                                  "compresslab")]
        levels = [lg.level for lg in quiet]
        try:
            with open(job.run_dir / "job.log", "w") as logfile, contextlib.redirect_stdout(logfile), \
                    contextlib.redirect_stderr(logfile):
                for lg in quiet:
                    lg.setLevel(logging.WARNING)
                job.record = run_experiment(cfg)
        except Exception as exc:  # noqa: BLE001 - a failed job is reported, the suite goes on
            job.error = f"{type(exc).__name__}: {exc}"
            (job.run_dir / "job.log").open("a").write(traceback.format_exc())
        finally:
            for lg, level in zip(quiet, levels):
                lg.setLevel(level)
            job.wall_s = time.perf_counter() - start

    def run(self, claims: Iterable[Claim]) -> list[dict]:
        settings = _settings(_compose([]))
        rows = []
        for claim in claims:
            per_seed: dict[int, dict[str, dict]] = {}
            claim_jobs: list[Job] = []
            t0 = time.perf_counter()
            for seed in self.seeds(claim):
                dirs: dict[str, Path] = {}
                for name in claim.jobs:
                    job = Job(claim.claim, name, seed, earlier_runs(self.job_overrides(claim, name, seed, settings), dirs))
                    self.run_job(job)
                    if job.run_dir is not None:
                        dirs[name] = job.run_dir.resolve()
                    claim_jobs.append(job)
                    self.jobs.append(job)
                    state = "reused" if job.reused else f"{job.wall_s:.1f}s" if not job.error else f"FAILED {job.error}"
                    self.log(f"  {claim.claim} seed={seed} {name}: {state}")
                    if job.record is not None:
                        per_seed.setdefault(seed, {})[name] = job.record
            complete = {s: r for s, r in per_seed.items() if len(r) == len(claim.jobs)}
            rows.append(self.row(claim, complete, claim_jobs, time.perf_counter() - t0))
        return rows

    def row(self, claim: Claim, per_seed: dict, jobs: list[Job], wall_s: float) -> dict:
        values = claim.values(per_seed)
        verdict, checks = claim.verdict(values)
        mean, std = mean_std(values[claim.headline])
        errors = [f"{j.name} seed={j.seed}: {j.error}" for j in jobs if j.error]
        return {
            "claim": claim.claim,
            "scale": claim.scale,
            "dataset": claim.dataset,
            "paper": claim.paper,
            "metric": claim.metrics[claim.headline].label,
            "paper_value": claim.paper_value,
            "ours_mean": None if math.isnan(mean) else mean,
            "ours_std": None if math.isnan(std) else std,
            "seeds": sorted(per_seed),
            "verdict": verdict,
            "figure": None,
            "statement": claim.statement,
            "checks": checks,
            "metrics": {name: {"label": m.label, "values": values[name],
                               "mean": mean_std(values[name])[0] if values[name] else None,
                               "std": mean_std(values[name])[1] if values[name] else None}
                        for name, m in claim.metrics.items()},
            "paper_results": claim.paper_results,
            "schedule": claim.schedule,
            "note": claim.note,
            "runs": {f"{j.name}/seed{j.seed}": str(j.run_dir) for j in jobs},
            "errors": errors,
            "wall_s": wall_s,
            "quick": self.quick,
        }
