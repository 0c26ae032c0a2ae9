"""DistillationModule: frozen teacher, taps/adapters, validation before training, checkpoints,
teacher-output cache, FitNets' first stage, and every method's loss going down on a fixed batch."""

from __future__ import annotations

from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from compresslab.data import DigitsDataModule
from compresslab.distill import (
    ATLoss,
    CRDLoss,
    DistillationModule,
    HintLoss,
    KDLoss,
    TeacherOutputCache,
)
from compresslab.errors import ConfigError
from compresslab.models import MLP, ConvNet, LeNet5, build_model
from compresslab.pipeline import build_student_module
from compresslab.config_utils import arch_spec
from compresslab.train import fit_with_checkpoints

from conftest import CONF_DIR, compose_config

SHAPE = (1, 8, 8)
METHODS = sorted(p.stem for p in (CONF_DIR / "distill").glob("*.yaml") if p.stem != "none")


def pair(student_cls=LeNet5):
    torch.manual_seed(0)
    teacher = ConvNet(SHAPE, 10, channels=[8, 16])
    student = student_cls(SHAPE, 10, width=0.5) if student_cls is LeNet5 else student_cls(SHAPE, 10, hidden=[32])
    return teacher, student


def make_module(feature_losses=None, student_cls=LeNet5, **kwargs):
    teacher, student = pair(student_cls)
    kwargs.setdefault("optimizer", partial(torch.optim.AdamW, lr=3e-3))
    return DistillationModule(student, teacher, 10, feature_losses=feature_losses, **kwargs)


def trainer(tmp_path, epochs=2, batches=3, callbacks=(), **kwargs):
    return pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, limit_train_batches=batches,
                      limit_val_batches=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, callbacks=list(callbacks), default_root_dir=str(tmp_path),
                      **kwargs)


@pytest.fixture
def dm(tmp_path):
    data = DigitsDataModule(root=tmp_path, batch_size=32)
    data.setup()
    return data


def batch(dm, n=32):
    x = torch.stack([dm.train_set[i][0] for i in range(n)])
    y = torch.stack([dm.train_set[i][1] for i in range(n)])
    return x, y


FITNET_AT = {
    "fitnet": {"loss": HintLoss(), "weight": 1.0, "student_layers": ["auto"], "teacher_layers": ["auto"]},
    "at": {"loss": ATLoss(), "weight": 100.0, "student_layers": ["features.2", "auto"],
           "teacher_layers": ["features.5", "features"]},
}


# ----------------------------------------------------------------------------- teacher kept out


def test_teacher_is_outside_state_dict_and_optimizer_adapters_inside():
    module = make_module(FITNET_AT, kd_weight=1.0, logit_loss=KDLoss())
    module.build(SHAPE)
    teacher_ptrs = {t.data_ptr() for t in module.teacher.state_dict().values()}
    assert not teacher_ptrs & {t.data_ptr() for t in module.state_dict().values()}
    assert not any(k.startswith(("teacher", "_teacher")) for k in module.state_dict())
    assert "adapters.fitnet_0.proj.0.weight" in module.state_dict()  # 8 student channels -> 16 teacher
    optimizer = module.configure_optimizers()
    opt_ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not opt_ids & {id(p) for p in module.teacher.parameters()}
    assert {id(p) for p in module.adapters.parameters()} <= opt_ids
    assert {id(p) for p in module.model.parameters()} <= opt_ids


def test_gradients_reach_student_and_adapters_never_the_teacher(dm):
    module = make_module(FITNET_AT, kd_weight=1.0, logit_loss=KDLoss())
    module.build(SHAPE)
    module.train()
    x, y = batch(dm)
    loss, _ = module.training_loss(x, y)
    loss.backward()
    assert all(p.grad is None for p in module.teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.model.parameters())
    assert all(p.grad is not None for p in module.adapters.parameters())


def test_teacher_weights_bit_identical_and_eval_at_every_training_step(tmp_path, dm):
    module = make_module(FITNET_AT, kd_weight=1.0, logit_loss=KDLoss())
    module.teacher.train()  # even a teacher handed over in train mode is switched to eval
    before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    modes, steps = [], []

    class ForceTrain(Callback):
        def on_train_start(self, trainer, pl_module):  # after setup's shape probe: count training forwards
            pl_module.teacher.register_forward_pre_hook(lambda m, i: modes.append(m.training))

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            pl_module.train()  # what Lightning does at epoch start; the teacher must stay in eval
            steps.append(batch_idx)

    trainer(tmp_path, epochs=2, batches=3, callbacks=[ForceTrain()]).fit(module, datamodule=dm)
    assert len(steps) == 6 and len(modes) == 6 and not any(modes)
    after = module.teacher.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # incl. BN running stats
    assert not module.teacher.training


