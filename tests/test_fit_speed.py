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
