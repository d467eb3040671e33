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


def test_int32_class_and_partner_indices(backend):
    device = backend.device
    logits, target, gen = make_batch(7, 13, torch.float32, device)
    lam, perm = torch.rand(7, generator=gen).to(device), torch.randperm(7, generator=gen).to(device)
    actual = run_loss(logits, target.int(), lam, perm.int(), 0.1)
    assert_matches(actual, dense_reference(logits, target, lam, perm, 0.1), torch.float32)


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


def kernel_run(logits, target, lam, perm, smoothing, block_k, grad_loss=None, grad_scale=1.0):
    """Launch forward and backward (upstream gradient 1 per row unless given) into NaN-poisoned buffers."""
    batch = logits.shape[0]
    poison = dict(dtype=torch.float32, device=logits.device)
    loss, lse = torch.full((batch,), math.nan, **poison), torch.full((batch,), math.nan, **poison)
    grad = torch.full_like(logits, math.nan)
    mixup_ce_fwd(logits, target, lam, perm, smoothing, block_k=block_k, loss=loss, lse=lse)
    grad_loss = torch.ones(batch, **poison) if grad_loss is None else grad_loss
    mixup_ce_bwd(grad_loss, logits, lse, target, lam, perm, smoothing, grad_scale, block_k=block_k, grad=grad)
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


@pytest.mark.parametrize("lam_kind", ["float", "0-d", "strided"])
def test_kernel_lam_kinds_and_a_reduced_losss_gradient(triton_device, lam_kind):
    """lam as a kernel scalar, a 0-d tensor (stride 0) or a strided (B,) tensor of another dtype; the
    upstream gradient as one 0-d value scaled by 1/B (a mean's), read with stride 0."""
    device = triton_device
    logits, target, gen = make_batch(5, 37, torch.float32, device)
    lam = {"float": 0.3, "0-d": torch.tensor(0.3, device=device),
           "strided": torch.rand(10, generator=gen, dtype=torch.float64).to(device)[::2]}[lam_kind]
    mean_grad = torch.tensor(2.0, device=device)
    loss, _, grad = kernel_run(logits, target, lam, None, 0.1, 16, grad_loss=mean_grad, grad_scale=1 / 5)
    ref_loss, ref_grad = dense_reference(logits, target, lam, None, 0.1)
    torch.testing.assert_close(loss.mean().double(), ref_loss, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(grad.double().cpu(), 2.0 * ref_grad, rtol=1e-5, atol=1e-7)


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
    assert torch.isnan(grad[[1, 2]]).all() and torch.isfinite(grad[[0, 3]]).all()
    # The target sits in a longer buffer of valid classes, so an unmasked read past row 3 would succeed.
    padded = torch.cat([target, torch.zeros(8, dtype=target.dtype, device=device)])[:4]
    for bad in (bad_perm, torch.tensor([3, 2, -2, 0], device=device)):
        loss, _, grad = kernel_run(logits, padded, lam, bad, 0.0, block_k=16)
        assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3]]).all()
        assert torch.isnan(grad[2]).all() and torch.isfinite(grad[[0, 1, 3]]).all()