# ----------------------------------------------------------------------------- validation before training


def test_unknown_tap_fails_in_constructor_listing_module_names():
    with pytest.raises(ConfigError) as err:
        make_module({"at": {"loss": ATLoss(), "student_layers": ["layer3"], "teacher_layers": ["auto"]}})
    msg = str(err.value)
    assert "'layer3'" in msg and "features.0" in msg and "classifier.4" in msg
    with pytest.raises(ConfigError, match="teacher tap 'nope'"):
        make_module({"at": {"loss": ATLoss(), "student_layers": ["auto"], "teacher_layers": ["nope"]}})


def test_mismatched_tap_counts_and_bad_entries_fail_in_constructor():
    with pytest.raises(ConfigError, match="paired element-wise"):
        make_module({"at": {"loss": ATLoss(), "student_layers": ["features.2", "auto"], "teacher_layers": ["auto"]}})
    with pytest.raises(ConfigError, match="at most 1"):
        make_module({"crd": {"loss": CRDLoss(), "student_layers": ["auto", "auto"],
                             "teacher_layers": ["auto", "auto"]}})
    with pytest.raises(ConfigError, match="logit_loss"):
        make_module(kd_weight=1.0)
    with pytest.raises(ConfigError, match="unknown keys"):
        make_module({"at": {"loss": ATLoss(), "wieght": 3}})


def test_attention_transfer_on_an_mlp_student_fails_before_training(tmp_path, dm):
    module = make_module({"at": {"loss": ATLoss(), "student_layers": ["auto"], "teacher_layers": ["auto"]}},
                         student_cls=MLP)
    steps = []

    class Count(Callback):
        def on_train_batch_start(self, *args):
            steps.append(1)

    with pytest.raises(ConfigError, match="needs feature maps"):
        trainer(tmp_path, callbacks=[Count()]).fit(module, datamodule=dm)
    assert not steps


