"""The per-step bookkeeping of a fit, made cheap without changing what it reports: the train tally and
the distillation terms' epoch means against an independent computation, the timed progress bar, the
no-op hook profiler, and the NVML probe switch (compresslab.fit_speed)."""

from __future__ import annotations

import os
from functools import partial
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from compresslab.data.regime import UNLABELED
from compresslab.measure.train_tally import TrainTally


class _Strategy:
    def reduce(self, tensor, reduce_op="sum"):
        return tensor


@pytest.mark.parametrize("fold_every", [1 << 20, 4])  # reduced at the epoch's end / after each 4+ samples
def test_the_train_tally_reports_the_sample_weighted_loss_and_the_accuracy_of_labelled_samples(fold_every):
    torch.manual_seed(0)
    tally, logged = TrainTally(fold_every), {}
    module = SimpleNamespace(log=lambda name, value, **kw: logged.__setitem__(name, value))
    batches = [(torch.randn(5, 3), torch.tensor([0, 1, 2, UNLABELED, 1])), (torch.randn(2, 3), torch.tensor([2, 2]))]
    losses = [torch.tensor(0.5), torch.tensor(2.0)]
    tally.on_train_epoch_start(None, module)
    for (logits, y), loss in zip(batches, losses):
        tally.add(loss, logits, y)
    tally.on_train_epoch_end(SimpleNamespace(strategy=_Strategy()), module)
    correct = sum(int(((lg.argmax(1) == y) & (y != UNLABELED)).sum()) for lg, y in batches)
    assert logged["train/loss"] == pytest.approx((0.5 * 5 + 2.0 * 2) / 7)
    assert logged["train/acc"] == pytest.approx(correct / 6)  # 6 labelled samples
    assert tally.sums() is None  # cleared for the next epoch


def test_the_distillation_terms_are_logged_as_sample_weighted_epoch_means():
    from compresslab.distill import DistillationModule, KDLoss
    from compresslab.models import MLP

    torch.manual_seed(0)
    student, teacher = MLP((1, 4, 4), 3, hidden=[8]), MLP((1, 4, 4), 3, hidden=[8])
    module = DistillationModule(student, teacher, 3, optimizer=partial(torch.optim.SGD, lr=0.1), ce_weight=0.5,
                                kd_weight=0.5, logit_loss=KDLoss(temperature=2.0))
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    batches = [(torch.randn(n, 1, 4, 4), torch.randint(0, 3, (n,))) for n in (6, 2)]
    module.on_train_epoch_start()
    expected = {"ce": 0.0, "kd": 0.0}
    for x, y in batches:
        module.training_loss(x, y)
        with torch.no_grad():
            s, t = student(x), teacher.eval()(x)
        expected["ce"] += float(F.cross_entropy(s, y)) * len(x)
        kl = F.kl_div(F.log_softmax(s / 2, 1), F.softmax(t / 2, 1), reduction="batchmean")  # T = 2
        expected["kd"] += float(kl * 4) * len(x)
    module.on_train_epoch_end()
    assert logged == pytest.approx({f"train/{k}": v / 8 for k, v in expected.items()}, rel=1e-5)


def test_the_timed_progress_bar_draws_each_bar_end_and_at_most_once_per_interval(monkeypatch):
    from compresslab import fit_speed

    bar, clock = fit_speed.TimedProgressBar(min_interval_s=1.0), [100.0]
    monkeypatch.setattr(fit_speed.time, "monotonic", lambda: clock[0])
    drawn = []
    for step in range(1, 11):
        clock[0] += 0.3
        drawn += [step] if bar._should_update(step, 10) else []
    assert drawn == [1, 5, 9, 10]  # t=100.3, 101.5, 102.7 (>= 1 s apart), and the bar's end
    assert not fit_speed.TimedProgressBar(refresh_rate=0)._should_update(10, 10)  # disabled


