"""The teacher → student distillation LightningModule.

``distill=<method>`` configs instantiate :class:`DistillationModule`; the pipeline
passes the student (``model``), the trained ``teacher``, ``num_classes``, the
student's optimizer/scheduler partials and ``label_smoothing``. The loss is

    ce_weight · CE(student, labels)          (over the samples that have a label)
    + kd_weight · logit_loss(student logits, teacher logits)
    + Σ_i weight_i · feature_loss_i(student taps_i, teacher taps_i)

The student is ``self.model`` (what the pipeline saves, measures and compresses).
The teacher (:mod:`~compresslab.distill.frozen_teacher`) is held outside ``nn.Module``
registration: it is not in the state dict (checkpoints hold the student, adapters and loss
state only — the teacher is reloaded from its own file/cache by the pipeline), not in the
optimizer, always in eval mode, and run under ``torch.no_grad``.

The module composes single-purpose pieces: the loss config (:mod:`~compresslab.distill.loss_config`),
the taps, adapters and loss state resolved against the two networks (:mod:`~compresslab.distill.wiring`),
the teacher-output cache (:mod:`~compresslab.distill.cache`), the stages before the main fit
(:mod:`~compresslab.distill.stages`), and the datamodule's ``with_index`` option for the sample
indices that the cache and CRD need.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import nn

from compresslab.data.regime import UNLABELED, labelled_cross_entropy, token_rows
from compresslab.distill.cache import TeacherOutputCache, check_cache_allowed, open_cache
from compresslab.distill.frozen_teacher import FrozenTeacher
from compresslab.distill.loss_config import FeatureEntry, check_weight, logit_loss_from, parse_feature_losses
from compresslab.distill.losses import LogitLoss
from compresslab.distill.stages import run_pending_stages, stage_list
from compresslab.distill.taps import capture
from compresslab.distill.wiring import Wiring, check_tap_names, wire
from compresslab.errors import ConfigError
from compresslab.train import ClassifierModule

# check_cache_allowed and TeacherOutputCache are imported from here by older callers
__all__ = ["DistillationModule", "FeatureEntry", "TeacherOutputCache", "check_cache_allowed"]


class DistillationModule(ClassifierModule):
    """Distils a frozen ``teacher`` into ``model`` (the student); see the module docstring for the loss.

    Args:
        model, num_classes, optimizer, scheduler, label_smoothing: as :class:`ClassifierModule`.
        teacher: the trained teacher network (kept frozen, in eval mode, out of the state dict).
        ce_weight: weight of the hard-label cross-entropy.
        kd_weight: weight of ``logit_loss`` (0 disables it).
        logit_loss: a :class:`~compresslab.distill.losses.LogitLoss` (KD, DKD, KD with logit standardization).
        feature_losses: ``{name: {loss, weight, student_layers, teacher_layers, adapter, init_epochs}}``,
            each a :class:`~compresslab.distill.loss_config.FeatureEntry` (its docstring has the
            fields). An entry with ``init_epochs > 0`` has a stage before the main fit, a Lightning
            fit of its own (:mod:`compresslab.distill.stages`: FitNets' stage 1, AB, FSP, FT's
            paraphraser); one with ``weight: 0`` only takes part in its stage (AB and FSP, as RepDistiller).
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
        self.frozen_teacher = FrozenTeacher(teacher)  # a plain object: not a registered submodule
        self.ce_weight = check_weight(ce_weight, "ce_weight")
        self.kd_weight = check_weight(kd_weight, "kd_weight")
        self.logit_loss = logit_loss_from(logit_loss, self.kd_weight)
        self.entries = parse_feature_losses(feature_losses)
        check_tap_names(self.entries, self.model, teacher)
        self.feature_losses = nn.ModuleDict({e.name: e.loss for e in self.entries})
        self.adapters = nn.ModuleDict()
        self.register_buffer("init_done", torch.zeros(len(self.entries), dtype=torch.bool))
        self.cache_teacher_outputs = bool(cache_teacher_outputs)
        self.cache_max_mb = float(cache_max_mb)
        self.wiring: Wiring | None = None
        self.init_stage_losses: dict[str, list[float]] = {}
        self._indexed: tuple[Any, bool] | None = None  # (datamodule, its with_index before the fit)
        self._batch_index: torch.Tensor | None = None
        self._terms: dict[str, list[torch.Tensor]] = {}  # each term's per-step values this epoch
        self._term_sizes: list[int] = []

    # ------------------------------------------------------------------ the pieces
    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher (not a registered submodule)."""
        return self.frozen_teacher.module

    def train(self, mode: bool = True):
        """Switch the student (and adapters) to train/eval; the teacher always stays in eval."""
        super().train(mode)
        self.frozen_teacher.module.eval()
        return self

    @property
    def built(self) -> bool:
        """Whether the taps, adapters and loss state exist (:meth:`build` ran)."""
        return self.wiring is not None

    @property
    def student_taps(self) -> list[str]:
        """The student taps the main fit captures (empty before :meth:`build`)."""
        return self.wiring.student_taps if self.wiring is not None else []

    @property
    def stages(self) -> list[tuple[int, FeatureEntry]]:
        """The stages before the main fit (:func:`~compresslab.distill.stages.stage_list`)."""
        return stage_list(self.entries)

    def build(self, input_shape, num_samples: int | None = None) -> None:
        """Resolve taps, create adapters and loss state for inputs of ``input_shape`` (no batch dim).

        Called by :meth:`setup` before the optimizer exists (call it yourself when using the
        module without a datamodule). Idempotent.
        """
        if not self.built:
            self.wiring = wire(self.entries, self.model, self.frozen_teacher, self.adapters, input_shape, num_samples)

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
    def distill_terms(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None):
        """``(total loss, student logits, {term name: unweighted value})`` for one batch."""
        if not self.built:
            self.build(tuple(x.shape[1:]))
        if index is None and any(e.loss.needs_index for e in self.entries):
            raise ConfigError("this distillation method needs each sample's training-set index; train it "
                              "through a datamodule with a `train_set` (or pass index=...)")
        t_logits, t_feats = self.frozen_teacher.outputs(x, index)
        with capture(self.model, self.student_taps) as s_feats:
            logits = self.model(x)
        if logits.dim() > 2:  # a causal LM: every logit loss per token position (token_rows)
            t_logits, _ = token_rows(t_logits, y)
            logits, y = token_rows(logits, y)
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
            s = [self.adapter(entry, i)(s_feats[tap]) for i, tap in enumerate(entry.student_layers)]
            t = [t_feats[tap] for tap in entry.teacher_layers]
            terms[entry.name] = value = entry.loss(s, t, target=y, index=index, epoch=self._epoch())
            total = total + entry.weight * value
        return total, logits, terms

    def _epoch(self) -> int:
        return int(self.current_epoch) if self._trainer is not None else 0

    def training_loss(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None):
        """Weighted sum of the configured terms; each term's epoch mean is logged as ``train/<name>``."""
        if index is None:  # the index of the batch training_step took apart (when it has the size of x)
            index, self._batch_index = self._batch_index, None
            if index is not None and len(index) != len(x):
                index = None
        total, logits, terms = self.distill_terms(x, y, index)
        # Kept here (no tensor op) and averaged once per epoch: a self.log, or even a sum, per term
        # and step costs more than a small student's whole step.
        for name, value in terms.items():
            self._terms.setdefault(name, []).append(value.detach())
        self._term_sizes.append(len(x))
        return total, logits

    def training_step(self, batch, batch_idx):
        """The supervised step on ``(x, y)``; a batch ``(x, y, index)`` of a ``with_index``
        datamodule hands its index to :meth:`training_loss`."""
        if isinstance(batch, (list, tuple)) and len(batch) == 3:
            x, y, self._batch_index = batch
            batch = [x, y]
        return super().training_step(batch, batch_idx)

    def on_train_epoch_start(self) -> None:
        """Start the epoch's record of the loss terms."""
        self._terms, self._term_sizes = {}, []

    def on_train_epoch_end(self) -> None:
        """Log each loss term's epoch mean as ``train/<name>``."""
        for name, values in self._terms.items():
            stacked = torch.stack([v.reshape(()) for v in values]).double()
            sizes = torch.as_tensor(self._term_sizes, dtype=torch.float64, device=stacked.device)
            self.log(f"train/{name}", ((stacked * sizes).sum() / sizes.sum()).float())
        self._terms, self._term_sizes = {}, []

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str) -> None:
        """Build taps/adapters/loss state from the datamodule; switch its ``with_index`` on when
        indices are needed; open the teacher cache."""
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
            self.frozen_teacher.cache = open_cache(dm, num_samples, self.num_classes, self.frozen_teacher.shapes,
                                                   self.cache_max_mb)
        if self.needs_index:
            if train_set is None or not hasattr(dm, "with_index"):
                raise ConfigError("the teacher-output cache / CRD need a datamodule with a `train_set` and the "
                                  "`with_index` option (compresslab.data.ClassificationDataModule) to index "
                                  "training samples")
            if self._indexed is None:
                self._indexed = (dm, dm.with_index)
            dm.with_index = True
        self.frozen_teacher.follow(self.device)

    def _restore_index_option(self) -> None:
        if self._indexed is not None:
            dm, before = self._indexed
            dm.with_index = before
            self._indexed = None

    def on_fit_start(self) -> None:
        """Bring the teacher to the student's device and fit the pending stages before the main fit."""
        self.frozen_teacher.follow(self.device)
        run_pending_stages(self)

    def on_train_start(self) -> None:
        """Switch the datamodule's ``with_index`` back to what it was (Lightning has its loader)."""
        # Lightning holds its indexed training loader now: anyone else who asks the datamodule for
        # one during or after the fit (a pruning callback, PTQ calibration) gets plain (x, y) batches.
        self._restore_index_option()

    def teardown(self, stage: str) -> None:
        """After a fit: restore ``with_index``, close the cache (its hit counts in ``cache_stats``),
        and move the teacher back to where it was."""
        if stage != "fit":
            return
        self._restore_index_option()
        cache = self.frozen_teacher.cache
        if cache is not None:
            rank_zero_info(f"teacher-output cache: {cache.hits} hits, {cache.misses} misses")
            self.cache_stats = {"hits": cache.hits, "misses": cache.misses}
            self.frozen_teacher.cache = None
        self.frozen_teacher.go_home()
