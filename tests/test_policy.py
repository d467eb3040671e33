"""The timm-compatible Mixup policy, CutMix alone and the sampling helpers (mixrecipe.policy).

Three kinds of checks:
- statistics of the draws (λ against Beta(α, α) by Kolmogorov–Smirnov, apply/switch probabilities, pairs);
- behaviour against timm's ``Mixup`` with the same draws (timm's sampling is patched to return ours),
  against timm's ``mixup_target`` and against the float64 reference ``mix_reference``;
- the edges timm does not cover: odd batches, B=1, bf16, channels_last, uint8, random pairing, seeds.

Images go through the fused op on every backend (the ``backend`` fixture): the compiled CPU kernel, the eager
CPU path and the Triton kernel (CUDA tensors on a GPU machine, the interpreter on CPU tensors elsewhere).
"""

import concurrent.futures
import importlib
import math

import numpy as np
import pytest
import scipy.stats
import torch
from timm.data import mixup as timm_mixup

from mixrecipe import draws
from mixrecipe.loss import SoftTargetCrossEntropy, mixup_cross_entropy
from mixrecipe.policy import (
    MixedBatch,
    Mixup,
    box_lam,
    cutmix,
    cutmix_box_and_lam,
    rand_box,
    rand_box_minmax,
    random_involution,
    sample_beta,
)
from mixrecipe.reference import mix_reference, smooth_targets

M = importlib.import_module("mixrecipe.policy")

HAS_CUDA = torch.cuda.is_available()
K = 10
P_MIN = 1e-3  # KS p-value floor: the seeds are fixed, so a pass is deterministic, and 1e-3 is no fishing


def gen(seed=0, device="cpu"):
    return torch.Generator(device=device).manual_seed(seed)


def make_batch(batch, shape=(3, 6, 5), dtype=torch.float32, channels_last=False, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *shape), generator=g).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, K, (batch,), generator=g)
    return x.to(device), y.to(device)


def twin(seed=0, **kwargs):
    """Two identically seeded policies: one to read the draw, one to apply it."""
    kwargs.setdefault("num_classes", K)
    return Mixup(generator=gen(seed), **kwargs), Mixup(generator=gen(seed), **kwargs)


def box_area(box):
    b = box.long()
    return (b[..., 1] - b[..., 0]) * (b[..., 3] - b[..., 2])


def binomial_ok(hits, n, p, z=5.0):
    return abs(hits - n * p) <= z * math.sqrt(n * p * (1 - p)) + 1


# --------------------------------------------------------------------------------------------------
# PyTorch reference: the draw -> the expected output, by mix_reference (float64) or by timm itself.
# --------------------------------------------------------------------------------------------------
def expected(x, y, p, smoothing, mean=None, std=None, out_dtype=None):
    return mix_reference(x, y, p.lam_x, p.lam_y, p.perm, p.box, num_classes=K, label_smoothing=smoothing,
                         mean=mean, std=std, out_dtype=out_dtype)


def assert_close_dtype(out, ref):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    else:  # one ulp (the interpreter truncates where the GPU rounds)
        torch.testing.assert_close(out.float(), ref.float(), rtol=2 * 2.0**-8, atol=1e-6)


def timm_with_our_draw(monkeypatch, m, p, x, y):
    """Run timm's Mixup on (x, y) with its sampling replaced by our draw ``p`` (flip pairing, even B)."""
    tm = timm_mixup.Mixup(mixup_alpha=m.mixup_alpha, cutmix_alpha=m.cutmix_alpha, cutmix_minmax=None,
                          prob=m.mix_prob, switch_prob=m.switch_prob, mode=m.mode,
                          correct_lam=m.correct_lam, label_smoothing=m.label_smoothing, num_classes=K)
    batch = x.shape[0]
    lam_x = p.lam_x.expand(batch).double().numpy()
    lam_y = p.lam_y.expand(batch).double().numpy()
    if p.box is None:
        cut = np.zeros(batch, dtype=bool)
        boxes = np.zeros((batch, 4), dtype=np.int64)
    else:
        boxes = p.box.expand(batch, 4).long().numpy()
        cut = box_area(torch.from_numpy(boxes)).numpy() > 0
    # timm decides "mixed" by lam != 1; a CutMix sample carries its corrected lam through the box helper.
    lam_timm = np.where(cut, 0.5, lam_x).astype(np.float32)
    # The boxes timm asks for, in the order it asks: once per batch, per pair (first half) or per sample.
    rows = {"batch": 1, "pair": batch // 2, "elem": batch}[m.mode]
    queue = [(tuple(int(v) for v in boxes[i]), float(lam_y[i])) for i in range(rows) if cut[i]]
    monkeypatch.setattr(timm_mixup, "cutmix_bbox_and_lam", lambda *a, **k: queue.pop(0))
    if m.mode == "batch":
        tm._params_per_batch = lambda: (float(lam_timm[0]), bool(cut[0]))
    else:
        tm._params_per_elem = lambda n: (lam_timm[:n].copy(), cut[:n].copy())
    out = tm(x.clone(), y)
    assert not queue
    return out


# --------------------------------------------------------------------------------------------------
# Sampling helpers
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.2, 1.0, 4.0])
def test_sample_beta_kolmogorov_smirnov(alpha):
    lam = sample_beta(alpha, 20000, generator=gen(int(alpha * 10)), dtype=torch.float64)
    assert lam.shape == (20000,) and lam.dtype == torch.float64
    assert bool(((lam >= 0) & (lam <= 1)).all())
    p = scipy.stats.kstest(lam.numpy(), scipy.stats.beta(alpha, alpha).cdf).pvalue
    assert p > P_MIN, f"Beta({alpha}, {alpha}) draws fail KS: p={p:.2g}"
    # The symmetric half too: 1 - λ must have the same law (a sampler biased to one side fails here).
    p = scipy.stats.kstest(1 - lam.numpy(), scipy.stats.beta(alpha, alpha).cdf).pvalue
    assert p > P_MIN


