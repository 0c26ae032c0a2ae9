"""Structured (channel) pruning: residual nets keep their output shape, the pruned artifact
reloads from its spec + state dict in a fresh process, the optimizer follows the new
parameters, iterative steps, and resume from a checkpoint holding pruned shapes."""

from __future__ import annotations

import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from compresslab.artifact import load_model_file, read_payload
from compresslab.compress.prune import StructuredPruning, prune_channels, resize_to_state_dict
from compresslab.compress.codecs.structured import structured_payload
from compresslab.compress.prune.channels import cumulative_ratios, step_ratio
from compresslab.errors import ConfigError
from compresslab.models import build_model
from compresslab.pipeline import run_experiment
from compresslab.train import ClassifierModule

SHAPE = (1, 8, 8)
ARCHS = {
    "resnet8": {"_target_": "compresslab.models.CifarResNet", "depth": 8},
    "resnet20": {"_target_": "compresslab.models.CifarResNet", "depth": 20},
    "wrn_16_2": {"_target_": "compresslab.models.WideResNet", "depth": 16, "widen_factor": 2},
    "mobilenetv2": {"_target_": "compresslab.models.MobileNetV2", "width_mult": 0.5},
}


def _params(model):
    return sum(p.numel() for p in model.parameters())


def test_channel_pruning_keeps_output_shape_and_reloads_from_spec_in_a_fresh_process(tmp_path):
    x = torch.randn(3, *SHAPE)
    torch.save(x, tmp_path / "x.pt")
    expected = {}
    residual_archs = {k: v for k, v in ARCHS.items() if k != "resnet8"}  # identity+projection, pre-act, depthwise
    for arch, spec in residual_archs.items():
        torch.manual_seed(0)
        model = build_model(spec, SHAPE, 10).eval()
        n0 = _params(model)
        prune_channels(model, x[:1], 0.5, "l1")
        model.eval()
        y = model(x)
        assert y.shape == (3, 10), arch  # residual adds / depthwise / concat stayed consistent
        assert _params(model) < 0.6 * n0, arch
        # spec + state dict (plain data): rebuild the original arch, resize to the saved shapes, load
        torch.save(structured_payload(model, spec, SHAPE, 10), tmp_path / f"{arch}.pt")
        expected[arch] = (y.detach(), _params(model))
        torch.testing.assert_close(load_model_file(tmp_path / f"{arch}.pt")(x), y, rtol=0, atol=0)
    script = ("import sys, torch; from compresslab.artifact import load_model_file;"
              "x = torch.load(sys.argv[1] + '/x.pt', weights_only=True)\n"
              "for a in sys.argv[2:]:\n"
              "    m = load_model_file(f'{sys.argv[1]}/{a}.pt'); torch.save(m(x).detach(), f'{sys.argv[1]}/{a}.y')\n"
              "    print(a, sum(p.numel() for p in m.parameters()))")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path), *residual_archs], check=True,
                         capture_output=True, text=True)
    counts = dict(line.split() for line in out.stdout.strip().splitlines())
    for arch, (y, n) in expected.items():
        assert int(counts[arch]) == n
        assert torch.equal(torch.load(tmp_path / f"{arch}.y", weights_only=True), y), arch


def test_exclude_and_classifier_are_never_pruned():
    model = build_model(ARCHS["resnet20"], SHAPE, 10)
    prune_channels(model, torch.randn(1, *SHAPE), 0.5, "l2", exclude=["layer3.0.conv1"])
    assert model.layer3[0].conv1.out_channels == 64 and model.layer3[0].bn1.num_features == 64
    assert model.layer3[1].conv1.out_channels == 32  # others were pruned
    assert model.fc.out_features == 10


@pytest.mark.parametrize("importance", ["bn_scale", "taylor", "random"])
def test_other_importances_and_global_scope_run(importance):
    torch.manual_seed(0)
    model = build_model(ARCHS["resnet8"], SHAPE, 10)
    x, y = torch.randn(8, *SHAPE), torch.randint(0, 10, (8,))
    for m in model.modules():  # trained-looking BN scales (fresh ones are all 1: no ranking)
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.1, 1.0)
    n0 = _params(model)
    prune_channels(model, x[:1], 0.5, importance, scope="global", max_layer_ratio=0.8, batches=[(x, y)])
    assert model(x).shape == (8, 10) and _params(model) < 0.8 * n0
    assert all(p.grad is None for p in model.parameters())


