"""Resolving the feature-loss entries against the two networks: taps, adapters and loss state.

One probe forward of each network (:func:`~compresslab.distill.tap_probe.probe`) resolves the
special taps, and gives the feature shapes each loss is built for. Everything that depends on
the models is checked here, before any training: tap names, feature maps where a loss needs
them, OFD's teacher BatchNorm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from pytorch_lightning.utilities import rank_zero_info
from torch import nn

from compresslab.distill.adapters import make_adapter
from compresslab.distill.frozen_teacher import FrozenTeacher
from compresslab.distill.loss_config import FeatureEntry
from compresslab.distill.tap_probe import ProbeResult, expand_layers, probe
from compresslab.distill.taps import validate_taps
from compresslab.errors import ConfigError

__all__ = ["Wiring", "check_tap_names", "wire"]


@dataclass
class Wiring:
    """What resolving the entries gave: the student's probe and the student taps of the main fit."""

    probe_student: ProbeResult
    student_taps: list[str]


def check_tap_names(entries: Sequence[FeatureEntry], student: nn.Module, teacher: nn.Module) -> None:
    """Fail, listing the valid module names, when a configured tap names no module."""
    for entry in entries:
        validate_taps(student, entry.student_layers, "student")
        validate_taps(teacher, entry.teacher_layers, "teacher")


def _check_spatial(entry: FeatureEntry, role: str, taps: Sequence[str], shapes: Sequence[tuple]) -> None:
    for tap, shape in zip(taps, shapes):
        if len(shape) < 2:
            raise ConfigError(
                f"{entry.name}: {type(entry.loss).__name__} needs feature maps (C, *spatial) but "
                f"{role} tap {tap!r} gives a vector of shape {shape}; tap a convolutional layer "
                f"(a model without feature maps, e.g. an MLP, cannot use this method)")


def _bind_teacher_bn(entry: FeatureEntry, p_t: ProbeResult, teacher: nn.Module) -> None:
    """OFD's margins: the teacher's BatchNorm before each tapped ReLU."""
    modules = dict(teacher.named_modules())
    bns = []
    for tap in entry.teacher_layers:
        bn = p_t.module_before(tap, (nn.modules.batchnorm._BatchNorm,))
        if bn is None:
            raise ConfigError(
                f"{entry.name}: {type(entry.loss).__name__} takes its margin from the teacher's "
                f"BatchNorm before the tapped pre-ReLU feature, but no BatchNorm runs before teacher tap "
                f"{tap!r} ({type(teacher).__name__}); use a teacher with BatchNorm (convnet, "
                "cnn1d, ResNets, WRN, VGG, MobileNetV2)")
        bns.append(modules[bn])
    entry.loss.bind_teacher_bn(bns)


def wire(entries: Sequence[FeatureEntry], student: nn.Module, teacher: FrozenTeacher, adapters: nn.ModuleDict,
         input_shape: Sequence[int], num_samples: int | None) -> Wiring:
    """Resolve every entry's taps for inputs of ``input_shape`` (no batch dim), create its adapters
    (in ``adapters``, as ``<entry>_<i>``) and its loss state, and set the teacher's taps and shapes."""
    input_shape = tuple(int(v) for v in input_shape)
    device = next(student.parameters()).device
    p_s = probe(student, input_shape, device)
    p_t = probe(teacher.module, input_shape, teacher.device() or "cpu")
    s_taps, t_taps = [], []
    for entry in entries:
        entry.student_layers, entry.teacher_layers = expand_layers(
            p_s, p_t, entry.student_layers, entry.teacher_layers, entry.name)
        entry.calls = p_s.calls_of(entry.student_layers)
        s_shapes = [p_s.shape(t) for t in entry.student_layers]
        t_shapes = [p_t.shape(t) for t in entry.teacher_layers]
        if entry.loss.needs_spatial:
            _check_spatial(entry, "student", entry.student_layers, s_shapes)
            _check_spatial(entry, "teacher", entry.teacher_layers, t_shapes)
        if entry.loss.needs_adapter:
            for i, (ss, ts) in enumerate(zip(s_shapes, t_shapes)):
                adapters[f"{entry.name}_{i}"] = make_adapter(ss, ts, entry.adapter).to(device)
        if entry.loss.needs_teacher_bn:
            _bind_teacher_bn(entry, p_t, teacher.module)
        entry.loss.build(s_shapes, t_shapes, num_samples)
        entry.loss.to(device)
        if entry.weight:
            s_taps += entry.student_layers
        t_taps += entry.teacher_layers
    teacher.taps = list(dict.fromkeys(t_taps))
    teacher.shapes = {t: p_t.shape(t) for t in teacher.taps}
    if entries:
        rank_zero_info("distill taps: " + "; ".join(
            f"{e.name}: student {e.student_layers} <- teacher {e.teacher_layers}" for e in entries))
    return Wiring(p_s, list(dict.fromkeys(s_taps)))
