"""The latency engine: several models timed in turn, with their spread, ratio intervals and a noise gate.

Timing uses ``torch.utils.benchmark.Timer`` (fixed thread count per measurement, CUDA
synchronisation, compiled statement). Models are measured in *interleaved rotating rounds*:
after every model's warm-up, each round times every model in turn, the order rotating each
round, so drift (clock speed, caches, other processes) falls on all models alike.

What makes a figure trustworthy on a shared machine (see docs/measurement.md for the data):

- ``clock="cpu"`` (the default) times each call with the CPU time of the measuring thread
  (one thread) or process (several), so the time slices other processes take are not
  counted; ``clock="wall"`` is plain ``perf_counter``.
- Threads are fixed and recorded: 1 at batch 1; at batch N the machine's physical cores but one
  when it is otherwise idle, 1 when other processes are using the CPU (multi-threaded kernels
  stall when one of their threads is descheduled).
- Every latency carries its IQR, every ratio a bootstrap interval over rounds.
- The reference is timed twice in the same rounds (a *twin*): their ratio must be ~1.
  When the twin check or the spread is beyond its threshold, the result says
  ``reliable: False`` with the reason, and tables print the figure as unreliable.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch.utils.benchmark import Timer

TWIN_SUFFIX = "#twin"


@dataclass
class LatencySettings:
    """How to time: ``measure.*`` in conf/config.yaml documents each field."""

    warmup: int = 10                # untimed calls per model before the first round
    rounds: int = 7
    round_ms: float = 20.0          # timed work per model per round (Timer.blocked_autorange's min_run_time)
    clock: str = "cpu"              # cpu | wall
    threads_b1: int | None = 1      # None: leave torch's thread count
    threads_bN: int | str | None = "auto"   # auto: physical cores - 1 when idle, else 1 (auto_threads_bN)
    max_spread: float = 0.5         # IQR / median of any model's blocks above this: unreliable
    max_twin_deviation: float = 0.10   # |twin ratio - 1| above this: unreliable
    max_ci_width: float = 0.25      # the twin ratio's 5-95% interval wider than this: unreliable
    max_other_cpu: float = 0.25     # wall clock only: other processes' CPU share above this: unreliable
    bootstrap: int = 1000

    def __post_init__(self) -> None:
        if self.clock not in ("cpu", "wall"):
            raise ValueError(f"measure.clock must be cpu or wall, got {self.clock!r}")

    @classmethod
    def from_config(cls, measure: Mapping[str, Any]) -> "LatencySettings":
        """Settings from the ``measure`` config node (its ``latency_*``, ``clock``, ``threads*`` keys)."""
        get = measure.get
        threads = get("threads")
        gate = dict(get("reliability") or {})
        return cls(
            warmup=int(get("latency_warmup", 10)), rounds=int(get("latency_rounds", 7)),
            round_ms=float(get("latency_round_ms", 20.0)), clock=str(get("clock", "cpu")),
            threads_b1=int(threads) if threads else _threads(get("threads_b1", 1)),
            threads_bN=int(threads) if threads else _threads(get("threads_bN", "auto")),
            max_spread=float(gate.get("max_spread", 0.5)),
            max_twin_deviation=float(gate.get("max_twin_deviation", 0.10)),
            max_ci_width=float(gate.get("max_ci_width", 0.25)),
            max_other_cpu=float(gate.get("max_other_cpu", 0.25)),
        )


def _threads(value: Any) -> int | str | None:
    return value if value in (None, "auto") else int(value)


# ---- the machine ------------------------------------------------------------------------
def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads counted once)."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = set()
    try:
        for cpu in allowed:
            topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
            cores.add((topo / "physical_package_id").read_text().strip() + ":" + (topo / "core_id").read_text().strip())
    except OSError:
        return len(allowed)
    return max(1, len(cores))


def _busy_and_self() -> tuple[float, float] | None:
    """(CPU seconds all processes have used, CPU seconds this process has used), from /proc."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
        tick = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    own = os.times()
    return (user + nice + system + irq + softirq + steal) / tick, own.user + own.system