def test_iterative_ratios_compose_to_the_target():
    cum = cumulative_ratios(0.6, 3)
    assert cum == pytest.approx([0.2, 0.4, 0.6])
    remaining = 1.0
    for i in range(3):
        remaining *= 1 - step_ratio(cum, i)
        assert remaining == pytest.approx(1 - cum[i])
    m = StructuredPruning("structured", ratio=0.6, steps=3, start=1, end=5)
    assert m.points() == [1, 3, 5]
    with pytest.raises(ConfigError, match="student.epochs"):
        StructuredPruning("structured", start=4, epochs=4)
    with pytest.raises(ConfigError, match="importance"):
        StructuredPruning("structured", importance="hessian2")


def test_resize_to_state_dict_restores_pruned_shapes():
    src = build_model(ARCHS["resnet8"], SHAPE, 10)
    prune_channels(src, torch.randn(1, *SHAPE), 0.25, "l1")
    dst = build_model(ARCHS["resnet8"], SHAPE, 10)
    changed = resize_to_state_dict(dst, src.state_dict())
    dst.load_state_dict(src.state_dict())
    assert "conv1" in changed and dst.conv1.out_channels == src.conv1.out_channels
    assert dst.bn1.num_features == src.bn1.num_features


class _OptimizerFollows(Callback):
    """After the pruning step, the optimizer must hold exactly the student's (new) parameters."""

    def __init__(self):
        self.ok = []
        self.snap = None

    def on_train_epoch_start(self, trainer, pl_module):
        ids = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
        self.ok.append(ids == {id(p) for p in pl_module.model.parameters()})
        self.snap = {k: v.clone() for k, v in pl_module.model.state_dict().items()}

    def on_train_epoch_end(self, trainer, pl_module):
        now = pl_module.model.state_dict()
        self.ok.append(any(not torch.equal(self.snap[k], now[k]) for k in now if k.endswith("conv1.weight")))


def test_optimizer_trains_the_pruned_parameters():
    torch.manual_seed(0)
    x, y = torch.randn(64, *SHAPE), torch.randint(0, 10, (64,))
    module = ClassifierModule(build_model(ARCHS["resnet8"], SHAPE, 10), 10,
                              optimizer=partial(torch.optim.AdamW, lr=1e-2))
    method = StructuredPruning("structured", ratio=0.5, start=1)
    method.example = x[:1]
    probe = _OptimizerFollows()
    pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[*method.callbacks(), probe]).fit(
        module, DataLoader(TensorDataset(x, y), batch_size=16))
    assert probe.ok == [True] * 6
    assert module.model.conv1.out_channels == 8


class _CrashAt(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")


def test_iterative_structured_run_resumes_from_pruned_checkpoint(make_cfg, tmp_path):
    cfg = make_cfg(["teacher=none", "student=resnet8", "prune=structured", "prune.steps=2", "prune.start=0",
                    "prune.end=1", "student.epochs=3", "prune.ratio=0.5"])
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_experiment(cfg, extra_callbacks=[_CrashAt(2)])
    last = tmp_path / "run" / "checkpoints" / "student" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["callbacks"]["compresslab.prune.structured"]["steps_done"] == 2
    assert ckpt["state_dict"]["model.conv1.weight"].shape[0] == 8  # 16 -> 8 channels in two steps
    record = run_experiment(cfg)  # fresh student has 16 channels: the load pre-hook resizes it
    st = record["student"]
    assert st["resumed_from"] == str(last) and st["epochs_run"] == 3
    assert st["prune"]["params_reduction"] >= 0.4 and st["prune"]["macs_ratio"] > 2
    assert st["params"] == st["prune"]["params_after"] < 0.6 * record["reference"]["params"]
    assert read_payload(Path(st["artifact"]))["format"] == "compresslab.structured/1"
    assert st["size_bytes"] < 0.6 * record["reference"]["size_bytes"]
    model = load_model_file(Path(st["artifact"]))
    assert model.conv1.out_channels == 8 and model(torch.randn(2, *SHAPE)).shape == (2, 10)
    table = (tmp_path / "run" / "pruning" / "channels.csv").read_text().splitlines()
    assert table[0].startswith("layer,type,shape_before,shape_after,out_before,out_after")
    assert any(line.startswith("conv1,Conv2d,16x1x3x3,8x1x3x3,16,8") for line in table)
