"""Each distillation loss against an independent computation on small tensors (plain-Python
arithmetic, closed forms, or known geometry), and the gradient reaching the student only."""

from __future__ import annotations

import math

import pytest
import torch

from compresslab.distill import (
    ATLoss,
    CRDLoss,
    DKDLoss,
    HintLoss,
    KDLoss,
    LSKDLoss,
    PKTLoss,
    RKDLoss,
    SPLoss,
)

# ----------------------------------------------------------------------------- plain-Python helpers


def softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = sum(e)
    return [v / s for v in e]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def normalize(vec):
    n = math.sqrt(sum(v * v for v in vec))
    return [v / max(n, 1e-12) for v in vec]


def zscore(row):
    mean = sum(row) / len(row)
    std = math.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))
    return [(v - mean) / (std + 1e-7) for v in row]


def hand_kd(s, t, temp):
    total = 0.0
    for rs, rt in zip(s.tolist(), t.tolist()):
        total += kl(softmax([v / temp for v in rt]), softmax([v / temp for v in rs]))
    return temp ** 2 * total / len(s)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 7, generator=g) * 2
    t = torch.randn(5, 7, generator=g) * 3
    y = torch.tensor([0, 3, 6, 2, 2])
    return s, t, y


def assert_grad_student_only(loss, student_tensors, teacher_tensors):
    loss.backward()
    for s in student_tensors:
        assert s.grad is not None and s.grad.abs().sum() > 0
    for t in teacher_tensors:
        assert t.grad is None


# ----------------------------------------------------------------------------- logit losses


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_kd_equals_t2_kl_written_out(logits, temp):
    s, t, _ = logits
    assert KDLoss(temperature=temp)(s, t).item() == pytest.approx(hand_kd(s, t, temp), rel=1e-5)


def test_kd_gradient_is_t_times_prob_difference_and_skips_teacher(logits):
    s, t, _ = logits
    s, t = s.clone().requires_grad_(), t.clone().requires_grad_()
    temp = 4.0
    loss = KDLoss(temperature=temp)(s, t)
    assert_grad_student_only(loss, [s], [t])
    # d/ds [T² KL(p_t ‖ p_s)] averaged over B = T (p_s − p_t) / B
    expected = [[temp * (ps - pt) / len(s) for ps, pt in zip(softmax([v / temp for v in rs]),
                                                           softmax([v / temp for v in rt]))]
                for rs, rt in zip(s.tolist(), t.tolist())]
    assert torch.allclose(s.grad, torch.tensor(expected), atol=1e-6)