class LoadProbe:
    """The machine's load over a stretch of time: load average, and the share of the CPUs
    that *other* processes used (from /proc/stat minus this process's own CPU time)."""

    def __init__(self) -> None:
        self.start_wall = time.monotonic()
        self.start = _busy_and_self()
        self.load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    def result(self) -> dict[str, Any]:
        end, wall = _busy_and_self(), time.monotonic() - self.start_wall
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        other = None
        if self.start is not None and end is not None and wall > 0:
            other_s = max(0.0, (end[0] - self.start[0]) - (end[1] - self.start[1]))
            other = min(1.0, other_s / (wall * cpus))
        return {"loadavg_1m": self.load_start, "other_cpu_fraction": other, "cpus": cpus,
                "seconds": round(wall, 3)}


#: The timed figures of one model (:meth:`Session.figures` and :meth:`Session.speedups`), which each
#: backend has its own of under ``<row>.backends.<backend>``.
TIMED_FIGURES = ("latency_ms_b1", "latency_ms_b1_p90", "latency_ms_b1_iqr", "latency_ms_bN", "latency_ms_bN_p90",
                 "latency_ms_bN_iqr", "speedup", "speedup_ci", "speedup_b1", "speedup_b1_ci")
#: Figures computed from timed ones: ``speedup_vs_expected`` (``track.results.add_ratios``) and the
#: deployed speed-ups (``measure.backends.set_deployed``). With :data:`TIMED_FIGURES` they are the one
#: vocabulary of clock-made figures (``track.metrics.LATENCY_METRICS`` is derived from both).
DERIVED_TIMED_FIGURES = ("speedup_vs_expected", "deployed_speedup", "deployed_speedup_b1")


def auto_threads_bN(is_idle: bool, cores: int | None = None) -> int:  # noqa: N802 - the config's name
    """``measure.threads_bN: auto``: on an idle machine every physical core but one (the one left
    to the OS and whatever else wakes up: with all cores busy, an OpenMP barrier waits for the
    thread the scheduler took away), else 1. On a 2-core machine that is 1 thread either way:
    there, 2 threads at batch N timed bimodally in every session of 2026-12-04 (docs/measurement.md)."""
    cores = physical_cores() if cores is None else int(cores)
    return max(1, cores - 1) if is_idle else 1


def idle(probe_s: float = 0.3, max_other: float = 0.10) -> tuple[bool, dict]:
    """Whether other processes leave the CPUs free (measured over ``probe_s``)."""
    probe = LoadProbe()
    time.sleep(probe_s)
    load = probe.result()
    return (load["other_cpu_fraction"] is not None and load["other_cpu_fraction"] <= max_other), load


# ---- timing -----------------------------------------------------------------------------
def _clock(kind: str, threads: int) -> Callable[[], float]:
    if kind == "wall":
        return time.perf_counter
    return time.thread_time if threads == 1 else time.process_time


@dataclass
class Timed:
    """Per-call times (ms) of one model: one list of block means per round."""

    rounds: list[list[float]] = field(default_factory=list)

    def samples(self) -> np.ndarray:
        return np.array([t for r in self.rounds for t in r], dtype=float)


@torch.no_grad()
def time_interleaved(models: Mapping[str, Callable], example: Any, settings: LatencySettings,
                     threads: int | None) -> dict[str, Timed]:
    """Time ``model(example)`` for every model in interleaved rotating rounds (see module doc):
    in each round every model runs ``Timer.blocked_autorange(min_run_time=round_ms)``, whose
    blocks (per-call means) are that round's samples."""
    names = list(models)
    n_threads = int(threads) if threads else torch.get_num_threads()
    clock = _clock(settings.clock, n_threads)
    timers = {}
    for name in names:
        model = models[name]
        if isinstance(model, torch.nn.Module):
            model.eval()
        timers[name] = Timer(stmt="model(x)", globals={"model": model, "x": example}, timer=clock,
                             num_threads=n_threads)
        if settings.warmup > 0:
            timers[name].timeit(settings.warmup)
    timed = {name: Timed() for name in names}
    for r in range(max(1, int(settings.rounds))):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            measurement = timers[name].blocked_autorange(min_run_time=settings.round_ms / 1e3)
            timed[name].rounds.append([t * 1e3 for t in measurement.times])
    return timed


