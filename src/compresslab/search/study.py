"""The Optuna study of a search: where it is stored, what it optimizes, how a trial's values
are read from its results.json.

Storage (``hydra.sweeper.storage``):

- ``null``: ``sqlite:///<sweep dir>/optuna.db`` -- a real database, readable while the search runs
  (``optuna-dashboard sqlite:///<sweep dir>/optuna.db``);
- ``journal:<file>``: Optuna's append-only journal file, which works on NFS where SQLite locking doesn't;
- any SQLAlchemy URL (``sqlite:///...``, ``postgresql://...``, ``mysql://...``).

Several sweep processes given the same storage and ``study_name`` add their trials to one study, and
re-running a search continues its study (``load_if_exists``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import optuna
from filelock import FileLock

from compresslab.axes import COMPRESSION_AXES
from compresslab.errors import ConfigError

#: the rows of results.json an objective can read
ROWS = ("student", "teacher", "reference")

#: The file beside the jobs that says which study a search dir belongs to (read by compresslab-report).
STUDY_FILE = "search.yaml"
DIRECTIONS = ("maximize", "minimize")
PRUNING_SUFFIX = ".pruning"


def storage_url(storage: str | None, sweep_dir: Path) -> str:
    """The storage spec the jobs and the sweeper share: ``storage`` as given, or the default SQLite
    file in ``sweep_dir`` (absolute, so jobs in other working directories find it)."""
    if storage in (None, ""):
        return f"sqlite:///{(Path(sweep_dir) / 'optuna.db').resolve()}"
    return str(storage)


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url`` (see the module docstring); a ConfigError for an unusable one."""
    if url.startswith("journal:"):
        path = Path(url[len("journal:"):].removeprefix("//"))
        if not str(path):
            raise ConfigError(f"hydra.sweeper.storage={url!r}: give the journal file, e.g. journal:/nfs/me/study.log")
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    if "://" not in url:
        raise ConfigError(f"hydra.sweeper.storage={url!r} is neither an RDB URL (sqlite:///file.db, "
                          "postgresql://...) nor journal:<file>; leave it null for SQLite in the sweep dir")
    if not url.startswith("sqlite:///"):
        return optuna.storages.RDBStorage(url)
    db = Path(url[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    # SQLite under parallel jobs: wait for the database lock instead of failing at once; and let one
    # process at a time create the schema (two sweeps starting together both insert alembic's version row)
    with FileLock(str(db) + ".lock"):
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})


def parse_objectives(objectives: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """``{dotted results.json path: maximize|minimize}`` -> (paths, directions), checked."""
    if not objectives:
        raise ConfigError("hydra.sweeper.objectives is empty: give e.g. {student.acc_top1: maximize}")
    paths, directions = [], []
    for path, direction in objectives.items():
        if str(direction) not in DIRECTIONS:
            raise ConfigError(f"hydra.sweeper.objectives.{path}={direction!r}: use maximize or minimize")
        check_objective_path(str(path))
        paths.append(str(path))
        directions.append(str(direction))
    return paths, directions


def check_objective_path(path: str) -> None:
    """A ConfigError unless ``path`` names a results.json figure: ``<row>.<figure>`` with a row of
    :data:`ROWS` and a figure of :data:`compresslab.run_options.OBJECTIVE_METRICS`, or
    ``student.<axis>.<key>`` (a method's own report)."""
    from compresslab.run_options import OBJECTIVE_METRICS  # here: run_options imports the datamodules (Lightning),
    # and this module is imported by the sweeper plugin before Hydra configures the job's logging

    parts = path.split(".")
    row, figure = parts[0], parts[1] if len(parts) > 1 else None
    if row not in ROWS or figure is None:
        raise ConfigError(f"hydra.sweeper.objectives.{path}: not a results.json figure; name one as "
                          f"<row>.<figure> with a row of {', '.join(ROWS)}, e.g. student.acc_top1")
    if figure in (*COMPRESSION_AXES, "backends") and len(parts) >= 3:
        return  # a method's report (student.prune.sparsity) or a backend's figures (student.backends.onnxruntime.x)
    if len(parts) != 2 or figure not in OBJECTIVE_METRICS:
        raise ConfigError(f"hydra.sweeper.objectives.{path}: unknown figure {'.'.join(parts[1:])!r}; "
                          f"the figures are {', '.join(OBJECTIVE_METRICS)} (or student.<axis>.<key>, <row>.backends.<backend>.<figure>)")


def dotted(record: Mapping[str, Any], path: str) -> Any:
    """``record["student"]["acc_top1"]`` for ``path="student.acc_top1"``; None when absent."""
    node: Any = record
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def objective_values(record: Mapping[str, Any], paths: list[str]) -> list[float]:
    """The trial's values, one per objective path; a ValueError naming a missing or non-finite one."""
    values = []
    for path in paths:
        value = dotted(record, path)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"results.json has no finite number at {path!r} (got {value!r})")
        values.append(float(value))
    return values


def create_studies(study_name: str, url: str, directions: list[str], sampler, pruner,
                   monitor_direction: str) -> tuple[optuna.Study, optuna.Study]:
    """The search's study and its single-objective companion ``<name>.pruning`` that holds the per-epoch
    validation metric. Optuna's ``Trial.report``/``should_prune`` are single-objective only, so each trial of
    a multi-objective study is paired with a companion trial the pruner decides on (the same for single
    objectives, so there is one path)."""
    storage = open_storage(url)
    study = optuna.create_study(study_name=study_name, storage=storage, sampler=sampler,
                                directions=directions, load_if_exists=True)
    if list(study.directions) != [optuna.study.StudyDirection[d.upper()] for d in directions]:
        raise ConfigError(f"study {study_name!r} in {url} has directions {[d.name.lower() for d in study.directions]},"
                          f" not {directions}: give another hydra.sweeper.study_name or storage")
    companion = optuna.create_study(study_name=study_name + PRUNING_SUFFIX, storage=storage, pruner=pruner,
                                    direction=monitor_direction, load_if_exists=True)
    return study, companion


def companion_trial(study_name: str, url: str, number: int, pruner) -> optuna.Trial:
    """Trial ``number`` of the companion pruning study, in a job process (reports and pruning
    decisions go through the shared storage, so the pruner sees every other job's epochs)."""
    storage = open_storage(url)
    name = study_name + PRUNING_SUFFIX
    study = optuna.load_study(study_name=name, storage=storage, pruner=pruner)
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(name), int(number))
    return optuna.trial.Trial(study, trial_id)