def test_special_taps_resolve_to_the_zoo_names():
    module = make_module({
        "pkt": {"loss": HintLoss(), "student_layers": ["embedding"], "teacher_layers": ["embedding"]},
        "at": {"loss": ATLoss(), "student_layers": ["auto"], "teacher_layers": ["auto"]}})
    module.build(SHAPE)
    entries = {e.name: e for e in module.entries}
    assert entries["at"].student_layers == ["features.5"] and entries["at"].teacher_layers == ["features"]
    assert entries["pkt"].student_layers == ["classifier.4:in"]
    assert entries["pkt"].teacher_layers == ["classifier:in"]


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_loads_weights_only_and_crd_memory_resumes(tmp_path, dm):
    def crd_module():
        return make_module({"crd": {"loss": CRDLoss(feat_dim=8, nce_k=64), "weight": 0.8,
                                    "student_layers": ["embedding"], "teacher_layers": ["embedding"]}})

    factory = partial(pl.Trainer, accelerator="cpu", devices=1, limit_train_batches=3, limit_val_batches=1,
                      enable_progress_bar=False, enable_model_summary=False)
    module = crd_module()
    first = fit_with_checkpoints(module, dm, factory, tmp_path / "ck", max_epochs=1)
    assert first["resumed_from"] is None
    state = torch.load(tmp_path / "ck" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert state["feature_losses.crd.memory_s"].shape == (len(dm.train_set), 8)
    assert all(k.startswith(("model.", "feature_losses.", "adapters.", "init_done")) for k in state)
    assert sum(k.startswith("model.") for k in state) == len(module.model.state_dict())

    resumed = crd_module()
    loaded = []

    class Snapshot(Callback):
        def on_train_start(self, trainer, pl_module):
            loaded.append(pl_module.feature_losses["crd"].memory_s.clone())

        def on_train_end(self, trainer, pl_module):
            loaded.append(pl_module.feature_losses["crd"].memory_s.clone())

    second = fit_with_checkpoints(resumed, dm, factory, tmp_path / "ck", max_epochs=2, callbacks=[Snapshot()])
    assert second["resumed_from"] and second["epochs_run"] == 2
    assert torch.equal(loaded[0], state["feature_losses.crd.memory_s"])
    assert not torch.equal(loaded[1], loaded[0])  # and it kept updating in the resumed epoch


# ----------------------------------------------------------------------------- teacher-output cache


def test_teacher_output_cache_returns_the_teachers_outputs(dm):
    module = make_module(FITNET_AT, kd_weight=1.0, logit_loss=KDLoss())
    module.build(SHAPE)
    x, y = batch(dm, 16)
    cache = TeacherOutputCache(len(dm.train_set), 10, module.frozen_teacher.shapes)
    index = torch.arange(16) * 3
    calls = []

    def compute(xs):
        calls.append(len(xs))
        return module.frozen_teacher.run(xs)

    first = cache.get(index, x, compute)
    second = cache.get(index[[3, 1, 7]], x[[3, 1, 7]], compute)
    direct_logits, direct_feats = module.frozen_teacher.run(x)
    assert calls == [16] and cache.hits == 3 and cache.misses == 16
    assert torch.allclose(first[0], direct_logits) and torch.allclose(second[0], direct_logits[[3, 1, 7]])
    for tap, feat in direct_feats.items():
        assert torch.allclose(second[1][tap], feat[[3, 1, 7]])


def test_cached_fit_computes_each_teacher_output_once(tmp_path):
    dm = DigitsDataModule(root=tmp_path, batch_size=256)
    dm.setup()
    module = make_module(FITNET_AT, kd_weight=1.0, logit_loss=KDLoss(), cache_teacher_outputs=True)
    trainer(tmp_path, epochs=2, batches=None).fit(module, datamodule=dm)
    n = len(dm.train_set)
    assert module.cache_stats == {"misses": n, "hits": n}
    assert not hasattr(dm.train_set, "base")  # the datamodule got its own dataset back


def test_cache_is_refused_for_augmented_training_data(tmp_path):
    class AugmentedDigits(DigitsDataModule):
        has_augmentation = True

    data = AugmentedDigits(root=tmp_path)
    module = make_module(kd_weight=1.0, logit_loss=KDLoss(), cache_teacher_outputs=True)
    with pytest.raises(ConfigError, match="augment"):
        trainer(tmp_path).fit(module, datamodule=data)


# ----------------------------------------------------------------------------- FitNets first stage


def test_fitnet_first_stage_trains_only_up_to_the_hint_layer(tmp_path, dm):
    module = make_module({"fitnet": {"loss": HintLoss(), "weight": 100.0, "student_layers": ["features.2"],
                                     "teacher_layers": ["features.5"], "init_epochs": 2}})
    initial = {k: v.clone() for k, v in module.model.state_dict().items()}
    seen = {}

    class AfterStage(Callback):
        def on_train_start(self, trainer, pl_module):
            seen.update({k: v.clone() for k, v in pl_module.model.state_dict().items()})

    trainer(tmp_path, epochs=1, batches=3, callbacks=[AfterStage()]).fit(module, datamodule=dm)
    assert len(module.init_stage_losses["fitnet"]) == 2 and bool(module.init_done[0])
    assert not torch.equal(seen["features.0.weight"], initial["features.0.weight"])  # before the hint: trained
    for key in ("features.3.weight", "classifier.0.weight", "classifier.4.bias"):  # after the hint: untouched
        assert torch.equal(seen[key], initial[key])


# ----------------------------------------------------------------------------- every method learns


@pytest.mark.parametrize("method", METHODS)
def test_loss_decreases_on_a_fixed_batch(method, tmp_path, dm):
    cfg = compose_config(tmp_path, [f"distill={method}"])
    torch.manual_seed(0)
    teacher = build_model(arch_spec(cfg.teacher), SHAPE, 10).eval()
    student = build_model(arch_spec(cfg.student), SHAPE, 10)
    module = build_student_module(cfg, student, teacher, 10)
    assert isinstance(module, DistillationModule)
    module.build(SHAPE, num_samples=len(dm.train_set))
    module.train()
    x, y = batch(dm, 32)
    index = torch.arange(32)
    opt = module.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    losses = []
    for _ in range(8):
        loss, _ = module.training_loss(x, y, index=index)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