def summarize(t: Timed) -> dict[str, float]:
    """Median, p90 and IQR (ms) of a model's per-call block times."""
    s = t.samples()
    q25, q50, q75, q90 = np.percentile(s, [25, 50, 75, 90])
    return {"median_ms": float(q50), "p90_ms": float(q90), "iqr_ms": float(q75 - q25)}


def ratio_interval(num: Timed, den: Timed, n_boot: int = 1000, seed: int = 0) -> tuple[float, list[float]]:
    """``median(num) / median(den)`` and its 5-95% bootstrap interval, resampling rounds (the
    unit in which the two were measured side by side)."""
    a, b = num.rounds, den.rounds
    k = min(len(a), len(b))
    point = float(np.median(num.samples()) / np.median(den.samples()))
    if k < 2:
        return point, [point, point]
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, k, size=(n_boot, k))
    ratios = [np.median([t for i in p for t in a[i]]) / np.median([t for i in p for t in b[i]]) for p in picks]
    lo, hi = np.percentile(ratios, [5, 95])
    return point, [float(lo), float(hi)]


@dataclass
class Session:
    """One interleaved measurement of several models: their timed blocks at batch 1 and N,
    the threads and clock used, and the machine's load while it ran."""

    timed: dict[str, dict[str, Timed]]    # "b1" / "bN" -> model name -> Timed
    threads_b1: int
    threads_bN: int
    load: dict
    idle_probe: dict | None
    twin: str | None
    settings: LatencySettings

    def figures(self, name: str) -> dict[str, float]:
        """latency_ms_b1 / _p90 / _iqr and the same for bN, of one model."""
        row = {}
        for tag in ("b1", "bN"):
            s = summarize(self.timed[tag][name])
            row[f"latency_ms_{tag}"] = s["median_ms"]
            row[f"latency_ms_{tag}_p90"] = s["p90_ms"]
            row[f"latency_ms_{tag}_iqr"] = s["iqr_ms"]
        return row

    def speedups(self, name: str, reference: str) -> dict[str, Any]:
        """``speedup`` (batch N) and ``speedup_b1`` of ``name`` over ``reference``, with their 5-95% intervals."""
        out: dict[str, Any] = {}
        for key, tag in (("speedup", "bN"), ("speedup_b1", "b1")):
            out[key], out[key + "_ci"] = ratio_interval(self.timed[tag][reference], self.timed[tag][name],
                                                        self.settings.bootstrap)
        return out

    def gate(self, names: list[str] | None = None) -> dict[str, Any]:
        """The noise gate over ``names`` (default: every model): spread, twin self-check, load."""
        names = [n for n in (names or self.timed["b1"]) if not n.endswith(TWIN_SUFFIX)]
        gate = _gate(self.timed, names, self.twin, self.settings, self.load)
        gate.update(threads_b1=self.threads_b1, threads_bN=self.threads_bN, clock=self.settings.clock,
                    idle_probe=self.idle_probe, settings=asdict(self.settings))
        return gate


def time_models(models: Mapping[str, Callable], example_b1: Any, example_bn: Any, settings: LatencySettings,
                twin: str | None = None) -> Session:
    """Time every model at batch 1 and batch N in interleaved rotating rounds, at the settings'
    thread counts (``threads_bN="auto"``: :func:`auto_threads_bN`), with
    ``twin`` timed a second time in the same rounds as the self-check."""
    timed_models = dict(models)
    if twin is not None and twin in models:
        timed_models[twin + TWIN_SUFFIX] = models[twin]
    else:
        twin = None
    probe = LoadProbe()
    threads_bn, idle_load = settings.threads_bN, None
    if threads_bn == "auto":
        cores = physical_cores()
        if auto_threads_bN(True, cores) == 1:  # 1 thread whatever the load: no need for the 0.3 s probe
            threads_bn = 1
        else:
            is_idle, idle_load = idle()
            threads_bn = auto_threads_bN(is_idle, cores)
    threads_b1 = settings.threads_b1 or torch.get_num_threads()
    threads_bn = threads_bn or torch.get_num_threads()
    timed = {"b1": time_interleaved(timed_models, example_b1, settings, threads_b1),
             "bN": time_interleaved(timed_models, example_bn, settings, threads_bn)}
    return Session(timed, int(threads_b1), int(threads_bn), probe.result(), idle_load, twin, settings)


