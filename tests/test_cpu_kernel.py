"""The compiled CPU kernel (mixrecipe.cpu_kernel) against the float64 reference and torch's conversions.

The op-level tests in test_ops.py already run on it (the "numba" backend); these cover what only this
kernel has: its 16-bit conversions, its thread split, its poison/NaN contract, its on-disk cache.
Shapes stay small so the whole file compiles a handful of signatures once and then runs in seconds.
"""

import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from mixrecipe import cpu_kernel, ops
from mixrecipe import reference as R
from mixrecipe.backend import cpu_backend

pytestmark = pytest.mark.skipif(not cpu_kernel.available(), reason="numba is not installed")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def assert_close_ulp(out, ref, scale, dtype):
    diff = (out.double() - ref.double()).abs()
    bound = ULP[dtype] * (ref.double().abs() + 2 * scale) + 1e-30
    assert not (diff > bound).any(), f"worst {float(diff.max()):.3g}"


@pytest.fixture(params=["1", "2-openmp", "2-python"], ids=["1-thread", "2-openmp", "2-python-threads"])
def threads(request, monkeypatch):
    """Run on 1 thread, on a 2-thread team of PyTorch's OpenMP runtime and on 2 Python threads (the team
    where no OpenMP runtime is found); with 2, even tiny batches take the team."""
    monkeypatch.setattr(cpu_kernel, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(cpu_kernel, "LOSS_PARALLEL_MIN_ELEMS", 0)
    if request.param == "2-python":
        monkeypatch.setattr(cpu_kernel, "USE_OPENMP_TEAM", False)
    elif request.param == "2-openmp" and cpu_kernel.team_runtime() != "openmp":
        pytest.skip("PyTorch here does not run on an OpenMP runtime this kernel can hand work to")
    n = int(request.param[0])
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    with cpu_backend("numba"):
        yield n
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------
# 16-bit conversions: every fp16/bf16 value in, torch's round-to-nearest-even out
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_16_bit_value_converts_exactly(dtype):
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    values = bits.view(dtype).reshape(2, -1)  # lam = 1: each row is itself, so the op is a pure conversion
    with cpu_backend("numba"):
        widened, _ = ops.mixup(values, None, 1.0, torch.arange(2), out_dtype=torch.float32)
    finite = values.isfinite()
    assert torch.equal(widened[finite], values.float()[finite])
    assert widened[values.isnan()].isnan().all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp32_rounds_to_nearest_even_like_torch(dtype):
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31 - 1, (2, 50000), generator=g, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    ties = torch.tensor([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 65520.0,
                         65519.0, 1e6, 6e-8, 3e-8, -0.0])  # ties, fp16 overflow to inf, subnormals
    x[0, : ties.numel()] = ties
    with cpu_backend("numba"):
        got, _ = ops.mixup(x, None, 1.0, torch.arange(2), out_dtype=dtype)
    want = x.to(dtype)
    finite = x.isfinite()  # an infinite input lerps to NaN (inf - inf), as in the Triton kernel
    assert torch.equal(got[finite], want[finite])
    assert got[x.isnan()].isnan().all()


# --------------------------------------------------------------------------------------------------
# The op on 1 and 2 threads against float64
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 2, 5])
def test_matches_reference_on_threads(threads, dtype, batch):
    g = torch.Generator().manual_seed(batch)
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(batch, 3, 7, 9, generator=g).to(dtype).contiguous(memory_format=layout)
        target = torch.randint(0, 11, (batch,), generator=g)
        lam = torch.rand(batch, generator=g)
        perm = torch.randperm(batch, generator=g)
        box = torch.tensor([[1, 5, 2, 8]] * batch, dtype=torch.int32)
        for p, b, inplace in ((None, None, True), (perm, None, False), (None, box, False),
                              (perm, box, False)):
            y = x.clone(memory_format=torch.preserve_format)
            out, soft = ops.mix(y, target, lam, lam.flip(0), p, b, num_classes=11, label_smoothing=0.1,
                                inplace=inplace)
            ref, ref_soft = R.mix_reference(x, target, lam, lam.flip(0), p, b, num_classes=11,
                                            label_smoothing=0.1)
            assert (out is y) == inplace
            assert_close_ulp(out, ref, x.double().abs().max(), dtype)
            assert out.is_contiguous(memory_format=layout)
            torch.testing.assert_close(soft, ref_soft, rtol=1e-6, atol=1e-7)