@pytest.mark.parametrize("alpha", [0.2, 1.0, 4.0])
def test_sample_beta_float32_matches_rounded_beta(alpha):
    # In float32, Beta(0.2, 0.2) puts ~2% of its mass within 3e-8 of 1, which rounds to exactly 1.0: an
    # atom that a one-sample KS test counts against any float32 sampler. Compare with numpy's draws
    # rounded the same way instead.
    ours = sample_beta(alpha, 20000, generator=gen(7)).numpy()
    theirs = np.random.default_rng(0).beta(alpha, alpha, 20000).astype(np.float32)
    assert scipy.stats.ks_2samp(ours, theirs).pvalue > P_MIN


@pytest.mark.parametrize("alpha", [0.01, 0.2, 1.0, 8.0])
def test_one_beta_draw_on_floats_is_the_tensor_formula(alpha):
    """One λ is computed on Python floats (per-call speed); it must be the tensor formula's value on the same
    draws, consume the same draws, and keep its law."""
    g_fast, g_ref = gen(11), gen(11)
    fast, ref = [], []
    for _ in range(3000):
        fast.append(draws.beta(alpha, 0, g_fast))
        if alpha == 1.0:  # Beta(1, 1) is U[0, 1): one uniform
            ref.append(torch.rand((), generator=g_ref, dtype=torch.float64).item())
        elif alpha > 1.0:  # two Gamma(a) draws, G1 / (G1 + G2)
            gamma = torch._standard_gamma(torch.full((2,), alpha, dtype=torch.float64), generator=g_ref)
            ref.append((gamma[0] / (gamma[0] + gamma[1])).item())
        else:
            conc = torch.tensor([alpha + 1.0, alpha + 1.0, 1.0, 1.0], dtype=torch.float64)
            gamma = torch._standard_gamma(conc, generator=g_ref)
            log_g = gamma[:2].log() - gamma[2:] / alpha  # log G(a) = log G(a + 1) - Exp(1) / a
            ref.append(torch.sigmoid(log_g[0] - log_g[1]).item())
    # exp() turns the last-bit differences of log() into a relative error of |log-odds| * 2**-52 at most
    np.testing.assert_allclose(fast, ref, rtol=1e-12, atol=1e-300)
    assert torch.equal(g_fast.get_state(), g_ref.get_state())
    assert all(0.0 <= v <= 1.0 for v in fast)
    if alpha >= 0.2:  # Beta(0.01, 0.01) piles mass within float64 rounding of 1.0: an atom KS rejects
        assert scipy.stats.kstest(fast, scipy.stats.beta(alpha, alpha).cdf).pvalue > P_MIN


@pytest.mark.parametrize("config", [
    dict(mixup_alpha=0.3),
    dict(mixup_alpha=1.0, prob=0.7),
    dict(mixup_alpha=2.0),
    dict(mixup_alpha=0.8, cutmix_alpha=1.0),
    dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.7, switch_prob=0.3),
    dict(mixup_alpha=0.0, cutmix_alpha=0.5, prob=0.6, correct_lam=False),
    dict(mixup_alpha=0.4, cutmix_minmax=(0.2, 0.8)),
])
def test_one_draw_on_floats_is_the_array_draw(config):
    """The draw formulas are written once for floats (one draw: mode "batch") and numpy arrays (per pair
    or sample): one draw on floats must equal a one-element array draw, consume the same draws, and reach
    the op as Python numbers (the kernel's scalars)."""
    m = Mixup(num_classes=5, **config)
    kw = dict(mixup_alpha=m.mixup_alpha, cutmix_alpha=m.cutmix_alpha, prob=m.mix_prob,
              switch_prob=m.switch_prob, minmax=m.cutmix_minmax, correct_lam=m.correct_lam, height=13,
              width=17)
    g_one, g_array = gen(31), gen(31)
    cuts = 0
    for _ in range(200):
        one = draws.draw_mix(0, generator=g_one, **kw)
        array = draws.draw_mix(1, generator=g_array, **kw)
        assert isinstance(one.lam_x, float) and isinstance(one.lam_y, float)
        # math's and numpy's log/exp may differ in the last bit
        assert math.isclose(one.lam_x, array.lam_x[0], rel_tol=1e-12, abs_tol=1e-300)
        assert math.isclose(one.lam_y, array.lam_y[0], rel_tol=1e-12, abs_tol=1e-300)
        assert (one.box is None) == (array.box is None)
        if one.box is not None:
            assert [float(v) for v in one.box] == [float(v[0]) for v in array.box]
            cuts += bool(one.cut)
        assert torch.equal(g_one.get_state(), g_array.get_state())
    assert (cuts > 0) == (m.cutmix_alpha > 0)
    policy = Mixup(num_classes=5, generator=gen(2), **config)
    lam_x, lam_y, perm, box = policy.draw((6, 3, 13, 17), torch.device("cpu"))
    assert isinstance(lam_x, float) and perm is None
    assert box is None or (isinstance(box, tuple) and all(isinstance(v, int) for v in box))


def test_prob_one_draws_no_coin():
    """prob=1 mixes every batch without drawing the apply coin: one call consumes exactly one Beta draw."""
    g_policy, g_beta = gen(9), gen(9)
    Mixup(mixup_alpha=0.5, num_classes=3, generator=g_policy).sample((4, 2))
    sample_beta(0.5, generator=g_beta)
    assert torch.equal(g_policy.get_state(), g_beta.get_state())
    g_elem = gen(9)
    Mixup(mixup_alpha=0.5, num_classes=3, mode="elem", generator=g_elem).sample((4, 2))
    g_ref = gen(9)
    sample_beta(0.5, 4, generator=g_ref, dtype=torch.float64)
    assert torch.equal(g_elem.get_state(), g_ref.get_state())


def test_sample_beta_generator_is_honoured():
    a = sample_beta(0.4, 100, generator=gen(3))
    torch.manual_seed(123)  # the global RNG must not matter when a generator is given
    b = sample_beta(0.4, 100, generator=gen(3))
    assert torch.equal(a, b)
    assert not torch.equal(a, sample_beta(0.4, 100, generator=gen(4)))
    torch.manual_seed(5)
    c = sample_beta(0.4, 100)
    torch.manual_seed(5)
    assert torch.equal(c, sample_beta(0.4, 100))
    assert sample_beta(1.0, generator=gen()).shape == ()


