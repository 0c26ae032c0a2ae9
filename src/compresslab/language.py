"""What a run does differently when its models are causal language models (docs/language_models.md).

The pipeline stays the image pipeline; these helpers are the few places where an LM differs:
test metrics (perplexity and per-token accuracy instead of per-class accuracy), the rules of a run
that post-processes an already trained LM (``student.epochs=0`` with ``student=hf_causal_lm``), the
teacher/student vocabulary check of LM distillation, and the Hugging Face checkpoint directory a run
writes beside its artifact so a later run can load the trained LM without retraining.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torch import nn

from compresslab.errors import ConfigError
from compresslab.measure import evaluate_accuracy
from compresslab.measure.lm import is_causal_lm, lm_quality
from compresslab.measure.per_class import class_metrics
from compresslab.models.lm import save_hf_dir

def is_language_data(dm: Any) -> bool:
    """Whether the datamodule serves token blocks for causal language modelling."""
    return bool(getattr(dm, "is_language_model", False))


def test_metrics(model: nn.Module, dm, num_classes: int, **class_kwargs) -> dict[str, Any]:
    """The test-split quality figures of a saved model: for an LM its perplexity, NLL and next-token
    ``acc_top1`` (:func:`~compresslab.measure.lm.lm_quality`); otherwise ``acc_top1`` and the per-class ones."""
    if is_language_data(dm) and is_causal_lm(model):
        return lm_quality(model, dm.test_dataloader(), dm.block_size)
    return {"acc_top1": evaluate_accuracy(model, dm.test_dataloader()),
            **class_metrics(model, dm, num_classes, **class_kwargs)}


def check_untrained_roles(cfg: DictConfig) -> None:
    """``student.epochs=0`` (allowed by :mod:`compresslab.run_options` only for a trained checkpoint,
    ``hf_causal_lm``) runs no fit, so nothing that needs one."""
    if int(cfg.student.get("epochs", 1)) == 0 and cfg.distill.name != "none":
        raise ConfigError(f"distill={cfg.distill.name} with student.epochs=0: distillation needs a fit; use "
                          "student.epochs>=1 (the hf_causal_lm weights are its starting point).")


def check_no_fit_callbacks(epochs: int, callbacks: list) -> None:
    """Refuse ``student.epochs=0`` with a method that acts during training (its callbacks would never run)."""
    if epochs == 0 and callbacks:
        names = ", ".join(sorted({type(cb).__name__ for cb in callbacks}))
        raise ConfigError(f"student.epochs=0 runs no fit, but these act during training: {names}. Use a "
                          "post-training method, or student.epochs>=1 to fine-tune.")


def check_same_vocabulary(student: nn.Module, teacher: nn.Module | None, distill_name: str) -> None:
    """LM distillation compares the two models' next-token distributions: their vocabularies must agree."""
    if teacher is None or distill_name == "none" or not (is_causal_lm(student) or is_causal_lm(teacher)):
        return
    sizes = {role: getattr(m, "vocab_size", None) for role, m in (("student", student), ("teacher", teacher))}
    if not (is_causal_lm(student) and is_causal_lm(teacher)) or sizes["student"] != sizes["teacher"]:
        raise ConfigError(f"distill={distill_name} between language models needs the same tokenizer: the student's "
                          f"vocabulary has {sizes['student']} tokens, the teacher's {sizes['teacher']}. Use one "
                          "dataset.tokenizer for both (a teacher from hf_causal_lm must have been trained with it).")


def untrained_fit() -> dict[str, Any]:
    """The fit figures of a student used as loaded (``student.epochs=0``)."""
    return {"acc_top1": None, "val_acc_top1": None, "acc_top1_last": None, "best_epoch": None, "epochs_run": 0,
            "resumed_from": None, "preemptions": 0, "train_time_s": 0.0}


def write_hf_checkpoint(model: nn.Module, artifacts: Path) -> str | None:
    """``<artifacts>/student_hf``: the student LM as a safetensors Hugging Face directory (None otherwise)."""
    path = save_hf_dir(model, artifacts / "student_hf")
    return str(path) if path is not None else None
