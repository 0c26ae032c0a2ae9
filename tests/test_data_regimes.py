"""The student's data regime (dataset.train_fraction / subset_seed / exclude_classes /
unlabeled_fraction) on digits and on torchvision files in their real on-disk formats, the teacher
trained once on the full split for a sweep of regimes, the checks that fail before training, and
per-class accuracy with the val-chosen class bias in results.json."""

from __future__ import annotations

import json
from collections import Counter
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from compresslab import teacher as teacher_mod
from compresslab.data import CIFAR10DataModule, DigitsDataModule, MNISTDataModule
from compresslab.data.regime import UNLABELED, labelled_cross_entropy, stratified_pick
from compresslab.errors import ConfigError
from compresslab.measure.per_class import apply_bias, choose_bias, per_class_accuracy
from compresslab.pipeline import run_experiment
from compresslab.teacher import teacher_cache_path

from test_vision_data import no_network, write_cifar10, write_mnist  # noqa: F401  (autouse: no download)


def _labels(ds):
    return Counter(int(ds[i][1]) for i in range(len(ds)))


def _digits(**kw):
    dm = DigitsDataModule(**kw)
    dm.setup()
    return dm


# ---------------------------------------------------------------- the three options on digits
def test_train_fraction_is_a_class_stratified_subset_seeded_by_subset_seed():
    full = _digits()
    dm = _digits(train_fraction=0.1, subset_seed=3)
    assert len(dm.train_indices) == round(0.1 * len(full.train_indices))
    assert set(dm.train_indices) <= set(full.train_indices)
    full_counts, counts = _labels(full.train_set), _labels(dm.train_set)
    for c in range(10):  # each class in proportion (largest remainder: within one sample)
        assert abs(counts[c] - 0.1 * full_counts[c]) < 1.0
    assert _digits(train_fraction=0.1, subset_seed=3).train_indices == dm.train_indices
    assert _digits(train_fraction=0.1, subset_seed=4).train_indices != dm.train_indices
    # the model's seed does not move the subset; val and test are untouched
    assert _digits(train_fraction=0.1, subset_seed=3, split_seed=0).val_indices == full.val_indices
    assert len(dm.test_set) == len(full.test_set) == 360


def test_exclude_classes_leaves_val_and_test_with_every_class():
    dm = _digits(exclude_classes=[3, 7])
    train = _labels(dm.train_set)
    assert train[3] == 0 and train[7] == 0 and all(train[c] > 0 for c in (0, 1, 2, 4, 5, 6, 8, 9))
    assert _labels(dm.val_set)[3] > 0 and _labels(dm.test_set)[3] > 0
    full = _digits()
    assert len(dm.train_indices) == len(full.train_indices) - sum(_labels(full.train_set)[c] for c in (3, 7))
    # with a fraction: exclusion first, then the stratified subset of what is left
    both = _digits(exclude_classes=[3], train_fraction=0.5)
    assert _labels(both.train_set)[3] == 0
    assert len(both.train_indices) == round(0.5 * (len(full.train_indices) - _labels(full.train_set)[3]))


@pytest.mark.parametrize("on_device", [False, True])
def test_unlabeled_fraction_hides_a_stratified_share_of_the_labels(on_device):
    dm = _digits(unlabeled_fraction=0.75, subset_seed=1, on_device=on_device)
    full = _digits()
    ys = torch.cat([y for _, y in dm.train_dataloader()])
    assert len(ys) == len(full.train_indices)  # every sample is still there (for soft targets)
    hidden = int((ys == UNLABELED).sum())
    assert hidden == len(dm.unlabeled_indices) == round(0.75 * len(ys))
    labelled = Counter(ys[ys != UNLABELED].tolist())
    full_counts = _labels(full.train_set)
    for c in range(10):
        assert abs(labelled[c] - 0.25 * full_counts[c]) <= 1.0
    assert all(int(y) != UNLABELED for _, y in dm.val_set) and all(int(y) != UNLABELED for _, y in dm.test_set)
    assert dm.regime_summary()["labelled_train_samples"] == len(ys) - hidden


def test_full_split_view_is_the_teachers_data():
    dm = _digits(train_fraction=0.2, exclude_classes=[3], unlabeled_fraction=0.5)
    view = dm.full_split_view()
    full = _digits()
    assert view.train_indices == full.train_indices and view.unlabeled_indices == []
    assert view.val_indices == dm.val_indices
    assert _labels(view.train_set)[3] > 0
    assert len(dm.train_indices) < len(view.train_indices)  # the student's own split is unchanged
    assert _digits().full_split_view() is not None


def test_stratified_pick_totals_and_rounding():
    labels = torch.tensor([0] * 7 + [1] * 3)
    picked = stratified_pick(list(range(10)), labels, 0.5, 0)
    assert len(picked) == 5 and Counter(int(labels[i]) for i in picked) in (Counter({0: 4, 1: 1}),
                                                                            Counter({0: 3, 1: 2}))
    assert stratified_pick(list(range(10)), labels, 1.0, 0) == list(range(10))