@pytest.mark.parametrize("alpha", [1e-3, 1e-2, 1e3])
def test_sample_beta_extreme_alpha(alpha):
    lam = sample_beta(alpha, 4000, generator=gen(1), dtype=torch.float64)
    assert not lam.isnan().any() and bool(((lam >= 0) & (lam <= 1)).all())
    assert abs(float(lam.mean()) - 0.5) < 0.05  # symmetric law
    if alpha > 1:
        assert float(lam.std()) < 0.05  # concentrates at 1/2
    else:
        assert float(((lam < 0.01) | (lam > 0.99)).double().mean()) > 0.9  # concentrates at 0 and 1


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
def test_sample_beta_rejects_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        sample_beta(alpha, 3)


@pytest.mark.parametrize("lam", [0.0, 0.1, 0.37, 0.5, 0.9, 0.999, 1.0])
def test_rand_box_equals_timm_rand_bbox(monkeypatch, lam):
    """Same λ and centre -> the same box as timm's rand_bbox, clipped or not."""
    shape = (3, 7, 10)
    for cy in range(7):
        for cx in range(10):
            centres = iter([cy, cx])
            monkeypatch.setattr(timm_mixup.np.random, "randint", lambda *a, c=centres, **k: next(c))
            want = timm_mixup.rand_bbox(shape, lam)
            # the uniform draws that put the centre at (cy, cx), on floats and on arrays
            u_y, u_x = (cy + 0.5) / 7, (cx + 0.5) / 10
            assert [int(v) for v in draws.cut_box(7, 10, float(lam), u_y, u_x)] == [int(v) for v in want]
            got = draws.cut_box(7, 10, np.array([lam]), np.array([u_y]), np.array([u_x]))
            assert [int(v[0]) for v in got] == [int(v) for v in want], (cy, cx)
    monkeypatch.undo()


def test_rand_box_centres_are_uniform():
    lam = torch.full((40000,), 0.75, dtype=torch.float64)  # cut = half of each side: 4 of 8, 5 of 10
    box = rand_box((8, 10), lam, generator=gen(2))
    assert box.shape == (40000, 4)
    assert bool((box[:, 0] <= box[:, 1]).all() & (box[:, 2] <= box[:, 3]).all())
    assert bool((box[:, 1] <= 8).all() & (box[:, 3] <= 10).all() & (box.min() >= 0))
    cy = box[:, 0] + 2  # unclipped at the top: y0 = cy - 2; recover cy from y1 = cy + 2 otherwise
    cy = torch.where(box[:, 0] > 0, cy, box[:, 1] - 2)
    counts = torch.bincount(cy.long(), minlength=8).numpy()
    assert scipy.stats.chisquare(counts).pvalue > P_MIN
    unclipped = (box[:, 1] - box[:, 0] == 4) & (box[:, 3] - box[:, 2] == 5)
    assert torch.allclose(box_lam(box[unclipped], (8, 10)), torch.tensor(0.75))
    assert bool((box_lam(box, (8, 10)) >= 0.75).all())  # clipping only removes area


def test_rand_box_minmax():
    box = rand_box_minmax((1, 20, 30), (0.2, 0.8), 5000, generator=gen(3))
    h, w = box[:, 1] - box[:, 0], box[:, 3] - box[:, 2]
    assert int(h.min()) == 4 and int(h.max()) == 15  # timm's randint(int(20*.2), int(20*.8)): [4, 16)
    assert int(w.min()) == 6 and int(w.max()) == 23
    assert bool((box[:, 0] >= 0).all() & (box[:, 1] <= 20).all() & (box[:, 2] >= 0).all()
                & (box[:, 3] <= 30).all())
    # Degenerate range (timm's numpy raises here): a fixed side.
    box = rand_box_minmax((3, 3), (0.5, 0.5), 10, generator=gen(0))
    assert bool(((box[:, 1] - box[:, 0]) == 1).all())


def test_cutmix_box_and_lam():
    lam = torch.tensor([0.2, 0.5, 0.9, 1.0], dtype=torch.float64)
    box, lam_y = cutmix_box_and_lam((16, 16), lam, generator=gen(0))
    assert torch.equal(lam_y, box_lam(box, (16, 16))) and lam_y.dtype == torch.float32
    assert box_area(box[3]) == 0 and float(lam_y[3]) == 1.0
    box2, lam_y2 = cutmix_box_and_lam((16, 16), lam, correct_lam=False, generator=gen(0))
    assert torch.equal(box, box2) and torch.equal(lam_y2, lam.float())
    box3, lam_y3 = cutmix_box_and_lam((16, 16), lam, minmax=(0.25, 0.5), correct_lam=False, generator=gen(0))
    assert torch.equal(lam_y3, box_lam(box3, (16, 16)))  # minmax always corrects, as timm


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 8])
def test_random_involution(n):
    for seed in range(20):
        perm, pair = random_involution(n, generator=gen(seed))
        assert torch.equal(perm[perm], torch.arange(n))
        assert int((perm == torch.arange(n)).sum()) == n % 2
        assert torch.equal(pair[perm], pair)
        assert sorted(torch.bincount(pair).tolist()) == sorted([2] * (n // 2) + [1] * (n % 2))
        if n % 2:
            assert int(pair[perm == torch.arange(n)]) == n // 2


def test_random_involution_is_uniform():
    counts = {}
    g = gen(0)
    for _ in range(3000):
        key = tuple(random_involution(4, generator=g)[0].tolist())
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 3  # the three perfect matchings of 4 samples
    assert scipy.stats.chisquare(list(counts.values())).pvalue > P_MIN


# --------------------------------------------------------------------------------------------------
# The policy's draws
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.2, 1.0, 4.0])
def test_lambda_per_batch_is_beta(alpha):
    m = Mixup(mixup_alpha=alpha, num_classes=K, generator=gen(11))
    lam = [m.sample((2, 3, 4, 4)).lam_x for _ in range(2000)]
    assert all(v.shape == () and v.dtype == torch.float32 for v in lam[:5])
    lam = torch.stack(lam).numpy()
    theirs = np.random.default_rng(1).beta(alpha, alpha, 20000).astype(np.float32)
    assert scipy.stats.ks_2samp(lam, theirs).pvalue > P_MIN
    assert scipy.stats.kstest(lam.astype(np.float64), scipy.stats.beta(alpha, alpha).cdf).pvalue > P_MIN