def test_kd_is_zero_for_identical_logits(logits):
    s, _, _ = logits
    assert KDLoss()(s, s.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_logit_standardized_kd_matches_zscored_hand_computation(logits):
    s, t, _ = logits
    temp = 2.0
    zs = torch.tensor([zscore(r) for r in s.tolist()])
    zt = torch.tensor([zscore(r) for r in t.tolist()])
    loss = LSKDLoss(temperature=temp)(s, t)
    assert loss.item() == pytest.approx(hand_kd(zs, zt, temp), rel=1e-4)
    # standardization makes the loss blind to the student's logit scale and shift
    assert LSKDLoss(temperature=temp)(3 * s + 5, t).item() == pytest.approx(loss.item(), rel=1e-4)
    s = s.clone().requires_grad_()
    t = t.clone().requires_grad_()
    assert_grad_student_only(LSKDLoss()(s, t), [s], [t])


def hand_dkd(s, t, y, alpha, beta, temp):
    tckd = nckd = 0.0
    for rs, rt, label in zip(s.tolist(), t.tolist(), y.tolist()):
        ps, pt = softmax([v / temp for v in rs]), softmax([v / temp for v in rt])
        bs, bt = [ps[label], 1 - ps[label]], [pt[label], 1 - pt[label]]
        tckd += kl(bt, bs)
        qs = softmax([v / temp for j, v in enumerate(rs) if j != label])
        qt = softmax([v / temp for j, v in enumerate(rt) if j != label])
        nckd += kl(qt, qs)
    n = len(s)
    return temp ** 2 * (alpha * tckd + beta * nckd) / n


def test_dkd_matches_hand_computation(logits):
    s, t, y = logits
    loss = DKDLoss(alpha=1.0, beta=8.0, temperature=4.0, warmup_epochs=0)(s, t, target=y)
    assert loss.item() == pytest.approx(hand_dkd(s, t, y, 1.0, 8.0, 4.0), rel=1e-5)


def test_dkd_decomposition_identity_kd_equals_tckd_plus_weighted_nckd(logits):
    # Zhao et al. 2022, eq. (3): KD = TCKD + (1 − p_t^target) · NCKD, per sample
    s, t, y = logits
    temp = 4.0
    for i in range(len(s)):
        si, ti, yi = s[i:i + 1], t[i:i + 1], y[i:i + 1]
        tckd = DKDLoss(alpha=1, beta=0, temperature=temp, warmup_epochs=0)(si, ti, target=yi)
        nckd = DKDLoss(alpha=0, beta=1, temperature=temp, warmup_epochs=0)(si, ti, target=yi)
        pt_target = softmax([v / temp for v in ti[0].tolist()])[int(yi)]
        kd = KDLoss(temperature=temp)(si, ti)
        assert kd.item() == pytest.approx((tckd + (1 - pt_target) * nckd).item(), rel=1e-4)


def test_dkd_warmup_ramps_linearly_and_gradient_skips_teacher(logits):
    s, t, y = logits
    full = DKDLoss(warmup_epochs=0)(s, t, target=y).item()
    ramp = DKDLoss(warmup_epochs=4)
    assert ramp(s, t, target=y, epoch=0).item() == pytest.approx(full / 4, rel=1e-6)
    assert ramp(s, t, target=y, epoch=1).item() == pytest.approx(full / 2, rel=1e-6)
    assert ramp(s, t, target=y, epoch=9).item() == pytest.approx(full, rel=1e-6)
    s, t = s.clone().requires_grad_(), t.clone().requires_grad_()
    assert_grad_student_only(ramp(s, t, target=y), [s], [t])


# ----------------------------------------------------------------------------- feature losses


def test_hint_is_mean_squared_error():
    s = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], requires_grad=True)
    t = torch.tensor([[[[0.0, 2.0], [5.0, 4.0]]]], requires_grad=True)
    loss = HintLoss()([s], [t])
    assert loss.item() == pytest.approx((1 + 0 + 4 + 0) / 4)
    assert_grad_student_only(loss, [s], [t])


def hand_attention(fmap):
    """fmap: nested list [C][H][W] -> normalised flattened mean_c f² map."""
    c, h, w = len(fmap), len(fmap[0]), len(fmap[0][0])
    flat = [sum(fmap[k][i][j] ** 2 for k in range(c)) / c for i in range(h) for j in range(w)]
    return normalize(flat)


def test_attention_transfer_from_hand_computed_maps():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 3, 2, 2, generator=g)
    t = torch.randn(2, 5, 2, 2, generator=g)
    total = 0.0
    for b in range(2):
        a_s, a_t = hand_attention(s[b].tolist()), hand_attention(t[b].tolist())
        total += sum((x - y) ** 2 for x, y in zip(a_s, a_t))
    expected = total / (2 * 4)
    assert ATLoss()([s], [t]).item() == pytest.approx(expected, rel=1e-5)
    # two tap pairs are summed
    assert ATLoss()([s, s], [t, t]).item() == pytest.approx(2 * expected, rel=1e-5)