# ---------------------------------------------------------------- real on-disk formats
def test_regimes_on_torchvision_mnist_and_cifar_files(tmp_path):
    data = write_mnist(tmp_path, n_train=200, n_test=20)
    dm = MNISTDataModule(root=tmp_path, train_fraction=0.5, exclude_classes=[3], unlabeled_fraction=0.5,
                         subset_seed=2)
    dm.setup()
    y_train = data["train"][1]
    pool = torch.as_tensor(y_train)[torch.as_tensor(dm.full_train_indices)]
    n_kept = int((pool != 3).sum())
    assert len(dm.train_indices) == round(0.5 * n_kept)
    ys = torch.cat([y for _, y in dm.train_dataloader()])
    assert 3 not in ys.tolist()
    assert int((ys == UNLABELED).sum()) == round(0.5 * len(dm.train_indices))
    x0, _ = dm.train_set[0]
    assert x0.shape == (1, 28, 28)  # the torchvision transform still applies
    view = dm.full_split_view()
    assert len(view.train_set) == len(dm.full_train_indices) and 3 in _labels(view.train_set)

    cifar_root = tmp_path / "c"
    write_cifar10(cifar_root, per_batch=20, n_test=10)
    dm = CIFAR10DataModule(root=cifar_root, verify_integrity=False, train_fraction=0.25, subset_seed=1)
    dm.setup()
    assert len(dm.train_indices) == round(0.25 * len(dm.full_train_indices))
    assert dm.train_set[0][0].shape == (3, 32, 32)
    with pytest.raises(ConfigError, match="not class labels"):
        bad = CIFAR10DataModule(root=cifar_root, verify_integrity=False, exclude_classes=[10])
        bad.setup()


# ---------------------------------------------------------------- losses with partial labels
def test_labelled_cross_entropy_skips_hidden_labels():
    logits = torch.randn(6, 4, requires_grad=True)
    y = torch.tensor([0, UNLABELED, 2, UNLABELED, 3, 1])
    keep = y != UNLABELED
    assert labelled_cross_entropy(logits, y).item() == pytest.approx(F.cross_entropy(logits[keep], y[keep]).item())
    none = labelled_cross_entropy(logits, torch.full((6,), UNLABELED))
    assert none.item() == 0.0
    none.backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) == 0.0


def test_distillation_gives_soft_targets_to_every_sample_and_labels_where_they_exist():
    from compresslab.distill import DistillationModule, KDLoss
    from compresslab.models import MLP

    torch.manual_seed(0)
    student, teacher = MLP((5,), 3, hidden=[8]), MLP((5,), 3, hidden=[8])
    module = DistillationModule(student, teacher, 3, optimizer=partial(torch.optim.SGD, lr=0.1),
                                ce_weight=1.0, kd_weight=1.0, logit_loss=KDLoss(temperature=2.0))
    x = torch.randn(4, 5)
    y = torch.tensor([1, UNLABELED, UNLABELED, 2])
    total, logits, terms = module.distill_terms(x, y)
    with torch.no_grad():
        t = teacher(x)
    keep = y != UNLABELED
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(logits[keep], y[keep]).item(), rel=1e-5)
    assert terms["kd"].item() == pytest.approx(KDLoss(temperature=2.0)(logits, t).item(), rel=1e-5)
    _, _, only_soft = module.distill_terms(x, torch.full((4,), UNLABELED))
    assert only_soft["ce"].item() == 0.0 and only_soft["kd"].item() > 0


# ---------------------------------------------------------------- the pipeline
def _count_teacher_fits(monkeypatch):
    seen = []
    real = teacher_mod.fit_with_checkpoints

    def spy(module, datamodule, *args, **kwargs):
        seen.append({"train": len(datamodule.train_set), "labels": _labels(datamodule.train_set)})
        return real(module, datamodule, *args, **kwargs)

    monkeypatch.setattr(teacher_mod, "fit_with_checkpoints", spy)
    return seen


def test_a_sweep_over_student_regimes_trains_the_teacher_once_on_the_full_split(make_cfg, monkeypatch, tmp_path):
    fits = _count_teacher_fits(monkeypatch)
    regimes = [[], ["dataset.exclude_classes=[3]"], ["dataset.train_fraction=0.1", "dataset.subset_seed=5"],
               ["dataset.unlabeled_fraction=1.0"]]
    paths, records = set(), []
    for k, regime in enumerate(regimes):
        cfg = make_cfg(["distill=kd", "teacher=mlp", "student=mlp", *regime,
                        f"paths.run_dir={tmp_path / f'job{k}'}"])
        paths.add(teacher_cache_path(cfg))
        records.append(run_experiment(cfg))
    assert len(paths) == 1 and len(fits) == 1
    assert fits[0]["train"] == 1293 and fits[0]["labels"][3] > 0  # the full training split, 3s included
    assert [r["teacher"]["source"] for r in records] == ["trained", "cache", "cache", "cache"]
    assert records[1]["data_regime"]["exclude_classes"] == [3]
    assert records[2]["data_regime"]["train_samples"] == round(0.1 * 1293)
    assert records[3]["data_regime"]["labelled_train_samples"] == 0
    # the model's seed still makes a new teacher
    assert teacher_cache_path(make_cfg(["distill=kd", "teacher=mlp", "seed=1"])) not in paths


