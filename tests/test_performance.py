"""Speed options applied to a real fit."""

import torch
from pytorch_lightning.callbacks import Callback

from compresslab.pipeline import run_experiment


class _Grab(Callback):
    def on_train_end(self, trainer, pl_module):
        self.weight = pl_module.model.features[3].weight.detach()  # LeNet5's second conv (16x6x5x5)


def test_channels_last_and_compile_options_reach_the_trained_model(make_cfg, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    grab = _Grab()
    record = run_experiment(make_cfg(["teacher=none", "performance.channels_last=true", "performance.compile=true"]),
                            extra_callbacks=[grab])
    assert record["status"] == "completed"
    assert compiled == ["LeNet5"]  # the student's network, compiled in place
    assert grab.weight.is_contiguous(memory_format=torch.channels_last) and not grab.weight.is_contiguous()


def test_channels_last_auto_stays_off_on_cpu(make_cfg):
    grab = _Grab()
    run_experiment(make_cfg(["teacher=none"]), extra_callbacks=[grab])
    assert grab.weight.is_contiguous()