@pytest.mark.parametrize("alpha", [0.2, 1.0, 4.0])
@pytest.mark.parametrize("mode", ["elem", "pair"])
def test_lambda_per_sample_is_beta(alpha, mode):
    m = Mixup(mixup_alpha=alpha, mode=mode, num_classes=K, generator=gen(12))
    lam = m.sample((20001, 1)).lam_x
    assert lam.shape == (20001,)
    if mode == "pair":
        assert torch.equal(lam, lam.flip(0)) and float(lam[10000]) == 1.0
        lam = lam[:10000]
    theirs = np.random.default_rng(2).beta(alpha, alpha, 20000).astype(np.float32)
    assert scipy.stats.ks_2samp(lam.numpy(), theirs).pvalue > P_MIN


@pytest.mark.parametrize("prob", [0.0, 0.3, 1.0])
def test_apply_probability_per_batch(prob):
    m = Mixup(mixup_alpha=1.0, prob=prob, num_classes=K, generator=gen(13))
    lam = torch.stack([m.sample((3, 8)).lam_x for _ in range(2000)])
    mixed = int((lam != 1.0).sum())
    assert binomial_ok(mixed, 2000, prob)


@pytest.mark.parametrize("prob", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("mode", ["elem", "pair"])
def test_apply_probability_per_sample(prob, mode):
    m = Mixup(mixup_alpha=1.0, prob=prob, mode=mode, num_classes=K, generator=gen(14))
    lam = m.sample((20000, 4)).lam_x
    units = lam if mode == "elem" else lam[:10000]  # one decision per pair
    assert binomial_ok(int((units != 1.0).sum()), units.numel(), prob)


@pytest.mark.parametrize("switch_prob", [0.0, 0.3, 1.0])
def test_switch_probability(switch_prob):
    # CutMix samples have pixel weight 1 outside the box; Mixup samples have lam_x < 1 (a.s.).
    m = Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=switch_prob, mode="elem", num_classes=K,
              generator=gen(15))
    p = m.sample((20000, 3, 8, 8))
    cut = p.lam_x == 1.0
    assert binomial_ok(int(cut.sum()), 20000, switch_prob)
    assert bool((box_area(p.box[~cut]) == 0).all())
    assert torch.equal(p.lam_y[cut], box_lam(p.box[cut], (8, 8)))
    assert torch.equal(p.lam_y[~cut], p.lam_x[~cut])
    mb = Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=switch_prob, num_classes=K, generator=gen(16))
    cuts = sum(bool(mb.sample((2, 3, 8, 8)).lam_x == 1.0) for _ in range(1000))
    assert binomial_ok(cuts, 1000, switch_prob)


def test_cutmix_only_and_lambda_correction():
    m = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, mode="elem", num_classes=K, generator=gen(17))
    p = m.sample((5000, 3, 8, 8))
    assert bool((p.lam_x == 1.0).all())
    assert torch.equal(p.lam_y, box_lam(p.box, (8, 8)))  # correct_lam: the kept area
    # Without correction the label weight is the sampled λ ~ Beta(1, 1) = U(0, 1), box or no box.
    m = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, mode="elem", correct_lam=False, num_classes=K,
              generator=gen(17))
    q = m.sample((5000, 3, 8, 8))
    assert torch.equal(q.box, p.box)
    assert not torch.equal(q.lam_y, p.lam_y)
    assert scipy.stats.kstest(q.lam_y.double().numpy(), "uniform").pvalue > P_MIN
    # cutmix_minmax: timm forces cutmix_alpha = 1 and always corrects.
    m = Mixup(mixup_alpha=0.0, cutmix_alpha=0.0, cutmix_minmax=(0.25, 0.75), correct_lam=False,
              mode="elem", num_classes=K, generator=gen(18))
    assert m.cutmix_alpha == 1.0
    r = m.sample((2000, 3, 8, 8))
    sides = torch.cat([r.box[:, 1] - r.box[:, 0], r.box[:, 3] - r.box[:, 2]])
    assert int(sides.min()) == 2 and int(sides.max()) == 5
    assert torch.equal(r.lam_y, box_lam(r.box, (8, 8)))
    # A sample that is not mixed has no box even with minmax (the box does not come from λ).
    m = Mixup(mixup_alpha=0.0, cutmix_minmax=(0.25, 0.75), prob=0.5, mode="elem", num_classes=K,
              generator=gen(19))
    s = m.sample((2000, 3, 8, 8))
    idle = s.lam_y == 1.0
    assert binomial_ok(int(idle.sum()), 2000, 0.5) and bool((box_area(s.box[idle]) == 0).all())


@pytest.mark.parametrize("batch", [1, 2, 7, 8])
@pytest.mark.parametrize("pairing", ["flip", "random"])
def test_pair_mode_shares_lambda_and_box(batch, pairing):
    m = Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, mode="pair", pairing=pairing, num_classes=K,
              generator=gen(20))
    for _ in range(10):
        p = m.sample((batch, 3, 8, 8))
        perm = torch.arange(batch - 1, -1, -1) if p.perm is None else p.perm
        assert (p.perm is None) == (pairing == "flip")
        assert torch.equal(perm[perm], torch.arange(batch))  # pairs mix with each other
        for t in (p.lam_x, p.lam_y, p.box):
            assert torch.equal(t[perm], t)
        alone = perm == torch.arange(batch)
        assert int(alone.sum()) == batch % 2
        assert bool((p.lam_x[alone] == 1).all() & (p.lam_y[alone] == 1).all())
        assert bool((box_area(p.box[alone]) == 0).all())


