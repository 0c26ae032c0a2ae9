"""Pieces the benchmark scripts share: the config a benchmark's pipeline run is composed from
(``conf/config.yaml`` with the benchmark's run dir and teacher cache, no logger, no progress output,
no resume, and the benchmark's overrides; ``compresslab.pipeline.run_experiment`` then runs it exactly
as the ``compresslab`` command would), and the table cell of a speed-up with its interval."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parents[1]


def compose_run(run_dir: Path, teacher_cache: Path, epochs: int, overrides: list[str]):
    """The composed config of one benchmark run (``teacher=none`` unless ``overrides`` say otherwise)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[
            f"paths.run_dir={run_dir}", f"paths.teacher_cache={teacher_cache}", "logger=none", "teacher=none",
            f"student.epochs={epochs}", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
            "resume=false", *overrides])


def ratio_cell(value: float | None, ci=None) -> str:
    """``2.37× [2.30, 2.40]`` (or ``2.37×`` without an interval, ``–`` without a value)."""
    if value is None:
        return "–"
    return f"{value:.2f}× [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{value:.2f}×"
