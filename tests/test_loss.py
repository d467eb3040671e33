"""Tests of mixrecipe.loss and its Triton kernels (run through the interpreter when there is no GPU)."""

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from mixrecipe.backend import cpu_backend
from mixrecipe.kernels.cross_entropy import mixup_ce_bwd, mixup_ce_fwd
from mixrecipe.loss import SoftTargetCrossEntropy, mixup_cross_entropy
from mixrecipe.reference import flip_perm, mixup_target_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (rtol, atol) against the float64 reference. The loss is always computed and returned in fp32 from the
# exactly upcast logits, so only the gradient's tolerance depends on the logits' dtype: half an ulp of
# round-to-nearest (2**-11 for fp16, 2**-8 for bf16, relative), which also catches the interpreter's
# truncating fp32 -> bf16 cast (up to a whole ulp) if the kernel's hand rounding were lost.
LOSS_TOL = (2e-6, 2e-6)
GRAD_TOL = {
    torch.float32: (1e-5, 1e-7),
    torch.float16: (5e-4, 1e-6),
    torch.bfloat16: (4e-3, 1e-6),
}


# ----------------------------------------------------------------------------------------------------------
# PyTorch reference: dense soft targets from mixrecipe.reference, soft-target CE, all in float64
# ----------------------------------------------------------------------------------------------------------


def dense_reference(logits, target, lam, perm=None, smoothing=0.0, reduction="mean", weights=None):
    """(loss, d loss / d logits) in float64, through the (B, K) target matrix and autograd."""
    num_classes = logits.shape[1]
    y = mixup_target_reference(target.cpu(), num_classes, _cpu(lam), _cpu(perm), smoothing).double()
    x = logits.detach().cpu().double().requires_grad_()
    rows = -(y * torch.log_softmax(x, dim=-1)).sum(-1)
    loss = {"mean": rows.mean, "sum": rows.sum, "none": lambda: rows}[reduction]()
    upstream = loss if weights is None else (loss * weights.cpu().double()).sum()
    upstream.backward(torch.ones_like(upstream))
    return loss.detach(), x.grad


def _cpu(value):
    return value.cpu() if isinstance(value, torch.Tensor) else value


def run_loss(logits, target, lam, perm=None, smoothing=0.0, reduction="mean", weights=None):
    """(loss, gradient) from mixup_cross_entropy through autograd."""
    x = logits.detach().clone().requires_grad_()
    loss = mixup_cross_entropy(x, target, lam, perm, label_smoothing=smoothing, reduction=reduction)
    upstream = loss if weights is None else (loss * weights).sum()
    upstream.backward(torch.ones_like(upstream))
    return loss.detach(), x.grad


def assert_matches(actual, expected, dtype):
    loss, grad = actual
    ref_loss, ref_grad = expected
    assert loss.dtype == torch.float32
    assert grad.dtype == dtype
    torch.testing.assert_close(loss.cpu().double(), ref_loss, rtol=LOSS_TOL[0], atol=LOSS_TOL[1])
    rtol, atol = GRAD_TOL[dtype]
    torch.testing.assert_close(grad.cpu().double(), ref_grad, rtol=rtol, atol=atol)


def make_batch(batch, classes, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(batch, classes, generator=gen)).to(device=device, dtype=dtype)
    target = torch.randint(0, classes, (batch,), generator=gen).to(device)
    return logits, target, gen


def make_lam(kind, batch, gen, device):
    if kind == "float":
        return 0.3
    if kind == "tensor0d":
        return torch.tensor(0.65, device=device)
    return torch.rand(batch, generator=gen).to(device)


def make_perm(kind, batch, gen, device):
    if kind == "flip":
        return None
    if kind == "identity":
        return torch.arange(batch, device=device)
    return torch.randperm(batch, generator=gen).to(device)


