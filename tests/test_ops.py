"""The fused mixup op and its Triton kernel against the float64 reference.

On a machine without a GPU the kernel runs through the Triton interpreter (conftest sets TRITON_INTERPRET=1),
selected with ``mixrecipe.backend.cpu_backend("triton")``; the eager CPU path is tested on the same cases.
"""

import contextlib

import pytest
import torch

from mixrecipe import ops
from mixrecipe import reference as R
from mixrecipe.backend import cpu_backend
from mixrecipe.kernels import mix_launch

HAS_CUDA = torch.cuda.is_available()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative size of one unit in the last place: a result rounded once from fp32 math is within ~1 ulp.
ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


# --------------------------------------------------------------------------------------------------
# PyTorch reference helpers
# --------------------------------------------------------------------------------------------------
def assert_matches_reference(out, ref, scale, dtype):
    """|out - ref| within ~1 ulp of the output dtype, measured against the inputs' magnitude."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert out.stride() == ref.stride() or out.is_contiguous() == ref.is_contiguous()
    diff = (out.double() - ref.double()).abs()
    bound = ULP[dtype] * (ref.double().abs() + 2 * scale) + 1e-30
    bad = diff > bound
    assert not bad.any(), f"{int(bad.sum())} elements off; worst {float(diff.max()):.3g}"


def make_case(batch, shape=(3, 5, 7), dtype=torch.float32, layout="nchw", device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *shape), generator=g).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (batch,), generator=g)
    return x.to(device), target.to(device), g


def make_lam(kind, batch, g, device):
    if kind == "scalar":
        return float(torch.rand((), generator=g))
    if kind == "tensor0d":
        return torch.rand((), generator=g)
    return torch.rand(batch, generator=g).to(device)


def make_perm(kind, batch, g, device):
    if kind == "flip":
        return None
    if kind == "identity":
        return torch.arange(batch, device=device)
    return torch.randperm(batch, generator=g).to(device)


def make_boxes(batch, height, width, g, device):
    y0 = torch.randint(0, height, (batch,), generator=g)
    x0 = torch.randint(0, width, (batch,), generator=g)
    y1 = torch.minimum(y0 + torch.randint(0, height + 1, (batch,), generator=g), torch.tensor(height))
    x1 = torch.minimum(x0 + torch.randint(0, width + 1, (batch,), generator=g), torch.tensor(width))
    return torch.stack([y0, y1, x0, x1], 1).to(device)


# --------------------------------------------------------------------------------------------------
# Correctness against float64
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 2, 3, 8])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("perm_kind", ["flip", "random", "identity"])
def test_mixup_matches_reference(backend, dtype, batch, layout, perm_kind):
    device = backend.device
    for lam_kind in ["scalar", "tensor0d", "per_sample"]:
        x, target, g = make_case(batch, dtype=dtype, layout=layout, device=device, seed=batch)
        lam = make_lam(lam_kind, batch, g, device)
        perm = make_perm(perm_kind, batch, g, device)
        out, soft = ops.mixup(x, target, lam, perm, num_classes=10, label_smoothing=0.1)
        ref, ref_soft = R.mix_reference(x, target, lam, perm=perm, num_classes=10, label_smoothing=0.1)
        assert_matches_reference(out, ref, x.double().abs().max(), dtype)
        keeps_layout = out.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
        assert keeps_layout or batch == 1
        torch.testing.assert_close(soft, ref_soft, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 4, 7])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_inplace_flip_matches_reference(backend, dtype, batch, layout):
    device = backend.device
    x, target, g = make_case(batch, dtype=dtype, layout=layout, device=device, seed=7)
    lam = torch.rand(batch, generator=g).to(device)
    ref, ref_soft = R.mix_reference(x, target, lam, num_classes=10)
    ptr = x.data_ptr()
    out, soft = ops.mixup(x, target, lam, num_classes=10, inplace=True)
    assert out is x and x.data_ptr() == ptr
    assert_matches_reference(out, ref, ref.double().abs().max() + 4, dtype)
    torch.testing.assert_close(soft, ref_soft, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("batch", [1, 3, 6])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("perm_kind", ["flip", "random"])
def test_cutmix_boxes_match_reference(backend, batch, layout, perm_kind):
    device = backend.device
    x, target, g = make_case(batch, shape=(3, 6, 9), layout=layout, device=device, seed=3)
    boxes = make_boxes(batch, 6, 9, g, device)
    perm = make_perm(perm_kind, batch, g, device)
    lam_y = R.cutmix_lam(boxes, 6, 9).float().to(device)
    one_box = tuple(boxes[0].tolist())  # four ints: scalars to the kernel, a tensor for the CPU paths
    for lam_x, box in [(1.0, boxes), (torch.rand(batch, generator=g).to(device), boxes), (1.0, boxes[0]),
                       (0.3, one_box)]:
        if isinstance(box, tuple):  # the reference takes the box it stands for
            lam_y = R.cutmix_lam(boxes[:1].expand(batch, 4), 6, 9).float().to(device)
        out, soft = ops.mix(x, target, lam_x, lam_y, perm, box, num_classes=10, label_smoothing=0.2)
        ref, ref_soft = R.mix_reference(x, target, lam_x, lam_y, perm,
                                        boxes[0] if isinstance(box, tuple) else box, num_classes=10,
                                        label_smoothing=0.2)
        assert_matches_reference(out, ref, x.abs().max().double(), torch.float32)
        torch.testing.assert_close(soft, ref_soft, rtol=1e-6, atol=1e-7)


def test_one_box_as_ints_is_the_box_as_a_tensor(backend):
    """A box of four ints (the policy's host-drawn box, the kernel's scalar path) mixes as its tensor does,
    in place too."""
    device = backend.device
    x, target, _ = make_case(5, shape=(3, 8, 8), device=device)
    want = ops.mix(x, target, 0.4, 0.7, None, torch.tensor([1, 6, 2, 5], device=device), num_classes=10)
    for box in ((1, 6, 2, 5), [1, 6, 2, 5]):
        got = ops.mix(x, target, 0.4, 0.7, None, box, num_classes=10)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        y = x.clone()
        ops.mix(y, target, 0.4, 0.7, None, box, num_classes=10, inplace=True)
        assert torch.equal(y, want[0])


def test_cutmix_box_comes_from_partner(backend):
    device = backend.device
    x, target, _ = make_case(4, shape=(2, 8, 8), device=device)
    box = torch.tensor([2, 5, 1, 7], device=device)
    out, _ = ops.mix(x, None, 1.0, None, None, box)
    flipped = x.flip(0)
    assert torch.equal(out[:, :, 2:5, 1:7], flipped[:, :, 2:5, 1:7])
    inside = torch.zeros(8, 8, dtype=torch.bool, device=device)
    inside[2:5, 1:7] = True
    assert torch.equal(out[:, :, ~inside], x[:, :, ~inside])


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("perm_kind", ["flip", "random"])
def test_uint8_normalize_fused(backend, out_dtype, layout, perm_kind):
    device = backend.device
    g = torch.Generator().manual_seed(11)
    x = torch.randint(0, 256, (5, 3, 6, 5), dtype=torch.uint8, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(device)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    lam = torch.rand(5, generator=g).to(device)
    perm = make_perm(perm_kind, 5, g, device)
    out, _ = ops.mixup(x, None, lam, perm, mean=mean, std=std, out_dtype=out_dtype)
    ref, _ = R.mix_reference(x, None, lam, perm=perm, mean=mean, std=std, out_dtype=out_dtype)
    assert_matches_reference(out, ref, 2.5, out_dtype)
    assert out.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    # Without mean/std a uint8 batch is only scaled to [0, 1].
    out, _ = ops.mixup(x, None, lam, perm, out_dtype=out_dtype)
    ref, _ = R.mix_reference(x, None, lam, perm=perm, out_dtype=out_dtype)
    assert_matches_reference(out, ref, 1.0, out_dtype)


@pytest.mark.parametrize("channels", [1, 2, 4, 5])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_normalization_any_channel_count(backend, channels, layout):
    """Up to 4 channels the kernel selects among scalar loads, beyond it gathers: both match the reference."""
    device = backend.device
    g = torch.Generator().manual_seed(channels)
    x = torch.randint(0, 256, (3, channels, 5, 7), dtype=torch.uint8, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(device)
    mean = torch.rand(channels, generator=g).tolist()
    std = (torch.rand(channels, generator=g) + 0.2).tolist()
    lam = torch.rand(3, generator=g).to(device)
    out, _ = ops.mixup(x, None, lam, mean=mean, std=std, out_dtype=torch.float32)
    ref, _ = R.mix_reference(x, None, lam, mean=mean, std=std, out_dtype=torch.float32)
    assert_matches_reference(out, ref, 4.0, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_float_input_with_normalization_and_out_dtype(backend, dtype):
    device = backend.device
    x, target, g = make_case(4, shape=(3, 4, 4), dtype=dtype, device=device)
    mean = torch.tensor([0.1, 0.2, 0.3], device=device)
    std = torch.tensor([1.5, 0.5, 2.0], device=device)
    out, _ = ops.mixup(x, None, 0.3, mean=mean, std=std, out_dtype=torch.float32)
    ref, _ = R.mix_reference(x, None, 0.3, mean=mean, std=std, out_dtype=torch.float32)
    assert_matches_reference(out, ref, 8.0, torch.float32)


@pytest.mark.parametrize("shape", [(17,), (3, 100, 70), (1, 1, 1), (2, 130, 129)])
def test_odd_shapes_and_multiple_blocks(backend, shape):
    """Sizes below, equal to and not a multiple of the block; 2-D (B, F) batches; several blocks per row."""
    device = backend.device
    for batch in (1, 3):
        x, target, g = make_case(batch, shape=shape, device=device)
        lam = torch.rand(batch, generator=g).to(device)
        out, soft = ops.mixup(x, target, lam, num_classes=10)
        ref, ref_soft = R.mix_reference(x, target, lam, num_classes=10)
        assert_matches_reference(out, ref, x.abs().max().double(), torch.float32)
        torch.testing.assert_close(soft, ref_soft)


@pytest.mark.parametrize("num_classes", [1, 10, 1000, 20000])
def test_soft_targets_index_and_dense(backend, num_classes):
    device = backend.device
    g = torch.Generator().manual_seed(num_classes)
    for batch in (1, 5):
        target = torch.randint(0, num_classes, (batch,), generator=g).to(device)
        lam = torch.rand(batch, generator=g).to(device)
        perm = torch.randperm(batch, generator=g).to(device)
        for p in (None, perm):
            soft = ops.mixup_target(target, num_classes, lam, p, label_smoothing=0.1)
            ref = R.mixup_target_reference(target, num_classes, lam, p, label_smoothing=0.1)
            torch.testing.assert_close(soft, ref, rtol=1e-6, atol=1e-7)
            assert torch.allclose(soft.sum(1), torch.ones(batch, device=device))
        dense = torch.softmax(torch.randn(batch, num_classes, generator=g), 1).to(device, torch.bfloat16)
        soft = ops.mixup_target(dense, None, lam, perm, label_smoothing=0.05)
        ref = R.mixup_target_reference(dense, num_classes, lam, perm, label_smoothing=0.05)
        torch.testing.assert_close(soft, ref, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# Exact identities, determinism, poison, NaN
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_identities(backend, dtype):
    device = backend.device
    x, target, g = make_case(5, dtype=dtype, device=device)
    perm = torch.randperm(5, generator=g).to(device)
    for p in (None, perm):
        partner = x.flip(0) if p is None else x[p]
        assert torch.equal(ops.mixup(x, None, 1.0, p)[0], x)
        assert torch.equal(ops.mixup(x, None, 0.0, p)[0], partner)
        lam = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0], device=device)
        expect = torch.where(lam.view(-1, 1, 1, 1) == 1, x, partner)
        assert torch.equal(ops.mixup(x, None, lam, p)[0], expect)
    y = x.clone()
    ops.mixup(y, None, 1.0, inplace=True)
    assert torch.equal(y, x)


def test_bitwise_deterministic(backend):
    device = backend.device
    x, target, g = make_case(6, shape=(3, 9, 9), dtype=torch.bfloat16, device=device)
    lam = torch.rand(6, generator=g).to(device)
    boxes = make_boxes(6, 9, 9, g, device)
    a = ops.mix(x, target, lam, lam, None, boxes, num_classes=10, label_smoothing=0.1)
    b = ops.mix(x, target, lam, lam, None, boxes, num_classes=10, label_smoothing=0.1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("paired", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_writes_every_element(triton_device, paired, dtype):
    """Poison the outputs with NaN, launch the kernel directly, and check every element was written."""
    device = triton_device
    x, target, g = make_case(5, shape=(3, 7, 11), dtype=dtype, device=device)
    out = torch.full_like(x, float("nan"))
    soft = torch.full((5, 13), float("nan"), device=device)
    perm = None if paired else torch.randperm(5, generator=g).to(device)
    lam = torch.rand(5, generator=g).to(device)
    mix_launch(x, out, target, soft, batch_size=5, perm=perm, lam_x=lam, lam_y=lam, box=None, mean=None,
               std=None, in_scale=1.0, label_off=0.0, label_keep=1.0)
    assert not out.isnan().any() and not soft.isnan().any()
    ref, ref_soft = R.mix_reference(x, target, lam, perm=perm, num_classes=13)
    assert_matches_reference(out, ref, x.abs().max().double(), dtype)
    torch.testing.assert_close(soft, ref_soft)


def test_kernel_poisons_rows_with_bad_indices_instead_of_reading_out_of_bounds(triton_device):
    """What the kernel does where the op cannot check on the host (CUDA): NaN rows, never garbage."""
    device = triton_device
    x, target, _ = make_case(4, shape=(2, 3, 3), device=device)
    target[1] = 99
    perm = torch.tensor([1, 0, 7, 2], device=device)
    out = torch.empty_like(x)
    soft = torch.empty(4, 10, device=device)
    mix_launch(x, out, target, soft, batch_size=4, perm=perm, lam_x=0.5, lam_y=0.5, box=None, mean=None,
               std=None, in_scale=1.0, label_off=0.0, label_keep=1.0)
    assert out[2].isnan().all() and not out[[0, 1, 3]].isnan().any()
    assert soft[[0, 1, 2]].isnan().all() and not soft[3].isnan().any()  # rows 0, 1 touch class 99


@pytest.mark.parametrize("paired", [True, False])
def test_kernel_poisons_rows_whose_device_weight_is_out_of_range(triton_device, paired):
    """A (B,) or one-value weight on the device is checked by the kernel as it reads it (on CUDA reading it
    on the host would cost a synchronization): a weight outside [0, 1] or NaN makes its row NaN, pixels and
    labels, and leaves the other rows exact."""
    device = triton_device
    x, target, _ = make_case(4, shape=(2, 3, 3), device=device)
    perm = None if paired else torch.tensor([1, 0, 3, 2], device=device)
    lam = torch.tensor([0.5, 1.5, 0.25, float("nan")], device=device)
    out, soft = torch.empty_like(x), torch.empty(4, 10, device=device)
    mix_launch(x, out, target, soft, batch_size=4, perm=perm, lam_x=lam, lam_y=lam, box=None, mean=None,
               std=None, in_scale=1.0, label_off=0.0, label_keep=1.0)
    bad, good = [1, 3], [0, 2]
    assert out[bad].isnan().all() and soft[bad].isnan().all()
    want_x, want_soft = R.mix_reference(x, target, lam.double().clamp(0, 1).nan_to_num(0.5), perm=perm,
                                      num_classes=10)
    torch.testing.assert_close(out[good], want_x[good])
    torch.testing.assert_close(soft[good], want_soft[good])
    one = torch.tensor(-0.5, device=device)  # one value for the batch: every row
    mix_launch(x, out, target, soft, batch_size=4, perm=perm, lam_x=one, lam_y=one, box=None, mean=None,
               std=None, in_scale=1.0, label_off=0.0, label_keep=1.0)
    assert out.isnan().all() and soft.isnan().all()


def test_kernel_launch_plans_are_made_once_per_signature(triton_device):
    """A call signature is planned once; later calls with other weights and boxes reuse the plan, and a
    tensor off a 16-byte boundary (another Triton specialization) gets a plan of its own."""
    from mixrecipe.kernels import mixup as kernel_module

    device = triton_device
    with cpu_backend("triton") if device == "cpu" else contextlib.nullcontext():
        kernel_module._PLANS.clear()
        x = torch.randn(9, 3, 8, 8, device=device)
        y = torch.arange(8, device=device) % 5
        for lam, box in ((0.3, None), (0.9, None), (0.6, (1, 4, 2, 7)), (0.1, (0, 8, 3, 5))):
            got, soft = ops.mix(x[:8].clone(), y, lam, None, None, box, num_classes=5, inplace=True)
            want, want_soft = R.mix_reference(x[:8], y, lam, box=box, num_classes=5)
            torch.testing.assert_close(got, want.float())
            torch.testing.assert_close(soft, want_soft)
        assert len(kernel_module._PLANS) == 2  # without a box, with one box as numbers
        # On a GPU every call after a signature's first runs the compiled kernel directly (the results
        # above came from it); the interpreter has no compiled kernel: every call goes through it.
        assert all(run.direct == (device == "cuda") for run, _ in kernel_module._PLANS.values())
        shifted = x.reshape(-1)[1:1 + 8 * 192].view(8, 3, 8, 8)  # 4 bytes in: not 16-byte aligned
        ops.mix(shifted.clone(), y, 0.5, num_classes=5)  # out of place: a signature of its own
        assert len(kernel_module._PLANS) == 3
        got, _ = ops.mix(shifted, y, 0.5, num_classes=5)
        assert len(kernel_module._PLANS) == 4
        torch.testing.assert_close(got, R.mix_reference(shifted, y, 0.5, num_classes=5)[0].float())


def test_public_ops_poison_rows_of_bad_partners_they_cannot_check(triton_device):
    """Where values cannot be read without a sync (CUDA; here: a dispatch mode watching, so nothing is
    inspected), mix, mixup_target and the loss accept an out-of-range partner and write NaN for its rows."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from mixrecipe import mixup_cross_entropy

    class Watching(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    device = triton_device
    x, target, _ = make_case(4, shape=(2, 3, 3), device=device)
    perm = torch.tensor([1, 0, 7, -2], device=device)
    with cpu_backend("triton") if device == "cpu" else contextlib.nullcontext(), Watching():
        out, soft = ops.mixup(x, target, 0.5, perm, num_classes=10)
        soft_only = ops.mixup_target(target, 10, 0.5, perm)
        loss = mixup_cross_entropy(torch.randn(4, 10, device=device), target, 0.5, perm, reduction="none")
    assert out[2:].isnan().all() and not out[:2].isnan().any()
    assert soft[2:].isnan().all() and not soft[:2].isnan().any()
    assert torch.equal(soft_only.isnan(), soft.isnan())
    assert loss[2:].isnan().all() and not loss[:2].isnan().any()


def test_nan_propagates(backend):
    device = backend.device
    x, target, _ = make_case(4, device=device)
    x[1, 0, 0, 0] = float("nan")
    out, _ = ops.mixup(x, None, 0.5)
    assert out[1, 0, 0, 0].isnan() and out[2, 0, 0, 0].isnan()  # row 1 and its partner 2
    assert out.isnan().sum() == 2


def test_non_contiguous_input_out_of_place(backend):
    device = backend.device
    x, _, _ = make_case(4, shape=(3, 8, 8), device=device)
    view = x[:, :, ::2, 1::2]
    out, _ = ops.mixup(view, None, 0.25)
    ref, _ = R.mix_reference(view, None, 0.25)
    assert_matches_reference(out, ref, 8.0, torch.float32)


# --------------------------------------------------------------------------------------------------
# Agreement with timm
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_matches_timm_mixup_target_and_images(backend, smoothing):
    from timm.data.mixup import mixup_target as timm_mixup_target

    device = backend.device
    x, target, _ = make_case(6, device=device)
    for lam in (0.0, 0.3, 0.77, 1.0):
        expect = timm_mixup_target(target, 10, lam, smoothing)
        got = ops.mixup_target(target, 10, lam, label_smoothing=smoothing)
        torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-7)
        # timm's image path: x.mul_(lam).add_(x.flip(0).mul_(1 - lam))
        timm_x = x.clone().mul_(lam).add_(x.flip(0).mul_(1.0 - lam))
        ours, soft = ops.mixup(x.clone(), target, lam, num_classes=10, label_smoothing=smoothing,
                               inplace=True)
        torch.testing.assert_close(ours, timm_x, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(soft, expect, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------------
def test_torch_compile_fullgraph():
    def step(x, target, lam, perm):
        mixed, soft = ops.mixup(x, target, lam, perm, num_classes=10, label_smoothing=0.1)
        flipped, soft2 = ops.mixup(x.clone(), target, lam, num_classes=10, inplace=True)
        return mixed * 2, soft + soft2, flipped, ops.mixup_target(target, 10, lam)

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    x, target, g = make_case(4)
    lam = torch.rand(4, generator=g)
    perm = torch.randperm(4, generator=g)
    got, expect = compiled(x, target, lam, perm), step(x, target, lam, perm)
    for a, b in zip(got, expect):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument
# --------------------------------------------------------------------------------------------------
def _bad_calls():
    x = torch.randn(4, 3, 4, 4)
    t = torch.tensor([0, 1, 2, 3])
    return [
        ("target must have shape (4,), got (3,)", lambda: ops.mixup(x, t[:3], 0.5, num_classes=4)),
        ("outside", lambda: ops.mixup(x, torch.tensor([0, 1, 2, 9]), 0.5, num_classes=4)),
        ("outside", lambda: ops.mixup(x, torch.tensor([0, -1, 2, 1]), 0.5, num_classes=4)),
        ("num_classes is required", lambda: ops.mixup(x, t, 0.5)),
        ("num_classes must be", lambda: ops.mixup_target(t, 0, 0.5)),
        ("lam_x must lie in", lambda: ops.mixup(x, t, 1.5, num_classes=4)),
        ("lam_x must lie in", lambda: ops.mixup(x, t, float("nan"), num_classes=4)),
        ("lam_x must lie in", lambda: ops.mixup(x, t, torch.tensor([0.1, 0.2, -0.1, 0.3]), num_classes=4)),
        ("lam_x must be a scalar or have shape", lambda: ops.mixup(x, t, torch.rand(3), num_classes=4)),
        ("lam_x must be a float", lambda: ops.mixup(x, t, "0.5", num_classes=4)),
        ("lam must lie in", lambda: ops.mixup_target(t, 4, -0.2)),
        ("perm must be a permutation", lambda: ops.mixup(x, None, 0.5, torch.tensor([0, 0, 1, 2]))),
        ("perm must have shape", lambda: ops.mixup(x, None, 0.5, torch.arange(3))),
        ("perm must be None or an int64", lambda: ops.mixup(x, None, 0.5, torch.arange(4.0))),
        ("inplace=True needs the flip pairing", lambda: ops.mixup(x, t, 0.5, torch.arange(4), num_classes=4,
                                                                   inplace=True)),
        ("pass a floating out_dtype", lambda: ops.mixup(x.to(torch.uint8), t, 0.5, num_classes=4)),
        ("out_dtype must be", lambda: ops.mixup(x, t, 0.5, num_classes=4, out_dtype=torch.int32)),
        ("inplace=True writes into x",
         lambda: ops.mixup(x.to(torch.uint8), None, 0.5, out_dtype=torch.float32, inplace=True)),
        ("x must be float32", lambda: ops.mixup(x.double(), None, 0.5)),
        ("x must be a tensor", lambda: ops.mixup([1.0, 2.0], None, 0.5)),
        ("mean has 2 values", lambda: ops.mixup(x, None, 0.5, mean=(0.1, 0.2), std=(1.0, 1.0))),
        ("mean and std go together", lambda: ops.mixup(x, None, 0.5, mean=(0.1, 0.2, 0.3))),
        ("std must be positive", lambda: ops.mixup(x, None, 0.5, mean=(0, 0, 0), std=(1.0, 0.0, 1.0))),
        ("target must have shape", lambda: ops.mixup(x, t.view(2, 2, 1), 0.5, num_classes=4)),
        ("must hold integer class indices", lambda: ops.mixup(x, t.float(), 0.5, num_classes=4)),
        ("must be floating point", lambda: ops.mixup(x, torch.zeros(4, 4, dtype=torch.long), 0.5)),
        ("num_classes=5 but target has 4", lambda: ops.mixup_target(torch.rand(4, 4), 5, 0.5)),
        ("label_smoothing must lie", lambda: ops.mixup(x, t, 0.5, num_classes=4, label_smoothing=1.5)),
        ("box needs x of shape", lambda: ops.mix(x.view(4, -1), None, 1.0, box=torch.tensor([0, 1, 0, 1]))),
        ("box must be integer", lambda: ops.mix(x, None, 1.0, box=torch.tensor([0, 1, 0]))),
        ("inplace=True needs x contiguous", lambda: ops.mixup(x[:, :, ::2], None, 0.5, inplace=True)),
        ("cpu_backend must be", lambda: cpu_backend("cuda").__enter__()),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_raises_clear_error(case):
    message, call = _bad_calls()[case]
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    assert message in str(info.value)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a second device (CUDA) to mix devices")
def test_devices_that_differ_raise():
    x = torch.randn(4, 3, 4, 4, device="cuda")
    with pytest.raises(ValueError, match="target is on cpu"):
        ops.mixup(x, torch.arange(4), 0.5, num_classes=4)
    with pytest.raises(ValueError, match="perm is on cpu"):
        ops.mixup(x, None, 0.5, torch.arange(4))


def test_devices_that_differ_raise_on_meta():
    """The same check without a GPU: a 'meta' tensor stands in for another device."""
    x = torch.randn(4, 3, 4, 4)
    with pytest.raises(ValueError, match="target is on meta"):
        ops.mixup(x, torch.arange(4, device="meta"), 0.5, num_classes=4)
    with pytest.raises(ValueError, match="lam_x is on meta"):
        ops.mixup(x, None, torch.rand(4, device="meta"))


@pytest.mark.skipif(not HAS_CUDA, reason="host-device synchronization only exists with a GPU")
def test_no_host_device_sync_on_cuda():
    x = torch.randn(8, 3, 16, 16, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, 10, (8,), device="cuda")
    lam = torch.rand(8, device="cuda")
    perm = torch.randperm(8, device="cuda")
    ops.mixup(x, t, lam, perm, num_classes=10)  # warm-up: constants cached, kernels compiled
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.mixup(x, t, lam, perm, num_classes=10, label_smoothing=0.1)
        ops.mixup(x, t, lam, num_classes=10, inplace=True)
        ops.mixup_target(t, 10, lam)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("chunk_elems", [1, 50, 1 << 17])
@pytest.mark.parametrize("batch", [1, 5, 8])
def test_eager_path_chunking(monkeypatch, chunk_elems, batch):
    """The CPU path walks cache-sized chunks of pairs: any chunking gives the same answer."""
    monkeypatch.setattr(ops, "_CHUNK_ELEMS", chunk_elems)
    x, target, g = make_case(batch, shape=(3, 4, 5))
    lam = torch.rand(batch, generator=g)
    boxes = make_boxes(batch, 4, 5, g, "cpu")
    for perm in (None, torch.randperm(batch, generator=g)):
        out, soft = ops.mix(x, target, lam, lam, perm, boxes, num_classes=10)
        ref, ref_soft = R.mix_reference(x, target, lam, lam, perm, boxes, num_classes=10)
        assert_matches_reference(out, ref, 8.0, torch.float32)
    y = x.clone()
    ops.mixup(y, None, lam, mean=(0.1, 0.2, 0.3), std=(0.5, 2.0, 1.0), inplace=True)
    ref, _ = R.mix_reference(x, None, lam, mean=(0.1, 0.2, 0.3), std=(0.5, 2.0, 1.0), out_dtype=torch.float32)
    assert_matches_reference(y, ref, 16.0, torch.float32)
    for dtype in DTYPES:  # in place, plain: the front row must be kept before it is overwritten
        z = x.to(dtype)
        ref, _ = R.mix_reference(z, None, lam)
        ops.mixup(z, None, lam, inplace=True)
        assert_matches_reference(z, ref, 8.0, dtype)


def test_inplace_normalization_odd_batch_kernel(backend):
    device = backend.device
    x, _, g = make_case(5, shape=(3, 4, 4), device=device)
    y = x.clone()
    ops.mixup(y, None, 0.4, mean=(0.1, 0.2, 0.3), std=(0.5, 2.0, 1.0), inplace=True)
    ref, _ = R.mix_reference(x, None, 0.4, mean=(0.1, 0.2, 0.3), std=(0.5, 2.0, 1.0))
    assert_matches_reference(y, ref, 16.0, torch.float32)


def test_tracing_sees_the_registered_op():
    """Eager calls skip the dispatcher; a tracer (a dispatch mode) must still see the one opaque op."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def step(x, y):
        out, soft = ops.mixup(x, y, 0.3, num_classes=5, label_smoothing=0.1)
        return out, soft, ops.mixup_target(y, 5, 0.3)

    x, y = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 4])
    graph = make_fx(step)(x, y).graph
    targets = {str(node.target) for node in graph.nodes if node.op == "call_function"}
    assert {"mixrecipe.mix.default", "mixrecipe.mix_target.default"} <= targets, targets
    traced = make_fx(lambda x: ops.mixup(x, None, 0.3, inplace=True)[0])(x.clone()).graph
    assert any(str(n.target) == "mixrecipe.mix_.default" for n in traced.nodes)


def test_inplace_bumps_the_version_counter(backend):
    """The kernels write through raw pointers; autograd must still learn that x changed in place, so a
    graph that saved x refuses to backpropagate through stale values instead of giving wrong gradients."""
    device = backend.device
    x = torch.randn(6, 3, 4, 4, device=device)
    w = torch.ones(1, requires_grad=True, device=device)
    y = (w * x).sum()  # saves x for the gradient of w
    version = x._version
    ops.mixup(x, torch.arange(6, device=device), 0.3, num_classes=6, inplace=True)
    assert x._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_inputs_that_need_grad_take_the_registered_op():
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    out, soft = ops.mixup(x, torch.arange(4), 0.3, num_classes=4)
    torch.testing.assert_close(out.detach(), 0.3 * x.detach() + 0.7 * x.detach().flip(0))
    assert soft.shape == (4, 4)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("perm_kind", ["flip", "random"])
def test_out_buffer_gets_the_same_result(backend, layout, perm_kind):
    """out= writes what the allocating call returns, into the caller's (poisoned) buffer, every element."""
    device = backend.device
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (7, 3, 5, 6), dtype=torch.uint8, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x, target = x.to(device), torch.randint(0, 4, (7,), generator=g).to(device)
    lam, perm = torch.rand(7, generator=g).to(device), make_perm(perm_kind, 7, g, device)
    box = torch.tensor([1, 4, 2, 5], dtype=torch.int32)
    kw = dict(num_classes=4, label_smoothing=0.1, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3),
              out_dtype=torch.bfloat16)
    want, want_soft = ops.mix(x, target, lam, 0.7, perm, box, **kw)
    buf = torch.full_like(x, float("nan"), dtype=torch.bfloat16)
    got, soft = ops.mix(x, target, lam, 0.7, perm, box, out=buf, **kw)
    assert got is buf and torch.equal(got, want) and torch.equal(soft, want_soft)
    norm = {k: kw[k] for k in ("mean", "std", "out_dtype")}
    got, _ = ops.mixup(x, None, lam, perm, out=buf, **norm)
    assert torch.equal(got, ops.mixup(x, None, lam, perm, **norm)[0])


@pytest.mark.parametrize("case, error, words", [
    ("wrong dtype", TypeError, "out has dtype"),
    ("wrong shape", ValueError, "shape and memory layout"),
    ("wrong layout", ValueError, "shape and memory layout"),
    ("is x", ValueError, "shares memory with x"),
    ("with inplace", ValueError, "exclude each other"),
    ("not a tensor", TypeError, "out must be a tensor"),
])
def test_bad_out_buffer_is_refused(case, error, words):
    x = torch.randn(4, 3, 5, 5)
    out = {"wrong dtype": torch.empty(4, 3, 5, 5, dtype=torch.float16),
           "wrong shape": torch.empty(4, 3, 5, 4),
           "wrong layout": torch.empty(4, 3, 5, 5).contiguous(memory_format=torch.channels_last),
           "is x": x, "with inplace": torch.empty(4, 3, 5, 5), "not a tensor": [0.0]}[case]
    with pytest.raises(error, match=words):
        ops.mixup(x, None, 0.3, out=out, inplace=case == "with inplace")


def test_out_buffer_under_torch_compile():
    def step(x, out, lam):
        return ops.mixup(x, None, lam, out=out)[0] * 2

    x, out = torch.randn(4, 3, 2, 2), torch.empty(4, 3, 2, 2)
    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    got = compiled(x, out, torch.full((4,), 0.25))
    torch.testing.assert_close(got, 2 * (0.25 * x + 0.75 * x.flip(0)))
    torch.testing.assert_close(out, 0.25 * x + 0.75 * x.flip(0))


def test_readme_op_snippet_runs():
    """README's "The op" block, on the CPU when there is no GPU."""
    from readme_snippets import snippet

    code = snippet("The op")
    if not torch.cuda.is_available():
        code = code.replace('device="cuda"', 'device="cpu"')
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["x3"] is scope["buf"] and scope["soft4"].shape == (7, 10)


def test_inference_mode():
    """Inference tensors (no version counter) mix in place and out of place, inside inference mode and out."""
    with torch.inference_mode():
        x = torch.randn(4, 3, 2, 2)
        want = 0.3 * x + 0.7 * x.flip(0)
        out, soft = ops.mixup(x, torch.arange(4), 0.3, num_classes=4, inplace=True)
        torch.testing.assert_close(out, want)
        assert soft.shape == (4, 4)
    out, _ = ops.mixup(x, None, 0.3)
    torch.testing.assert_close(out, 0.3 * x + 0.7 * x.flip(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_float_weight_is_taken_as_its_float32(backend, dtype):
    """The policy passes its float draws unrounded (float64): every backend must take a float λ as the
    float32 nearest to it, as a float32 λ tensor is, for pixels, labels and a CutMix label weight."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 3, 4, 6, generator=g).to(dtype).to(backend.device)
    y = torch.tensor([0, 2, 1, 3, 2], device=backend.device)
    box = (1, 3, 0, 4)
    for _ in range(20):
        lam, lam_y = torch.rand(2, generator=g, dtype=torch.float64).tolist()
        lam32, lam_y32 = float(torch.tensor(lam).float()), float(torch.tensor(lam_y).float())
        assert lam != lam32 or lam_y != lam_y32  # a weight that rounding changes
        for b in (None, box):
            got = ops.mix(x.clone(), y, lam, lam_y, None, b, num_classes=4, label_smoothing=0.1,
                          inplace=True)
            want = ops.mix(x.clone(), y, lam32, lam_y32, None, b, num_classes=4, label_smoothing=0.1,
                           inplace=True)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