def measure_latencies(models: Mapping[str, Callable], example_b1: Any, example_bn: Any,
                      settings: LatencySettings, references: Mapping[str, str] | None = None,
                      twin: str | None = "reference") -> dict[str, Any]:
    """Latency at batch 1 and batch N of every model, interleaved, with the noise gate.

    ``references`` maps a model name to the name of the model its speed-up is relative to
    (default: every model relative to ``"reference"`` when there is one); ``twin`` is timed a
    second time in the same rounds as the self-check. Returns ``{"models": {name: figures},
    "gate": {...}}``; each model's figures hold ``latency_ms_b1``/``_p90``/``_iqr``, the same
    for ``bN``, ``speedup``/``speedup_b1`` and their ``_ci`` when it has a reference.
    """
    references = dict(references if references is not None else
                      {n: "reference" for n in models if "reference" in models})
    session = time_models(models, example_b1, example_bn, settings, twin)
    out: dict[str, dict] = {}
    for name in models:
        out[name] = session.figures(name)
        if references.get(name) in models:
            out[name].update(session.speedups(name, references[name]))
    return {"models": out, "gate": session.gate()}


def _gate(timed: Mapping[str, Mapping[str, Timed]], models: list[str], twin: str | None,
          settings: LatencySettings, load: dict) -> dict[str, Any]:
    """The noise gate: spread, twin self-check and (wall clock) other processes' CPU share."""
    reasons = []
    spreads = {}
    for key in ("b1", "bN"):
        for name in models:
            s = summarize(timed[key][name])
            spreads[f"{name}/{key}"] = s["iqr_ms"] / s["median_ms"] if s["median_ms"] > 0 else 0.0
    worst = max(spreads, key=spreads.get) if spreads else None
    if worst is not None and spreads[worst] > settings.max_spread:
        reasons.append(f"spread {spreads[worst]:.2f} (IQR/median of {worst}) > {settings.max_spread}")
    twin_ratio, twin_ci = {}, {}
    if twin is not None and twin in timed["b1"]:
        for key in ("b1", "bN"):
            twin_ratio[key], twin_ci[key] = ratio_interval(timed[key][twin], timed[key][twin + TWIN_SUFFIX],
                                                           settings.bootstrap)
            width = twin_ci[key][1] - twin_ci[key][0]
            if abs(twin_ratio[key] - 1.0) > settings.max_twin_deviation:
                reasons.append(f"self-check {twin_ratio[key]:.2f} at {key} ({twin} vs itself, "
                               f"|1 - ratio| > {settings.max_twin_deviation})")
            elif width > settings.max_ci_width:
                reasons.append(f"self-check interval {width:.2f} wide at {key} ({twin} vs itself: 5-95% "
                               f"[{twin_ci[key][0]:.2f}, {twin_ci[key][1]:.2f}] > {settings.max_ci_width})")
    other = load.get("other_cpu_fraction")
    if settings.clock == "wall" and other is not None and other > settings.max_other_cpu:
        reasons.append(f"other processes {other:.0%} of CPU (wall clock)")
    short = [r.split(" (")[0] for r in reasons]
    if reasons and load.get("loadavg_1m") is not None:
        reasons.append(f"load {load['loadavg_1m']:.1f}")
        short.append(f"load {load['loadavg_1m']:.1f}")
    return {"reliable": not reasons, "reason": "; ".join(reasons) or None, "short_reason": ", ".join(short) or None,
            "load": load, "self_check": twin_ratio, "self_check_ci": twin_ci, "max_spread_seen": spreads.get(worst) if worst else None}
