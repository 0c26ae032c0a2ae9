"""The Optuna search (issue #28): search space, objectives by dotted path, storage, the pruning
callback, and two sweep processes sharing one study (end to end through ``compresslab -m``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from compresslab.cli import report_main
from compresslab.errors import ConfigError
from compresslab.search.pruning import OptunaPruning, TrialPrunedAtEpoch, pruned_epoch
from compresslab.search.space import search_space
from compresslab.search.study import (create_studies, objective_values, open_storage, parse_objectives,
                                      storage_url)

from conftest import FAST


def test_search_space_from_hydra_sweep_syntax():
    dists, fixed = search_space(["student.optimizer.lr=tag(log, interval(0.0003, 0.03))", "prune=none,agp",
                                 "x=range(1,10,3)", "quant=choice(none,ptq_int8)", "seed=3"])
    assert dists["student.optimizer.lr"] == FloatDistribution(0.0003, 0.03, log=True)
    assert dists["prune"] == CategoricalDistribution(["none", "agp"])
    assert dists["quant"] == CategoricalDistribution(["none", "ptq_int8"])
    assert dists["x"] == IntDistribution(1, 7, step=3)  # stop excluded, as range() is
    assert fixed == {"seed": "3"}


def test_objectives_by_dotted_path():
    paths, directions = parse_objectives({"student.acc_top1": "maximize", "student.backends.ort.size": "minimize"})
    record = {"student": {"acc_top1": 0.75, "backends": {"ort": {"size": 120}}}}
    assert objective_values(record, paths) == [0.75, 120.0] and directions == ["maximize", "minimize"]
    with pytest.raises(ValueError, match="student.latency_ms_b1"):
        objective_values(record, ["student.latency_ms_b1"])
    with pytest.raises(ConfigError, match="upward"):
        parse_objectives({"student.acc_top1": "upward"})


def test_storage_default_sqlite_journal_and_bad_spec(tmp_path):
    assert storage_url(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/optuna.db"
    journal = open_storage(f"journal:{tmp_path / 'j' / 'study.log'}")
    study = optuna.create_study(storage=journal, study_name="s")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    again = optuna.load_study(study_name="s", storage=open_storage(f"journal:{tmp_path / 'j' / 'study.log'}"))
    assert len(again.trials) == 2  # the journal file holds the study for another process
    with pytest.raises(ConfigError, match="hydra.sweeper.storage"):
        open_storage("my_study.db")


def test_pruning_callback_reports_each_epoch_and_raises_with_the_epoch(tmp_path):
    url = storage_url(None, tmp_path)
    _, companion = create_studies("s", url, ["maximize", "minimize"], None,
                                  optuna.pruners.ThresholdPruner(lower=0.5), "maximize")
    trial = companion.ask()
    callback = OptunaPruning(trial, "val/acc")
    strategy = SimpleNamespace(broadcast=lambda obj, src=0: obj)
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, strategy=strategy, current_epoch=0,
                              callback_metrics={"val/acc": 0.8})
    callback.on_validation_end(trainer, None)  # above the threshold: goes on
    trainer.current_epoch, trainer.callback_metrics = 1, {"val/acc": 0.3}
    with pytest.raises(TrialPrunedAtEpoch) as info:
        callback.on_validation_end(trainer, None)
    assert pruned_epoch(info.value) == 2 and pruned_epoch(ValueError()) is None
    assert companion.trials[0].intermediate_values == {1: 0.8, 2: 0.3}  # stored, readable by other processes
    trainer.callback_metrics = {"train/loss": 1.0}
    with pytest.raises(KeyError, match="val/acc"):
        callback.on_validation_end(trainer, None)


def _search(sweep, storage, teachers, extra):
    args = ["-m", "hydra/sweeper=optuna_nsga2", "hydra.sweeper.n_trials=2", f"hydra.sweeper.storage={storage}",
            f"hydra.sweep.dir={sweep}", f"paths.teacher_cache={teachers}", *FAST, "teacher=none",
            "student=lenet5,mlp", *extra]
    return subprocess.Popen([sys.executable, "-m", "compresslab.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=sweep.parent,
                            env={**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_two_sweep_processes_share_one_study_and_pruned_trials_are_recorded(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    a, b = tmp_path / "a", tmp_path / "b"
    procs = [_search(a, storage, tmp_path / "t", ["hydra/sweeper/pruner=none",
                                                  "hydra.sweeper.constraints={student.size_bytes:100000}"]),
             # b's pruner stops every trial after its first epoch (no val accuracy reaches 1.01)
             _search(b, storage, tmp_path / "t", ["hydra/sweeper/pruner=threshold", "hydra.sweeper.pruner.lower=1.01"])]
    outs = [p.communicate(timeout=600) for p in procs]
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0, err[-3000:]
    study = optuna.load_study(study_name="compresslab", storage=storage)
    states = sorted(t.state.name for t in study.trials)
    assert states == ["COMPLETE", "COMPLETE", "PRUNED", "PRUNED"]  # both processes' trials, one study
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    for t in study.trials:  # each trial's job dir is its trial number, its results.json says how it ended
        record = json.loads((tmp_path / t.user_attrs["run_dir"] / "results.json").read_text())
        assert record["config"]["search"]["trial"] == t.number
        if t.state.name == "PRUNED":
            assert record["status"] == "pruned" and record["pruned_at_epoch"] == 1
            assert t.user_attrs["pruned_at_epoch"] == 1
        else:
            assert record["status"] == "completed"
            assert list(t.values) == [record["student"]["acc_top1"], record["student"]["size_bytes"]]
            assert t.user_attrs["constraints"] == [record["student"]["size_bytes"] - 100000]  # a's budget
    assert "2 pruned, 0 failed" in outs[1][0]
    front = yaml.safe_load((a / "optimization_results.yaml").read_text())["pareto_front"]
    assert {f["number"] for f in front} <= {t.number for t in study.trials if t.state.name == "COMPLETE"}
    report_main([str(a), "--no-plots"])
    assert "2 complete, 2 pruned; Pareto front" in capsys.readouterr().out


@pytest.mark.parametrize("path", ["student.accuracy", "students.acc_top1", "acc_top1", "student.acc_top1.x"])
def test_an_unknown_objective_path_is_refused_naming_the_figures(path):
    from compresslab.search.study import parse_objectives

    with pytest.raises(ConfigError, match=r"hydra.sweeper.objectives\." + path.replace(".", r"\.")):
        parse_objectives({path: "maximize"})
    assert parse_objectives({"student.acc_top1": "maximize", "student.prune.sparsity": "maximize"})[1] == [
        "maximize", "maximize"]