# Boxes that cover no row, a zero-width column range, the top or bottom rows, every row, a middle band:
# the rows no box covers are mixed as one span, the others one span per box edge.
EDGE_BOXES = [[0, 0, 0, 0], [2, 5, 3, 3], [0, 2, 1, 6], [4, 7, 0, 9], [0, 7, 0, 9], [2, 4, 2, 7],
              [1, 6, 5, 9]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_cutmix_boxes_at_every_row_position(threads, dtype, layout):
    """Per-sample boxes in every position against float64, in place (flip) and out of place (flip and a
    random permutation), partners with different boxes; outputs poisoned with NaN first."""
    g = torch.Generator().manual_seed(9)
    batch = len(EDGE_BOXES)
    boxes = torch.tensor(EDGE_BOXES, dtype=torch.int32)
    norm = {}
    if dtype == torch.uint8:
        norm = dict(mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), out_dtype=torch.float32)
    base = torch.randn(batch, 3, 7, 9, generator=g)
    x = (base.abs() * 60).to(torch.uint8) if dtype == torch.uint8 else base.to(dtype)
    x = x.contiguous(memory_format=layout)
    target = torch.randint(0, 5, (batch,), generator=g)
    lam = torch.rand(batch, generator=g)
    perm = torch.randperm(batch, generator=g)
    for p, inplace in ((None, True), (None, False), (perm, False)):
        if inplace and dtype == torch.uint8:
            continue
        y = x.clone(memory_format=torch.preserve_format)
        out_dtype = norm.get("out_dtype", dtype)
        buf = None if inplace else torch.full_like(x, float("nan"), dtype=out_dtype)
        ref, ref_soft = R.mix_reference(x, target, lam, 1.0 - lam, p, boxes, num_classes=5, **norm)
        out, soft = ops.mix(y, target, lam, 1.0 - lam, p, boxes, num_classes=5, inplace=inplace, out=buf,
                            **norm)
        assert (out is y) == inplace and out.is_contiguous(memory_format=layout)
        assert_close_ulp(out, ref, 4.0 if dtype == torch.uint8 else x.double().abs().max(), out_dtype)
        torch.testing.assert_close(soft, ref_soft, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("out_dtype", DTYPES)
def test_uint8_normalized_on_threads(threads, out_dtype):
    g = torch.Generator().manual_seed(3)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randint(0, 256, (5, 3, 6, 11), dtype=torch.uint8, generator=g)
        x = x.contiguous(memory_format=layout)
        lam = torch.rand(5, generator=g)
        box = torch.tensor([0, 4, 3, 9], dtype=torch.int32)
        out, _ = ops.mix(x, None, lam, None, None, box, mean=mean, std=std, out_dtype=out_dtype)
        ref, _ = R.mix_reference(x, None, lam, None, None, box, mean=mean, std=std, out_dtype=out_dtype)
        assert_close_ulp(out, ref, 2.5, out_dtype)
        assert out.is_contiguous(memory_format=layout)


def test_lines_longer_than_a_chunk(threads, monkeypatch):
    """Rows cut into several chunks, the last one short; channels_last chunks end on a pixel."""
    monkeypatch.setattr(cpu_kernel, "CHUNK_ELEMS", 10)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 3, 5, 7, generator=g)
    for layout in (torch.contiguous_format, torch.channels_last):
        y = x.contiguous(memory_format=layout)
        out, _ = ops.mixup(y, None, 0.3, mean=(0.1, 0.2, 0.3), std=(0.5, 2.0, 1.0))
        ref, _ = R.mix_reference(y, None, 0.3, mean=(0.1, 0.2, 0.3), std=(0.5, 2.0, 1.0))
        assert_close_ulp(out, ref, 16.0, torch.float32)