def test_project_fits_get_the_timed_bar_and_hook_profiler_unless_configured():
    from pytorch_lightning.callbacks import RichProgressBar
    from pytorch_lightning.profilers import SimpleProfiler

    from compresslab.fit_speed import HookProfiler, TimedProgressBar, default_fit_kwargs
    from compresslab.pipeline import _trainer_with

    cfg = OmegaConf.create({"_target_": "pytorch_lightning.Trainer", "accelerator": "cpu", "logger": False,
                            "enable_progress_bar": True, "enable_checkpointing": False})
    trainer = _trainer_with(cfg, [])
    assert isinstance(trainer.profiler, HookProfiler) and isinstance(trainer.progress_bar_callback, TimedProgressBar)
    with trainer.profiler.profile("[Callback]x.on_train_batch_end") as name:
        assert name is None
    rich = RichProgressBar()
    assert [type(c) for c in default_fit_kwargs(cfg, [rich])["callbacks"]] == [RichProgressBar]  # callbacks=rich_...
    assert _trainer_with(cfg, [rich]).progress_bar_callback is rich
    off = default_fit_kwargs(cfg, [], {"enable_progress_bar": False, "profiler": SimpleProfiler()})
    assert off == {"callbacks": []}
    assert default_fit_kwargs(OmegaConf.merge(cfg, {"profiler": "simple"}), [])["callbacks"]


def test_the_nvml_probe_is_skipped_only_where_nvml_cannot_load(monkeypatch):
    from compresslab import fit_speed

    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    monkeypatch.setattr(fit_speed, "nvml_loadable", lambda: False)
    with fit_speed.no_failing_nvml_probe():
        assert os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] == "0"
        available = torch.cuda.is_available()
    assert os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] == "1"
    assert torch.cuda.is_available() == available  # the same answer either way
    monkeypatch.setattr(fit_speed, "nvml_loadable", lambda: True)
    with fit_speed.no_failing_nvml_probe():
        assert os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] == "1"


def test_only_inherited_no_op_step_hooks_are_skipped_and_a_fit_still_calls_the_overridden_ones(tmp_path):
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import Callback

    from compresslab.fit_speed import skip_noop_hooks
    from compresslab.train import ClassifierModule

    class Counting(Callback):
        calls = 0

        def on_train_batch_end(self, *args):
            Counting.calls += 1

    torch.manual_seed(0)
    counting = Counting()
    module = ClassifierModule(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)), 3,
                              optimizer=partial(torch.optim.SGD, lr=0.1))
    skip_noop_hooks([counting, module])
    assert counting.on_before_backward is None and module.on_after_backward is None
    assert counting.on_train_batch_end is not None and module.training_step is not None
    data = torch.utils.data.TensorDataset(torch.randn(12, 1, 2, 2), torch.randint(0, 3, (12,)))
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[counting],
                         default_root_dir=str(tmp_path))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    trainer.test(module, dataloaders=loader, verbose=False)
    assert Counting.calls == 3 and trainer.global_step == 3 and callable(module.on_validation_batch_end)


class _TensorData:
    """64 fixed samples of 1x4x4 in 3 classes, batches of 16 in a fixed order (train = val = test)."""

    def __new__(cls):
        import pytorch_lightning as pl
        from torch.utils.data import DataLoader, TensorDataset

        class Data(pl.LightningDataModule):
            def __init__(self):
                super().__init__()
                g = torch.Generator().manual_seed(0)
                self.data = TensorDataset(torch.randn(64, 1, 4, 4, generator=g), torch.randint(0, 3, (64,), generator=g))

            def _loader(self):
                return DataLoader(self.data, batch_size=16)

            train_dataloader = val_dataloader = test_dataloader = _loader

        return Data()


class _EpochRates:
    """The learning rate each training epoch starts with, and the global step at each epoch's end."""

    def __new__(cls):
        from pytorch_lightning.callbacks import Callback

        class Rates(Callback):
            def __init__(self):
                self.lrs, self.steps = [], []

            def on_train_epoch_start(self, trainer, pl_module):
                self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

            def on_train_epoch_end(self, trainer, pl_module):
                self.steps.append(trainer.global_step)

        return Rates()