def test_random_pairing_draws_a_fresh_permutation():
    m = Mixup(mixup_alpha=1.0, mode="elem", pairing="random", num_classes=K, generator=gen(21))
    perms = [m.sample((6, 4)).perm for _ in range(50)]
    for perm in perms:
        assert perm.dtype == torch.int64 and torch.equal(perm.sort().values, torch.arange(6))
    assert len({tuple(p.tolist()) for p in perms}) > 20


# --------------------------------------------------------------------------------------------------
# Applying: against timm with the same draw, against timm's mixup_target, against the reference
# --------------------------------------------------------------------------------------------------
CONFIGS = {
    "mixup": dict(mixup_alpha=0.8),
    "cutmix": dict(mixup_alpha=0.0, cutmix_alpha=1.0),
    "both": dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5),
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_matches_timm_with_the_same_draw(monkeypatch, backend, config, mode):
    x, y = make_batch(6, shape=(3, 8, 8))
    for seed in range(3):
        draw, m = twin(seed, mode=mode, prob=0.8, label_smoothing=0.1, **CONFIGS[config])
        p = draw.sample(x.shape)
        x_timm, y_timm = timm_with_our_draw(monkeypatch, m, p, x, y)
        x_ours, y_ours = m(x.clone().to(backend.device), y.to(backend.device))
        torch.testing.assert_close(x_ours.cpu(), x_timm, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(y_ours.cpu(), y_timm, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 3, 6])
def test_targets_match_timm_mixup_target(batch):
    x, y = make_batch(batch, shape=(3, 8, 8))
    # Per batch: one λ; timm's mixup_target takes it as a float.
    draw, m = twin(1, mixup_alpha=1.0, label_smoothing=0.1)
    lam = float(draw.sample(x.shape).lam_y)
    _, soft = m(x.clone(), y)
    torch.testing.assert_close(soft, timm_mixup.mixup_target(y, K, lam, 0.1), rtol=1e-6, atol=1e-6)
    # Per sample (CutMix included): timm passes a (B, 1) tensor of label weights.
    draw, m = twin(2, mixup_alpha=1.0, cutmix_alpha=1.0, mode="elem", label_smoothing=0.2)
    lam = draw.sample(x.shape).lam_y
    _, soft = m(x.clone(), y)
    want = timm_mixup.mixup_target(y, K, lam.unsqueeze(1), 0.2)
    torch.testing.assert_close(soft, want, rtol=1e-6, atol=1e-6)
    assert soft.dtype == torch.float32 and soft.shape == (batch, K)