@pytest.mark.parametrize("perm_kind", ["flip", "random"])
def test_loss_rows_on_threads(threads, perm_kind):
    """The loss rows and their gradient, split into chunks of rows over the team, against float64."""
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(37, 23, generator=g) * 4
    target = torch.randint(0, 23, (37,), generator=g)
    lam = torch.rand(37, generator=g)
    perm = None if perm_kind == "flip" else torch.randperm(37, generator=g)
    upstream = torch.rand(37, generator=g)
    loss, lse = cpu_kernel.ce_rows(logits, target, lam, perm, 0.1)
    dz = cpu_kernel.ce_rows_backward(upstream, logits, lse, target, lam, perm, 0.1)
    z = logits.double().requires_grad_()
    soft = R.mixup_target_reference(target, 23, lam.double(), perm, 0.1).double()
    ref = -(soft * torch.log_softmax(z, dim=-1)).sum(-1)
    ref.backward(upstream.double())
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.double(), torch.logsumexp(z.detach(), -1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dz.double(), z.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", ["index", "weight"])
def test_loss_rows_refuse_bad_values_on_threads(threads, bad):
    """One thread checks inside the launch, a team before it: either way the checks module's message."""
    logits = torch.randn(6, 5)
    target = torch.tensor([0, 1, 7 if bad == "index" else 2, 3, 4, 0])
    lam = torch.tensor([0.1, 0.2, 0.3, float("nan") if bad == "weight" else 0.4, 0.5, 0.6])
    match = r"class indices from .* outside \[0, num_classes=5\)" if bad == "index" else r"lam must lie in"
    with pytest.raises(ValueError, match=match):
        cpu_kernel.ce_rows(logits, target, lam, None, 0.1)


# --------------------------------------------------------------------------------------------------
# In-place flip calls with a float lam: checked once per signature, then the kernel's plan is re-pointed
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def planning(monkeypatch):
    """A fresh table of checked signatures, and a count of the launches planned from scratch."""
    monkeypatch.setattr(ops, "_CHECKED_INPLACE", {})
    planned = []
    real = cpu_kernel.plan_mix

    def counting(*args, **kwargs):
        planned.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cpu_kernel, "plan_mix", counting)
    return planned


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("with_target", [True, False])
def test_a_checked_signature_is_planned_once_then_relaunched(threads, planning, dtype, layout, with_target):
    """Batches of one signature: the first call plans; later ones re-point the plan at their own tensors
    (NaN-poisoned labels all written, earlier batches untouched) and bump the version counter."""
    g = torch.Generator().manual_seed(11)
    results = []
    for _ in range(4):
        x = torch.randn(5, 3, 6, 7, generator=g).to(dtype).contiguous(memory_format=layout)
        target = torch.randint(0, 9, (5,), generator=g) if with_target else None
        lam = float(torch.rand((), generator=g))
        ref, ref_soft = R.mix_reference(x, target, lam, num_classes=9, label_smoothing=0.2)
        version, before = x._version, x.clone()
        out, soft = ops.mixup(x, target, lam, num_classes=9, label_smoothing=0.2, inplace=True)
        assert out is x and x._version > version
        assert_close_ulp(x, ref, before.double().abs().max(), dtype)
        assert x.is_contiguous(memory_format=layout)
        if with_target:
            torch.testing.assert_close(soft, ref_soft, rtol=1e-6, atol=1e-7)
        else:
            assert soft is None
        results.append((x, x.clone()))
    assert len(planning) == 1
    assert all(torch.equal(x, kept) for x, kept in results)  # each call wrote its own batch only


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_per_sample_weights_are_planned_once_then_relaunched(threads, planning, layout):
    """(B,) float32 weights take the same shortcut: the plan is re-pointed at each call's weights, which
    are still range-checked by every launch; weights in another form (float64, a 0-d tensor, a strided
    view) never reuse a plan made for contiguous float32 ones."""
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        x = torch.randn(7, 3, 5, 4, generator=g).contiguous(memory_format=layout)
        target = torch.randint(0, 6, (7,), generator=g)
        lam = torch.rand(7, generator=g)
        ref, ref_soft = R.mix_reference(x, target, lam, num_classes=6, label_smoothing=0.1)
        version = x._version
        out, soft = ops.mixup(x, target, lam, num_classes=6, label_smoothing=0.1, inplace=True)
        assert out is x and x._version > version
        assert_close_ulp(x, ref, 4.0, torch.float32)
        torch.testing.assert_close(soft, ref_soft, rtol=1e-6, atol=1e-7)
    assert len(planning) == 1
    before = x.clone()
    with pytest.raises(ValueError, match=r"lam_x must lie in \[0, 1\]"):
        ops.mixup(x, target, torch.tensor([0.5] * 6 + [float("nan")]), num_classes=6, inplace=True)
    with pytest.raises(ValueError, match=r"class indices from .* outside"):
        ops.mixup(x, torch.tensor([0, 1, 2, 3, 4, 5, 6]), lam, num_classes=6, inplace=True)
    assert torch.equal(x, before)
    for other in (lam.double(), torch.tensor(0.25), torch.rand(14, generator=g)[::2]):
        ref, _ = R.mix_reference(x, target, other.expand(7), num_classes=6)
        mixed, _ = ops.mixup(x.clone(), target, other, num_classes=6, inplace=True)
        assert_close_ulp(mixed, ref, 4.0, torch.float32)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_batch_box_is_planned_once_then_relaunched(threads, planning, layout, dtype):
    """In-place CutMix calls with one (4,) int32 box and float weights for pixels and labels (what the
    policy passes) plan once; later calls re-point the plan at their own box and weights. Boxes in another
    form ((B, 4), int64) take the full path and give the same result."""
    g = torch.Generator().manual_seed(6)
    for step in range(5):
        x = torch.randn(7, 3, 8, 9, generator=g).to(dtype).contiguous(memory_format=layout)
        target = torch.randint(0, 6, (7,), generator=g)
        box = torch.tensor([step, 4 + step, 8 - step, 9], dtype=torch.int32)
        lam_x, lam_y = float(torch.rand((), generator=g)), float(torch.rand((), generator=g))
        ref, ref_soft = R.mix_reference(x, target, lam_x, lam_y, None, box, num_classes=6,
                                        label_smoothing=0.1)
        before, version = x.clone(), x._version
        out, soft = ops.mix(x, target, lam_x, lam_y, None, box, num_classes=6, label_smoothing=0.1,
                            inplace=True)
        assert out is x and x._version > version and x.is_contiguous(memory_format=layout)
        assert_close_ulp(x, ref, before.double().abs().max(), dtype)
        torch.testing.assert_close(soft, ref_soft, rtol=1e-6, atol=1e-7)
        strided = torch.zeros(8, dtype=torch.int32)[::2]
        strided.copy_(box)
        for other in (box.expand(7, 4), box.long(), strided):
            y = before.clone(memory_format=torch.preserve_format)
            ops.mix(y, target, lam_x, lam_y, None, other, num_classes=6, label_smoothing=0.1, inplace=True)
            assert torch.equal(y, x)
    assert len(planning) == 1 + 3 * 5  # the contiguous (4,) int32 box once; the other forms every call


