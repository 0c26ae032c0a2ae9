"""The rest of the distillation catalogue (CC, VID, AB, FT, FSP, NST, OFD, ReviewKD, DIST): each loss
against an independent computation of its published formula on small tensors, the stage taps
(``stages``, ``stages_preact``, ``sections``), the shared stage mechanism (stages as Lightning fits,
run once), validation before any fit, and one run through the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback

from compresslab.data import DigitsDataModule
from compresslab.distill import (
    ABLoss,
    CCLoss,
    DistillationModule,
    DISTLoss,
    FSPLoss,
    FTLoss,
    HintLoss,
    NSTLoss,
    OFDLoss,
    ReviewKDLoss,
    VIDLoss,
)
from compresslab.distill import stages as stages_mod
from compresslab.distill.losses_ofd import ofd_margin
from compresslab.distill.losses_review import hcl_loss
from compresslab.distill.tap_probe import probe
from compresslab.distill.taps import run_until_captured
from compresslab.errors import ConfigError
from compresslab.models import ConvNet, LeNet5, build_model
from compresslab.pipeline import build_datamodule, validate
from hydra.errors import InstantiationException

from conftest import FAST, compose_config

SHAPE = (1, 8, 8)
torch.set_default_dtype(torch.float32)


def g(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- formulas


def test_cc_is_the_taylor_rbf_correlation_congruence():
    b, d = 5, 4
    s, t = torch.randn(b, d, generator=g(1)), torch.randn(b, d, generator=g(2))
    loss = CCLoss(feat_dim=d, gamma=0.4, order=2)
    loss.build([(d,)], [(d,)], None)
    for lin in (loss.embed_s, loss.embed_t):  # identity heads: the formula on the normalised features
        lin.weight.data = torch.eye(d)
        lin.bias.data.zero_()

    def corr(x):
        x = [v / math.sqrt(sum(float(e) ** 2 for e in v)) for v in x]
        out = [[0.0] * b for _ in range(b)]
        for i in range(b):
            for j in range(b):
                dot = sum(float(x[i][k]) * float(x[j][k]) for k in range(d))
                out[i][j] = sum(math.exp(-0.8) * 0.8 ** p / math.factorial(p) * dot ** p for p in range(3))
        return out

    cs, ct = corr(s), corr(t)
    ref = sum((cs[i][j] - ct[i][j]) ** 2 for i in range(b) for j in range(b)) / b ** 2
    assert float(loss([s], [t]).detach()) == pytest.approx(ref, rel=1e-5)
    # the series is the Gaussian RBF exp(-γ‖x−y‖²) of unit vectors when it is long enough
    long = CCLoss(feat_dim=d, gamma=0.4, order=14)
    e = F.normalize(s, dim=1)
    assert torch.allclose(long.correlation(e), torch.exp(-0.4 * torch.cdist(e, e) ** 2), atol=1e-5)


def test_dist_is_tau_squared_inter_plus_intra_pearson():
    zs, zt = torch.randn(6, 5, generator=g(3)), torch.randn(6, 5, generator=g(4)) * 3
    beta, gamma, tau = 2.0, 0.5, 3.0

    def pearson(a, b):
        ma, mb = sum(a) / len(a), sum(b) / len(b)
        num = sum((x - ma) * (y - mb) for x, y in zip(a, b))
        den = math.sqrt(sum((x - ma) ** 2 for x in a)) * math.sqrt(sum((y - mb) ** 2 for y in b))
        return num / (den + 1e-8)

    def softmax(row):
        m = max(row)
        e = [math.exp((v - m) / tau) for v in row]
        return [v / sum(e) for v in e]

    ys, yt = [softmax(r.tolist()) for r in zs], [softmax(r.tolist()) for r in zt]
    inter = 1 - sum(pearson(a, b) for a, b in zip(ys, yt)) / len(ys)
    cols = lambda y: [[row[c] for row in y] for c in range(5)]  # noqa: E731
    intra = 1 - sum(pearson(a, b) for a, b in zip(cols(ys), cols(yt))) / 5
    ref = tau ** 2 * (beta * inter + gamma * intra)
    assert float(DISTLoss(beta, gamma, tau)(zs, zt)) == pytest.approx(ref, rel=1e-5)
    assert float(DISTLoss()(zs, zs)) == pytest.approx(0.0, abs=1e-5)  # identical predictions: no loss


def test_vid_is_the_gaussian_negative_log_likelihood_with_softplus_variance():
    s, t = torch.randn(3, 2, 4, 4, generator=g(5)), torch.randn(3, 3, 2, 2, generator=g(6))
    loss = VIDLoss(init_pred_var=5.0, eps=1e-5)
    loss.build([(2, 4, 4)], [(3, 2, 2)], None)
    var0 = math.log(1 + math.exp(float(loss.log_scales[0][0]))) + 1e-5
    assert var0 == pytest.approx(5.0, rel=1e-6)  # σ² starts at init_pred_var
    loss.log_scales[0].data = torch.tensor([0.3, -1.0, 2.0])
    w = [m.weight.detach()[:, :, 0, 0] for m in loss.regressors[0] if isinstance(m, torch.nn.Conv2d)]
    pooled = s.reshape(3, 2, 2, 2, 2, 2).mean(dim=(3, 5))  # 4x4 -> 2x2 by 2x2 blocks
    h = pooled.permute(0, 2, 3, 1)  # (B, H, W, C)
    mean = (torch.relu(torch.relu(h @ w[0].t()) @ w[1].t()) @ w[2].t()).permute(0, 3, 1, 2)
    var = torch.log1p(torch.exp(torch.tensor([0.3, -1.0, 2.0]))) + 1e-5
    nll = 0.5 * ((mean - t) ** 2 / var.view(1, 3, 1, 1) + torch.log(var).view(1, 3, 1, 1))
    assert float(loss([s], [t])) == pytest.approx(float(nll.mean()), rel=1e-5)


def test_ab_is_the_margin_boundary_loss_weighted_by_depth():
    s = [torch.randn(2, 2, 3, 3, generator=g(7)), torch.randn(2, 3, 2, 2, generator=g(8))]
    t = [torch.randn(2, 2, 3, 3, generator=g(9)), torch.randn(2, 3, 2, 2, generator=g(10))]
    m = 1.0
    ref = 0.0
    for i, (a, b) in enumerate(zip(s, t)):
        part = 0.0
        for x, y in zip(a.flatten().tolist(), b.flatten().tolist()):
            if y <= 0 and x > -m:
                part += (x + m) ** 2
            if y > 0 and x <= m:
                part += (x - m) ** 2
        ref += 2.0 ** (i - 1) * part / 2 * 3 / 1000  # weights 1/2, 1; per sample; ×3/1000
    assert float(ABLoss(margin=m)(s, t)) == pytest.approx(ref, rel=1e-5)


def test_fsp_matrix_and_loss_and_the_spatial_check():
    a, b = torch.randn(2, 2, 3, 3, generator=g(11)), torch.randn(2, 3, 3, 3, generator=g(12))
    c, d = torch.randn(2, 2, 3, 3, generator=g(13)), torch.randn(2, 3, 3, 3, generator=g(14))

    def fsp(x, y):
        return [[[sum(float(x[n, i].flatten()[k]) * float(y[n, j].flatten()[k]) for k in range(9)) / 9
                  for j in range(3)] for i in range(2)] for n in range(2)]

    gs, gt = fsp(a, b), fsp(c, d)
    ref = sum((gs[n][i][j] - gt[n][i][j]) ** 2 for n in range(2) for i in range(2) for j in range(3)) / 12
    loss = FSPLoss()
    loss.build([(2, 3, 3), (3, 3, 3)], [(2, 3, 3), (3, 3, 3)], None)
    assert float(loss([a, b], [c, d])) == pytest.approx(ref, rel=1e-5)
    with pytest.raises(ConfigError, match="different spatial sizes"):
        FSPLoss().build([(2, 4, 4), (3, 2, 2)], [(2, 4, 4), (3, 4, 4)], None)
    with pytest.raises(ConfigError, match="pairs"):
        FSPLoss().build([(2, 4, 4)], [(2, 4, 4)], None)


def test_nst_is_the_squared_mmd_with_the_polynomial_kernel():
    s, t = torch.randn(2, 3, 2, 2, generator=g(15)), torch.randn(2, 4, 2, 2, generator=g(16))

    def unit_channels(f):
        out = []
        for n in range(f.shape[0]):
            rows = []
            for c in range(f.shape[1]):
                v = f[n, c].flatten().tolist()
                norm = math.sqrt(sum(x * x for x in v))
                rows.append([x / norm for x in v])
            out.append(rows)
        return out

    def kmean(a, b):
        vals = [sum(x * y for x, y in zip(u, v)) ** 2 for n in range(len(a)) for u in a[n] for v in b[n]]
        return sum(vals) / len(vals)

    us, ut = unit_channels(s), unit_channels(t)
    ref = kmean(ut, ut) + kmean(us, us) - 2 * kmean(us, ut)
    assert float(NSTLoss()([s], [t])) == pytest.approx(ref, rel=1e-5)


def test_ft_factor_loss_and_paraphraser_reconstruction():
    s, t = torch.randn(2, 3, 4, 4, generator=g(17)), torch.rand(2, 4, 4, 4, generator=g(18))
    loss = FTLoss(k=0.5)
    loss.build([(3, 4, 4)], [(4, 4, 4)], None)
    loss.eval()
    fs, ft = loss.translator(s), loss.paraphraser.encoder(t)
    assert fs.shape == ft.shape == (2, 2, 4, 4)  # the factor has k·C_teacher channels

    def factor(f):
        out = []
        for n in range(f.shape[0]):
            v = [sum(float(f[n, c].flatten()[k]) ** 2 for c in range(f.shape[1])) / f.shape[1] for k in range(16)]
            norm = math.sqrt(sum(x * x for x in v))
            out.append([x / norm for x in v])
        return out

    a, b = factor(fs), factor(ft)
    ref = sum(abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v)) / 32
    assert float(loss([s], [t])) == pytest.approx(ref, rel=1e-4)
    rec = loss.paraphraser.decoder(loss.paraphraser.encoder(t))
    assert float(loss.stage_loss(None, [t])) == pytest.approx(float(((rec - t) ** 2).mean()), rel=1e-5)
    assert {id(p) for p in loss.stage_parameters()} == {id(p) for p in loss.paraphraser.parameters()}
    assert {id(p) for p in loss.main_parameters()} == {id(p) for p in loss.translator.parameters()}


def test_ofd_margin_is_the_expected_negative_response():
    gamma, beta = torch.tensor([1.0, 0.5, 2.0, 0.1]), torch.tensor([0.0, 1.0, -1.0, 1.0])
    margin = ofd_margin(gamma, beta)
    for c in range(3):  # E[x | x < 0] for x ~ N(β, γ²), by numerical integration
        x = torch.linspace(-12 * float(gamma[c]) + float(beta[c]), 0.0, 200001, dtype=torch.float64)
        pdf = torch.exp(-((x - float(beta[c])) / float(gamma[c])) ** 2 / 2)
        assert float(margin[c]) == pytest.approx(float(torch.trapezoid(x * pdf, x) / torch.trapezoid(pdf, x)),
                                                 rel=1e-4)
    assert float(margin[3]) == pytest.approx(-0.3)  # P(x<0) = Φ(-10) ≤ 0.001: −3·|γ|
    assert float(margin[0]) == pytest.approx(-math.sqrt(2 / math.pi), rel=1e-6)  # half-normal mean


def test_ofd_partial_l2_per_element_and_tap_weights():
    s = [torch.randn(2, 2, 2, 2, generator=g(19)), torch.randn(2, 2, 2, 2, generator=g(20))]
    t = [torch.randn(2, 3, 2, 2, generator=g(21)), torch.randn(2, 3, 2, 2, generator=g(22))]
    bn = torch.nn.BatchNorm2d(3)
    bn.weight.data, bn.bias.data = torch.tensor([1.0, 0.5, 2.0]), torch.tensor([0.0, 1.0, -1.0])
    loss = OFDLoss()
    loss.bind_teacher_bn([bn, bn])
    loss.build([(2, 2, 2)] * 2, [(3, 2, 2)] * 2, None)
    loss.eval()
    m = ofd_margin(bn.weight, bn.bias).tolist()
    ref = 0.0
    for i in range(2):
        out = loss.connectors[i](s[i])
        part = 0.0
        for n in range(2):
            for c in range(3):
                for x, y in zip(out[n, c].flatten().tolist(), t[i][n, c].flatten().tolist()):
                    if y > 0:
                        part += (x - y) ** 2
                    elif y > m[c] and x > y:
                        part += (x - y) ** 2
                    elif y <= m[c] and x > m[c]:
                        part += (x - m[c]) ** 2
        ref += part / 2 / 2 ** (1 - i)
    assert float(loss(s, t)) == pytest.approx(ref, rel=1e-5)


def test_reviewkd_hcl_pyramid_and_fusion_shapes():
    fs, ft = torch.randn(2, 3, 8, 8, generator=g(23)), torch.randn(2, 3, 8, 8, generator=g(24))

    def block_mean(f, k):  # average pooling to k×k by reshaping (8 divides evenly)
        r = 8 // k
        return f.reshape(2, 3, k, r, k, r).mean(dim=(3, 5))

    terms = [((fs - ft) ** 2).mean()] + [((block_mean(fs, k) - block_mean(ft, k)) ** 2).mean() for k in (4, 2, 1)]
    ref = (terms[0] + terms[1] / 2 + terms[2] / 4 + terms[3] / 8) / (1 + 1 / 2 + 1 / 4 + 1 / 8)
    v1, v2 = torch.randn(2, 5, generator=g(25)), torch.randn(2, 5, generator=g(26))
    ref = ref + ((v1 - v2) ** 2).mean()  # a 1×1 level has no pyramid
    assert float(hcl_loss([fs, v1[..., None, None]], [ft, v2[..., None, None]])) == pytest.approx(float(ref),
                                                                                                   rel=1e-5)
    loss = ReviewKDLoss(warmup_epochs=4)
    loss.build([(4, 8, 8), (6, 4, 4), (7,)], [(3, 8, 8), (5, 4, 4), (9,)], None)
    assert [a.att_conv is not None for a in loss.abfs] == [True, True, False]  # the deepest level has no fusion
    s = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4), torch.randn(2, 7)]
    t = [torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4), torch.randn(2, 9)]
    assert float(loss(s, t, epoch=0)) == pytest.approx(float(loss(s, t, epoch=3)) / 4, rel=1e-5)  # warm-up


# ----------------------------------------------------------------------------- stage taps


def test_stage_taps_resolve_on_the_default_pair_and_a_resnet():
    t, s = probe(ConvNet(SHAPE, 10), SHAPE), probe(LeNet5(SHAPE, 10), SHAPE)
    assert t.stage_list() == [("features.5", (8, 8)), ("features", (4, 4))]
    assert s.stage_list() == [("features.1", (8, 8)), ("features.4", (4, 4)), ("features.5", (2, 2))]
    assert [tap for tap, _ in t.stage_list(preact=True)] == ["features.5:in", "features.12:in"]
    assert [sec for sec, _ in s.section_list()] == [("features.0", "features.1"), ("features.2", "features.4"),
                                                    ("features.5", "features.5")]
    resnet = build_model({"_target_": "compresslab.models.CifarResNet", "depth": 8}, SHAPE, 10).eval()
    p = probe(resnet, SHAPE)
    assert [tap for tap, _ in p.stage_list()] == ["layer1", "layer2", "layer3"]  # RepDistiller's feat[1:-1]
    pre = [tap for tap, _ in p.stage_list(preact=True)]
    assert pre == ["layer1.0.relu:in", "layer2.0.relu:in", "layer3.0.relu:in"]
    # the block's ReLU runs twice: the tap is its last call, the residual sum before the activation
    x = torch.randn(2, *SHAPE)
    feats = run_until_captured(resnet, x, pre[:1], p.calls_of(pre[:1]))
    block = resnet.layer1[0]
    with torch.no_grad():
        h = resnet.relu(resnet.bn1(resnet.conv1(x)))
        want = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(h))))) + block.shortcut(h)
    assert torch.allclose(feats[pre[0]], want, atol=1e-5)


# ----------------------------------------------------------------------------- the stage mechanism


@pytest.fixture
def dm(tmp_path):
    data = DigitsDataModule(root=tmp_path, batch_size=32)
    data.setup()
    return data


def module_with(entries):
    torch.manual_seed(0)
    teacher, student = ConvNet(SHAPE, 10, channels=[8, 16]), LeNet5(SHAPE, 10, width=0.5)
    return DistillationModule(student, teacher, 10, optimizer=partial(torch.optim.AdamW, lr=3e-3),
                              feature_losses=entries)


def trainer(tmp_path, callbacks=()):
    return pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=3, limit_val_batches=1,
                      logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, callbacks=list(callbacks), default_root_dir=str(tmp_path))


class Snapshot(Callback):
    def __init__(self):
        self.state = None

    def on_train_start(self, trainer, pl_module):
        self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}


def test_ft_paraphraser_stage_is_a_lightning_fit_that_runs_once(tmp_path, dm, monkeypatch):
    fits = []
    real_fit = pl.Trainer.fit

    def counting_fit(self, model, *args, **kwargs):
        fits.append(type(model).__name__)
        return real_fit(self, model, *args, **kwargs)

    monkeypatch.setattr(pl.Trainer, "fit", counting_fit)
    module = module_with({"ft": {"loss": FTLoss(), "weight": 200.0, "student_layers": ["auto"],
                                 "teacher_layers": ["auto"], "init_epochs": 2}})
    module.build(SHAPE, len(dm.train_set))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    snap = Snapshot()
    trainer(tmp_path, [snap]).fit(module, datamodule=dm)
    assert fits == ["DistillationModule", "StageModule"]  # the stage ran as its own fit, inside the main one
    assert len(module.init_stage_losses["ft"]) == 2 and bool(module.init_done[0])
    changed = {k for k in before if not torch.equal(before[k], snap.state[k])}
    assert any(k.startswith("feature_losses.ft.paraphraser.") for k in changed)
    assert not any(k.startswith(("model.", "feature_losses.ft.translator.")) for k in changed)
    opt = module.trainer.optimizers[0]
    in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
    assert not in_opt & {id(p) for p in module.feature_losses["ft"].paraphraser.parameters()}  # fixed afterwards
    assert {id(p) for p in module.feature_losses["ft"].translator.parameters()} <= in_opt
    # a second fit of the same module (as after a resume: init_done comes back with the checkpoint) skips it
    trainer(tmp_path).fit(module, datamodule=dm)
    assert fits.count("StageModule") == 1


def test_ab_stage_trains_the_feature_layers_and_main_fit_has_no_ab_term(tmp_path, dm):
    module = module_with({"ab": {"loss": ABLoss(), "weight": 0.0, "student_layers": ["stages_preact"],
                                 "teacher_layers": ["stages_preact"], "init_epochs": 1}})
    initial = {k: v.clone() for k, v in module.model.state_dict().items()}
    snap = Snapshot()
    trainer(tmp_path, [snap]).fit(module, datamodule=dm)
    entry = module.entries[0]
    assert entry.student_layers == ["features.1:in", "features.4:in"]
    assert entry.teacher_layers == ["features.5:in", "features.12:in"]
    assert not torch.equal(snap.state["model.features.3.weight"], initial["features.3.weight"])  # trained
    assert torch.equal(snap.state["model.classifier.0.weight"], initial["classifier.0.weight"])  # not run
    x, y = next(iter(dm.train_dataloader()))[:2]
    _, _, terms = module.distill_terms(x, y)
    assert set(terms) == {"ce"} and module.student_taps == []


def test_stage_trainer_follows_the_main_fit_settings(tmp_path):
    outer = pl.Trainer(accelerator="cpu", devices=1, limit_train_batches=7, gradient_clip_val=0.5, logger=False,
                       precision="bf16-mixed", default_root_dir=str(tmp_path))
    kw = stages_mod.stage_trainer_kwargs(outer, torch.device("cpu"))
    assert (kw["limit_train_batches"], kw["gradient_clip_val"], kw["precision"]) == (7, 0.5, "bf16-mixed")
    assert kw["limit_val_batches"] == 0 and kw["logger"] is False
    assert stages_mod.stage_trainer_kwargs(None, torch.device("cuda", 1))["devices"] == [1]


def test_fitnet_stage_still_trains_only_up_to_the_hint(tmp_path, dm):
    module = module_with({"fitnet": {"loss": HintLoss(), "weight": 1.0, "student_layers": ["features.2"],
                                     "teacher_layers": ["features.5"], "init_epochs": 1}})
    initial = {k: v.clone() for k, v in module.model.state_dict().items()}
    snap = Snapshot()
    trainer(tmp_path, [snap]).fit(module, datamodule=dm)
    assert not torch.equal(snap.state["model.features.0.weight"], initial["features.0.weight"])
    assert torch.equal(snap.state["model.features.3.weight"], initial["features.3.weight"])


# ----------------------------------------------------------------------------- validation before any fit


def _validate(tmp_path, overrides):
    cfg = compose_config(tmp_path, overrides)
    dm = build_datamodule(cfg)
    dm.setup("fit")
    return validate(cfg, dm)


def test_bad_configs_of_the_new_methods_fail_in_validate(tmp_path):
    with pytest.raises(ConfigError, match="different spatial sizes"):
        _validate(tmp_path, ["distill=fsp", "distill.feature_losses.fsp.student_layers=[features.1,features.4]",
                             "distill.feature_losses.fsp.teacher_layers=[features.5,features]"])
    with pytest.raises(ConfigError, match="no BatchNorm runs before teacher tap"):
        _validate(tmp_path, ["distill=ofd", "teacher=lenet5"])
    refused = (ConfigError, InstantiationException)  # the constructor's errors come through Hydra's instantiate
    with pytest.raises(refused, match="set init_epochs > 0"):
        _validate(tmp_path, ["distill=ft", "distill.feature_losses.ft.init_epochs=0"])
    with pytest.raises(refused, match="both sides need one"):
        _validate(tmp_path, ["distill=nst", "distill.feature_losses.nst.teacher_layers=[auto]"])
    with pytest.raises(ConfigError, match="no feature-map stages"):
        _validate(tmp_path, ["distill=vid", "student=mlp"])
    _validate(tmp_path, ["distill=fsp"])  # the default taps are fine


# ----------------------------------------------------------------------------- the CLI


def test_cli_run_with_a_stage_method(tmp_path):
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "compresslab.cli", "distill=ft", *FAST, "distill.feature_losses.ft.init_epochs=1",
            f"hydra.run.dir={run_dir}", f"paths.teacher_cache={tmp_path / 'teachers'}",
            f"paths.data_dir={tmp_path / 'data'}"]
    out = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=600,
                         env={**os.environ, "WANDB_MODE": "offline"})
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads(next(run_dir.rglob("results.json")).read_text())
    assert record["status"] == "completed" and record["axes"]["distill"] == "ft"
    assert "ft stage: epoch 1/1" in out.stdout + out.stderr