def test_paper_definition():
    """x' = λ x_i + (1 - λ) x_j, y' = λ y_i + (1 - λ) y_j with j = B-1-i (timm's pairing), λ ~ Beta."""
    x, y = make_batch(5, shape=(12,))
    draw, m = twin(3, mixup_alpha=0.2, label_smoothing=0.0)
    lam = float(draw.sample(x.shape).lam_x)
    x_out, soft = m(x.clone(), y)
    onehot = torch.nn.functional.one_hot(y, K).float()
    torch.testing.assert_close(x_out, lam * x + (1 - lam) * x.flip(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(soft, lam * onehot + (1 - lam) * onehot.flip(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x_out[2], x[2])  # odd batch: the middle sample pairs with itself


CASES = [
    # (batch, dtype, channels_last, mode, pairing, config)
    (1, torch.float32, False, "batch", "flip", "both"),
    (1, torch.float32, False, "elem", "random", "cutmix"),
    (1, torch.bfloat16, True, "pair", "flip", "both"),
    (3, torch.float32, False, "pair", "flip", "both"),
    (3, torch.float32, True, "elem", "flip", "both"),
    (5, torch.bfloat16, False, "batch", "flip", "cutmix"),
    (5, torch.bfloat16, True, "elem", "random", "both"),
    (5, torch.float16, False, "pair", "random", "both"),
    (7, torch.float32, True, "batch", "random", "mixup"),
    (6, torch.bfloat16, False, "pair", "random", "cutmix"),
]


@pytest.mark.parametrize("batch,dtype,channels_last,mode,pairing,config", CASES)
def test_matches_reference(backend, batch, dtype, channels_last, mode, pairing, config):
    x, y = make_batch(batch, shape=(3, 6, 5), dtype=dtype, channels_last=channels_last)
    for seed in range(2):
        draw, m = twin(seed, mode=mode, pairing=pairing, label_smoothing=0.1, **CONFIGS[config])
        p = draw.sample(x.shape)
        x_ref, y_ref = expected(x, y, p, 0.1)
        x_in = x.to(backend.device).clone(memory_format=torch.preserve_format)
        x_out, soft = m(x_in, y.to(backend.device))
        assert x_out.device == x_in.device and soft.device == x_in.device
        assert_close_dtype(x_out.cpu(), x_ref)
        torch.testing.assert_close(soft.cpu(), y_ref, rtol=1e-6, atol=1e-6)
        assert x_out.is_contiguous(memory_format=torch.channels_last) == channels_last
        if pairing == "flip":  # timm's pairing mixes in place, like timm
            assert x_out.data_ptr() == x_in.data_ptr()
        else:
            assert x_out.data_ptr() != x_in.data_ptr() and torch.equal(x_in.cpu(), x)


def test_odd_batch_keeps_the_middle_sample():
    x, y = make_batch(5, shape=(3, 8, 8))
    for config in CONFIGS:
        for mode in ("batch", "pair", "elem"):
            m = Mixup(mode=mode, num_classes=K, label_smoothing=0.0, generator=gen(4), **CONFIGS[config])
            x_out, soft = m(x.clone(), y)
            assert torch.equal(x_out[2], x[2])
            assert torch.equal(soft[2], torch.nn.functional.one_hot(y[2], K).float())


@pytest.mark.parametrize("pairing", ["flip", "random"])
def test_cutmix_region_comes_from_the_partner(backend, pairing):
    x, y = make_batch(5, shape=(2, 8, 8))
    draw, m = twin(5, mixup_alpha=0.0, cutmix_alpha=1.0, mode="elem", pairing=pairing)
    p = draw.sample(x.shape)
    x_out, _ = m(x.clone().to(backend.device), y.to(backend.device))
    x_out = x_out.cpu()
    perm = torch.arange(4, -1, -1) if p.perm is None else p.perm
    assert bool((box_area(p.box) > 0).any())
    for i in range(5):
        y0, y1, x0, x1 = p.box[i].tolist()
        inside = torch.zeros(8, 8, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        assert torch.equal(x_out[i][:, inside], x[perm[i]][:, inside])
        assert torch.equal(x_out[i][:, ~inside], x[i][:, ~inside])
        assert float(p.lam_y[i]) == pytest.approx(1 - inside.sum().item() / 64, abs=1e-7)


def test_uint8_with_mean_and_std(backend):
    g = gen(6)
    x = torch.randint(0, 256, (5, 3, 6, 6), dtype=torch.uint8, generator=g)
    y = torch.randint(0, K, (5,), generator=g)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    for out_dtype in (None, torch.bfloat16):
        draw, m = twin(6, mixup_alpha=1.0, cutmix_alpha=1.0, mode="elem", mean=mean, std=std,
                       out_dtype=out_dtype)
        p = draw.sample(x.shape)
        x_ref, y_ref = expected(x, y, p, 0.1, mean=mean, std=std, out_dtype=out_dtype or torch.float32)
        x_in = x.clone().to(backend.device)
        x_out, soft = m(x_in, y.to(backend.device))
        assert torch.equal(x_in.cpu(), x)  # a new tensor: uint8 cannot hold the result
        x_out, soft = x_out.cpu(), soft.cpu()
        assert x_out.dtype == (out_dtype or torch.float32)
        if out_dtype is None:
            torch.testing.assert_close(x_out, x_ref, rtol=1e-5, atol=1e-5)
        else:
            assert_close_dtype(x_out, x_ref)
        torch.testing.assert_close(soft, y_ref, rtol=1e-6, atol=1e-6)


def test_mixing_without_image_dims():
    x = torch.randn(5, 16)
    y = torch.randint(0, K, (5,))
    draw, m = twin(7, mixup_alpha=1.0, mode="elem")
    p = draw.sample(x.shape)
    x_out, soft = m(x.clone(), y)
    x_ref, y_ref = expected(x, y, p, 0.1)
    torch.testing.assert_close(x_out, x_ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="CutMix"):
        Mixup(cutmix_alpha=1.0, num_classes=K)(x, y)


def test_mixup_disabled_returns_smoothed_unmixed_targets(backend):
    x, y = make_batch(5, shape=(3, 6, 6))
    want = smooth_targets(y, K, 0.1).float()
    torch.testing.assert_close(want, timm_mixup.mixup_target(y, K, 1.0, 0.1), rtol=0, atol=1e-7)
    x, y = x.to(backend.device), y.to(backend.device)
    m = Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=K, generator=gen(8))
    m.mixup_enabled = False
    x_in = x.clone()
    x_out, soft = m(x_in, y)
    assert x_out is x_in and torch.equal(x_out, x)
    torch.testing.assert_close(soft.cpu(), want, rtol=0, atol=1e-7)
    mb = m.mix_batch(x_in, y)
    assert mb.x is x_in and mb.lam == 1.0 and mb.perm is None
    # uint8 still gets normalized and converted.
    x8 = torch.randint(0, 256, (5, 3, 6, 6), dtype=torch.uint8, generator=gen(8))
    m = Mixup(num_classes=K, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    m.mixup_enabled = False
    x_out, soft = m(x8.to(backend.device), y)
    torch.testing.assert_close(x_out.cpu(), (x8.float() / 255 - 0.5) / 0.25, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(soft.cpu(), want, rtol=0, atol=1e-7)


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
@pytest.mark.parametrize("pairing", ["flip", "random"])
def test_mix_batch_feeds_the_index_loss(mode, pairing):
    x, y = make_batch(5, shape=(3, 6, 6))
    logits = torch.randn(5, K, generator=gen(9))
    kwargs = dict(mixup_alpha=1.0, cutmix_alpha=1.0, mode=mode, pairing=pairing, label_smoothing=0.1)
    a, b = twin(9, **kwargs)
    x_soft, soft = a(x.clone(), y)
    mb = b.mix_batch(x.clone(), y)
    assert isinstance(mb, MixedBatch)
    assert torch.equal(mb.x, x_soft) and mb.target is y and mb.label_smoothing == 0.1
    if mode == "batch":  # one λ for the batch: a host number, as the loss's kernel takes it
        assert isinstance(mb.lam, float)
    else:
        assert mb.lam.shape == (5,) and mb.lam.dtype == torch.float32 and mb.lam.is_contiguous()
    assert (mb.perm is None) == (pairing == "flip")
    loss = mixup_cross_entropy(logits, mb.target, mb.lam, mb.perm, label_smoothing=mb.label_smoothing)
    torch.testing.assert_close(loss, SoftTargetCrossEntropy()(logits, soft), rtol=1e-5, atol=1e-6)


def test_dense_and_multi_label_targets():
    x, _ = make_batch(4, shape=(3, 6, 6))
    dense = torch.rand(4, K, generator=gen(10))
    draw, m = twin(10, mixup_alpha=1.0, mode="elem", label_smoothing=0.1)
    lam = draw.sample(x.shape).lam_y
    _, soft = m(x.clone(), dense)
    torch.testing.assert_close(soft, mix_reference(None, dense, lam, num_classes=K, label_smoothing=0.1)[1])
    multi = (torch.rand(4, K, generator=gen(11)) > 0.5).float()
    draw, m = twin(11, mixup_alpha=1.0, label_smoothing=0.1, multi_label=True)
    lam = float(draw.sample(x.shape).lam_y)
    _, soft = m(x.clone(), multi)
    want = timm_mixup.mixup_target(multi, K, lam, 0.1, multi_label=True)
    torch.testing.assert_close(soft, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="multi_label"):
        m(x.clone(), torch.arange(4))


def test_runs_are_reproducible():
    x, y = make_batch(6, shape=(3, 8, 8))
    kwargs = dict(mixup_alpha=0.8, cutmix_alpha=1.0, mode="elem", pairing="random", num_classes=K)
    outs = []
    for seed in (0, 0, 1):
        m = Mixup(generator=gen(seed), **kwargs)
        outs.append([m(x.clone(), y) for _ in range(3)])
    for (xa, ya), (xb, yb) in zip(outs[0], outs[1]):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not all(torch.equal(a[1], c[1]) for a, c in zip(outs[0], outs[2]))
    # No generator: the batch device's default generator, seeded by torch.manual_seed.
    m = Mixup(**kwargs)
    torch.manual_seed(3)
    first = m(x.clone(), y)
    torch.manual_seed(3)
    second = m(x.clone(), y)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_inplace_switch():
    x, y = make_batch(4, shape=(3, 6, 6))
    m = Mixup(num_classes=K, generator=gen(12), inplace=False)
    x_in = x.clone()
    x_out, _ = m(x_in, y)
    assert torch.equal(x_in, x) and x_out.data_ptr() != x_in.data_ptr()
    m = Mixup(num_classes=K, generator=gen(12))
    x_in = x.clone()
    x_out2, _ = m(x_in, y)
    assert x_out2 is x_in and torch.equal(x_out2, x_out)
    # A non-dense view cannot be rewritten in place: the result is a new tensor.
    x_view = x.clone()[:, :, ::2]
    m = Mixup(num_classes=K, generator=gen(12))
    x_out3, _ = m(x_view, y)
    assert x_out3.data_ptr() != x_view.data_ptr()


# --------------------------------------------------------------------------------------------------
# CutMix alone
# --------------------------------------------------------------------------------------------------
def test_cutmix_with_a_given_box(backend):
    x, y = make_batch(5, shape=(2, 8, 8))
    dev = backend.device
    box = torch.tensor([1, 5, 2, 6])
    x_out, soft = cutmix(x.clone().to(dev), y.to(dev), box=box.to(dev), num_classes=K, label_smoothing=0.1)
    x_out, soft = x_out.cpu(), soft.cpu()
    x_ref, y_ref = mix_reference(x, y, 1.0, 1 - 16 / 64, None, box, num_classes=K, label_smoothing=0.1,
                                 out_dtype=torch.float32)
    assert torch.equal(x_out, x_ref)
    torch.testing.assert_close(soft, y_ref)
    assert torch.equal(x_out[:, :, 1:5, 2:6], x.flip(0)[:, :, 1:5, 2:6])
    # Per-sample boxes, an explicit partner and an explicit label weight.
    boxes = torch.tensor([[0, 8, 0, 8], [0, 0, 0, 0], [2, 4, 2, 4], [0, 8, 0, 4], [7, 8, 7, 8]])
    perm = torch.tensor([1, 2, 3, 4, 0])
    x_out, soft = cutmix(x.clone().to(dev), y.to(dev), box=boxes.to(dev), perm=perm.to(dev),
                         lam=torch.full((5,), 0.5, device=dev), num_classes=K)
    x_out, soft = x_out.cpu(), soft.cpu()
    x_ref, y_ref = mix_reference(x, y, 1.0, 0.5, perm, boxes, num_classes=K, out_dtype=torch.float32)
    assert torch.equal(x_out, x_ref) and torch.equal(x_out[0], x[1]) and torch.equal(x_out[1], x[1])
    torch.testing.assert_close(soft, y_ref)


@pytest.mark.parametrize("per_sample", [False, True])
def test_cutmix_random_box(per_sample):
    x, y = make_batch(5, shape=(2, 8, 8))
    x_out, soft = cutmix(x.clone(), y, alpha=1.0, per_sample=per_sample, num_classes=K, generator=gen(13))
    # The same generator stream: λ first, then the box.
    g2 = gen(13)
    lam2 = sample_beta(1.0, (5,) if per_sample else (), generator=g2, dtype=torch.float64)
    box2, lam_y2 = cutmix_box_and_lam(x.shape, lam2, generator=g2)
    x_ref, y_ref = mix_reference(x, y, 1.0, lam_y2, None, box2, num_classes=K, out_dtype=torch.float32)
    assert torch.equal(x_out, x_ref)
    torch.testing.assert_close(soft, y_ref)
    assert torch.equal(lam_y2, box_lam(box2, x.shape))
    # With λ given and cutmix_minmax-style boxes; uint8 in, normalized float out.
    x8 = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8, generator=gen(14))
    x_out, soft = cutmix(x8, y, lam=0.5, minmax=(0.25, 0.5), num_classes=K, generator=gen(15),
                         mean=(0.5,) * 3, std=(0.5,) * 3, per_sample=per_sample)
    assert x_out.dtype == torch.float32 and soft.shape == (5, K)
    # Box sides in [int(8 * .25), int(8 * .5)) = {2, 3}: at most 9 of 64 pixels come from the partner.
    assert bool((soft.max(1).values >= 1 - 9 / 64 - 1e-6).all())
    assert bool((soft.max(1).values <= 1 - 4 / 64 + 1e-6).any())  # ... and at least 4 (unless same class)


def test_cutmix_rejects_bad_input():
    with pytest.raises(ValueError, match="B, C, H, W"):
        cutmix(torch.randn(4, 8), torch.arange(4), num_classes=K)
    with pytest.raises(ValueError, match="alpha"):
        cutmix(torch.randn(4, 1, 8, 8), torch.arange(4), alpha=0.0, num_classes=K)


# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(mixup_alpha=-0.1), "mixup_alpha"),
        (dict(cutmix_alpha=-1.0), "cutmix_alpha"),
        (dict(mixup_alpha=float("nan")), "mixup_alpha"),
        (dict(mixup_alpha=0.0, cutmix_alpha=0.0), "neither Mixup nor CutMix"),
        (dict(mode="half"), "mode"),
        (dict(mode="Batch"), "mode"),
        (dict(prob=1.5), "prob"),
        (dict(prob=-0.1), "prob"),
        (dict(switch_prob=2.0), "switch_prob"),
        (dict(num_classes=0), "num_classes"),
        (dict(num_classes=-3), "num_classes"),
        (dict(num_classes=2.5), "num_classes"),  # TypeError: the wrong kind of value
        (dict(label_smoothing=1.5), "label_smoothing"),
        (dict(cutmix_minmax=(0.8, 0.2)), "cutmix_minmax"),
        (dict(cutmix_minmax=(0.5,)), "cutmix_minmax"),
        (dict(pairing="shuffle"), "pairing"),
        (dict(generator=42), "generator"),  # TypeError
        (dict(mean=(0.5,)), "mean and std"),
        (dict(out_dtype=torch.int32), "out_dtype"),  # TypeError
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, match):
    # mixrecipe.checks: a value of the wrong kind is a TypeError, a value out of range a ValueError.
    wrong_kind = any(isinstance(v, float) and k == "num_classes" for k, v in kwargs.items()) \
        or "generator" in kwargs or "out_dtype" in kwargs
    with pytest.raises(TypeError if wrong_kind else ValueError, match=match):
        Mixup(**kwargs)


def test_timm_arguments_and_attributes():
    m = Mixup(0.8, 1.0, None, 1.0, 0.5, "batch", True, 0.1, 1000)  # timm's positional order
    for name, value in dict(mixup_alpha=0.8, cutmix_alpha=1.0, cutmix_minmax=None, mix_prob=1.0,
                            switch_prob=0.5, mode="batch", correct_lam=True, label_smoothing=0.1,
                            num_classes=1000, mixup_enabled=True).items():
        assert getattr(m, name) == value
    assert "Mixup(" in repr(m)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU: checks that no call synchronizes host and device")
@pytest.mark.parametrize("where", ["default", "cpu"])
def test_no_host_device_sync_on_cuda(where):
    """Every mode, with and without CutMix, float and uint8 batches, the op, mix_batch with the loss and the
    loss's backward: no call reads a device value on the host."""
    x, y = make_batch(6, shape=(3, 8, 8), device="cuda")
    x8 = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, device="cuda")
    logits = torch.randn(6, K, device="cuda", requires_grad=True)
    generator = None if where == "default" else gen(0, where)
    norm = dict(mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2), out_dtype=torch.bfloat16)
    for mode in ("batch", "pair", "elem"):
        for pairing in ("flip", "random"):
            for cutmix_alpha in (0.0, 1.0):
                m = Mixup(0.8, cutmix_alpha, mode=mode, pairing=pairing, prob=0.7, num_classes=K,
                          generator=generator)
                u = Mixup(0.8, cutmix_alpha, mode=mode, pairing=pairing, num_classes=K, generator=generator,
                          **norm)
                calls = [lambda m=m: m(x.clone(), y), lambda u=u: u(x8, y),
                         lambda: cutmix(x, y, num_classes=K),
                         lambda m=m: mixup_cross_entropy(logits, y, *m.mix_batch(x.clone(), y)[2:4])
                         .backward()]
                for call in calls:
                    call()  # warm-up: lazy initialisations and compilation may synchronize once
                torch.cuda.set_sync_debug_mode("error")
                try:
                    for call in calls:
                        call()
                finally:
                    torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA generator to refuse")
def test_a_device_generator_is_refused():
    with pytest.raises(ValueError, match="CPU torch.Generator"):
        Mixup(num_classes=K, generator=torch.Generator("cuda"))


@pytest.mark.parametrize("mode", ["batch", "elem"])
@pytest.mark.parametrize("enabled", [True, False])
def test_out_buffer_gets_what_the_policy_returns(mode, enabled):
    """Mixup(..., out=buf) writes the same batch into the caller's buffer, leaves x as it was, and keeps
    the draw stream (same generator state after)."""
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    y = torch.arange(6) % 4
    kw = dict(mixup_alpha=0.4, cutmix_alpha=1.0, num_classes=4, mode=mode, label_smoothing=0.1,
              mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), out_dtype=torch.bfloat16)
    a, b = Mixup(**kw, generator=gen(5)), Mixup(**kw, generator=gen(5))
    a.mixup_enabled = b.mixup_enabled = enabled
    want, want_soft = a(x, y)
    buf = torch.full((6, 3, 8, 8), float("nan"), dtype=torch.bfloat16)
    x_before = x.clone()
    got, soft = b(x, y, out=buf)
    assert got is buf and torch.equal(got, want) and torch.equal(soft, want_soft)
    assert torch.equal(x, x_before)
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    mb = b.mix_batch(x, y, out=buf)
    assert mb.x is buf and torch.isfinite(buf.float()).all()