def _fit(tmp_path, name, epochs=4, automatic=None, resume=False, **trainer_kwargs):
    """A ClassifierModule (AdamW, cosine over 4 epochs) fitted by fit_with_checkpoints; returns the
    module, the per-epoch rates callback and whether the fit ran Lightning's automatic loop."""
    import pytorch_lightning as pl

    from compresslab.models import MLP
    from compresslab.train import ClassifierModule, fit_with_checkpoints

    torch.manual_seed(0)
    module = ClassifierModule(MLP((1, 4, 4), 3, hidden=[8]), 3, optimizer=partial(torch.optim.AdamW, lr=0.05),
                              scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=4))
    if automatic is not None:
        module.automatic_optimization = automatic
    rates, seen = _EpochRates(), []

    class Mode(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.append(pl_module.automatic_optimization)

    factory = partial(pl.Trainer, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, **trainer_kwargs)
    fit_with_checkpoints(module, _TensorData(), factory, tmp_path / name, epochs, callbacks=[rates, Mode()],
                         resume=resume)
    return module, rates, seen[0]


def _weights_equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_the_module_steps_its_own_optimizer_and_trains_exactly_as_lightnings_automatic_loop(tmp_path):
    manual, manual_rates, manual_mode = _fit(tmp_path, "manual")
    auto, auto_rates, auto_mode = _fit(tmp_path, "auto", automatic=True)
    assert (manual_mode, auto_mode) == (False, True)
    # the cosine rate of each epoch (stepped once per epoch end), the step count and the weights, bit for bit
    expected = [0.05 * (1 + torch.cos(torch.tensor(e * torch.pi / 4)).item()) / 2 for e in range(4)]
    assert manual_rates.lrs == pytest.approx(expected, rel=1e-6)
    assert manual_rates.lrs == auto_rates.lrs
    assert manual_rates.steps == auto_rates.steps == [4, 8, 12, 16]
    assert _weights_equal(manual, auto)


@pytest.mark.parametrize("setting", [{"gradient_clip_val": 0.01}, {"accumulate_grad_batches": 2}])
def test_clipping_or_accumulation_runs_lightnings_automatic_loop_and_takes_effect(tmp_path, setting):
    clipped, _, mode = _fit(tmp_path, "set", epochs=1, **setting)
    plain, _, plain_mode = _fit(tmp_path, "plain", epochs=1)
    assert (mode, plain_mode) == (True, False)
    assert not _weights_equal(clipped, plain)  # the setting changed the training


# every=1: last.ckpt is written at the training epoch's end, after the scheduler's step; every=2: at the
# end of validation, before it (Lightning runs the epoch's end again on resuming).
@pytest.mark.parametrize("every", [1, 2])
def test_a_fit_resumed_from_an_epoch_end_checkpoint_continues_the_schedule_where_it_stopped(tmp_path, every):
    whole, whole_rates, _ = _fit(tmp_path, "whole", check_val_every_n_epoch=every)
    _fit(tmp_path, "split", epochs=2, check_val_every_n_epoch=every)  # stops after epoch 2 of 4
    resumed, resumed_rates, mode = _fit(tmp_path, "split", resume=True, check_val_every_n_epoch=every)
    assert mode is False
    assert resumed_rates.lrs == whole_rates.lrs[2:]
    assert _weights_equal(resumed, whole)


def test_a_plateau_scheduler_is_left_to_lightnings_automatic_loop_and_its_missing_monitor_named(tmp_path):
    import pytorch_lightning as pl
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    from compresslab.models import MLP
    from compresslab.train import ClassifierModule, fit_with_checkpoints

    module = ClassifierModule(MLP((1, 4, 4), 3, hidden=[8]), 3, optimizer=partial(torch.optim.SGD, lr=0.1),
                              scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau)
    factory = partial(pl.Trainer, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0)
    with pytest.raises(MisconfigurationException, match="monitor"):
        fit_with_checkpoints(module, _TensorData(), factory, tmp_path / "plateau", 1, resume=False)
    assert module.automatic_optimization  # not stepped by count in the manual path (it needs a metric)
