"""The loss part of a ``distill=<method>`` config, validated by its own structure.

``feature_losses`` maps a name to one :class:`FeatureEntry` (a loss, its weight, its tap pairs, its
adapter mode and the epochs of its stage before the main fit); the fields check themselves in
``__post_init__``, so a bad entry fails when the module is built, before any training, with a
message that names the key and says what to write instead. The checks that need the two
networks (tap names exist, feature shapes) run in :mod:`compresslab.distill.wiring`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from compresslab.distill.losses import FeatureLoss, LogitLoss
from compresslab.distill.taps import check_expanding_taps
from compresslab.errors import ConfigError

__all__ = ["FeatureEntry", "parse_feature_losses", "check_weight", "logit_loss_from"]

ADAPTER_MODES = ("auto", "always", "none")


def plain(value: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists (objects inside are kept)."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def instantiate_as(spec: Any, kind: type, what: str) -> Any:
    """``spec`` as an instance of ``kind``: an instance already, or a config with ``_target_``."""
    spec = plain(spec)
    if isinstance(spec, Mapping) and "_target_" in spec:
        spec = instantiate(dict(spec))
    if not isinstance(spec, kind):
        raise ConfigError(f"{what} must be a {kind.__name__} (a config with _target_), got {type(spec).__name__}")
    return spec


def check_weight(value: Any, what: str) -> float:
    """A loss weight: a finite number >= 0."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number, got {value!r}") from None
    if value < 0 or not math.isfinite(value):
        raise ConfigError(f"{what} must be a finite number >= 0, got {value}")
    return value


def layer_list(value: Any, what: str) -> list[str]:
    """A list of tap paths (a single path is a list of one)."""
    value = plain(value)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{what} must be a non-empty list of module paths, got {value!r}")
    return list(value)


def logit_loss_from(spec: Any, kd_weight: float) -> LogitLoss | None:
    """The configured logit loss (None when there is none); ``kd_weight > 0`` needs one."""
    loss = instantiate_as(spec, LogitLoss, "logit_loss") if spec is not None else None
    if kd_weight and loss is None:
        raise ConfigError("kd_weight > 0 needs a logit_loss (e.g. compresslab.distill.KDLoss)")
    return loss


@dataclass
class FeatureEntry:
    """One entry of ``feature_losses``: the loss, its weight and its tap pairs.

    ``loss`` a :class:`~compresslab.distill.losses.FeatureLoss` (or a config with ``_target_``);
    ``student_layers[i]`` is paired with ``teacher_layers[i]`` (tap paths, see
    :mod:`compresslab.distill.taps`); ``adapter`` ``auto|always|none``; ``init_epochs`` the epochs
    of the entry's stage before the main fit (:mod:`compresslab.distill.stages`); ``weight: 0``
    keeps the entry in its stage only. ``calls`` is filled when the taps are resolved.
    """

    name: str
    loss: Any
    weight: float = 1.0
    student_layers: Any = field(default_factory=lambda: ["auto"])
    teacher_layers: Any = field(default_factory=lambda: ["auto"])
    adapter: str = "auto"
    init_epochs: int = 0
    calls: dict[str, int] | None = field(default=None, init=False)  # how often each student tap's module runs

    def __post_init__(self) -> None:
        what = f"feature_losses.{self.name}"
        self.loss = instantiate_as(self.loss, FeatureLoss, f"{what}.loss")
        self.student_layers = layer_list(self.student_layers, f"{what}.student_layers")
        self.teacher_layers = layer_list(self.teacher_layers, f"{what}.teacher_layers")
        s_layers, t_layers = self.student_layers, self.teacher_layers
        if len(s_layers) != len(t_layers):
            raise ConfigError(
                f"{what}: {len(s_layers)} student_layers {s_layers} but {len(t_layers)} "
                f"teacher_layers {t_layers}; they are paired element-wise, so give as many of each")
        check_expanding_taps(s_layers, t_layers, what)
        loss = self.loss
        if loss.max_taps is not None and len(s_layers) > loss.max_taps:
            raise ConfigError(f"{what}: {type(loss).__name__} takes at most {loss.max_taps} tap pair(s), "
                              f"got {len(s_layers)}")
        self.adapter = str(self.adapter)
        if self.adapter not in ADAPTER_MODES:
            raise ConfigError(f"{what}.adapter must be auto, always or none; got {self.adapter!r}")
        self.init_epochs = self.init_epochs or 0
        if isinstance(self.init_epochs, bool) or not isinstance(self.init_epochs, int) or self.init_epochs < 0:
            raise ConfigError(f"{what}.init_epochs must be an integer >= 0, got {self.init_epochs!r}")
        self.weight = check_weight(self.weight, f"{what}.weight")
        if self.weight == 0 and self.init_epochs == 0:
            raise ConfigError(f"{what}: weight 0 and init_epochs 0 leave the loss unused; "
                              "give it a weight (main fit) or init_epochs (a stage before it)")
        if not loss.stage_uses_student and self.init_epochs == 0:
            raise ConfigError(f"{what}: {type(loss).__name__} needs its stage before the "
                              f"main fit ({loss.stage_description}); set init_epochs > 0")

    @classmethod
    def from_config(cls, name: Any, item: Any) -> "FeatureEntry":
        """The entry ``feature_losses.<name>`` of a config (a mapping of this class's fields)."""
        if not str(name).isidentifier():
            raise ConfigError(f"feature loss name {name!r} must be an identifier")
        item = dict(plain(item))
        unknown = set(item) - {f.name for f in fields(cls) if f.init and f.name != "name"}
        if unknown:
            raise ConfigError(f"feature_losses.{name}: unknown keys {sorted(unknown)}")
        if "loss" not in item:
            raise ConfigError(f"feature_losses.{name} needs a loss (a config with _target_)")
        return cls(str(name), **item)


def parse_feature_losses(spec: Any) -> list[FeatureEntry]:
    """The entries of ``feature_losses``, in config order (an entry set to null is switched off)."""
    spec = plain(spec or {})
    if not isinstance(spec, Mapping):
        raise ConfigError(f"feature_losses must map a name to a loss entry, got {type(spec).__name__}")
    # a composed config may switch an entry off with `<name>: null`
    return [FeatureEntry.from_config(name, item) for name, item in spec.items() if item is not None]