def test_attention_transfer_pools_the_larger_map():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(1, 2, 4, 4, generator=g)
    t = torch.randn(1, 3, 2, 2, generator=g)
    pooled = [[[sum(s[0, k, 2 * i + a, 2 * j + b].item() for a in (0, 1) for b in (0, 1)) / 4
                for j in range(2)] for i in range(2)] for k in range(2)]
    a_s, a_t = hand_attention(pooled), hand_attention(t[0].tolist())
    expected = sum((x - y) ** 2 for x, y in zip(a_s, a_t)) / 4
    assert ATLoss()([s], [t]).item() == pytest.approx(expected, rel=1e-5)


def test_attention_transfer_on_1d_maps_and_gradient():
    s = torch.randn(3, 4, 10, requires_grad=True)
    t = torch.randn(3, 8, 10, requires_grad=True)
    assert_grad_student_only(ATLoss()([s], [t]), [s], [t])


def test_similarity_preserving_from_hand_gram_matrices():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(3, 2, 2, 1, generator=g)
    t = torch.randn(3, 6, generator=g)
    fs, ft = s.flatten(1).tolist(), t.tolist()

    def gram(f):
        return [normalize([sum(a * b for a, b in zip(fi, fj)) for fj in f]) for fi in f]

    gs, gt = gram(fs), gram(ft)
    expected = sum((gt[i][j] - gs[i][j]) ** 2 for i in range(3) for j in range(3)) / 9
    assert SPLoss()([s], [t]).item() == pytest.approx(expected, rel=1e-5)
    s, t = s.clone().requires_grad_(), t.clone().requires_grad_()
    assert_grad_student_only(SPLoss()([s], [t]), [s], [t])


def test_pkt_from_hand_conditional_probabilities():
    g = torch.Generator().manual_seed(4)
    s = torch.randn(4, 3, generator=g)
    t = torch.randn(4, 5, generator=g)
    eps = 1e-7

    def probs(f):
        f = [[v / (math.sqrt(sum(x * x for x in row)) + eps) for v in row] for row in f]
        sim = [[(sum(a * b for a, b in zip(fi, fj)) + 1) / 2 for fj in f] for fi in f]
        return [[v / sum(row) for v in row] for row in sim]

    ps, pt = probs(s.tolist()), probs(t.tolist())
    expected = sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(4) for j in range(4)) / 16
    assert PKTLoss()([s], [t]).item() == pytest.approx(expected, rel=1e-5)
    s, t = s.clone().requires_grad_(), t.clone().requires_grad_()
    assert_grad_student_only(PKTLoss()([s], [t]), [s], [t])


def test_rkd_with_known_triangle_distances_and_angles():
    # teacher: the 3-4-5 right triangle; student: the unit equilateral triangle
    t = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]], requires_grad=True)
    s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]], requires_grad=True)
    # distances / their mean (4): 0.75, 1.0, 1.25 vs 1, 1, 1 -> two sides differ by 0.25, each pair twice,
    # smooth-L1(0.25) = 0.5·0.25², averaged over the 3×3 matrix
    loss_d = 4 * 0.5 * 0.25 ** 2 / 9
    # angle cosines: teacher 0 (right angle), 0.6, 0.8; student 0.5 everywhere; each twice among 27 triplets
    loss_a = 2 * sum(0.5 * (c - 0.5) ** 2 for c in (0.0, 0.6, 0.8)) / 27
    rkd = RKDLoss(w_d=25.0, w_a=50.0)
    loss = rkd([s], [t])
    assert loss.item() == pytest.approx(25 * loss_d + 50 * loss_a, rel=1e-5)
    assert RKDLoss(w_d=1, w_a=0)([s], [t]).item() == pytest.approx(loss_d, rel=1e-5)
    # relations are scale invariant: a scaled copy of the teacher has zero loss
    assert rkd([t.detach() * 2.5], [t]).item() == pytest.approx(0.0, abs=1e-6)
    assert_grad_student_only(loss, [s], [t])


# ----------------------------------------------------------------------------- CRD


