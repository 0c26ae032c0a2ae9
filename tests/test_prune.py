"""Unstructured pruning: AGP schedule vs its formula, masks through optimizer steps, checkpoints
and resume, the sparse encoding (bit-exact, sizes), lottery rewinding, L1 penalty, sensitivity,
the teacher left alone, and pipeline runs (incl. ``distill=kd prune=agp``)."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from compresslab.artifact import load_model_file, read_payload
from compresslab.compress.prune import (
    AGPPruning,
    L1ThresholdPruning,
    MagnitudePruning,
    layer_sensitivity,
    magnitude_masks,
    write_sensitivity,
)
from compresslab.compress.codecs.sparse import decode_state_dict, encode_state_dict, encoded_sizes
from compresslab.compress.prune.masks import agp_sparsity
from compresslab.compress.prune.unstructured_callback import UnstructuredPruningCallback
from compresslab.errors import ConfigError
from compresslab.models import MLP
from compresslab.pipeline import run_experiment
from compresslab.train import ClassifierModule

from conftest import CONF_DIR

# ---------------------------------------------------------------- helpers
FIT = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
           enable_model_summary=False)


def _data(n=96, d=12, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, :classes].argmax(1)).long()
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


def _module(seed=0, lr=0.1):
    torch.manual_seed(seed)
    net = MLP((12,), 3, hidden=[32, 16])
    return ClassifierModule(net, 3, optimizer=partial(torch.optim.SGD, lr=lr, momentum=0.9))


def _prunable(net):
    return {"features.1": net.features[1].weight, "features.3": net.features[3].weight}


def _sparsity(weights):
    total = sum(w.numel() for w in weights.values())
    return 1 - sum(int((w != 0).sum()) for w in weights.values()) / total


class _Recorder(Callback):
    """Records measured sparsity at each batch start and checks zeros after each batch end."""

    def __init__(self):
        self.at_start, self.violations, self.steps = {}, 0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.at_start[trainer.global_step] = _sparsity(_prunable(pl_module.model))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        cb = next(c for c in trainer.callbacks if isinstance(c, UnstructuredPruningCallback))
        for name, w in _prunable(pl_module.model).items():
            if name in cb.masks:
                self.violations += int((w.detach()[~cb.masks[name]] != 0).sum())
        self.steps += 1


# ---------------------------------------------------------------- AGP schedule
def test_agp_formula_matches_paper_equation():
    s_i, s_f, t0, n, dt = 0.05, 0.85, 3, 5, 2
    for t in range(t0, t0 + n * dt + 1):
        expected = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3
        assert agp_sparsity(t, s_i, s_f, t0, t0 + n * dt) == pytest.approx(expected, abs=1e-12)
    assert agp_sparsity(t0 - 1, s_i, s_f, t0, t0 + n * dt) == 0.0
    assert agp_sparsity(100, s_i, s_f, t0, t0 + n * dt) == s_f


def test_agp_in_training_follows_the_schedule_and_masks_survive_optimizer_steps():
    method = AGPPruning("agp", final_sparsity=0.8, initial_sparsity=0.1, start=2, end=8, frequency=2, unit="step")
    rec = _Recorder()
    module = _module(lr=0.5)
    pl.Trainer(max_epochs=2, callbacks=[*method.callbacks(), rec], **FIT).fit(module, _data())
    sizes = {n: w.numel() for n, w in _prunable(module.model).items()}
    for t, measured in rec.at_start.items():
        if t < 2:
            assert measured == 0.0
            continue
        p = min(max(q for q in (2, 4, 6, 8) if q <= t), 8)
        target = 0.8 + (0.1 - 0.8) * (1 - (p - 2) / 6) ** 3  # independent restatement of Zhu & Gupta eq. 1
        expected = sum(round(target * n) for n in sizes.values()) / sum(sizes.values())
        assert measured == pytest.approx(expected, abs=1e-9), t
    assert rec.steps == 12 and rec.violations == 0  # pruned weights stayed exactly 0 after every step
    final = _prunable(module.model)
    assert _sparsity(final) == pytest.approx(0.8, abs=1 / 512)
    # classifier untouched, biases untouched
    assert int((module.model.classifier.weight == 0).sum()) == 0


def test_magnitude_masks_are_exact_global_and_monotone():
    torch.manual_seed(0)
    w = {"a": torch.randn(10, 10), "b": torch.randn(50) * 3}
    m = magnitude_masks(w, 0.5, "layer")
    assert int((~m["a"]).sum()) == 50 and int((~m["b"]).sum()) == 25
    assert (w["a"][~m["a"]].abs().max() <= w["a"][m["a"]].abs().min())
    g = magnitude_masks(w, 0.5, "global")
    allw = torch.cat([w["a"].flatten(), w["b"]]).abs()
    thr = allw.sort().values[74]
    assert int((~g["a"]).sum() + (~g["b"]).sum()) == 75
    assert (w["b"][~g["b"]].abs() <= thr).all() and (w["b"][g["b"]].abs() >= thr).all()
    # a weight pruned before is never revived, even if the new magnitude is large
    prior = {"a": torch.ones(10, 10, dtype=torch.bool), "b": torch.ones(50, dtype=torch.bool)}
    prior["a"][0, 0] = False
    w2 = {"a": w["a"].clone(), "b": w["b"]}
    w2["a"][0, 0] = 100.0
    assert not magnitude_masks(w2, 0.3, "layer", prior)["a"][0, 0]


def test_bad_schedules_fail_before_training():
    with pytest.raises(ConfigError, match="student.epochs"):
        AGPPruning("agp", start=1, end=8, epochs=5)
    with pytest.raises(ConfigError, match="final_sparsity"):
        AGPPruning("agp", final_sparsity=1.2)
    with pytest.raises(ConfigError, match="scope"):
        MagnitudePruning("magnitude", scope="row")


# ---------------------------------------------------------------- other unstructured methods
def test_l1_penalty_gradient_equals_adding_it_to_the_loss_and_cut_uses_threshold():
    method = L1ThresholdPruning("l1_threshold", strength=0.01, cut=3, threshold=0.05, unit="step")
    cb = method.callbacks()[0]
    torch.manual_seed(1)
    net = MLP((12,), 3, hidden=[32, 16])
    ref = MLP((12,), 3, hidden=[32, 16])
    ref.load_state_dict(net.state_dict())
    x, y = torch.randn(8, 12), torch.randint(0, 3, (8,))
    F.cross_entropy(net(x), y).backward()
    loss = F.cross_entropy(ref(x), y) + 0.01 * sum(w.abs().sum() for w in _prunable(ref).values())
    loss.backward()
    method.add_penalty_grad(cb, _prunable(net))
    for (n, w), w_ref in zip(_prunable(net).items(), _prunable(ref).values()):
        torch.testing.assert_close(w.grad, w_ref.grad)
    masks = method.compute_masks(_prunable(net), 0.9, {})
    for n, w in _prunable(net).items():
        assert torch.equal(masks[n], w.detach().abs() > 0.05)


def test_lottery_rewinds_survivors_to_their_initial_values():
    method = MagnitudePruning("lottery", final_sparsity=0.75, at=2, unit="epoch",
                              lottery={"enabled": True, "rounds": 2, "rewind_to": 0})
    assert [p for p, _ in method.points()] == [2, 4]
    assert method.points()[0][1] == pytest.approx(0.5)  # 1 - (1 - 0.75)^(1/2)
    module = _module(seed=3)
    init = {n: w.detach().clone() for n, w in _prunable(module.model).items()}

    class AtRewind(Callback):
        def __init__(self):
            self.checked = []

        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch in (2, 4):
                cb = next(c for c in trainer.callbacks if isinstance(c, UnstructuredPruningCallback))
                for n, w in _prunable(pl_module.model).items():
                    keep = cb.masks[n]
                    assert torch.equal(w.detach()[keep], init[n][keep])
                    assert (w.detach()[~keep] == 0).all()
                self.checked.append(trainer.current_epoch)

    probe = AtRewind()
    pl.Trainer(max_epochs=5, callbacks=[*method.callbacks(), probe], **FIT).fit(module, _data())
    assert probe.checked == [2, 4]
    assert _sparsity(_prunable(module.model)) == pytest.approx(0.75, abs=1 / 512)


# ---------------------------------------------------------------- teacher untouched
class _WithTeacher(ClassifierModule):
    """Minimal distillation-shaped module: a frozen ``teacher`` next to the student ``model``."""

    def __init__(self, model, teacher):
        super().__init__(model, 3, optimizer=partial(torch.optim.SGD, lr=0.2))
        self.teacher = teacher.eval().requires_grad_(False)

    def training_loss(self, x, y):
        logits = self.model(x)
        with torch.no_grad():
            t = self.teacher(x)
        return F.cross_entropy(logits, y) + F.kl_div(F.log_softmax(logits, 1), F.softmax(t, 1),
                                                     reduction="batchmean"), logits


def test_pruning_callbacks_never_touch_the_teacher():
    from compresslab.compress.prune import StructuredPruning

    torch.manual_seed(0)
    teacher = MLP((12,), 3, hidden=[32, 16])
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    for method in (AGPPruning("agp", final_sparsity=0.9, start=0, end=1, unit="epoch"),
                   StructuredPruning("structured", ratio=0.5, start=1)):
        module = _WithTeacher(MLP((12,), 3, hidden=[32, 16]), teacher)
        method.example = torch.randn(1, 12)
        pl.Trainer(max_epochs=2, callbacks=method.callbacks(), **FIT).fit(module, _data())
        after = teacher.state_dict()
        assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
        assert module.teacher is teacher and not teacher.training
    # the students were pruned: the AGP one to 90% zeros, the structured one to fewer channels
    teacher_params = sum(p.numel() for p in teacher.parameters())
    assert _sparsity(_prunable(module.model)) == 0.0 and module.model.features[1].out_features == 16
    assert sum(p.numel() for p in module.model.parameters()) < 0.5 * teacher_params


# ---------------------------------------------------------------- sparse encoding
@pytest.mark.parametrize("encoding", ["auto", "bitmask", "index", "dense"])
@pytest.mark.parametrize("compression", ["lzma", "zlib", "none"])
def test_sparse_encoding_round_trips_bit_exactly(encoding, compression):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 11, generator=g)
    w[torch.rand(37, 11, generator=g) < 0.8] = 0.0
    w[0, 0], w[0, 1], w[0, 2], w[0, 3] = -0.0, float("nan"), float("inf"), 1e-45  # -0, NaN, inf, subnormal
    state = {
        "w": w,
        "half": (w * 3).half(),
        "bf16": w.bfloat16(),
        "dense": torch.randn(5, generator=g),
        "count": torch.tensor(7, dtype=torch.int64),
        "flags": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(0.0),
        "all_zero": torch.zeros(3, 3),
        "big": torch.where(torch.rand(70000, generator=g) < 0.99, 0.0, 1.0),
    }
    enc = encode_state_dict(state, encoding=encoding, compression=compression)
    dec = decode_state_dict(enc)
    assert list(dec) == list(state)
    for k, v in state.items():
        assert dec[k].dtype == v.dtype and dec[k].shape == v.shape, k
        int_t = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[v.element_size()]
        assert torch.equal(dec[k].reshape(-1).view(int_t), v.reshape(-1).view(int_t)) if v.dtype != torch.bool \
            else torch.equal(dec[k], v), k
    # -0.0 counts as a stored value (bit pattern), so it comes back negative
    assert torch.signbit(dec["w"][0, 0])


def test_encoded_sizes_match_an_independent_count():
    w = torch.zeros(1000)
    w[::10] = 1.5  # 100 nonzeros
    enc = encode_state_dict({"w": w}, encoding="auto", compression="none")
    (rec,) = enc["tensors"]
    assert rec["layout"] == "bitmask" and rec["length"] == 125 + 100 * 4 == enc["raw_bytes"]
    assert encoded_sizes(1000, 100, 4) == {"dense": 4000, "bitmask": 525, "index": 100 * (2 + 4)}
    very_sparse = torch.zeros(1000)
    very_sparse[3] = 2.0
    (rec,) = encode_state_dict({"w": very_sparse}, compression="none")["tensors"]
    assert rec["layout"] == "index" and rec["length"] == 1 * (2 + 4)
    (rec,) = encode_state_dict({"w": torch.ones(100)}, compression="none")["tensors"]
    assert rec["layout"] == "dense" and rec["length"] == 400


# ---------------------------------------------------------------- pipeline runs
AGP_FAST = ["teacher=none", "student=lenet300", "prune=agp", "prune.unit=step", "prune.start=0", "prune.end=2",
            "prune.frequency=1"]


class _CrashAt(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")


class _MasksAtStart(Callback):
    def __init__(self):
        self.masks = None
        self.applied_t = None

    def on_train_start(self, trainer, pl_module):
        cb = next(c for c in trainer.callbacks if isinstance(c, UnstructuredPruningCallback))
        self.masks = {k: v.clone() for k, v in cb.masks.items()}
        self.applied_t = cb.applied_t


def test_agp_run_saves_sparse_artifact_reloadable_in_fresh_process(make_cfg, tmp_path):
    record = run_experiment(make_cfg(AGP_FAST + ["prune.final_sparsity=0.9"]))
    st = record["student"]
    assert st["prune"]["sparsity_prunable"] == pytest.approx(0.9, abs=0.005)
    assert st["prune"]["schedule_done"] and st["prune"]["selected_weights"] == "val-best"
    # schema 3: the method's own report only under student.<axis>, plain keys
    assert record["schema_version"] == 3 and record["axes"]["prune"] == "agp"
    assert "sparsity_prunable" not in st and "prune_method" not in st["prune"]
    assert "acc_top1" not in st["prune"] and "quant" not in st
    assert st["encodings"] == {"format": "compresslab.sparse/1", "stacks": ["sparse"], "not_stacked": {}}
    from test_stacking import AGP_KEYS

    assert set(st["prune"]) == AGP_KEYS  # what the stacked run (tests/test_stacking.py) reports too
    artifact = Path(st["artifact"])
    payload = read_payload(artifact)
    assert payload["format"] == "compresslab.sparse/1"
    assert st["size_bytes"] < 0.35 * record["reference"]["size_bytes"]
    assert st["size_bytes"] < 0.35 * st["prune"]["dense_size_bytes"]
    # the per-layer table on disk agrees with the reloaded weights
    model = load_model_file(artifact)
    rows = (tmp_path / "run" / "pruning" / "layer_sparsity.csv").read_text().splitlines()
    assert rows[0].startswith("layer,type,shape,params,nonzero,sparsity,pruned")
    for line in rows[1:]:
        name, _, _, params, nnz = line.split(",")[:5]
        w = model.get_submodule(name).weight
        assert int(params) == w.numel() and int(nnz) == int(w.count_nonzero())
    assert st["params_nonzero"] == sum(int(p.count_nonzero()) for p in model.parameters())
    # fresh process, safe load, identical outputs
    x = torch.randn(4, 1, 8, 8)
    torch.save(x, tmp_path / "x.pt")
    script = ("import sys, torch; from compresslab.artifact import load_model_file;"
              "m = load_model_file(sys.argv[1]); x = torch.load(sys.argv[2], weights_only=True);"
              "torch.save(m(x).detach(), sys.argv[3])")
    subprocess.run([sys.executable, "-c", script, str(artifact), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                   check=True)
    assert torch.equal(torch.load(tmp_path / "y.pt", weights_only=True), model(x).detach())


def test_crashed_pruning_run_resumes_with_the_same_masks_and_schedule_position(make_cfg, tmp_path):
    over = ["teacher=none", "student=lenet300", "prune=agp", "prune.start=0", "prune.end=3", "student.epochs=5",
            "prune.final_sparsity=0.8"]
    cfg = make_cfg(over)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_experiment(cfg, extra_callbacks=[_CrashAt(2)])
    last = tmp_path / "run" / "checkpoints" / "student" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    state = ckpt["callbacks"]["compresslab.prune.agp"]
    assert state["applied_t"] == 1 and not state["done"]
    assert set(state["masks"]) == {"features.1", "features.3"}
    for name, mask in state["masks"].items():  # the saved weights obey the saved masks
        assert mask.dtype == torch.bool
        assert (ckpt["state_dict"][f"model.{name}.weight"][~mask] == 0).all()

    probe = _MasksAtStart()
    record = run_experiment(cfg, extra_callbacks=[probe])
    assert record["student"]["resumed_from"] == str(last)
    assert probe.applied_t == 1
    assert all(torch.equal(probe.masks[k].cpu(), state["masks"][k]) for k in state["masks"])
    hist = record["student"]["prune"]["schedule_history"]
    assert [h["t"] for h in hist] == [0, 1, 2, 3]  # each point applied once, none skipped or repeated
    assert record["student"]["prune"]["sparsity_prunable"] == pytest.approx(0.8, abs=0.005)
    assert record["student"]["best_epoch"] >= 3  # val selection only after the schedule ended


def test_distill_kd_with_agp_in_one_run(make_cfg):
    if not (CONF_DIR / "distill" / "kd.yaml").exists():
        pytest.skip("distill=kd is not available")
    record = run_experiment(make_cfg(["student=lenet300", "distill=kd", *AGP_FAST[2:]]))
    assert record["status"] == "completed" and record["axes"]["distill"] == "kd"
    assert record["student"]["prune"]["sparsity_prunable"] == pytest.approx(0.9, abs=0.005)
    assert record["teacher"]["sparsity"] < 0.05  # the teacher was not pruned


# ---------------------------------------------------------------- sensitivity
def test_sensitivity_prunes_one_layer_at_a_time_and_restores(tmp_path):
    torch.manual_seed(0)
    net = MLP((12,), 3, hidden=[32, 16])
    original = {k: v.clone() for k, v in net.state_dict().items()}
    seen = []

    def evaluate(model):  # "accuracy" = fraction of nonzero weights in the whole net
        ws = [m.weight for m in (model.features[1], model.features[3], model.classifier)]
        seen.append([float((w == 0).float().mean()) for w in ws])
        return sum(int(w.count_nonzero()) for w in ws) / sum(w.numel() for w in ws)

    base, rows = layer_sensitivity(net, evaluate, [0.0, 0.5, 0.9])
    assert base == 1.0 and len(rows) == 9
    assert seen[1 + 4] == [0.0, pytest.approx(0.5), 0.0]  # 2nd layer alone at 50%
    r = next(r for r in rows if r["layer"] == "classifier" and r["sparsity"] == 0.9)
    assert r["acc_drop"] == pytest.approx(0.9 * 48 / (384 + 512 + 48), abs=1e-3)
    assert all(torch.equal(original[k], v) for k, v in net.state_dict().items())
    paths = write_sensitivity(rows, base, tmp_path)
    assert Path(paths["png"]).read_bytes()[:4] == b"\x89PNG"
    assert len(Path(paths["csv"]).read_text().splitlines()) == 10


def test_sensitivity_mode_through_the_pipeline(make_cfg, tmp_path):
    record = run_experiment(make_cfg(["teacher=none", "student=lenet300", "prune=sensitivity",
                                      "prune.sparsities=[0.0,0.5,0.95]"]))
    st = record["student"]
    assert Path(st["prune"]["sensitivity_png"]).exists() and st["prune"]["sensitivity_split"] == "val"
    lines = Path(st["prune"]["sensitivity_csv"]).read_text().splitlines()
    assert len(lines) == 1 + 3 * 3  # two hidden layers + classifier, 3 sparsities
    assert st["sparsity"] < 0.01  # the saved student is not pruned
    summary = json.loads((tmp_path / "run" / "results.json").read_text())["student"]
    assert summary["prune"]["most_sensitive_layer"] in {"features.1", "features.3", "classifier"}


@pytest.mark.parametrize("name, cls, checks", [
    ("agp", "AGPPruning", {"final_sparsity": 0.9, "start": 1, "end": 8}),
    ("magnitude", "MagnitudePruning", {"at": 5, "lottery": False}),
    ("lottery", "MagnitudePruning", {"at": 3, "lottery": True, "rounds": 3, "rewind_to": 1}),
    ("l1_threshold", "L1ThresholdPruning", {"penalty": "l1", "cut": 8}),
    ("structured", "StructuredPruning", {"ratio": 0.5, "importance": "l1", "epochs": 15}),
    ("sensitivity", "SensitivityAnalysis", {"split": "val"}),
])
def test_every_prune_config_builds_its_method(make_cfg, name, cls, checks):
    from compresslab.compress import build_methods

    (method,) = build_methods(make_cfg([f"prune={name}", "student.epochs=15"]))
    assert type(method).__name__ == cls and method.name == name and method.axis == "prune"
    for key, value in checks.items():
        assert getattr(method, key) == value, key


def test_sensitivity_command_analyses_a_saved_model_file(tmp_path, capsys):
    """``compresslab-sensitivity MODEL dataset=digits --out DIR`` (compresslab.cli.sensitivity_main)."""
    from compresslab.artifact import save_model_file
    from compresslab.cli import run_sensitivity
    from compresslab.models import build_model

    arch = {"_target_": "compresslab.models.MLP", "hidden": [32]}
    model = build_model(arch, (1, 8, 8), 10)
    path = save_model_file(tmp_path / "mlp.pt", model, arch, (1, 8, 8), 10)
    paths = run_sensitivity([str(path), "dataset=digits", f"paths.data_dir={tmp_path}", "--out", str(tmp_path / "s"),
                              "--sparsities", "0.5,0.9", "--max-batches", "2"])
    rows = Path(paths["csv"]).read_text().splitlines()
    assert len(rows) == 1 + 2 * 2  # header + (2 layers incl. the classifier) x 2 sparsities
    assert "unpruned val accuracy" in capsys.readouterr().out
