"""The Pareto front a search found, for ``compresslab-report <sweep dir>``: read from the study the
sweep dir names (``search.yaml``), tabulated, and drawn over every completed trial in the plane of
the first two objectives (accuracy vs size for the ``optuna_nsga2``/``optuna_motpe`` presets)."""

from __future__ import annotations

from pathlib import Path

import optuna
import yaml

from compresslab.search.study import STUDY_FILE, open_storage


def load_search(sweep_dir: Path) -> tuple[optuna.Study, list[str]] | None:
    """The study of a search dir and its objective paths, or None for a dir that is not a search."""
    info_path = Path(sweep_dir) / STUDY_FILE
    if not info_path.exists():
        return None
    info = yaml.safe_load(info_path.read_text())
    study = optuna.load_study(study_name=info["study_name"], storage=open_storage(info["storage"]))
    return study, list(info["objectives"])


def front_markdown(study: optuna.Study, paths: list[str]) -> str:
    """A markdown table of the Pareto-optimal (or, single-objective, the best) trials, with the trial
    counts by state (pruned apart from failed)."""
    states = [t.state.name.lower() for t in study.trials]
    counts = ", ".join(f"{states.count(s)} {s}" for s in ("complete", "pruned", "fail", "running") if s in states)
    param_keys = sorted({k for t in study.best_trials for k in t.params})
    lines = [f"study {study.study_name}: {counts}; Pareto front ({len(study.best_trials)} trials)", "",
             "| trial | " + " | ".join(paths + param_keys) + " |", "|---" * (1 + len(paths) + len(param_keys)) + "|"]
    for t in sorted(study.best_trials, key=lambda t: t.values):
        cells = [f"{v:.6g}" for v in t.values] + [_fmt(t.params.get(k)) for k in param_keys]
        lines.append(f"| {t.number} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_front(study: optuna.Study, paths: list[str], out_dir: Path) -> Path | None:
    """``pareto_front.png``: every completed trial in the plane of the first two objectives, the
    front marked and joined; None for a single-objective study."""
    if len(paths) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    front = sorted(study.best_trials, key=lambda t: t.values[1])
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter([t.values[1] for t in done], [t.values[0] for t in done], color="tab:blue", alpha=0.6,
               label=f"completed trials ({len(done)})")
    ax.plot([t.values[1] for t in front], [t.values[0] for t in front], color="tab:red", marker="o",
            fillstyle="none", markersize=11, label=f"Pareto front ({len(front)})")
    for t in front:
        ax.annotate(str(t.number), (t.values[1], t.values[0]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(f"{paths[1]} ({study.directions[1].name.lower()})")
    ax.set_ylabel(f"{paths[0]} ({study.directions[0].name.lower()})")
    ax.set_title(f"study {study.study_name}")
    ax.legend()
    fig.tight_layout()
    out = Path(out_dir) / "pareto_front.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