def make_crd(n=6, k=3, s_dim=4, t_dim=5, feat_dim=3, **kwargs):
    torch.manual_seed(0)
    crd = CRDLoss(feat_dim=feat_dim, nce_k=k, nce_t=0.5, momentum=0.5, **kwargs)
    crd.build([(s_dim,)], [(t_dim,)], n)
    return crd


@pytest.mark.parametrize("n", [6, 40])  # scores against the whole bank / gathered rows
def test_crd_nce_loss_matches_hand_computation_and_updates_memory(n):
    k, temp = 3, 0.5
    crd = make_crd(n=n, k=k)
    g = torch.Generator().manual_seed(5)
    fs, ft = torch.randn(2, 4, generator=g), torch.randn(2, 5, generator=g)
    index = torch.tensor([1, 4])
    negatives = torch.tensor([[0, 2, 5], [3, 1, 0]])
    mem_s, mem_t = crd.memory_s.clone().tolist(), crd.memory_t.clone().tolist()

    def embed(lin, f):
        w, b = lin.weight.tolist(), lin.bias.tolist()
        return [normalize([sum(wi * fj for wi, fj in zip(row, fr)) + bi for row, bi in zip(w, b)]) for fr in f.tolist()]

    vs, vt = embed(crd.embed_s.linear, fs), embed(crd.embed_t.linear, ft)
    ids = [[int(index[i])] + negatives[i].tolist() for i in range(2)]
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    out_s = [[math.exp(dot(mem_t[j], vs[i]) / temp) for j in ids[i]] for i in range(2)]
    out_t = [[math.exp(dot(mem_s[j], vt[i]) / temp) for j in ids[i]] for i in range(2)]

    def nce(out):
        z = sum(map(sum, out)) / (2 * (k + 1)) * n
        noise = k / n
        total = 0.0
        for row in out:
            p = [v / z for v in row]
            total += math.log(p[0] / (p[0] + noise + 1e-7))
            total += sum(math.log(noise / (q + noise + 1e-7)) for q in p[1:])
        return -total / 2

    crd.train()
    loss = crd([fs], [ft], index=index, contrast_index=negatives)
    assert loss.item() == pytest.approx(nce(out_s) + nce(out_t), rel=1e-5)
    # memory rows of the batch: normalize(momentum·old + (1 − momentum)·new)
    for i, row in enumerate(index.tolist()):
        expect = normalize([0.5 * a + 0.5 * b for a, b in zip(mem_s[row], vs[i])])
        assert crd.memory_s[row].tolist() == pytest.approx(expect, rel=1e-5)
        expect = normalize([0.5 * a + 0.5 * b for a, b in zip(mem_t[row], vt[i])])
        assert crd.memory_t[row].tolist() == pytest.approx(expect, rel=1e-5)
    untouched = [r for r in range(n) if r not in index.tolist()]
    assert torch.equal(crd.memory_s[untouched], torch.tensor([mem_s[r] for r in untouched]))


def test_crd_gradient_reaches_student_and_heads_not_teacher_features():
    crd = make_crd()
    fs = torch.randn(3, 4, requires_grad=True)
    ft = torch.randn(3, 5, requires_grad=True)
    loss = crd([fs], [ft], index=torch.tensor([0, 2, 5]))
    assert_grad_student_only(loss, [fs], [ft])
    assert crd.embed_s.linear.weight.grad.abs().sum() > 0
    assert crd.embed_t.linear.weight.grad.abs().sum() > 0


def test_crd_negatives_never_hit_the_anchor_and_k_is_capped():
    crd = make_crd(n=6, k=100)
    assert crd.num_negatives == 5
    index = torch.arange(6).repeat(50)
    neg = crd.sample_negatives(index)
    assert neg.shape == (300, 5) and (neg != index.unsqueeze(1)).all()
    assert neg.min() >= 0 and neg.max() <= 5