# ----------------------------------------------------------------------------------------------------------
# Value and gradient against the reference
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("perm_kind", ["flip", "random", "identity"])
@pytest.mark.parametrize("lam_kind", ["float", "tensor0d", "per_sample"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_dense_reference(backend, dtype, lam_kind, perm_kind, smoothing):
    device = backend.device
    logits, target, gen = make_batch(7, 37, dtype, device)
    lam = make_lam(lam_kind, 7, gen, device)
    perm = make_perm(perm_kind, 7, gen, device)
    actual = run_loss(logits, target, lam, perm, smoothing)
    assert_matches(actual, dense_reference(logits, target, lam, perm, smoothing), dtype)


@pytest.mark.parametrize("batch, classes", [(1, 2), (1, 37), (2, 5), (7, 2), (6, 130), (3, 1)])
def test_weird_shapes(backend, batch, classes):
    device = backend.device
    logits, target, gen = make_batch(batch, classes, torch.float32, device, seed=batch * 1000 + classes)
    lam = torch.rand(batch, generator=gen).to(device)
    actual = run_loss(logits, target, lam, smoothing=0.1)
    assert_matches(actual, dense_reference(logits, target, lam, None, 0.1), torch.float32)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_upstream_gradient(backend, reduction):
    device = backend.device
    # Non-uniform upstream weights check that each row's gradient is scaled by its own grad_output.
    logits, target, gen = make_batch(5, 19, torch.float32, device)
    lam, perm = torch.rand(5, generator=gen).to(device), torch.randperm(5, generator=gen).to(device)
    weights = torch.rand(5, generator=gen).to(device) if reduction == "none" else None
    actual = run_loss(logits, target, lam, perm, 0.1, reduction, weights)
    expected = dense_reference(logits, target, lam, perm, 0.1, reduction, weights)
    assert actual[0].shape == ((5,) if reduction == "none" else ())
    assert_matches(actual, expected, torch.float32)


def test_strided_logits(backend):
    device = backend.device
    # A column slice (row stride > K) and a transposed (column-major) view must read the right logits.
    base, _, gen = make_batch(6, 50, torch.float32, device)
    target = torch.randint(0, 37, (6,), generator=gen).to(device)
    lam = torch.rand(6, generator=gen).to(device)
    for logits in (base[:, 3:40], base[:, :37].t().contiguous().t()):
        assert not logits.is_contiguous()
        actual = run_loss(logits, target, lam, smoothing=0.1)
        assert_matches(actual, dense_reference(logits, target, lam, None, 0.1), torch.float32)


def test_lam_one_and_zero_are_plain_cross_entropy(backend):
    device = backend.device
    logits, target, gen = make_batch(5, 11, torch.float32, device)
    perm = torch.randperm(5, generator=gen).to(device)
    own = mixup_cross_entropy(logits, target, 1.0, perm, label_smoothing=0.1)
    partner = mixup_cross_entropy(logits, target, 0.0, perm)
    torch.testing.assert_close(own, F.cross_entropy(logits, target, label_smoothing=0.1))
    torch.testing.assert_close(partner, F.cross_entropy(logits, target[perm]))


def test_float64_gradcheck():
    # fp64 logits keep fp64 math on the eager path, precise enough for finite differences.
    logits, target, gen = make_batch(4, 6, torch.float64, "cpu")
    lam, perm = torch.rand(4, generator=gen, dtype=torch.float64), torch.randperm(4, generator=gen)
    fn = lambda x: mixup_cross_entropy(x, target, lam, perm, label_smoothing=0.1, reduction="none")
    assert torch.autograd.gradcheck(fn, (logits.requires_grad_(),))


# ----------------------------------------------------------------------------------------------------------
# Equality with timm
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("batch", [6, 7])
def test_equals_timm_with_flip_pairing(batch, smoothing):
    timm_loss = pytest.importorskip("timm.loss")
    timm_mixup = pytest.importorskip("timm.data.mixup")
    logits, target, _ = make_batch(batch, 23, torch.float32, "cpu")
    x_timm = logits.clone().requires_grad_()
    soft = timm_mixup.mixup_target(target, 23, lam=0.37, smoothing=smoothing)
    expected = timm_loss.SoftTargetCrossEntropy()(x_timm, soft)
    expected.backward()
    loss, grad = run_loss(logits, target, 0.37, None, smoothing)
    torch.testing.assert_close(loss, expected.detach(), rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(grad, x_timm.grad, rtol=1e-5, atol=1e-7)


def test_soft_target_cross_entropy_is_timms_bitwise():
    timm_loss = pytest.importorskip("timm.loss")
    logits, target, _ = make_batch(5, 13, torch.float32, "cpu")
    soft = mixup_target_reference(target, 13, 0.8, None, 0.1)
    ours_x, timm_x = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = SoftTargetCrossEntropy()(ours_x, soft)
    theirs = timm_loss.SoftTargetCrossEntropy()(timm_x, soft)
    ours.backward()
    theirs.backward()
    assert torch.equal(ours, theirs)
    assert torch.equal(ours_x.grad, timm_x.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_soft_target_cross_entropy_half_logits_in_fp32(dtype):
    logits, target, gen = make_batch(5, 13, dtype, "cpu")
    lam = torch.rand(5, generator=gen)
    soft = mixup_target_reference(target, 13, lam, None, 0.1)
    loss = SoftTargetCrossEntropy()(logits, soft)
    assert loss.dtype == torch.float32
    expected, _ = dense_reference(logits, target, lam, None, 0.1)
    torch.testing.assert_close(loss.double(), expected, rtol=2e-6, atol=2e-6)
    # ...and it agrees with the target-free loss on the same mixed targets.
    torch.testing.assert_close(loss, mixup_cross_entropy(logits, target, lam, label_smoothing=0.1))


def test_soft_target_cross_entropy_integer_targets_and_reduction():
    logits, target, _ = make_batch(5, 13, torch.float32, "cpu")
    torch.testing.assert_close(SoftTargetCrossEntropy()(logits, target), F.cross_entropy(logits, target))
    rows = SoftTargetCrossEntropy(reduction="none")(logits, F.one_hot(target, 13).float())
    torch.testing.assert_close(rows, F.cross_entropy(logits, target, reduction="none"))


# ----------------------------------------------------------------------------------------------------------
# The kernels themselves: several K chunks per row, every output written, out-of-range indices
# ----------------------------------------------------------------------------------------------------------


def kernel_run(logits, target, lam, perm, smoothing, block_k):
    """Launch forward and backward (upstream gradient 1 per row) into NaN-poisoned buffers."""
    batch = logits.shape[0]
    poison = dict(dtype=torch.float32, device=logits.device)
    loss, lse = torch.full((batch,), math.nan, **poison), torch.full((batch,), math.nan, **poison)
    grad = torch.full_like(logits, math.nan)
    mixup_ce_fwd(logits, target, lam, perm, smoothing, block_k=block_k, loss=loss, lse=lse)
    ones = torch.ones(batch, **poison)
    mixup_ce_bwd(ones, logits, lse, target, lam, perm, smoothing, block_k=block_k, grad=grad)
    return loss, lse, grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("classes", [5, 16, 37])  # below, equal to, not a multiple of the block
def test_kernel_chunks_and_writes_everything(triton_device, dtype, classes):
    device = triton_device
    logits, target, gen = make_batch(3, classes, dtype, device)
    lam = torch.rand(3, generator=gen).to(device)
    perm = torch.tensor([2, 2, 0], device=device)  # not a permutation: the kernel only gathers
    loss, lse, grad = kernel_run(logits, target, lam, perm, 0.1, block_k=16)
    ref_loss, ref_grad = dense_reference(logits, target, lam, perm, 0.1, reduction="none")
    ref_lse = torch.logsumexp(logits.cpu().double(), 1)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, rtol=2e-6, atol=0)
    assert_matches((loss, grad), (ref_loss, ref_grad), dtype)


def test_kernel_is_deterministic(triton_device):
    device = triton_device
    logits, target, gen = make_batch(4, 37, torch.bfloat16, device)
    lam = torch.rand(4, generator=gen).to(device)
    first = kernel_run(logits, target, lam, None, 0.1, block_k=16)
    second = kernel_run(logits, target, lam, None, 0.1, block_k=16)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_kernel_out_of_range_indices_give_nan_not_garbage(triton_device):
    device = triton_device
    # On CUDA the wrapper does not check index values (that would sync): the kernel must not read out
    # of bounds and must flag the row instead.
    logits, target, _ = make_batch(4, 9, torch.float32, device)
    bad_target = target.clone()
    bad_target[1] = 9
    bad_perm = torch.tensor([3, 2, 7, 0], device=device)
    lam = torch.full((4,), 0.5, device=device)
    loss, _, grad = kernel_run(logits, bad_target, lam, None, 0.0, block_k=16)
    assert torch.isnan(loss[[1, 2]]).all() and torch.isfinite(loss[[0, 3]]).all()  # row 2 pairs with 1
    assert torch.isnan(grad[1]).all() and torch.isfinite(grad[0]).all()
    # The target sits in a longer buffer of valid classes, so an unmasked read past row 3 would succeed.
    padded = torch.cat([target, torch.zeros(8, dtype=target.dtype, device=device)])[:4]
    loss, _, _ = kernel_run(logits, padded, lam, bad_perm, 0.0, block_k=16)
    assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3]]).all()