def test_out_buffer_instead_of_mixing_in_place():
    x = torch.randn(4, 3, 5, 5)
    buf = torch.empty_like(x)
    x_before = x.clone()
    m = Mixup(mixup_alpha=1.0, num_classes=3, generator=gen(1))
    got, _ = m(x, torch.arange(4) % 3, out=buf)
    assert got is buf and torch.equal(x, x_before) and not torch.equal(buf, x)


def test_float_draws_from_several_threads_keep_to_their_generators():
    """Threads drawing at once, each from its own generator, get exactly what each gets alone."""
    def draw_all(seed):
        g = gen(seed)
        batch = Mixup(mixup_alpha=1.0, cutmix_alpha=1.0, num_classes=5, prob=0.8, generator=g)
        elem = Mixup(mixup_alpha=1.0, num_classes=5, prob=0.8, mode="elem", generator=g)  # (B,) in place
        return [tuple(v.tolist() if isinstance(v, torch.Tensor) else v for v in m.sample((4, 3, 8, 8)))
                for _ in range(150) for m in (batch, elem)]

    alone = [draw_all(seed) for seed in range(4)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(draw_all, range(4)))
    assert together == alone


def test_float_draws_work_in_and_out_of_inference_mode():
    """Draws made under torch.inference_mode() and outside it in one thread both work."""
    def calls():
        m = Mixup(mixup_alpha=1.0, num_classes=5, generator=gen(2))
        e = Mixup(mixup_alpha=1.0, num_classes=5, mode="elem", generator=gen(2))
        x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
        with torch.inference_mode():
            m(x.clone(), y), e(x.clone(), y)
        return m(x.clone(), y)[1], e(x.clone(), y)[1]

    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # a fresh thread: its first draws made above
        soft, soft_elem = pool.submit(calls).result()
    assert soft.shape == soft_elem.shape == (4, 5)