def test_unchecked_bad_indices_through_the_api_give_nan_rows(triton_device):
    """Where values cannot be inspected (CUDA: a read would sync), mixup_cross_entropy passes the indices
    to the kernels unchecked: the rows holding a bad class or partner index get a NaN loss and gradient."""
    from unittest.mock import patch

    device = triton_device
    logits, target, _ = make_batch(6, 9, torch.float32, device)
    target[1] = 12
    perm = torch.tensor([5, 4, 3, 2, 1, 9], device=device)
    x = logits.clone().requires_grad_()
    on_kernel = cpu_backend("triton") if device == "cpu" else contextlib.nullcontext()
    with on_kernel, patch("mixrecipe.checks.can_inspect", return_value=False):
        loss = mixup_cross_entropy(x, target, 0.6, perm, label_smoothing=0.1, reduction="none")
        loss.sum().backward()
    bad = torch.tensor([False, True, False, False, True, True])  # row 4 pairs with row 1
    assert loss.isnan().cpu().equal(bad)
    assert x.grad.isnan().all(1).cpu().equal(bad) and not x.grad[~bad.to(device)].isnan().any()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf - inf
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_kernel_treats_non_finite_logits_like_the_eager_path(triton_device, value, smoothing):
    """A NaN or infinite logit gives the same loss and gradient (NaN, inf or finite) from the kernels as
    from the CPU path: the online logsumexp and the row sum keep NaN and inf as log_softmax does."""
    logits = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    logits[1, 2] = value
    target = torch.tensor([0, 1, 2, 3])
    eager = run_loss(logits, target, 0.5, None, smoothing, "none")
    on_kernel = cpu_backend("triton") if triton_device == "cpu" else contextlib.nullcontext()
    with on_kernel:
        kernel = run_loss(logits.to(triton_device), target.to(triton_device), 0.5, None, smoothing, "none")
    for ours, theirs in zip(kernel, eager):
        torch.testing.assert_close(ours.cpu(), theirs, equal_nan=True, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# CPU: values checked on every call
# ----------------------------------------------------------------------------------------------------------


def test_cpu_values_are_checked_on_every_call():
    """Calls of one signature keep checking: a bad class index, lam or perm after good calls is refused."""
    logits, target, gen = make_batch(6, 7, torch.float32, "cpu")
    lam = torch.rand(6, generator=gen)
    for _ in range(3):
        mixup_cross_entropy(logits, target, lam)
        mixup_cross_entropy(logits, target, 0.4)
    with pytest.raises(ValueError, match=r"class indices from .* outside \[0, num_classes=7\)"):
        mixup_cross_entropy(logits, torch.tensor([0, 1, 7, 2, 3, 4]), lam)
    with pytest.raises(ValueError, match="lam must lie in"):
        mixup_cross_entropy(logits, target, torch.tensor([0.5, 0.5, math.nan, 0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="perm must be a permutation"):
        mixup_cross_entropy(logits, target, 0.4, torch.tensor([0, 1, 2, 3, 4, 4]))


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
def test_eager_and_kernel_bodies_agree(triton_device, dtype):
    # Both implementations of the op return the loss and the logsumexp the backward reads.
    logits, target, gen = make_batch(5, 37, dtype, "cpu")
    lam, perm = torch.rand(5, generator=gen), torch.randperm(5, generator=gen)
    op = torch.ops.mixrecipe.mixup_cross_entropy
    for reduction in ("none", "mean"):
        with cpu_backend("eager"):
            eager = op(logits, target, lam, 0.0, perm, 0.1, reduction)
        on_kernel = [t.to(triton_device) for t in (logits, target, lam, perm)]
        with cpu_backend("triton") if triton_device == "cpu" else contextlib.nullcontext():
            kernel = op(*on_kernel[:3], 0.0, on_kernel[3], 0.1, reduction)
        torch.testing.assert_close(eager[1], torch.logsumexp(logits.float(), 1), rtol=1e-6, atol=1e-6)
        for ours, theirs in zip(eager, kernel):
            torch.testing.assert_close(ours, theirs.cpu(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("lam_kind", ["float", "tensor"])
def test_custom_op_registration(lam_kind, reduction):
    logits, target, gen = make_batch(3, 7, torch.float32, "cpu")
    lam, lam_value = (None, 0.3) if lam_kind == "float" else (torch.rand(3, generator=gen), 0.0)
    args = (logits.requires_grad_(), target, lam, lam_value, flip_perm(3), 0.1, reduction)
    torch.library.opcheck(torch.ops.mixrecipe.mixup_cross_entropy.default, args)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_direct_eager_call_equals_the_registered_op(reduction):
    """A plain eager call runs the op's bodies through an autograd.Function (no dispatcher); forcing the
    registered op (as under a tracer) must give the same loss and gradient bitwise, and neither path may
    silently return a zero second derivative."""
    from unittest.mock import patch

    logits, target, gen = make_batch(6, 10, torch.float32, "cpu")
    lam = torch.rand(6, generator=gen)
    direct = run_loss(logits, target, lam, None, 0.1, reduction)
    with patch("mixrecipe.loss.tracing", return_value=True):
        registered = run_loss(logits, target, lam, None, 0.1, reduction)
    assert torch.equal(direct[0], registered[0]) and torch.equal(direct[1], registered[1])
    for force_op in (False, True):
        with patch("mixrecipe.loss.tracing", return_value=force_op):
            x = logits.clone().requires_grad_()
            (grad,) = torch.autograd.grad(mixup_cross_entropy(x, target, lam), x, create_graph=True)
            with pytest.raises(RuntimeError):
                grad.sum().backward()


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


def test_loss_kernel_launches_are_planned_once_per_specialization(triton_device):
    """Forward and backward each keep one launch per specialization: other weights reuse it, and on a GPU
    the calls after the first run the compiled kernel directly (the interpreter has none)."""
    from mixrecipe.kernels import _common

    device = triton_device
    _common._LAUNCHES.clear()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 10, generator=g).to(device).requires_grad_()
    y = torch.randint(0, 10, (8,), generator=g).to(device)
    with cpu_backend("triton") if device == "cpu" else contextlib.nullcontext():
        for lam in (0.3, 0.7, 0.9):
            loss = mixup_cross_entropy(logits, y, lam, label_smoothing=0.1)
            want = SoftTargetCrossEntropy()(logits, mixup_target_reference(y, 10, lam, label_smoothing=0.1))
            torch.testing.assert_close(loss, want)
            loss.backward()
    assert len(_common._LAUNCHES) == 2  # the forward and the backward
    assert all(run.direct == (device == "cuda") for run in _common._LAUNCHES.values())
