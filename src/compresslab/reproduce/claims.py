"""A claim of the reproduction suite: its preset, its metrics computed from results.json records,
and the verdict, applied mechanically from the checks the preset states.

A preset ``conf/experiment/repro/<claim>.yaml`` carries, besides the setup it pins:

``paper``
    ``citation``, ``claim`` (the statement being checked) and ``results`` (the paper's numbers).
``repro``
    ``claim`` (the id), ``order``, ``seeds``, ``schedule`` (where the schedule comes from),
    ``jobs`` (name → overrides: one run per job and seed), ``quick`` (overrides for
    ``--quick``), ``metrics`` (name → ``{a: "job:key", op: "-"|"/", b: "job:key", scale, label}``),
    ``headline`` (the metric of the table row) and ``paper_value`` (the paper's number for it),
    ``checks`` (``{metric, op: ">="|"<="|">"|"<", value, why}``), ``figure`` and ``note``;
``scale`` (``digits``, the default, or ``paper``: the claim on the paper's own data and architectures,
``conf/experiment/repro/paper/``).

The verdict: every check holds on the mean over seeds → ``reproduced``; some → ``partly``;
none → ``not reproduced``.

A check with ``se_n`` (the number of test images a percentage is measured on: 10,000 for MNIST)
compares our mean with the paper's number directly, with a tolerance of two standard errors:
``tol = 2·sqrt(100²·p(1−p)/se_n + s²·(1 + 1/k))``, ``p`` the paper's value as a fraction, ``s`` the
sample standard deviation of our ``k`` seeds (the training noise of our mean and of the paper's single
run; 0 with one seed). ``op: "<="`` then holds when ``mean ≤ value + tol``, ``">="`` when
``mean ≥ value − tol``.
"""

from __future__ import annotations

import math
import operator
import statistics
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from compresslab.errors import ConfigError

VERDICTS = ("reproduced", "partly", "not reproduced")
_COMPARE = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
_COMBINE = {"-": operator.sub, "/": operator.truediv, "+": operator.add}


def lookup(record: Mapping[str, Any], key: str) -> float:
    """``record`` at a dotted ``key`` (``student.acc_per_class_bias.3``: list items by index)."""
    value: Any = record
    for part in key.split("."):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, (list, tuple)) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        else:
            raise KeyError(f"{key!r}: no {part!r} in the record")
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise KeyError(f"{key!r} is {value!r}, not a number")
    return float(value)


@dataclass
class Metric:
    """``scale · (a op b) + offset`` where ``a``, ``b`` are ``job:key`` references into the records, or
    the names of metrics defined before this one (an error rate in %: ``scale: -100, offset: 100``)."""

    name: str
    a: str
    op: str | None = None
    b: str | None = None
    scale: float = 1.0
    label: str = ""
    offset: float = 0.0

    @classmethod
    def parse(cls, name: str, spec: Mapping[str, Any], jobs: Sequence[str], earlier: Sequence[str] = ()) -> "Metric":
        unknown = set(spec) - {"a", "op", "b", "scale", "label", "offset"}
        if unknown or "a" not in spec:
            raise ConfigError(f"repro.metrics.{name}: needs `a` (job:key), optional op/b/scale/offset/label; "
                              f"got {dict(spec)}")
        metric = cls(name, str(spec["a"]), spec.get("op"), spec.get("b"), float(spec.get("scale", 1.0)),
                     str(spec.get("label", name)), float(spec.get("offset", 0.0)))
        if (metric.op is None) != (metric.b is None) or (metric.op is not None and metric.op not in _COMBINE):
            raise ConfigError(f"repro.metrics.{name}: `op` ({'/'.join(_COMBINE)}) and `b` go together")
        for ref in (metric.a, metric.b):
            if ref is None:
                continue
            if ":" not in ref and ref not in earlier:
                raise ConfigError(f"repro.metrics.{name}: {ref!r} is neither job:key nor a metric defined before")
            if ":" in ref and ref.split(":", 1)[0] not in jobs:
                raise ConfigError(f"repro.metrics.{name}: {ref!r} names no job of this claim ({list(jobs)})")
        return metric

    @staticmethod
    def _value(ref: str, records: Mapping[str, Mapping], done: Mapping[str, float]) -> float:
        if ":" not in ref:
            return done[ref]
        job, key = ref.split(":", 1)
        return lookup(records[job], key)

    def value(self, records: Mapping[str, Mapping], done: Mapping[str, float] | None = None) -> float:
        """The metric for one seed, from that seed's records (``{job: results.json}``) and the
        metrics already computed for it (``done``)."""
        done = done or {}
        a = self._value(self.a, records, done)
        if self.op is None:
            return self.scale * a + self.offset
        return self.scale * _COMBINE[self.op](a, self._value(self.b, records, done)) + self.offset


@dataclass
class Check:
    """``metric op value`` on the mean over seeds; with ``se_n``, against the paper's number with the
    two-standard-error tolerance of the module doc."""

    metric: str
    op: str
    value: float
    why: str = ""
    se_n: int | None = None

    def tolerance(self, xs: Sequence[float]) -> float:
        """Two standard errors (binomial on ``se_n`` test images, plus the seed spread); 0 without ``se_n``."""
        if not self.se_n:
            return 0.0
        p = min(max(self.value / 100.0, 0.0), 1.0)
        seeds = statistics.variance(xs) * (1 + 1 / len(xs)) if len(xs) > 1 else 0.0
        return 2.0 * math.sqrt(100.0 ** 2 * p * (1 - p) / self.se_n + seeds)

    def holds(self, x: float, tol: float = 0.0) -> bool:
        bound = self.value + tol if self.op in ("<=", "<") else self.value - tol
        return bool(_COMPARE[self.op](x, bound))

    def text(self, tol: float = 0.0) -> str:
        if not self.se_n:
            return f"{self.metric} {self.op} {self.value:g}"
        sign = "+" if self.op in ("<=", "<") else "-"
        return f"{self.metric} {self.op} {self.value:g} {sign} {tol:.2f} (2 SE: binomial on {self.se_n} test images + seed spread)"


