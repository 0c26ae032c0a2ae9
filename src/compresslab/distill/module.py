"""The teacher → student distillation LightningModule.

``distill=<method>`` configs instantiate :class:`DistillationModule`; the pipeline
passes the student (``model``), the trained ``teacher``, ``num_classes``, the
student's optimizer/scheduler partials and ``label_smoothing``. The loss is

    ce_weight · CE(student, labels)          (over the samples that have a label)
    + kd_weight · logit_loss(student logits, teacher logits)
    + Σ_i weight_i · feature_loss_i(student taps_i, teacher taps_i)

The student is ``self.model`` (what the pipeline saves, measures and compresses).
The teacher is held outside ``nn.Module`` registration: it is not in the state dict
(checkpoints hold the student, adapters and loss state only — the teacher is
reloaded from its own file/cache by the pipeline), not in the optimizer, always in
eval mode, and run under ``torch.no_grad``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_info
from torch import nn
from torch.utils.data import Dataset

from compresslab.data.regime import UNLABELED, labelled_cross_entropy
from compresslab.distill.losses import FeatureLoss, LogitLoss
from compresslab.distill.stages import Stage, run_stage
from compresslab.distill.taps import (
    ProbeResult,
    capture,
    check_expanding_taps,
    expand_layers,
    make_adapter,
    probe,
    run_until_captured,
    validate_taps,
)
from compresslab.errors import ConfigError
from compresslab.train import ClassifierModule

__all__ = ["DistillationModule", "FeatureEntry", "TeacherOutputCache", "IndexedDataset"]


class IndexedDataset(Dataset):
    """Wraps a dataset so each item also carries its index: ``(*item, index)``."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i):
        return (*self.base[i], i)


@dataclass
class FeatureEntry:
    """One configured feature loss: the loss, its weight and its tap pairs."""

    name: str
    loss: FeatureLoss
    weight: float
    student_layers: list[str]
    teacher_layers: list[str]
    adapter: str = "auto"
    init_epochs: int = 0
    calls: dict[str, int] | None = None  # how often each student tap's module runs per forward