# ----------------------------------------------------------------------------------------------------------
# torch.compile and the op registration
# ----------------------------------------------------------------------------------------------------------


def test_torch_compile_fullgraph_matches_eager():
    # One compile only: the first inductor compile costs ~11 s on the CI machine.
    logits, target, gen = make_batch(6, 21, torch.float32, "cpu")
    lam, perm = torch.rand(6, generator=gen), torch.randperm(6, generator=gen)

    def step(x):
        return mixup_cross_entropy(x * 2.0, target, lam, perm, label_smoothing=0.1) + x.square().mean()

    compiled = torch.compile(step, fullgraph=True)
    x_eager, x_comp = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    eager, comp = step(x_eager), compiled(x_comp)
    eager.backward()
    comp.backward()
    torch.testing.assert_close(comp, eager)
    torch.testing.assert_close(x_comp.grad, x_eager.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_eager_and_kernel_rows_agree(triton_device, dtype):
    # Both implementations of the op return the per-row loss and the logsumexp the backward reads.
    logits, target, gen = make_batch(5, 37, dtype, "cpu")
    lam, perm = torch.rand(5, generator=gen), torch.randperm(5, generator=gen)
    rows_op = torch.ops.mixrecipe.mixup_cross_entropy_rows
    with cpu_backend("eager"):
        eager = rows_op(logits, target, lam, perm, 0.1)
    on_kernel = [t.to(triton_device) for t in (logits, target, lam, perm)]
    with cpu_backend("triton") if triton_device == "cpu" else contextlib.nullcontext():
        kernel = rows_op(*on_kernel, 0.1)
    torch.testing.assert_close(eager[1], torch.logsumexp(logits.float(), 1), rtol=1e-6, atol=1e-6)
    for ours, theirs in zip(eager, kernel):
        torch.testing.assert_close(ours, theirs.cpu(), rtol=1e-6, atol=1e-6)


def test_custom_op_registration():
    logits, target, gen = make_batch(3, 7, torch.float32, "cpu")
    lam = torch.rand(3, generator=gen)
    args = (logits.requires_grad_(), target, lam, flip_perm(3), 0.1)
    torch.library.opcheck(torch.ops.mixrecipe.mixup_cross_entropy_rows.default, args)


# ----------------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument
# ----------------------------------------------------------------------------------------------------------

_X = torch.randn(4, 5)
_T = torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(logits=torch.randn(4)), ValueError, "logits"),
        (dict(logits=torch.randn(4, 5, 2)), ValueError, "logits"),
        (dict(logits=torch.ones(4, 5, dtype=torch.int64)), TypeError, "logits"),
        (dict(logits=_X.numpy()), TypeError, "logits"),
        (dict(target=torch.tensor([0, 1, 2])), ValueError, "target"),
        (dict(target=torch.tensor([0, 1, 2, 5])), ValueError, "target"),
        (dict(target=torch.tensor([0, -1, 2, 3])), ValueError, "target"),
        (dict(target=torch.rand(4, 5)), TypeError, "SoftTargetCrossEntropy"),
        (dict(lam=torch.rand(3)), ValueError, "lam"),
        (dict(lam=torch.rand(4, 1)), ValueError, "lam"),
        (dict(lam=1.5), ValueError, "lam"),
        (dict(lam=-0.1), ValueError, "lam"),
        (dict(lam=math.nan), ValueError, "lam"),
        (dict(lam=torch.tensor([0.1, 0.2, 1.2, 0.3])), ValueError, "lam"),
        (dict(lam="0.5"), TypeError, "lam"),
        (dict(perm=torch.tensor([0, 1, 2])), ValueError, "perm"),
        (dict(perm=torch.tensor([0, 1, 2, 4])), ValueError, "perm"),
        (dict(perm=torch.tensor([0.0, 1.0, 2.0, 3.0])), TypeError, "perm"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        (dict(reduction="avg"), ValueError, "reduction"),
    ],
)
def test_bad_input(kwargs, error, match):
    call = dict(logits=_X, target=_T, lam=0.5, perm=None, label_smoothing=0.0, reduction="mean")
    call.update(kwargs)
    with pytest.raises(error, match=match):
        mixup_cross_entropy(**call)


