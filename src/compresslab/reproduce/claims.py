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
    ``checks`` (``{metric, op: ">="|"<="|">"|"<", value, why}``), ``figure`` and ``note``.

The verdict: every check holds on the mean over seeds → ``reproduced``; some → ``partly``;
none → ``not reproduced``.
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
    """``scale · (a op b)`` where ``a``, ``b`` are ``job:key`` references into the records, or the
    names of metrics defined before this one."""

    name: str
    a: str
    op: str | None = None
    b: str | None = None
    scale: float = 1.0
    label: str = ""

    @classmethod
    def parse(cls, name: str, spec: Mapping[str, Any], jobs: Sequence[str], earlier: Sequence[str] = ()) -> "Metric":
        unknown = set(spec) - {"a", "op", "b", "scale", "label"}
        if unknown or "a" not in spec:
            raise ConfigError(f"repro.metrics.{name}: needs `a` (job:key), optional op/b/scale/label; got {dict(spec)}")
        metric = cls(name, str(spec["a"]), spec.get("op"), spec.get("b"), float(spec.get("scale", 1.0)),
                     str(spec.get("label", name)))
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
            return self.scale * a
        return self.scale * _COMBINE[self.op](a, self._value(self.b, records, done))


@dataclass
class Check:
    metric: str
    op: str
    value: float
    why: str = ""

    def holds(self, x: float) -> bool:
        return bool(_COMPARE[self.op](x, self.value))

    def text(self) -> str:
        return f"{self.metric} {self.op} {self.value:g}"


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
            checks.append(Check(str(c["metric"]), str(c["op"]), float(c["value"]), str(c.get("why", ""))))
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
                   figure=dict(repro.get("figure") or {}))

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
            results.append({"check": check.text(), "why": check.why, "mean": mean,
                            "holds": bool(xs) and check.holds(mean)})
        held = sum(r["holds"] for r in results)
        verdict = "reproduced" if held == len(results) else "partly" if held else "not reproduced"
        return verdict, results


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value, nan for none)."""
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)