def test_beta_rows_is_the_tensor_formula():
    """beta_rows combines sample_beta's draws exactly as the tensor ops do (bit for bit here): per sample,
    per pair spread to both rows (the middle row of an odd batch unmixed), with and without the coin."""
    g = torch.Generator().manual_seed(2)
    for alpha in (0.2, 1.0, 1.5, 3.0):
        for batch in (1, 2, 7, 64):
            for pair in (False, True):
                n = (batch + 1) // 2 if pair else batch
                if alpha == 1.0:  # Beta(1, 1): one row of uniforms, λ = U
                    gamma = torch.rand((1, n), generator=g, dtype=torch.float64)
                    lam = gamma[0]
                elif alpha > 1.0:  # two Gamma(a) rows: G1 / (G1 + G2)
                    gamma = torch._standard_gamma(torch.full((2, n), alpha, dtype=torch.float64), generator=g)
                    lam = gamma[0] / (gamma[0] + gamma[1])
                else:  # Gamma(a + 1) and Exp(1) rows, in log space
                    conc = torch.full((4, n), alpha + 1.0, dtype=torch.float64)
                    conc[2:] = 1.0
                    gamma = torch._standard_gamma(conc, generator=g)
                    log_g = gamma[:2].log() - gamma[2:] / alpha
                    lam = torch.sigmoid(log_g[0] - log_g[1])
                for coin in (None, torch.rand(n, generator=g, dtype=torch.float64)):
                    got = cpu_kernel.beta_rows(gamma, coin, alpha, 0.6, batch, pair)
                    want = lam.clone()
                    if coin is not None:
                        want = torch.where(coin < 0.6, want, 1.0)
                    if pair:
                        if batch % 2:
                            want[batch // 2] = 1.0
                        rows = torch.arange(batch)
                        want = want[torch.minimum(rows, batch - 1 - rows)]
                    assert got.dtype == torch.float32 and torch.equal(got, want.float())
    with pytest.raises(ValueError, match="beta_rows needs"):
        cpu_kernel.beta_rows(torch.ones(2, 3, dtype=torch.float64), None, 1.0, 1.0, 4, False)
    with pytest.raises(ValueError, match="beta_rows needs"):
        cpu_kernel.beta_rows(torch.ones(2, 4, dtype=torch.float64), None, 0.5, 1.0, 4, False)
    with pytest.raises(ValueError, match="beta_rows needs"):
        cpu_kernel.beta_rows(torch.ones(2, 2, dtype=torch.float64), torch.ones(3, dtype=torch.float64), 2.0,
                             1.0, 4, True)
    with pytest.raises(ValueError, match="beta_rows needs"):  # alpha = 1 takes one row of uniforms
        cpu_kernel.beta_rows(torch.ones(2, 4, dtype=torch.float64), None, 1.0, 1.0, 4, False)


def test_a_checked_signature_still_refuses_bad_values(planning):
    """After a signature passed the checks, class indices out of range, NaN or out-of-range weights and a
    changed signature (non-dense x, a float64 x, a bool smoothing) are still refused before anything is
    written."""
    x = torch.randn(5, 2, 3, 3)
    ops.mixup(x, torch.arange(5), 0.3, num_classes=5, inplace=True)
    before = x.clone()
    with pytest.raises(ValueError, match=r"class indices from .* outside \[0, num_classes=5\)"):
        ops.mixup(x, torch.tensor([0, 1, 9, 3, 4]), 0.3, num_classes=5, inplace=True)
    for bad in (float("nan"), 1.5, -0.25):
        with pytest.raises(ValueError, match="lam_x must lie in"):
            ops.mixup(x, torch.arange(5), bad, num_classes=5, inplace=True)
    with pytest.raises(TypeError, match="label_smoothing"):
        ops.mixup(x, torch.arange(5), 0.3, num_classes=5, label_smoothing=True, inplace=True)
    with pytest.raises(ValueError, match="contiguous or channels_last"):
        ops.mixup(torch.randn(5, 2, 3, 6)[..., ::2], torch.arange(5), 0.3, num_classes=5, inplace=True)
    with pytest.raises(TypeError, match="float32, float16, bfloat16 or uint8"):
        ops.mixup(x.double(), torch.arange(5), 0.3, num_classes=5, inplace=True)
    with cpu_backend("eager"), pytest.raises(ValueError, match="outside"):  # the eager path checks values
        ops.mixup(x, torch.tensor([0, 1, 9, 3, 4]), 0.3, num_classes=5, inplace=True)
    assert torch.equal(x, before)
    assert len(planning) == 1


# --------------------------------------------------------------------------------------------------
# Poison, bad indices, determinism
# --------------------------------------------------------------------------------------------------
def _launch(x, out, target, soft, perm, lam=0.5, box=None):
    cpu_kernel.mix_cpu(x, out, target, soft, perm=perm, lam_x=lam, lam_y=lam, box=box, mean=None,
                       inv_std=None, in_scale=1.0, label_off=0.0, label_keep=1.0)


@pytest.mark.parametrize("paired", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_writes_every_element(threads, paired, dtype):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 3, 7, 11, generator=g).to(dtype)
    target = torch.randint(0, 13, (5,), generator=g)
    out = torch.full_like(x, float("nan"))
    soft = torch.full((5, 13), float("nan"))
    perm = None if paired else torch.randperm(5, generator=g)
    lam = torch.rand(5, generator=g)
    _launch(x, out, target, soft, perm, lam)
    assert not out.isnan().any() and not soft.isnan().any()
    ref, ref_soft = R.mix_reference(x, target, lam, perm=perm, num_classes=13)
    assert_close_ulp(out, ref, x.double().abs().max(), dtype)
    torch.testing.assert_close(soft, ref_soft)


def test_bad_partners_give_nan_rows_not_out_of_bounds_reads():
    """What the kernel does with a partner index the op could not check (inside torch.compile): the Triton
    kernel's contract, a NaN row instead of a read out of bounds."""
    x = torch.randn(4, 2, 3, 3)
    target = torch.tensor([0, 1, 2, 3])
    perm = torch.tensor([1, 0, 7, 2])
    out, soft = torch.empty_like(x), torch.empty(4, 10)
    _launch(x, out, target, soft, perm)
    assert out[2].isnan().all() and not out[[0, 1, 3]].isnan().any()
    assert soft[2].isnan().all() and not soft[[0, 1, 3]].isnan().any()


@pytest.mark.parametrize("bad", [99, 10, -1])
def test_class_indices_are_range_checked_before_anything_is_written(bad):
    """The launcher finds the index bounds in its own pass (no torch reduction per call) and refuses a
    target outside [0, K) with the checks module's message, before writing images or labels, in place too."""
    x = torch.randn(5, 2, 3, 3)
    before = x.clone()
    target = torch.tensor([0, 1, bad, 3, 4])
    soft = torch.full((5, 10), -7.0)
    with pytest.raises(ValueError, match=r"class indices from .* outside \[0, num_classes=10\)"):
        _launch(x, x, target, soft, None)
    assert torch.equal(x, before) and (soft == -7.0).all()
    with pytest.raises(ValueError, match="outside"):
        ops.mixup(x, target, 0.3, num_classes=10, inplace=True)
    assert torch.equal(x, before)
    with pytest.raises(ValueError, match="outside"):
        ops.mixup_target(target, 10, 0.3)


@pytest.mark.skipif("OpenMP" not in torch.__config__.parallel_info() or not sys.platform.startswith("linux"),
                    reason="PyTorch here is not built on OpenMP, or this is not Linux")
def test_the_team_is_pytorchs_own_openmp_runtime():
    """The runtime found is the one torch.set_num_threads configures: its threads are PyTorch's, so a
    launch right after a parallel PyTorch op finds them awake instead of fighting a second pool."""
    assert cpu_kernel.team_runtime() == "openmp"
    before = torch.get_num_threads()
    try:
        for n in (1, 3, 2):
            torch.set_num_threads(n)
            assert cpu_kernel.openmp_max_threads() == n
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("inplace", [False, True])
def test_launches_from_several_python_threads_at_once(monkeypatch, inplace):
    """Each Python thread packs its own argument block and may start its own team; in place, the threads
    re-point one checked signature's plan at once."""
    monkeypatch.setattr(cpu_kernel, "PARALLEL_MIN_BYTES", 0)
    g = torch.Generator().manual_seed(8)
    batches = [torch.randn(6, 3, 9, 9, generator=g) for _ in range(4)]
    targets = [torch.randint(0, 7, (6,), generator=g) for _ in range(4)]
    results = [None] * 4

    def work(k):
        for _ in range(25):
            x = batches[k].clone() if inplace else batches[k]
            results[k] = ops.mixup(x, targets[k], 0.3, num_classes=7, inplace=inplace)

    with cpu_backend("numba"):
        workers = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    for k in range(4):
        ref, ref_soft = R.mix_reference(batches[k], targets[k], 0.3, num_classes=7)
        assert_close_ulp(results[k][0], ref, 8.0, torch.float32)
        torch.testing.assert_close(results[k][1], ref_soft)


def test_two_thread_and_one_thread_results_are_bitwise_equal(monkeypatch):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(9, 3, 8, 8, generator=g).to(torch.bfloat16)
    lam = torch.rand(9, generator=g)
    monkeypatch.setattr(cpu_kernel, "PARALLEL_MIN_BYTES", 0)
    results = []
    before = torch.get_num_threads()
    for n in (1, 2):
        torch.set_num_threads(n)
        with cpu_backend("numba"):
            results.append(ops.mixup(x, None, lam, mean=(0.1, 0.2, 0.3), std=(1.0, 2.0, 3.0))[0])
    torch.set_num_threads(before)
    assert torch.equal(results[0], results[1])


def test_without_numba_falls_back_to_eager_with_one_warning(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "available", lambda: False)
    monkeypatch.setattr(ops, "_WARNED_NO_NUMBA", False)
    x = torch.randn(4, 3)
    with cpu_backend("numba"):
        with pytest.warns(RuntimeWarning, match="numba is not installed"):
            out, _ = ops.mixup(x, None, 0.25)
        ops.mixup(x, None, 0.25)  # no second warning: pytest's "error" filter would not be needed
    torch.testing.assert_close(out, R.mix_reference(x, None, 0.25)[0].float())


# --------------------------------------------------------------------------------------------------
# The on-disk cache: a second process loads, it does not compile
# --------------------------------------------------------------------------------------------------
def test_second_process_loads_the_kernel_from_the_cache():
    with cpu_backend("numba"):
        ops.mixup(torch.randn(3, 2, 4), torch.arange(3), 0.5, num_classes=3)  # compiled (or loaded) here
    script = textwrap.dedent("""
        import torch
        from mixrecipe import cpu_kernel, ops
        from mixrecipe.backend import cpu_backend
        with cpu_backend("numba"):
            ops.mixup(torch.randn(3, 2, 4), torch.arange(3), 0.5, num_classes=3)
        print(*cpu_kernel.cache_stats())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    hits, misses = (int(v) for v in done.stdout.split()[-2:])
    assert hits >= 1 and misses == 0, done.stdout


@pytest.mark.parametrize("bad", [float("nan"), 1.5, -0.25])
def test_per_sample_weights_are_range_checked_before_anything_is_written(threads, bad):
    """A (B,) lam outside [0, 1] (or NaN) is refused by the launch (every team member checks the weights
    before it writes) with the checks module's message; the loss's numba rows refuse it the same way."""
    x = torch.randn(5, 2, 3, 3)
    before = x.clone()
    lam = torch.tensor([0.1, 0.2, bad, 0.4, 0.5])
    with pytest.raises(ValueError, match=r"lam_x must lie in \[0, 1\]; got values from"):
        ops.mixup(x, torch.arange(5), lam, num_classes=5, inplace=True)
    assert torch.equal(x, before)
    with pytest.raises(ValueError, match=r"lam_y must lie in \[0, 1\]"):
        ops.mix(x, torch.arange(5), 0.5, lam, num_classes=5, inplace=True)
    assert torch.equal(x, before)
    from mixrecipe.loss import mixup_cross_entropy

    with pytest.raises(ValueError, match=r"lam must lie in \[0, 1\]"):
        mixup_cross_entropy(torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0]), lam)