class TeacherOutputCache:
    """Teacher logits and tapped features per training sample, filled on first sight.

    Valid only when a sample's input is the same every epoch (no random augmentation)
    and the teacher is deterministic (eval mode). Stored on the CPU; rows are looked
    up by the sample's training-set index.
    """

    def __init__(self, num_samples: int, num_classes: int, feature_shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.num_samples = int(num_samples)
        self.filled = torch.zeros(self.num_samples, dtype=torch.bool)
        self.logits = torch.zeros(self.num_samples, num_classes)
        self.feats = {tap: torch.zeros(self.num_samples, *shape) for tap, shape in feature_shapes.items()}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def nbytes(num_samples: int, num_classes: int, feature_shapes: Mapping[str, tuple[int, ...]]) -> int:
        """Bytes the cache needs (float32)."""
        per_sample = num_classes + sum(math.prod(s) for s in feature_shapes.values())
        return 4 * int(num_samples) * int(per_sample)

    def get(self, index: torch.Tensor, x: torch.Tensor,
            compute: Callable[[torch.Tensor], tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, dict]:
        """Cached outputs for the samples ``index`` (computing and storing the missing ones)."""
        idx = index.detach().cpu().long()
        missing = ~self.filled[idx]
        n_missing = int(missing.sum())
        if n_missing:
            mask = missing.to(x.device)
            logits, feats = compute(x[mask])
            rows = idx[missing]
            self.logits[rows] = logits.detach().float().cpu()
            for tap, store in self.feats.items():
                store[rows] = feats[tap].detach().float().cpu()
            self.filled[rows] = True
        self.misses += n_missing
        self.hits += len(idx) - n_missing
        logits = self.logits[idx].to(x.device, non_blocking=True)
        feats = {tap: store[idx].to(x.device, non_blocking=True) for tap, store in self.feats.items()}
        return logits, feats


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists (objects inside are kept)."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _maybe_instantiate(spec: Any, kind: type, what: str) -> Any:
    spec = _plain(spec)
    if isinstance(spec, Mapping) and "_target_" in spec:
        spec = instantiate(dict(spec))
    if not isinstance(spec, kind):
        raise ConfigError(f"{what} must be a {kind.__name__} (a config with _target_), got {type(spec).__name__}")
    return spec


def check_cache_allowed(datamodule) -> None:
    """Refuse the teacher-output cache for a dataset whose training samples are augmented (the
    teacher's output for a sample would change between epochs, so a cache would be wrong)."""
    augmented = getattr(datamodule, "has_augmentation", None)
    if augmented is not False:
        why = ("its training data is randomly augmented" if augmented else
               "it does not declare `has_augmentation = False`")
        raise ConfigError(
            f"cache_teacher_outputs=true is refused for dataset {getattr(datamodule, 'name', datamodule)!r}: "
            f"{why}, so the teacher's output for a sample changes between epochs and a cache would be wrong. "
            "Set distill.cache_teacher_outputs=false, or turn augmentation off (dataset.augment=false).")


class DistillationModule(ClassifierModule):
    """Distils a frozen ``teacher`` into ``model`` (the student); see the module docstring for the loss.

    Args:
        model, num_classes, optimizer, scheduler, label_smoothing: as :class:`ClassifierModule`.
        teacher: the trained teacher network (kept frozen, in eval mode, out of the state dict).
        ce_weight: weight of the hard-label cross-entropy.
        kd_weight: weight of ``logit_loss`` (0 disables it).
        logit_loss: a :class:`~compresslab.distill.losses.LogitLoss` (KD, DKD, KD with logit standardization).
        feature_losses: ``{name: {loss, weight, student_layers, teacher_layers, adapter, init_epochs}}``:
            ``loss`` a :class:`~compresslab.distill.losses.FeatureLoss`; the layer lists are tap
            paths (see :mod:`compresslab.distill.taps`), paired element-wise; ``adapter``
            ``auto|always|none`` for losses that compare features element-wise; ``init_epochs``
            a first stage that trains the student up to its taps (and the adapters) on this loss
            alone before the main fit (FitNets' stage 1; RepDistiller uses 30), or what the loss's
            ``stage_loss`` trains (FT's paraphraser); each such stage is a Lightning fit of its own
            (:mod:`compresslab.distill.stages`). An entry with ``weight: 0`` only takes part in its
            stage (AB and FSP, as RepDistiller: their loss is not in the main fit).
        cache_teacher_outputs: compute the teacher's outputs once per training sample and reuse
            them in later epochs (refused when the datamodule's training data is augmented).
        cache_max_mb: refuse the cache when it would need more memory than this.
    """

    def __init__(
        self,
        model: nn.Module,
        teacher: nn.Module,
        num_classes: int,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        label_smoothing: float = 0.0,
        ce_weight: float = 1.0,
        kd_weight: float = 0.0,
        logit_loss: LogitLoss | Mapping | None = None,
        feature_losses: Mapping[str, Mapping] | None = None,
        cache_teacher_outputs: bool = False,
        cache_max_mb: float = 4096.0,
    ) -> None:
        super().__init__(model, num_classes, optimizer=optimizer, scheduler=scheduler,
                         label_smoothing=label_smoothing)
        if not isinstance(teacher, nn.Module):
            raise ConfigError("DistillationModule needs a teacher network (teacher=<arch>)")
        object.__setattr__(self, "_teacher", teacher.eval())  # not a registered submodule
        object.__setattr__(self, "_teacher_home", None)
        self.ce_weight = self._weight(ce_weight, "ce_weight")
        self.kd_weight = self._weight(kd_weight, "kd_weight")
        if logit_loss is not None:
            logit_loss = _maybe_instantiate(logit_loss, LogitLoss, "logit_loss")
        if self.kd_weight and logit_loss is None:
            raise ConfigError("kd_weight > 0 needs a logit_loss (e.g. compresslab.distill.KDLoss)")
        self.logit_loss = logit_loss
        self.entries = self._parse_feature_losses(feature_losses or {})
        self.feature_losses = nn.ModuleDict({e.name: e.loss for e in self.entries})
        self.adapters = nn.ModuleDict()
        self.register_buffer("init_done", torch.zeros(len(self.entries), dtype=torch.bool))
        self.cache_teacher_outputs = bool(cache_teacher_outputs)
        self.cache_max_mb = float(cache_max_mb)
        self.built = False
        self.student_taps: list[str] = []
        self.teacher_taps: list[str] = []
        self.init_stage_losses: dict[str, list[float]] = {}
        self._probe_student: ProbeResult | None = None
        self._cache: TeacherOutputCache | None = None
        self._wrapped: tuple[Any, Any] | None = None  # (datamodule, original train_set)
        self._batch_index: torch.Tensor | None = None
        self._term_sums: dict[str, torch.Tensor] = {}
        self._term_count = 0

    # ------------------------------------------------------------------ config parsing
    @staticmethod
    def _weight(value: Any, what: str) -> float:
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{what} must be a number, got {value!r}") from None
        if value < 0 or not math.isfinite(value):
            raise ConfigError(f"{what} must be a finite number >= 0, got {value}")
        return value

    def _parse_feature_losses(self, spec: Mapping) -> list[FeatureEntry]:
        spec = _plain(spec)
        if not isinstance(spec, Mapping):
            raise ConfigError(f"feature_losses must map a name to a loss entry, got {type(spec).__name__}")
        entries = []
        for name, item in spec.items():
            if item is None:  # a composed config may switch an entry off with `<name>: null`
                continue
            if not str(name).isidentifier():
                raise ConfigError(f"feature loss name {name!r} must be an identifier")
            item = dict(_plain(item))
            unknown = set(item) - {"loss", "weight", "student_layers", "teacher_layers", "adapter", "init_epochs"}
            if unknown:
                raise ConfigError(f"feature_losses.{name}: unknown keys {sorted(unknown)}")
            if "loss" not in item:
                raise ConfigError(f"feature_losses.{name} needs a loss (a config with _target_)")
            loss = _maybe_instantiate(item["loss"], FeatureLoss, f"feature_losses.{name}.loss")
            s_layers = self._layer_list(item.get("student_layers", ["auto"]), f"feature_losses.{name}.student_layers")
            t_layers = self._layer_list(item.get("teacher_layers", ["auto"]), f"feature_losses.{name}.teacher_layers")
            if len(s_layers) != len(t_layers):
                raise ConfigError(
                    f"feature_losses.{name}: {len(s_layers)} student_layers {s_layers} but {len(t_layers)} "
                    f"teacher_layers {t_layers}; they are paired element-wise, so give as many of each")
            check_expanding_taps(s_layers, t_layers, f"feature_losses.{name}")
            if loss.max_taps is not None and len(s_layers) > loss.max_taps:
                raise ConfigError(f"feature_losses.{name}: {type(loss).__name__} takes at most "
                                  f"{loss.max_taps} tap pair(s), got {len(s_layers)}")
            validate_taps(self.model, s_layers, "student")
            validate_taps(self.teacher, t_layers, "teacher")
            adapter = str(item.get("adapter", "auto"))
            if adapter not in ("auto", "always", "none"):
                raise ConfigError(f"feature_losses.{name}.adapter must be auto, always or none; got {adapter!r}")
            init_epochs = item.get("init_epochs", 0) or 0
            if isinstance(init_epochs, bool) or not isinstance(init_epochs, int) or init_epochs < 0:
                raise ConfigError(f"feature_losses.{name}.init_epochs must be an integer >= 0, got {init_epochs!r}")
            weight = self._weight(item.get("weight", 1.0), f"feature_losses.{name}.weight")
            if weight == 0 and init_epochs == 0:
                raise ConfigError(f"feature_losses.{name}: weight 0 and init_epochs 0 leave the loss unused; "
                                  "give it a weight (main fit) or init_epochs (a stage before it)")
            if not loss.stage_uses_student and init_epochs == 0:
                raise ConfigError(f"feature_losses.{name}: {type(loss).__name__} needs its stage before the "
                                  f"main fit ({loss.stage_description}); set init_epochs > 0")
            entries.append(FeatureEntry(str(name), loss, weight, s_layers, t_layers, adapter, init_epochs))
        return entries

    @staticmethod
    def _layer_list(value: Any, what: str) -> list[str]:
        value = _plain(value)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{what} must be a non-empty list of module paths, got {value!r}")
        return list(value)

    # ------------------------------------------------------------------ teacher handling
    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher (not a registered submodule)."""
        return self._teacher

    def train(self, mode: bool = True):
        """Switch the student (and adapters) to train/eval; the teacher always stays in eval."""
        super().train(mode)
        self._teacher.eval()
        return self

    def _teacher_device(self) -> torch.device | None:
        for t in self._teacher.parameters():
            return t.device
        for t in self._teacher.buffers():
            return t.device
        return None

    def _sync_teacher(self, device: torch.device) -> None:
        current = self._teacher_device()
        if current is not None and current != device:
            if self._teacher_home is None:
                object.__setattr__(self, "_teacher_home", current)
            self._teacher.to(device)
        if self._teacher.training:
            self._teacher.eval()

    def _run_teacher(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad(), capture(self._teacher, self.teacher_taps) as feats:
            logits = self._teacher(x)
        return logits, dict(feats)

    def teacher_outputs(self, x: torch.Tensor, index: torch.Tensor | None = None):
        """Teacher logits and tapped features for ``x`` (from the cache when it is on)."""
        self._sync_teacher(x.device)
        if self._cache is not None and index is not None:
            return self._cache.get(index, x, self._run_teacher)
        return self._run_teacher(x)

    # ------------------------------------------------------------------ building
    def build(self, input_shape, num_samples: int | None = None) -> None:
        """Resolve taps, create adapters and loss state for inputs of ``input_shape`` (no batch dim).

        Called by :meth:`setup` before the optimizer exists (call it yourself when using the
        module without a datamodule). Idempotent.
        """
        if self.built:
            return
        input_shape = tuple(int(v) for v in input_shape)
        device = next(self.model.parameters()).device
        p_s = probe(self.model, input_shape, device)
        p_t = probe(self._teacher, input_shape, self._teacher_device() or "cpu")
        self._probe_student = p_s
        s_taps, t_taps = [], []
        for entry in self.entries:
            entry.student_layers, entry.teacher_layers = expand_layers(
                p_s, p_t, entry.student_layers, entry.teacher_layers, entry.name)
            entry.calls = p_s.calls_of(entry.student_layers)
            s_shapes = [p_s.shape(t) for t in entry.student_layers]
            t_shapes = [p_t.shape(t) for t in entry.teacher_layers]
            if entry.loss.needs_spatial:
                for role, taps, shapes in (("student", entry.student_layers, s_shapes),
                                           ("teacher", entry.teacher_layers, t_shapes)):
                    for tap, shape in zip(taps, shapes):
                        if len(shape) < 2:
                            raise ConfigError(
                                f"{entry.name}: {type(entry.loss).__name__} needs feature maps (C, *spatial) but "
                                f"{role} tap {tap!r} gives a vector of shape {shape}; tap a convolutional layer "
                                f"(a model without feature maps, e.g. an MLP, cannot use this method)")
            if entry.loss.needs_adapter:
                for i, (ss, ts) in enumerate(zip(s_shapes, t_shapes)):
                    self.adapters[f"{entry.name}_{i}"] = make_adapter(ss, ts, entry.adapter).to(device)
            if entry.loss.needs_teacher_bn:  # OFD's margins: the teacher's BatchNorm before each tapped ReLU
                modules = dict(self._teacher.named_modules())
                bns = []
                for tap in entry.teacher_layers:
                    bn = p_t.module_before(tap, (nn.modules.batchnorm._BatchNorm,))
                    if bn is None:
                        raise ConfigError(
                            f"{entry.name}: {type(entry.loss).__name__} takes its margin from the teacher's "
                            f"BatchNorm before the tapped pre-ReLU feature, but no BatchNorm runs before teacher tap "
                            f"{tap!r} ({type(self._teacher).__name__}); use a teacher with BatchNorm (convnet, "
                            "cnn1d, ResNets, WRN, VGG, MobileNetV2)")
                    bns.append(modules[bn])
                entry.loss.bind_teacher_bn(bns)
            entry.loss.build(s_shapes, t_shapes, num_samples)
            entry.loss.to(device)
            if entry.weight:
                s_taps += entry.student_layers
            t_taps += entry.teacher_layers
        self.student_taps = list(dict.fromkeys(s_taps))
        self.teacher_taps = list(dict.fromkeys(t_taps))
        self.built = True
        self._teacher_shapes = {t: p_t.shape(t) for t in self.teacher_taps}
        if self.entries:
            rank_zero_info("distill taps: " + "; ".join(
                f"{e.name}: student {e.student_layers} <- teacher {e.teacher_layers}" for e in self.entries))

    @property
    def needs_index(self) -> bool:
        """Whether training batches must carry sample indices (teacher cache, CRD memory bank)."""
        return self.cache_teacher_outputs or any(e.loss.needs_index for e in self.entries)

    def adapter(self, entry: FeatureEntry, i: int) -> nn.Module:
        """The adapter of tap pair ``i`` of ``entry`` (identity when there is none)."""
        key = f"{entry.name}_{i}"
        return self.adapters[key] if key in self.adapters else nn.Identity()

    def trainable_parameters(self):
        """Student parameters plus the main fit's adapters' and losses' (e.g. CRD's embedding heads;
        not FT's paraphraser, trained in its stage and fixed afterwards)."""
        params = list(super().trainable_parameters())
        for entry in self.entries:
            if entry.weight:
                for i in range(len(entry.student_layers) if self.built else 0):
                    params += [p for p in self.adapter(entry, i).parameters() if p.requires_grad]
                params += list(entry.loss.main_parameters())
        if self.logit_loss is not None:
            params += [p for p in self.logit_loss.parameters() if p.requires_grad]
        seen: dict[int, nn.Parameter] = {}
        for p in params:
            seen.setdefault(id(p), p)
        return list(seen.values())

    # ------------------------------------------------------------------ the loss
    def _take_index(self, x: torch.Tensor) -> torch.Tensor | None:
        index, self._batch_index = self._batch_index, None
        if index is not None and len(index) != len(x):
            index = None
        return index

    def distill_terms(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None):
        """``(total loss, student logits, {term name: unweighted value})`` for one batch."""
        if not self.built:
            self.build(tuple(x.shape[1:]))
        if index is None and any(e.loss.needs_index for e in self.entries):
            raise ConfigError("this distillation method needs each sample's training-set index; train it "
                              "through a datamodule with a `train_set` (or pass index=...)")
        t_logits, t_feats = self.teacher_outputs(x, index)
        with capture(self.model, self.student_taps) as s_feats:
            logits = self.model(x)
        # A partly labelled transfer set (dataset.unlabeled_fraction): the hard-label loss only where
        # a label exists; losses that need a class (DKD's target, CRD) get the teacher's prediction there.
        ce = labelled_cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        y = torch.where(y == UNLABELED, t_logits.argmax(1).to(y.dtype), y)
        terms = {"ce": ce}
        total = self.ce_weight * ce
        if self.logit_loss is not None and self.kd_weight:
            kd = self.logit_loss(logits, t_logits, target=y, epoch=self._epoch())
            terms["kd"] = kd
            total = total + self.kd_weight * kd
        for entry in self.entries:
            if not entry.weight:  # a stage-only entry (AB, FSP)
                continue
            value = self._feature_term(entry, s_feats, t_feats, y, index)
            terms[entry.name] = value
            total = total + entry.weight * value
        return total, logits, terms

    def _feature_term(self, entry: FeatureEntry, s_feats, t_feats, y, index) -> torch.Tensor:
        s = [self.adapter(entry, i)(s_feats[tap]) for i, tap in enumerate(entry.student_layers)]
        t = [t_feats[tap] for tap in entry.teacher_layers]
        return entry.loss(s, t, target=y, index=index, epoch=self._epoch())

    def _epoch(self) -> int:
        return int(self.current_epoch) if self._trainer is not None else 0

    def training_loss(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None):
        """Weighted sum of the configured terms; each term's epoch mean is logged as ``train/<name>``."""
        if index is None:
            index = self._take_index(x)
        total, logits, terms = self.distill_terms(x, y, index)
        # Summed here and logged once per epoch: a self.log per term and step costs more than
        # a small student's whole step.
        n = len(x)
        for name, value in terms.items():
            self._term_sums[name] = self._term_sums.get(name, 0.0) + value.detach() * n
        self._term_count += n
        return total, logits

    def on_train_epoch_start(self) -> None:
        self._term_sums, self._term_count = {}, 0

    def on_train_epoch_end(self) -> None:
        if self._term_count:
            for name, value in self._term_sums.items():
                self.log(f"train/{name}", value / self._term_count)
        self._term_sums, self._term_count = {}, 0

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str) -> None:
        """Build taps/adapters/loss state from the datamodule; prepare indices and the teacher cache."""
        if stage != "fit":
            return
        dm = getattr(self.trainer, "datamodule", None)
        train_set = getattr(dm, "train_set", None)
        num_samples = len(train_set) if train_set is not None else None
        if not self.built:
            if dm is None or not getattr(dm, "input_shape", None):
                raise ConfigError("DistillationModule needs a datamodule with `input_shape` "
                                  "(or call module.build(input_shape, num_samples) before fit)")
            self.build(dm.input_shape, num_samples)
        if self.cache_teacher_outputs:
            check_cache_allowed(dm)
            need = TeacherOutputCache.nbytes(num_samples or 0, self.num_classes, self._teacher_shapes)
            if need > self.cache_max_mb * 2 ** 20:
                raise ConfigError(f"the teacher-output cache would need {need / 2 ** 20:.0f} MiB "
                                  f"(> cache_max_mb={self.cache_max_mb:g}); tap fewer/smaller layers or raise it")
            self._cache = TeacherOutputCache(num_samples, self.num_classes, self._teacher_shapes)
        if self.needs_index:
            if train_set is None:
                raise ConfigError("the teacher-output cache / CRD need a datamodule with a `train_set` "
                                  "to index training samples")
            if not isinstance(train_set, IndexedDataset):
                self._wrapped = (dm, train_set)
                dm.train_set = IndexedDataset(train_set)
            # Set on the instance only when needed: Lightning then strips the index before the batch
            # reaches callbacks, and methods without indices keep Lightning's default hook.
            self.on_before_batch_transfer = self._strip_index_before_transfer
        self._sync_teacher(self.device)

    def _unwrap(self) -> None:
        if self._wrapped is not None:
            dm, original = self._wrapped
            dm.train_set = original
            self._wrapped = None

    def on_train_start(self) -> None:
        # The training dataloader now holds the indexed dataset: give the datamodule its own back
        # (compression methods may read it after the fit).
        self._unwrap()

    def _strip_index_before_transfer(self, batch, dataloader_idx: int):
        """``on_before_batch_transfer`` while indices are needed: keep the index aside, pass (x, y) on."""
        if self._trainer is not None and self.trainer.training and isinstance(batch, (list, tuple)) \
                and len(batch) == 3:
            x, y, index = batch
            self._batch_index = index
            return [x, y]
        return batch

    def training_step(self, batch, batch_idx):
        if isinstance(batch, (list, tuple)) and len(batch) == 3:  # the datamodule's own transfer hook won
            x, y, index = batch
            self._batch_index = index
            batch = [x, y]
        return super().training_step(batch, batch_idx)

    def on_fit_start(self) -> None:
        self._sync_teacher(self.device)
        for k, entry in enumerate(self.entries):
            if entry.init_epochs > 0 and not bool(self.init_done[k]):
                self.run_stage(k, entry)

    def teardown(self, stage: str) -> None:
        if stage != "fit":
            return
        self._unwrap()
        self.__dict__.pop("on_before_batch_transfer", None)
        if self._cache is not None:
            rank_zero_info(f"teacher-output cache: {self._cache.hits} hits, {self._cache.misses} misses")
            self.cache_stats = {"hits": self._cache.hits, "misses": self._cache.misses}
            self._cache = None
        if self._teacher_home is not None:
            self._teacher.to(self._teacher_home)
            object.__setattr__(self, "_teacher_home", None)

    # ------------------------------------------------------------------ stages before the main fit
    def stage_parameters(self, entry: FeatureEntry) -> list[nn.Parameter]:
        """What ``entry``'s stage trains: its loss's stage parameters and, when the stage runs the
        student, the student's parameters used up to the taps and the entry's adapters."""
        params: dict[int, nn.Parameter] = {}
        if entry.loss.stage_uses_student:
            assert self._probe_student is not None
            modules = dict(self.model.named_modules())
            names: dict[str, None] = {}
            for tap in entry.student_layers:
                names.update(dict.fromkeys(self._probe_student.modules_run_before(tap)))
            for name in names:
                for p in modules[name].parameters(recurse=False):
                    params[id(p)] = p
            for i in range(len(entry.student_layers)):
                for p in self.adapter(entry, i).parameters():
                    params[id(p)] = p
        for p in entry.loss.stage_parameters():
            params[id(p)] = p
        return [p for p in params.values() if p.requires_grad]

    def stage_loss(self, entry: FeatureEntry, x: torch.Tensor, y: torch.Tensor,
                   index: torch.Tensor | None = None) -> torch.Tensor:
        """``entry``'s stage loss of one batch: the student runs only as far as its taps."""
        _, t_feats = self.teacher_outputs(x, index)
        t = [t_feats[tap] for tap in entry.teacher_layers]
        s = None
        if entry.loss.stage_uses_student:
            s_feats = run_until_captured(self.model, x, entry.student_layers, entry.calls)
            s = [self.adapter(entry, i)(s_feats[tap]) for i, tap in enumerate(entry.student_layers)]
        return entry.loss.stage_loss(s, t, target=y, index=index, epoch=0)

    def make_stage(self, entry: FeatureEntry) -> Stage:
        """The :class:`~compresslab.distill.stages.Stage` of a feature-loss entry."""
        return Stage(name=entry.name, epochs=entry.init_epochs,
                     loss=lambda x, y, index: self.stage_loss(entry, x.to(self.device), y.to(self.device), index),
                     parameters=self.stage_parameters(entry),
                     train_modules=[self.model, self.adapters, entry.loss])

    def run_stage(self, k: int, entry: FeatureEntry) -> None:
        """Fit ``entry``'s stage on the training data (a Lightning fit of its own), once."""
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None:
            raise ConfigError(f"{entry.name}: init_epochs > 0 needs a datamodule (its training data feeds the stage)")
        was_training = self.training
        self.train()
        losses = run_stage(self.make_stage(entry), dm.train_dataloader(), self.optimizer_factory, self.device,
                           outer=self.trainer, sync=[self.model, self.adapters, entry.loss])
        self.to(self.device)  # (a no-op unless the stage's trainer moved something)
        self.init_stage_losses[entry.name] = losses
        self.init_done[k] = True
        self.train(was_training)
