"""Obtain the teacher: load ``teacher.ckpt``, or train it once and cache it by config hash.

The cache lives in ``paths.teacher_cache`` as ``<arch>-<dataset>-<hash>.pt`` (a safe
model file) plus a ``.json`` describing what was hashed. A file lock makes
concurrent sweep jobs that need the same teacher wait for the one that trains
it; the file appears by atomic rename, so nobody reads a half-written teacher.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytorch_lightning as pl
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf
from torch import nn

from compresslab.config_utils import arch_spec, recipe_kwargs
from compresslab.distributed import is_rank_zero
from compresslab.artifact import DENSE_FORMAT, load_state_dict_into, model_from_payload, read_payload, save_model_file
from compresslab.errors import CheckpointError
from compresslab.data.regime import STUDENT_REGIME_KEYS
from compresslab.models import build_model
from compresslab.train import ClassifierModule, fit_with_checkpoints

#: Dataset keys that change what is loaded, not which samples/labels a model sees, and the
#: student's regime (the teacher always trains on the full training split).
_DATA_KEYS_IGNORED = {"root", "download", "num_workers", "eval_batch_size", "pin_memory", "persistent_workers",
                      *STUDENT_REGIME_KEYS}
#: Trainer keys that change the numbers a training run produces.
_TRAINER_KEYS_HASHED = ("precision", "limit_train_batches", "limit_val_batches", "max_steps",
                        "accumulate_grad_batches", "gradient_clip_val")
CACHE_VERSION = 1
#: What a cached teacher file records about its training (its ``meta``).
META_KEYS = ("acc_top1", "acc_top1_last", "best_epoch", "train_time_s")


def load_cached_teacher(path: Path, spec: dict, shape, classes: int) -> tuple[nn.Module, dict]:
    """The teacher in the cache file ``path`` and its ``meta``, after checking that the file is the
    configured teacher: a complete dense model file of this architecture, input shape and class count,
    with its training figures, and finite weights. Otherwise a :class:`CheckpointError` naming the
    file to delete (the next run then trains the teacher into it again)."""
    way_out = (f" Delete {path} (and {path.with_suffix('.json')}) to train the teacher again into the cache, "
               "or set paths.teacher_cache to another directory.")
    try:
        payload = read_payload(path)
    except CheckpointError as exc:
        raise CheckpointError(f"The cached teacher is unusable: {exc}{way_out}") from exc
    if not isinstance(payload, dict) or payload.get("format") != DENSE_FORMAT:
        what = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"The cached teacher {path} is not a dense compresslab model file ({what!r}).{way_out}")
    wanted = {"arch": dict(spec), "input_shape": [int(v) for v in shape], "num_classes": int(classes)}
    for key, value in wanted.items():
        if json.dumps(payload.get(key), sort_keys=True, default=str) != json.dumps(value, sort_keys=True, default=str):
            raise CheckpointError(f"The cached teacher {path} is not the configured teacher: its {key} is "
                                  f"{payload.get(key)!r}, the configuration asks for {value!r}.{way_out}")
    meta = payload.get("meta")
    if not isinstance(meta, dict) or not set(META_KEYS) <= set(meta):
        raise CheckpointError(f"The cached teacher {path} lacks its training figures (meta with "
                              f"{', '.join(META_KEYS)}).{way_out}")
    try:
        return model_from_payload(payload, str(path)), meta
    except CheckpointError as exc:
        raise CheckpointError(f"The cached teacher is unusable: {exc}{way_out}") from exc


def teacher_identity(cfg: DictConfig) -> dict:
    """Everything that determines a trained teacher: data, arch, recipe, seed, trainer numerics
    (not the student's regime: ``dataset.train_fraction``, ``exclude_classes``, ...)."""
    data = {k: v for k, v in OmegaConf.to_container(cfg.dataset, resolve=True).items() if k not in _DATA_KEYS_IGNORED}
    recipe = {k: v for k, v in OmegaConf.to_container(cfg.teacher, resolve=True).items() if k not in ("ckpt", "name")}
    trainer = {k: cfg.trainer.get(k) for k in _TRAINER_KEYS_HASHED}
    return {"version": CACHE_VERSION, "dataset": data, "teacher": recipe, "seed": int(cfg.seed), "trainer": trainer}


def teacher_cache_path(cfg: DictConfig) -> Path:
    """``<cache>/<arch>-<dataset>-<12 hex of sha256(identity)>.pt``."""
    ident = json.dumps(teacher_identity(cfg), sort_keys=True, default=str)
    digest = hashlib.sha256(ident.encode()).hexdigest()[:12]
    return Path(cfg.paths.teacher_cache) / f"{cfg.teacher.name}-{cfg.dataset.name}-{digest}.pt"


def build_recipe_module(model: nn.Module, recipe: DictConfig, cfg: DictConfig, num_classes: int) -> ClassifierModule:
    """A :class:`ClassifierModule` with the optimizer/scheduler/label smoothing of a recipe node."""
    return ClassifierModule(model, num_classes, **recipe_kwargs(recipe, cfg))


def obtain_teacher(
    cfg: DictConfig, datamodule, trainer_factory: Callable[..., pl.Trainer], log: Callable[[str], Any] = print,
) -> tuple[nn.Module, dict] | tuple[None, None]:
    """Return ``(teacher in eval mode, info)``; info has ``path``, ``source`` and test accuracies.

    The teacher trains on the full training split: a datamodule with a student regime is
    replaced by its :meth:`~compresslab.data.ClassificationDataModule.full_split_view`.
    """
    if cfg.teacher.get("arch") is None:
        return None, None
    if hasattr(datamodule, "full_split_view"):
        datamodule = datamodule.full_split_view()
    shape, classes = datamodule.input_shape, datamodule.num_classes
    spec = arch_spec(cfg.teacher)
    if cfg.teacher.get("ckpt"):
        path = Path(cfg.teacher.ckpt)
        model = load_state_dict_into(build_model(spec, shape, classes), path)
        return model.eval(), {"path": str(path), "source": "checkpoint"}

    path = teacher_cache_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Global rank 0 holds the lock for its whole job; DDP ranks > 0 follow its decision
    # (train along with it, or load the file it finds) without taking the lock.
    with FileLock(str(path) + ".lock") if is_rank_zero() else contextlib.nullcontext():
        if path.exists():
            log(f"teacher: cached {path}")
            model, meta = load_cached_teacher(path, spec, shape, classes)
            return model, {"path": str(path), "source": "cache", **meta}
        pl.seed_everything(int(cfg.seed), workers=True)
        model = build_model(spec, shape, classes)
        if int(cfg.teacher.get("epochs", 1)) == 0:  # a trained checkpoint (hf_causal_lm) used as it is
            meta = {k: None for k in META_KEYS}
            if is_rank_zero():
                save_model_file(path, model, spec, shape, classes, meta=meta)
            return model.eval(), {"path": str(path), "source": "pretrained", **meta}
        log(f"teacher: training {cfg.teacher.name} -> {path}")
        module = build_recipe_module(model, cfg.teacher, cfg, classes)
        work_dir = path.with_suffix(".work")
        fit = fit_with_checkpoints(  # resume=false (the way out of a damaged last.ckpt) holds for the teacher too
            module, datamodule, trainer_factory, work_dir, cfg.teacher.epochs, resume=bool(cfg.get("resume", True)),
        )
        meta = {k: fit[k] for k in META_KEYS}
        if not is_rank_zero():
            return model.eval(), {"path": str(path), "source": "trained", **meta}
        save_model_file(path, model, spec, shape, classes, meta=meta)
        path.with_suffix(".json").write_text(json.dumps(
            {"identity": teacher_identity(cfg), "metrics": meta}, indent=2, default=str))
        shutil.rmtree(work_dir, ignore_errors=True)
        return model.eval(), {"path": str(path), "source": "trained", **meta}