def test_crd_bounded_queue_for_large_datasets():
    crd = make_crd(n=10_000, k=4, max_bank_samples=100, queue_size=4)
    assert crd.mode == "queue" and crd.memory_s.shape == (4, 3) and not crd.needs_index
    before = crd.memory_t.clone()
    fs, ft = torch.randn(3, 4, requires_grad=True), torch.randn(3, 5, requires_grad=True)
    loss = crd([fs], [ft])  # no index needed
    assert torch.isfinite(loss)
    assert_grad_student_only(loss, [fs], [ft])
    assert int(crd.queue_ptr) == 3
    assert torch.equal(crd.memory_t[3], before[3])  # only the 3 oldest slots were replaced
    assert not torch.equal(crd.memory_t[:3], before[:3])


def _confident_pair(gap: float, dtype):
    """A student whose target logit leads by ``gap`` and a moderately sure teacher (10 classes)."""
    student = torch.zeros(3, 10, dtype=dtype)
    student[:, 3] = gap
    student[1, 5] = 1.5  # the non-target logits need not be equal
    student[2, 0] = -2.0
    teacher = torch.linspace(-1.0, 1.0, 10, dtype=dtype).repeat(3, 1)
    teacher[:, 3] = 3.0
    return student.requires_grad_(), teacher, torch.full((3,), 3, dtype=torch.long)


def _dkd_value_and_target_grad(loss, gap, dtype):
    s, t, y = _confident_pair(gap, dtype)
    value = loss(s, t, target=y)
    value.backward()
    return value.item(), s.grad[:, 3].clone()


def _old_tckd_formula(s, t, y, temp):
    """The former TCKD: stack([p_gt, 1 - p_gt]) clamped to 1e-12 (kept to show the test catches it)."""
    gt = torch.nn.functional.one_hot(y, s.shape[1]).bool()
    p_s, p_t = torch.softmax(s / temp, 1), torch.softmax(t / temp, 1)
    b_s = torch.stack([p_s[gt], 1 - p_s[gt]], 1).clamp_min(1e-12)
    b_t = torch.stack([p_t[gt], 1 - p_t[gt]], 1).clamp_min(1e-12)
    return (b_t * (b_t.log() - b_s.log())).sum(1).mean() * temp ** 2


@pytest.mark.parametrize("temp", [1.0, 4.0])
@pytest.mark.parametrize("gap", [10.0, 20.0, 40.0, 60.0, 80.0, 100.0, 120.0])
def test_dkd_float32_matches_float64_for_confident_students(gap, temp):
    # TCKD in log space: float32 gives the float64 value and gradient however confident the student is.
    loss = DKDLoss(alpha=1.0, beta=8.0, temperature=temp, warmup_epochs=0)
    v32, g32 = _dkd_value_and_target_grad(loss, gap, torch.float32)
    v64, g64 = _dkd_value_and_target_grad(loss, gap, torch.float64)
    assert v32 == pytest.approx(v64, rel=1e-5)
    assert torch.allclose(g32.double(), g64, rtol=1e-4, atol=1e-7)
    assert bool((g64.abs() > 1e-3).all())  # the target logit still gets a gradient


def test_dkd_old_tckd_formula_fails_the_float32_check_at_gap_40():
    # The example: a gap of 40 at T=1. The old formula's float32 TCKD is wrong, with a zero
    # gradient for the target logit; the log-space one equals the float64 value.
    s32, t32, y = _confident_pair(40.0, torch.float32)
    s64, t64, _ = _confident_pair(40.0, torch.float64)
    tckd = DKDLoss(alpha=1.0, beta=0.0, temperature=1.0, warmup_epochs=0)
    old32 = _old_tckd_formula(s32, t32, y, 1.0)
    old32.backward()
    assert float(s32.grad[:, 3].abs().max()) == 0.0
    exact = tckd(s64, t64, target=y).item()
    assert abs(old32.item() - exact) > 0.1 * exact
    assert tckd(s32.detach(), t32, target=y).item() == pytest.approx(exact, rel=1e-5)
