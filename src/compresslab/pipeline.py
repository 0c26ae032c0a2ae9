"""One compresslab run: data → teacher → (compressed) student fit → artifact → measurement → results.

:func:`run_experiment` is what the ``compresslab`` CLI calls for each Hydra job; it
can be called directly with a composed config (tests do). Bad configuration
fails in :func:`validate` before any training time is spent, and every run —
completed or failed — leaves ``<run dir>/results.json``.

After :func:`validate`, a run is five named stages: ``obtain_teacher``
(:mod:`compresslab.teacher`: cached, from a checkpoint, or trained), :func:`fit_student`,
:func:`export_student` (every method's finalize and side files, save the artifact in the
claiming method's codec, what it stacks, the reference, export ONNX),
:func:`measure_models` and :func:`record_rows` (the rows of :mod:`compresslab.track.results`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import tempfile
import traceback
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback

from compresslab.artifact import DENSE_FORMAT, atomic_torch_save, load_model_file, model_payload, save_model_file
from compresslab.compress import CompressionMethod, build_methods
from compresslab.compress.base import ExportContext
from compresslab.compress.codecs.stacking import encodings_record
from compresslab.compress.fuse.bn import check_fuse_combination
from compresslab.config_utils import arch_spec, hydra_overrides, instantiate_node, job_run_dir, recipe_kwargs
from compresslab.data.regime import check_student_regime
from compresslab.deploy import step as deploy
from compresslab.distill.cache import check_cache_allowed
from compresslab.distributed import JobProcessGroup, install_hydra_ddp_fix, is_rank_zero
from compresslab.errors import CheckpointError, ConfigError
from compresslab.fit_speed import default_fit_kwargs
from compresslab.language import (check_no_fit_callbacks, check_same_vocabulary, check_untrained_roles, test_metrics,
                                  untrained_fit, write_hf_checkpoint)
from compresslab.measure import file_size, profile_many
from compresslab.measure.backends import load_backends
from compresslab.measure.fresh import measure_in_fresh_process
from compresslab.measure.latency import LatencySettings
from compresslab.measure.per_class import parse_class_bias
from compresslab.models import build_model
from compresslab.run_control import RunDirLock, as_interrupted
from compresslab.search.pruning import pruned_epoch, search_callbacks
from compresslab.run_options import check_run_options
from compresslab.teacher import obtain_teacher
from compresslab.track import base_record, write_results
from compresslab.track.results import add_ratios, student_row, teacher_row, unresolved_record, write_final_results
from compresslab.track.console import print_summary
from compresslab.track.loggers import config_callbacks, make_loggers
from compresslab.track.wandb_glue import finish, log_final
from compresslab.train import ClassifierModule, PerformanceOptions, fit_with_checkpoints
from compresslab.train_guard import check_training_config

log = logging.getLogger(__name__)


def build_datamodule(cfg: DictConfig):
    """Instantiate ``cfg.dataset`` and check its files are there (clear error otherwise)."""
    check_run_options(cfg)  # seed, dataset.*, recipes, measure.*, ...: a ConfigError naming the key, not the library's
    dm = instantiate_node(cfg.dataset)
    dm.prepare_data()
    return dm


def build_student_module(cfg: DictConfig, student: torch.nn.Module, teacher, num_classes: int) -> pl.LightningModule:
    """Plain supervised training for ``distill=none``; otherwise the configured distillation module."""
    common = recipe_kwargs(cfg.student, cfg)
    if cfg.distill.name == "none":
        return ClassifierModule(student, num_classes, **common)
    if teacher is None:
        raise ConfigError(f"distill={cfg.distill.name} needs a teacher, but teacher=none")
    return instantiate_node(cfg.distill, model=student, teacher=teacher, num_classes=num_classes, **common)


def validate(cfg: DictConfig, datamodule) -> list[CompressionMethod]:
    """Everything that can be checked before training: the options' types and ranges
    (:mod:`compresslab.run_options`, each method's ``options``), models build, files exist."""
    check_run_options(cfg)  # also run by build_datamodule, for a datamodule built another way
    shape, classes = datamodule.input_shape, datamodule.num_classes
    student = build_model(arch_spec(cfg.student), shape, classes)
    teacher = None
    if cfg.teacher.get("arch") is not None:
        teacher = build_model(arch_spec(cfg.teacher), shape, classes)
        ckpt = cfg.teacher.get("ckpt")
        if ckpt and not Path(ckpt).exists():
            raise CheckpointError(f"teacher.ckpt={ckpt} does not exist ({Path(ckpt).resolve()})")
    elif cfg.distill.name != "none":
        raise ConfigError(f"distill={cfg.distill.name} needs a teacher, but teacher=none")
    if cfg.distill.get("cache_teacher_outputs"):
        check_cache_allowed(datamodule)  # before the teacher trains, not at the student's fit
    check_student_regime(datamodule, cfg.distill.name)  # a transfer set without labels needs soft targets
    parse_class_bias(_eval_cfg(cfg).get("class_bias"), classes)
    check_training_config(cfg)  # a fit runs steps (epochs >= 1 is run_options', 0 only for a trained LM)
    check_untrained_roles(cfg)
    check_same_vocabulary(student, teacher, cfg.distill.name)
    if cfg.distill.name != "none":  # losses, weights and feature taps, against fresh models: before any fit
        module = build_student_module(cfg, student, teacher, classes)
        train_set = getattr(datamodule, "train_set", None)  # feature shapes at the taps too (FSP pairs, OFD's BN)
        module.build(shape, len(train_set) if train_set is not None else None)
    methods = build_methods(cfg)
    context = ExportContext(arch=arch_spec(cfg.student), input_shape=list(shape), num_classes=classes)
    for method in methods:  # checks against the built student (layer names, BN present, ...)
        method.validate_student(build_model(arch_spec(cfg.student), shape, classes), datamodule)
        method.bind(context)
    check_fuse_combination(cfg)
    deploy.validate(cfg)  # export / measure.backends settings
    instantiate(cfg.trainer, max_epochs=1, logger=False, **trainer_adjustments(cfg.trainer))  # accelerator/devices/precision errors now
    return methods


def _eval_cfg(cfg: DictConfig) -> dict:
    """The ``eval`` node (class bias) as a plain dict ({} when absent)."""
    node = cfg.get("eval")
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


def _trainer_with(trainer_cfg: DictConfig, extra: list, callbacks=(), **kwargs) -> pl.Trainer:
    """The configured Trainer with ``extra`` callbacks and :func:`~compresslab.fit_speed.default_fit_kwargs`."""
    return instantiate(trainer_cfg, **{**kwargs, **default_fit_kwargs(trainer_cfg, [*callbacks, *extra], kwargs)})


def trainer_adjustments(trainer_cfg: DictConfig) -> dict:
    """Trainer settings that cannot apply on this machine, overridden with a logged reason."""
    out = {}
    on_cpu = trainer_cfg.get("accelerator") == "cpu" or (
        trainer_cfg.get("accelerator") == "auto" and not torch.cuda.is_available())
    if trainer_cfg.get("sync_batchnorm") and on_cpu:
        log.warning("trainer.sync_batchnorm needs GPUs (torch SyncBatchNorm); disabled for this CPU run")
        out["sync_batchnorm"] = False
    return out


def _size(path: Path) -> dict:
    return {"size_bytes": file_size(path), "artifact": str(path)}


def latency_deferred(cfg: DictConfig) -> bool:
    """``measure.defer``: true/false, or auto = defer when the sweep's launcher runs jobs
    concurrently (submitit, SLURM, joblib...), whose latencies would disturb each other; the
    sweep then measures every job's artifacts together at its end (``compresslab-measure``)."""
    value = cfg.measure.get("defer", "auto")
    if value != "auto":
        return bool(value)
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return False
    return "BasicLauncher" not in str(HydraConfig.get().launcher.get("_target_", ""))


def _profile_all(cfg: DictConfig, files: dict[str, Path | None], models: dict[str, torch.nn.Module],
                 examples, num_classes: int, backends: dict | None = None) -> dict[str, dict]:
    """Params, MACs and latency of every model: by default of its file, loaded in a fresh process
    (``measure.fresh_process``) and checked to compute what this process loaded. A model without
    a compresslab file (a teacher from a Lightning checkpoint) is written to a temporary one.
    ``backends``: ``{backend: {name: .onnx path}}`` timed in the same rounds (:mod:`compresslab.deploy.step`)."""
    ex1, exn = examples
    settings = LatencySettings.from_config(cfg.measure)
    latency = not latency_deferred(cfg)
    if not cfg.measure.get("fresh_process", True):
        profiles = profile_many(models, ex1, exn, settings, latency=latency, backends=load_backends(backends))
        return {name: {**p, "measured_in": "training_process"} for name, p in profiles.items()}
    with tempfile.TemporaryDirectory(prefix="compresslab-teacher-") as tmp:
        files = {name: path if path is not None else save_model_file(
            Path(tmp) / f"{name}.pt", models[name], arch_spec(cfg[name]), ex1.shape[1:], num_classes)
            for name, path in files.items()}
        metrics, outputs = measure_in_fresh_process(files, ex1, exn, settings, latency=latency, backends=backends)
    for name, model in models.items():
        with torch.no_grad():
            here = model(exn).detach().cpu()
        diff = float((here - outputs[name]).abs().max())
        if diff > 1e-4 * (1.0 + float(here.abs().max())):
            log.warning("%s: the fresh process computes different outputs from its file (max abs diff %.3g)",
                        name, diff)
        metrics[name].update(measured_in="fresh_process", fresh_process_max_abs_diff=diff)
    return metrics


@dataclass
class SavedModels:
    """What :func:`export_student` leaves for measuring: each model as loaded back from its file
    (``models``), the file (``files``; None for a teacher without a compresslab file), the
    export/check figures of the ``.onnx`` files (``onnx``, None without ``export.onnx``), what the
    student's file stacks (``encodings``) and each method's side files (``side_files``, by axis)."""

    models: dict[str, torch.nn.Module]
    files: dict[str, Path | None]
    onnx: dict[str, dict] | None
    encodings: dict[str, Any]
    side_files: dict[str, dict[str, str]]
    hf_checkpoint: str | None = None


def fit_student(cfg: DictConfig, dm, methods: Sequence[CompressionMethod], teacher, trainer_factory, logger,
                run_dir: Path, extra_callbacks: Sequence[Callback] = ()) -> tuple[torch.nn.Module, dict]:
    """Stage 2: build the student, let each method prepare it, fit it (with the methods' callbacks,
    distilling from ``teacher`` when there is one; resumable) and return it with the fit's figures."""
    pl.seed_everything(int(cfg.seed), workers=True)
    student = build_model(arch_spec(cfg.student), dm.input_shape, dm.num_classes)
    for method in methods:
        student = method.prepare(student, dm)
    module = build_student_module(cfg, student, teacher, dm.num_classes)
    method_callbacks = [cb for m in methods for cb in m.callbacks()]  # once: a method keeps the one it made
    check_no_fit_callbacks(int(cfg.student.epochs), method_callbacks)
    callbacks = method_callbacks + list(extra_callbacks)
    if int(cfg.student.epochs) == 0:  # a trained LM (hf_causal_lm) given to post-training methods as it is
        return student.eval(), untrained_fit()
    fit = fit_with_checkpoints(module, dm, trainer_factory, run_dir / "checkpoints" / "student",
                               cfg.student.epochs, callbacks=callbacks, logger=logger or False,
                               resume=bool(cfg.resume))
    return module.model.eval(), fit


def export_student(cfg: DictConfig, dm, methods: Sequence[CompressionMethod], student: torch.nn.Module, teacher,
                   tinfo: dict, artifacts: Path) -> SavedModels:
    """Stage 3: finalize the trained student with each method (every method: its report), write
    each method's side files, save the student in the format the last method claims (dense
    otherwise; :meth:`~compresslab.compress.base.CompressionMethod.export` is pure) beside the
    untrained dense reference, record what the file stacks, load both back from their files, and
    export/check ONNX files when ``export.onnx`` is on."""
    for method in methods:
        student = method.finalize(student, dm)
    side = {m.axis: m.side_files(artifacts.parent) for m in methods}
    spec, shape, classes = arch_spec(cfg.student), dm.input_shape, dm.num_classes
    context = ExportContext(arch=spec, input_shape=list(shape), num_classes=classes)
    payload = next((p for m in reversed(methods) if (p := m.export(student, context)) is not None), None)
    payload = payload or model_payload(student, spec, shape, classes)
    student_path = artifacts / "student.pt"
    atomic_torch_save(payload, student_path)
    ref_path = save_model_file(artifacts / "reference.pt", build_model(spec, shape, classes), spec, shape, classes)
    models = {"reference": load_model_file(ref_path), "student": load_model_file(student_path)}  # as saved
    hf = write_hf_checkpoint(models["student"], artifacts) if payload["format"] == DENSE_FORMAT else None
    files: dict[str, Path | None] = {"reference": ref_path, "student": student_path}
    if teacher is not None:  # a user's checkpoint may be a Lightning one: measured from a model file
        models["teacher"] = teacher
        files["teacher"] = None if tinfo["source"] == "checkpoint" else Path(tinfo["path"])
    calibration = [x for m in methods for x in m.calibration_data()]
    onnx = deploy.export_step(cfg, files, models, dm, calibration, artifacts) if deploy.export_enabled(cfg) else None
    return SavedModels(models, files, onnx, encodings_record(payload, methods), side, hf)


def measure_models(cfg: DictConfig, saved: SavedModels, dm) -> dict[str, dict]:
    """Stage 4: params, MACs and latency of every saved model (and its ONNX file in each backend)."""
    examples = (dm.example_batch(1), dm.example_batch(int(cfg.measure.latency_batch)))
    return _profile_all(cfg, saved.files, saved.models, examples, dm.num_classes, deploy.onnx_files(saved.onnx, cfg))


def record_rows(cfg: DictConfig, dm, methods: Sequence[CompressionMethod], saved: SavedModels,
                profiles: dict[str, dict], fit: dict, tinfo: dict) -> dict[str, dict | None]:
    """Stage 5: the teacher / reference / student rows of results.json (:mod:`compresslab.track.results`),
    accuracies measured on the saved models on the test split."""
    models, files, classes = saved.models, saved.files, dm.num_classes
    rows: dict[str, dict | None] = {"teacher": None}
    if "teacher" in models:
        teacher = models["teacher"]
        accuracy = test_metrics(teacher, dm, classes, with_bias=False)
        rows["teacher"] = teacher_row(profiles["teacher"], _size(Path(tinfo["path"])), accuracy, tinfo)
    rows["reference"] = {**profiles["reference"], **_size(files["reference"])}
    accuracy = test_metrics(models["student"], dm, classes, eval_cfg=_eval_cfg(cfg))
    rows["student"] = student_row(profiles["student"], _size(files["student"]), accuracy, fit,
                                  {m.axis: {**m.report(), **saved.side_files[m.axis]} for m in methods})
    rows["student"]["encodings"] = saved.encodings
    if saved.hf_checkpoint:
        rows["student"]["hf_checkpoint"] = saved.hf_checkpoint
    add_ratios(rows)
    deploy.merge(rows, saved.onnx)
    return rows


def run_experiment(cfg: DictConfig, extra_callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Run one experiment described by ``cfg`` and return its results record."""
    with JobProcessGroup(), RunDirLock(job_run_dir(cfg)) if is_rank_zero() else contextlib.nullcontext():
        return _run(cfg, extra_callbacks)


def _run(cfg: DictConfig, extra_callbacks: Sequence[Callback]) -> dict[str, Any]:
    run_dir = job_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    results_path = run_dir / "results.json"
    try:
        record = base_record(cfg, run_dir)
    except Exception as exc:  # the config itself can't be read: a short failed record, then the error
        if is_rank_zero():
            write_results(results_path, unresolved_record(run_dir, exc, hydra_overrides()))
        raise
    install_hydra_ddp_fix()
    if is_rank_zero():
        write_results(results_path, record)
    logger = None
    failed = True
    run_error: BaseException | None = None
    try:
        dm = build_datamodule(cfg)  # checks the run's options first
        if cfg.measure.get("threads"):
            torch.set_num_threads(int(cfg.measure.threads))
        dm.setup("fit")
        methods = validate(cfg, dm)
        perf = cfg.get("performance") or {}
        speed = PerformanceOptions(perf.get("channels_last", "auto"), perf.get("compile", False))
        trainer_factory = partial(_trainer_with, cfg.trainer, [speed], **trainer_adjustments(cfg.trainer))
        logger = make_loggers(cfg, run_dir, record["axes"])

        teacher, tinfo = obtain_teacher(cfg, dm, trainer_factory)
        student, fit = fit_student(cfg, dm, methods, teacher, trainer_factory, logger, run_dir,
                                   [*extra_callbacks, *search_callbacks(cfg), *config_callbacks(cfg)])
        if not is_rank_zero():  # DDP ranks > 0 took part in the fits; rank 0 exports and measures
            failed = False
            return record
        saved = export_student(cfg, dm, methods, student, teacher, tinfo, run_dir / "artifacts")
        profiles = measure_models(cfg, saved, dm)
        record.update(record_rows(cfg, dm, methods, saved, profiles, fit, tinfo))
        if hasattr(dm, "regime_summary"):
            record["data_regime"] = dm.regime_summary()
        record["status"] = "completed"
        failed = False
        return record
    except BaseException as exc:
        run_error = as_interrupted(exc, run_dir) or exc  # a signal: say how to resume, exit non-zero
        record["status"] = "failed" if pruned_epoch(exc) is None else "pruned"  # a search's pruner stopped it
        if pruned_epoch(exc) is not None:
            record["pruned_at_epoch"] = pruned_epoch(exc)
        record["error"] = f"{type(run_error).__name__}: {run_error}"
        record["traceback"] = traceback.format_exc()
        if run_error is not exc:
            raise run_error from exc
        raise
    finally:
        record["finished_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        if is_rank_zero():
            try:
                write_final_results(results_path, record, run_error)
            finally:
                failed = failed or record["status"] != "completed"
                try:
                    if logger is not None and not failed:
                        log_final(logger, record)
                finally:
                    finish(logger, failed)
                    print_summary(record)