@pytest.mark.parametrize("overrides, match", [
    (["dataset.train_fraction=0"], r"dataset.train_fraction=0 is not allowed: .* in \(0, 1\]"),
    (["dataset.train_fraction=1.5"], r"dataset.train_fraction=1.5 is not allowed: .* in \(0, 1\]"),
    (["dataset.train_fraction=-0.2"], r"dataset.train_fraction=-0.2 is not allowed: .* in \(0, 1\]"),
    (["dataset.train_fraction=0.0001"], "empty subset"),
    (["dataset.exclude_classes=[10]"], "not class labels"),
    (["dataset.exclude_classes=[0,1,2,3,4,5,6,7,8,9]"], "removes every class"),
    (["dataset.exclude_classes=[a]"], r"dataset.exclude_classes\[0\]='a' is not allowed: expected an integer"),
    (["dataset.unlabeled_fraction=1.2"], r"dataset.unlabeled_fraction=1.2 is not allowed: .* in \[0, 1\]"),
    (["dataset.unlabeled_fraction=1.0", "distill=none"], "nothing to learn from"),
    (["+eval.class_bias={12:1.0}"], "not a class label"),
    (["+eval.class_bias={3:best}"], "eval.class_bias.3='best' is not allowed: expected a finite number or 'val'"),
])
def test_bad_regime_values_fail_before_training(make_cfg, monkeypatch, tmp_path, overrides, match):
    fits = _count_teacher_fits(monkeypatch)
    cfg = make_cfg(["distill=kd", "teacher=mlp", "student=mlp", *overrides])
    with pytest.raises(ConfigError, match=match):
        run_experiment(cfg)
    assert fits == [] and not (tmp_path / "run" / "checkpoints").exists()
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "failed"


def test_results_have_per_class_accuracy_and_a_val_chosen_class_bias(make_cfg):
    cfg = make_cfg(["distill=kd", "teacher=mlp", "student=mlp", "dataset.exclude_classes=[3]",
                    "+eval.class_bias={3:val}", "eval.class_bias_grid=[0.0,2.0,4.0]",
                    "trainer.limit_train_batches=null", "teacher.epochs=3", "student.epochs=2"])
    record = run_experiment(cfg)
    s, t = record["student"], record["teacher"]
    assert len(s["acc_per_class"]) == len(t["acc_per_class"]) == 10
    assert s["class_bias_chosen_on"] == "val" and s["class_bias"]["3"] in (0.0, 2.0, 4.0)
    assert {"acc_top1_bias", "acc_per_class_bias", "val_acc_top1_bias", "val_acc_top1_nobias"} <= set(s)
    assert s["val_acc_top1_bias"] >= s["val_acc_top1_nobias"]
    assert "class_bias" not in t  # the bias is a student evaluation option
    # test accuracy of the saved student, per class, matches its overall accuracy
    counts = Counter(int(y) for _, y in DigitsDataModule().__class__()._load()[1])
    n = sum(counts.values())
    assert sum(s["acc_per_class"][c] * counts[c] for c in range(10)) / n == pytest.approx(s["acc_top1"], abs=1e-6)


def test_class_bias_is_chosen_on_val_never_on_test():
    # val prefers a bias of 2 on class 1 (4 breaks its second sample); this test split would prefer 4
    val_logits, val_labels = torch.tensor([[1.0, -0.5], [1.0, -1.5]]), torch.tensor([1, 0])
    test_logits, test_labels = torch.tensor([[1.0, -2.5], [1.0, -0.5]]), torch.tensor([1, 1])
    assert choose_bias(val_logits, val_labels, {1: "val"}, [0.0, 2.0, 4.0]) == {1: 2.0}
    assert choose_bias(test_logits, test_labels, {1: "val"}, [0.0, 2.0, 4.0]) == {1: 4.0}
    fixed = choose_bias(val_logits, val_labels, {1: 3.0}, [0.0])
    assert fixed == {1: 3.0}
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    assert per_class_accuracy(logits, torch.tensor([0, 0, 1]), 3) == [0.5, 1.0, None]
    assert torch.equal(apply_bias(logits, {0: 1.0})[:, 0], logits[:, 0] + 1.0)