@dataclass
class Claim:
    """One claim of the suite, parsed from a composed preset config."""

    claim: str
    order: int
    paper: str
    statement: str
    paper_results: dict
    seeds: list[int]
    jobs: dict[str, list[str]]
    quick: dict[str, list[str]]
    metrics: dict[str, Metric]
    headline: str
    paper_value: float | None
    checks: list[Check]
    schedule: str = ""
    note: str = ""
    figure: dict = field(default_factory=dict)
    scale: str = "digits"
    dataset: str = ""
    preset: str = ""

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "Claim":
        repro, paper = cfg.get("repro"), cfg.get("paper") or {}
        if not repro:
            raise ConfigError("a reproduction preset needs a `repro:` node")
        jobs = {str(k): [str(o) for o in (v or [])] for k, v in dict(repro["jobs"]).items()}
        metrics: dict[str, Metric] = {}
        for k, v in dict(repro["metrics"]).items():
            metrics[str(k)] = Metric.parse(str(k), v, list(jobs), list(metrics))
        checks = []
        for c in repro.get("checks") or []:
            if c.get("metric") not in metrics or c.get("op") not in _COMPARE:
                raise ConfigError(f"repro.checks: {dict(c)} needs a metric of {list(metrics)} and op in {list(_COMPARE)}")
            se_n = c.get("se_n")
            checks.append(Check(str(c["metric"]), str(c["op"]), float(c["value"]), str(c.get("why", "")),
                                None if se_n is None else int(se_n)))
        if not checks:
            raise ConfigError(f"repro {repro.get('claim')}: a claim needs at least one check (its verdict rule)")
        headline = str(repro["headline"])
        if headline not in metrics:
            raise ConfigError(f"repro.headline {headline!r} is not one of the metrics {list(metrics)}")
        seeds = [int(s) for s in repro.get("seeds") or [0, 1, 2]]
        pv = repro.get("paper_value")
        return cls(claim=str(repro["claim"]), order=int(repro.get("order", 99)), paper=str(paper.get("citation", "")),
                   statement=str(paper.get("claim", "")), paper_results=dict(paper.get("results") or {}),
                   seeds=seeds, jobs=jobs, quick=cls._quick(repro.get("quick"), jobs), metrics=metrics,
                   headline=headline, paper_value=None if pv is None else float(pv), checks=checks,
                   schedule=str(repro.get("schedule", "")), note=str(repro.get("note", "")),
                   figure=dict(repro.get("figure") or {}), scale=str(repro.get("scale", "digits")),
                   dataset=str((cfg.get("dataset") or {}).get("name", "")),
                   preset=str(repro.get("preset", f"repro/{repro['claim']}")))

    @staticmethod
    def _quick(spec: Any, jobs: Mapping[str, list[str]]) -> dict[str, list[str]]:
        """``repro.quick``: a list of overrides for every job, or ``{all: [...], <job>: [...]}``."""
        if not spec:
            return {}
        if isinstance(spec, (list, tuple)):
            return {"all": [str(o) for o in spec]}
        spec = dict(spec)
        unknown = set(spec) - {"all", *jobs}
        if unknown:
            raise ConfigError(f"repro.quick: {sorted(unknown)} are not jobs of this claim ({list(jobs)}) nor `all`")
        return {str(k): [str(o) for o in v or []] for k, v in spec.items()}

    def quick_overrides(self, job: str) -> list[str]:
        """What ``--quick`` adds to ``job``: the ``all`` overrides, then the job's own."""
        return [*self.quick.get("all", []), *self.quick.get(job, [])]

    # ---------------------------------------------------------------- results
    def values(self, per_seed: Mapping[int, Mapping[str, Mapping]]) -> dict[str, list[float]]:
        """``{metric: [value per seed]}`` from ``{seed: {job: record}}`` (only completed seeds)."""
        out: dict[str, list[float]] = {m: [] for m in self.metrics}
        for seed in sorted(per_seed):
            done: dict[str, float] = {}
            for name, metric in self.metrics.items():
                try:
                    done[name] = metric.value(per_seed[seed], done)
                except (KeyError, ZeroDivisionError):
                    continue
                out[name].append(done[name])
        return out

    def verdict(self, values: Mapping[str, list[float]]) -> tuple[str, list[dict]]:
        """The verdict and, per check, the mean it was applied to and whether it held."""
        results = []
        for check in self.checks:
            xs = values.get(check.metric) or []
            mean = statistics.fmean(xs) if xs else math.nan
            tol = check.tolerance(xs) if xs else 0.0
            results.append({"check": check.text(tol), "why": check.why, "mean": mean, "tolerance": tol,
                            "holds": bool(xs) and check.holds(mean, tol)})
        held = sum(r["holds"] for r in results)
        verdict = "reproduced" if held == len(results) else "partly" if held else "not reproduced"
        return verdict, results


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value, nan for none)."""
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)