def test_soft_target_cross_entropy_bad_input():
    with pytest.raises(ValueError, match="target"):
        SoftTargetCrossEntropy()(_X, torch.rand(4, 6))
    with pytest.raises(ValueError, match="reduction"):
        SoftTargetCrossEntropy(reduction="avg")


# ----------------------------------------------------------------------------------------------------------
# The numba rows on CPU (small float32 logits) against the eager path and the float64 reference
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch, classes", [(1, 1), (3, 2), (128, 10), (33, 100), (64, 512)])
@pytest.mark.parametrize("perm_kind", ["flip", "random"])
def test_cpu_kernel_rows_match_the_reference_and_the_eager_path(batch, classes, perm_kind):
    """Logits spread over +-90 so that exp underflows for most classes and the kernel's own exp is used over
    its whole range; loss and gradient within float32 rounding of the float64 reference."""
    from mixrecipe.loss import CPU_KERNEL_MAX_ELEMS

    assert batch * classes <= CPU_KERNEL_MAX_ELEMS
    gen = torch.Generator().manual_seed(batch + classes)
    logits = (torch.rand(batch, classes, generator=gen) * 180 - 90).float()
    target = torch.randint(0, classes, (batch,), generator=gen)
    lam = torch.rand(batch, generator=gen)
    perm = make_perm(perm_kind, batch, gen, "cpu")
    ref = dense_reference(logits, target, lam, perm, 0.1, "none")
    got = run_loss(logits, target, lam, perm, 0.1, reduction="none")
    with cpu_backend("eager"):
        eager = run_loss(logits, target, lam, perm, 0.1, reduction="none")
    for actual in (got, eager):
        torch.testing.assert_close(actual[0].double(), ref[0], rtol=1e-5, atol=1e-4)
        # The rows recompute softmax as exp(z - logsumexp) from the saved logsumexp (as the Triton kernels
        # do): its float32 rounding, |lse| * 2**-24 ~ 5e-6 here, bounds the gradient's absolute error.
        torch.testing.assert_close(actual[1].double(), ref[1], rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(eager[1].double(), ref[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grad_kind", ["expanded", "strided", "contiguous"])
def test_cpu_kernel_rows_take_upstream_gradients_and_weights_of_any_stride(grad_kind):
    """The rows read tensors by address: a mean's stride-0 gradient is one value, a strided gradient or
    lam is made contiguous first; all give the float64 reference's gradient."""
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(7, 13, generator=gen)
    target = torch.randint(0, 13, (7,), generator=gen)
    lam = torch.rand(14, generator=gen)[::2]
    upstream = {"expanded": torch.tensor(0.7).expand(7), "strided": torch.rand(14, generator=gen)[::2],
                "contiguous": torch.rand(7, generator=gen)}[grad_kind]
    x = logits.clone().requires_grad_()
    rows = mixup_cross_entropy(x, target, lam, None, label_smoothing=0.1, reduction="none")
    rows.backward(upstream)
    ref_loss, ref_grad = dense_reference(logits, target, lam, None, 0.1, "none", upstream)
    torch.testing.assert_close(rows.detach().double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


def test_cpu_kernel_rows_run_below_the_size_limit_only(monkeypatch):
    """The numba rows take float32 logits up to CPU_KERNEL_MAX_ELEMS under the "numba" backend; anything
    else runs the eager path (counted by patching both)."""
    from mixrecipe import cpu_kernel
    from mixrecipe import loss as loss_module

    calls = []
    real = cpu_kernel.ce_rows
    monkeypatch.setattr(cpu_kernel, "ce_rows", lambda *a: calls.append(a[0].shape) or real(*a))
    assert loss_module.CPU_KERNEL_MAX_ELEMS >= 1 << 18  # (256, 1000) runs the rows
    limit = 1 << 10
    monkeypatch.setattr(loss_module, "CPU_KERNEL_MAX_ELEMS", limit)
    shapes = (((4, 8), torch.float32), ((limit // 8, 8), torch.float32), ((limit // 8 + 1, 8), torch.float32),
              ((4, 8), torch.bfloat16), ((4, 8), torch.float64))
    for shape, dtype in shapes:
        logits = torch.randn(shape).to(dtype)
        mixup_cross_entropy(logits, torch.zeros(shape[0], dtype=torch.long), 0.5)
    with cpu_backend("eager"):
        mixup_cross_entropy(torch.randn(4, 8), torch.zeros(4, dtype=torch.long), 0.5)
    assert calls == [(4, 8), (limit // 8, 8)]


def test_cpu_kernel_rows_refuse_bad_class_indices_before_computing():
    logits = torch.randn(4, 6, requires_grad=True)
    for bad in (6, -1):
        with pytest.raises(ValueError, match=r"class indices from .* outside \[0, num_classes=6\)"):
            mixup_cross_entropy(logits, torch.tensor([0, 1, bad, 2]), 0.5)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_cpu_kernel_rows_treat_non_finite_logits_like_the_eager_path(value, smoothing):
    """A NaN or infinite logit gives the same loss and gradient (NaN, inf or finite) on both CPU paths: the
    kernel's exp, its running maxima and its vectorized sums keep NaN and inf."""
    results = []
    for backend in ("numba", "eager"):
        logits = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
        logits[1, 2] = value
        with cpu_backend(backend):
            results.append(run_loss(logits, torch.tensor([0, 1, 2, 3]), 0.5, None, smoothing, "none"))
    (loss, grad), (ref_loss, ref_grad) = results
    torch.testing.assert_close(loss, ref_loss, equal_nan=True, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, equal_nan=True, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(6, 10), (700, 400)])  # the numba rows, then the eager path
def test_direct_eager_call_equals_the_registered_op(shape):
    """A plain eager call runs the op's bodies through an autograd.Function (no dispatcher); forcing the
    registered op (as under a tracer) must give the same loss and gradient bitwise, and neither path may
    silently return a zero second derivative."""
    from unittest.mock import patch

    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(*shape, generator=gen)
    target = torch.randint(0, shape[1], (shape[0],), generator=gen)
    lam = torch.rand(shape[0], generator=gen)
    direct = run_loss(logits, target, lam, None, 0.1)
    with patch("mixrecipe.loss.tracing", return_value=True):
        registered = run_loss(logits, target, lam, None, 0.1)
    assert torch.equal(direct[0], registered[0]) and torch.equal(direct[1], registered[1])
    for force_op in (False, True):
        with patch("mixrecipe.loss.tracing", return_value=force_op):
            x = logits.clone().requires_grad_()
            (grad,) = torch.autograd.grad(mixup_cross_entropy(x, target, lam), x, create_graph=True)
            with pytest.raises(RuntimeError):
                grad.sum().backward()


@pytest.mark.parametrize("lam_kind", ["float", "tensor"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_a_checked_signature_skips_the_checks_but_not_the_value_checks(monkeypatch, lam_kind, reduction):
    """Numba-row calls of one signature are checked once; later ones (new values) still give the reference
    loss and gradient, still refuse bad class indices and weights, and a changed signature (an int32
    target, a partner permutation, float64 logits, a float64 weight) is checked again and computed right."""
    from mixrecipe import loss as loss_module

    monkeypatch.setattr(loss_module, "_CHECKED_CALLS", set())
    checked = []
    real = loss_module._check_logits
    monkeypatch.setattr(loss_module, "_check_logits", lambda z: (checked.append(1), real(z)))
    g = torch.Generator().manual_seed(3)

    def weights():
        return float(torch.rand((), generator=g)) if lam_kind == "float" else torch.rand(6, generator=g)

    for _ in range(3):
        logits = torch.randn(6, 7, generator=g)
        target, lam = torch.randint(0, 7, (6,), generator=g), weights()
        got = run_loss(logits, target, lam, smoothing=0.1, reduction=reduction)
        want = dense_reference(logits, target, lam, smoothing=0.1, reduction=reduction)
        for a, b in zip(got, want):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)
    assert len(checked) == 1
    with pytest.raises(ValueError, match=r"class indices from .* outside \[0, num_classes=7\)"):
        mixup_cross_entropy(logits, torch.tensor([0, 1, 7, 2, 3, 4]), weights(), reduction=reduction,
                            label_smoothing=0.1)
    bad = 1.5 if lam_kind == "float" else torch.tensor([0.5, 0.5, float("nan"), 0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="lam must lie in"):
        mixup_cross_entropy(logits, target, bad, reduction=reduction, label_smoothing=0.1)
    perm = torch.randperm(6, generator=g)
    lam = weights()
    for z, t, p, w in ((logits, target.int(), None, lam), (logits, target, perm, lam),
                       (logits.double(), target, None, lam),
                       (logits, target, None, lam.double() if isinstance(lam, torch.Tensor) else lam)):
        for _ in range(2):  # the second call of a signature may take the shortcut
            got = run_loss(z, t, w, p, smoothing=0.1, reduction=reduction)
            want = dense_reference(z, t.long(), w, p, smoothing=0.1, reduction=reduction)
            for a, b in zip(got, want):
                torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)
