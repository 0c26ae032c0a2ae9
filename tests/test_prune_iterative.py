"""Options the reproduction suite needs from prune=magnitude: Han et al.'s iterative prune-retrain
(``prune.rounds``) and the lottery ticket's random re-initialisation control (``lottery.reinit``)."""

from __future__ import annotations

from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from compresslab.compress.prune import MagnitudePruning
from compresslab.compress.prune.unstructured_callback import UnstructuredPruningCallback
from compresslab.errors import ConfigError
from compresslab.models import MLP
from compresslab.train import ClassifierModule

FIT = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
           enable_model_summary=False)
LAYERS = ("features.1", "features.3")


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 12, generator=g)
    return DataLoader(TensorDataset(x, x[:, :3].argmax(1)), batch_size=16)


def _module(seed=0):
    torch.manual_seed(seed)
    return ClassifierModule(MLP((12,), 3, hidden=[32, 16]), 3,
                            optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9))


def _weights(model):
    mods = dict(model.named_modules())
    return {n: mods[n].weight for n in LAYERS}


class _Snapshots(Callback):
    """The prunable weights at the start of the given epochs (after the pruning callback ran)."""

    def __init__(self, epochs):
        self.epochs, self.seen = set(epochs), {}

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch in self.epochs:
            cb = next(c for c in trainer.callbacks if isinstance(c, UnstructuredPruningCallback))
            self.seen[trainer.current_epoch] = (
                {n: w.detach().clone() for n, w in _weights(pl_module.model).items()},
                {n: m.clone() for n, m in cb.masks.items()})


def test_iterative_rounds_prune_then_retrain_without_rewinding():
    method = MagnitudePruning("magnitude", final_sparsity=0.875, at=2, rounds=3, unit="epoch")
    assert [p for p, _ in method.points()] == [2, 4, 6]
    assert [s for _, s in method.points()] == pytest.approx([0.5, 0.75, 0.875])  # 1 - 0.125^(r/3)
    module = _module()
    init = {n: w.detach().clone() for n, w in _weights(module.model).items()}
    snaps = _Snapshots([2, 4, 6])
    pl.Trainer(max_epochs=7, callbacks=[*method.callbacks(), snaps], **FIT).fit(module, _data())
    for epoch, target in zip((2, 4, 6), (0.5, 0.75, 0.875)):
        weights, masks = snaps.seen[epoch]
        kept = sum(int(m.sum()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        assert 1 - kept / total == pytest.approx(target, abs=2 / total)
        # retraining continues from the trained survivors: they are not the initial values
        for n in LAYERS:
            assert not torch.equal(weights[n][masks[n]], init[n][masks[n]])
            assert (weights[n][~masks[n]] == 0).all()
    # masks only grow: a weight pruned in round 1 stays pruned
    (_, m2), (_, m4) = snaps.seen[2], snaps.seen[4]
    assert all(not bool((m4[n] & ~m2[n]).any()) for n in LAYERS)


def test_lottery_random_reinit_keeps_the_ticket_mask_and_redraws_the_survivors():
    lottery = {"enabled": True, "rounds": 2, "rewind_to": 0}
    runs = {}
    for reinit in ("rewind", "random"):
        method = MagnitudePruning("lottery", final_sparsity=0.75, at=2, unit="epoch",
                                  lottery={**lottery, "reinit": reinit, "reinit_seed": 5})
        module = _module(seed=3)
        init = {n: w.detach().clone() for n, w in _weights(module.model).items()}
        snaps = _Snapshots([2, 4])
        pl.Trainer(max_epochs=5, callbacks=[*method.callbacks(), snaps], **FIT).fit(module, _data())
        runs[reinit] = snaps.seen
    for n in LAYERS:
        # the same masks in both runs: the control differs from the ticket only in the final weights
        assert torch.equal(runs["rewind"][4][1][n], runs["random"][4][1][n])
        assert torch.equal(runs["rewind"][2][0][n], runs["random"][2][0][n])  # round 1 rewinds in both
        w_ticket, mask = runs["rewind"][4]
        w_random, _ = runs["random"][4]
        keep = mask[n]
        assert torch.equal(w_ticket[n][keep], init[n][keep])           # winning ticket: initial values
        assert not torch.equal(w_random[n][keep], init[n][keep])       # control: re-drawn
        assert (w_random[n][~keep] == 0).all()
    # the re-draw is a permutation of the initial tensor (same distribution), seeded
    method = MagnitudePruning("lottery", final_sparsity=0.75, at=2, lottery={**lottery, "reinit": "random"})
    state = {"a.weight": torch.arange(12.0).reshape(3, 4), "a.running_mean": torch.arange(3.0)}
    out = method.reinit_state(state, ["a.weight"])
    assert sorted(out["a.weight"].flatten().tolist()) == list(range(12))
    assert not torch.equal(out["a.weight"], state["a.weight"])
    assert torch.equal(out["a.running_mean"], state["a.running_mean"])  # buffers are kept
    assert torch.equal(method.reinit_state(state, ["a.weight"])["a.weight"], out["a.weight"])


def test_bad_iterative_and_reinit_options_fail_at_build():
    with pytest.raises(ConfigError, match="reinit"):
        MagnitudePruning("m", at=2, lottery={"enabled": True, "reinit": "shuffle"})
    with pytest.raises(ConfigError, match="lottery.rounds"):
        MagnitudePruning("m", at=2, rounds=3, lottery={"enabled": True, "rounds": 3})
    with pytest.raises(ConfigError, match="prune.rounds"):
        MagnitudePruning("m", at=2, rounds=0)
    with pytest.raises(ConfigError, match="student.epochs"):
        MagnitudePruning("m", at=5, rounds=3, epochs=15)  # the last pruning at epoch 15 leaves no retraining


def test_prune_config_exposes_rounds_and_reinit(make_cfg):
    from compresslab.compress import build_methods

    (m,) = build_methods(make_cfg(["prune=magnitude", "student.epochs=12", "prune.rounds=3", "prune.at=3"]))
    assert m.rounds == 3 and not m.lottery and [p for p, _ in m.points()] == [3, 6, 9]
    (m,) = build_methods(make_cfg(["prune=lottery", "student.epochs=12", "prune.lottery.reinit=random"]))
    assert m.lottery and m.reinit == "random" and m.rounds == 3
