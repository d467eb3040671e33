"""The autograd-free mixup ops: validate (``mixrecipe.checks``), allocate, dispatch.

CUDA tensors run the fused Triton kernel (``kernels/mixup.py``) through its launch plan. CPU tensors run an
eager path with the same semantics, a cache-sized chunk of rows at a time, or the Triton kernel through the
interpreter inside ``cpu_backend("triton")`` (how the tests check the kernel on a machine without a GPU;
``mixrecipe.backend`` holds the switch). The work is registered with ``torch.library.custom_op`` so that
``torch.compile(fullgraph=True)``, ``torch.export`` and FakeTensor see one opaque op; a plain eager call
skips torch's dispatcher and runs the op's body directly when nothing could tell the difference
(:func:`_direct_call`).

Every call checks every argument. Values are read only where that is free: numbers, and CPU tensors
outside torch.compile. On CUDA reading a value would be a host-device synchronization, so the kernel checks
what changes per call as it reads it (partners, class indices, (B,) weights) and writes NaN rows for bad
ones instead of reading or writing out of bounds.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backend import runs_kernel
from .checks import (
    check_box,
    check_images,
    check_lam,
    check_out,
    check_perm,
    check_target,
    check_unit_interval,
    tracing,
)
from .kernels import mix_launch
from .reference import pixel_weights, smooth_targets

__all__ = ["mix", "mixup", "mixup_target"]

# Eager CPU path: rows per chunk sized so a chunk's temporaries stay in cache. Whole-batch temporaries were
# 7-13x slower at ImageNet size (64x3x224x224: 17-76 against 2.4-5.8 ms); a CIFAR batch's 64 pairs are one
# chunk (0.14 against 0.16 ms with two).
_CHUNK_ELEMS = 1 << 18


# --------------------------------------------------------------------------------------------------
# The work itself, on already-validated arguments.
# --------------------------------------------------------------------------------------------------
def _as_float(v: Tensor, mean, std, in_scale, shape) -> Tensor:
    """A chunk in fp32, normalized like the kernel does: (v * in_scale - mean) / std."""
    if mean is None:
        if in_scale != 1.0:
            return v.float() * in_scale
        return v if v.dtype == torch.float32 else v.float()  # fp32: a view, callers copy before writing
    return (v.float() * in_scale - mean.view(shape)) / std.view(shape)


def _lerp_into(dst: Tensor, start: Tensor, end: Tensor, weight) -> None:
    if dst.dtype == torch.float32:
        torch.lerp(start, end, weight, out=dst)
    else:
        dst.copy_(torch.lerp(start, end, weight))


def _rows(weights, lo: int, hi: int):
    return weights if isinstance(weights, float) else weights[lo:hi]


def _mix_images_eager(x, out, perm, lam_x, box, mean, std, in_scale):
    """Normalize + gather + lerp, a cache-sized chunk of rows at a time.

    Flip pairing walks rows [i0, i1) from the front together with their partners [B-i1, B-i0) from the back
    as plain views: each chunk is read once and written once (plus in-cache flips), and it can write in
    place because both halves are loaded before either is written.
    """
    batch = x.shape[0]
    if batch == 0:
        return
    n = x[0].numel()
    if box is None and not isinstance(lam_x, Tensor):
        weights = float(lam_x)  # one weight keeps the lerp on its cheapest path
    else:
        weights = pixel_weights(x.shape, lam_x, box, torch.float32, x.device)
    shape = [1, -1] + [1] * (x.ndim - 2)
    norm = (mean, std, in_scale, shape)
    step = max(1, _CHUNK_ELEMS // max(1, n))
    if perm is not None:
        for r0 in range(0, batch, step):
            r1 = min(batch, r0 + step)
            own = _as_float(x[r0:r1], *norm)
            partner = _as_float(x.index_select(0, perm[r0:r1]), *norm)
            _lerp_into(out[r0:r1], partner, own, _rows(weights, r0, r1))
        return
    half = batch // 2
    front_is_view = mean is None and x.dtype == torch.float32
    for i0 in range(0, half, step):
        i1 = min(half, i0 + step)
        j0, j1 = batch - i1, batch - i0
        front = _as_float(x[i0:i1], *norm)
        back = _as_float(x[j0:j1], *norm)
        if i1 - i0 > 1:
            back_partners = back.flip(0)  # flip copies: both taken before anything is written
            front_partners = front.flip(0)
        else:
            # One pair (large samples): no reordering needed; keep the front row only if it gets overwritten.
            back_partners = back
            front_partners = front.clone() if front_is_view and out is x else front
        _lerp_into(out[i0:i1], back_partners, front, _rows(weights, i0, i1))
        _lerp_into(out[j0:j1], front_partners, back, _rows(weights, j0, j1))
    if batch % 2 and (out is not x or mean is not None or in_scale != 1.0):
        out[half:half + 1].copy_(_as_float(x[half:half + 1], *norm))  # the middle row is its own partner


def _mix_labels_eager(target, soft, perm, lam_y, label_smoothing):
    s = smooth_targets(target, soft.shape[1], label_smoothing, torch.float32)
    partner = s.flip(0) if perm is None else s.index_select(0, perm)
    w = float(lam_y) if not isinstance(lam_y, Tensor) else lam_y.float().view(-1, 1)
    torch.lerp(partner, s, w, out=soft)


def _run(x, out, target, soft, perm, lam_x, lam_y, box, mean, std, num_classes, label_smoothing):
    """The work on checked arguments. ``box`` may be four ints (one box for the batch: the kernel's
    scalars)."""
    ref = x if x is not None else target
    off = label_smoothing / num_classes if target is not None else 0.0
    in_scale = 1.0 / 255.0 if x is not None and x.dtype == torch.uint8 else 1.0
    if runs_kernel(ref):
        mix_launch(x, out, target, soft, batch_size=ref.shape[0], perm=perm, lam_x=lam_x, lam_y=lam_y,
                   box=box, mean=mean, std=std, in_scale=in_scale, label_off=off,
                   label_keep=1.0 - label_smoothing)
        return
    if isinstance(box, tuple):
        box = torch.tensor(box, dtype=torch.int32)
    if x is not None:
        _mix_images_eager(x, out, perm, lam_x, box, mean, std, in_scale)
    if target is not None:
        _mix_labels_eager(target, soft, perm, lam_y, label_smoothing)


def _direct_call(*tensors: Tensor | None) -> bool:
    """Whether a call may run the op's body without the dispatcher: plain tensors that need no grad,
    outside torch.compile tracing and outside any dispatch or function mode (FakeTensor, make_fx,
    FlopCounterMode, a default-device context). Anything else goes through the registered op."""
    if tracing():
        return False
    return all(t is None or (type(t) is Tensor and not t.requires_grad) for t in tensors)


def _call(op, body, *args, mutated: Tensor | None = None):
    """``body(*args)`` directly when :func:`_direct_call` allows it, else the registered ``op``.

    The kernels write through raw pointers, so the direct call bumps the version counter of the tensor it
    mutates, as the registered op would: a graph that saved it then refuses to backpropagate."""
    if not _direct_call(*(a for a in args if isinstance(a, Tensor))):
        return op(*args)
    if mutated is not None:
        torch.autograd.graph.increment_version(mutated)
    return body(*args)


# --------------------------------------------------------------------------------------------------
# Registered ops. Tensors, numbers and int lists only: the public wrappers below translate. A weight is a
# tensor or (None, its value); one box for the batch is four ints in ``box_values`` (else empty).
# --------------------------------------------------------------------------------------------------
def _weight(tensor: Tensor | None, value: float):
    return tensor if tensor is not None else value


def _box(box: Tensor | None, box_values: list[int]):
    return tuple(box_values) if box_values else box


def _new_soft(ref: Tensor, target: Tensor | None, num_classes: int) -> Tensor:
    rows = ref.shape[0] if target is not None else 0
    return torch.empty((rows, num_classes if target is not None else 0), dtype=torch.float32,
                       device=ref.device)


def _mix_out_body(
    x: Tensor, out: Tensor, target: Tensor | None, lam_x: Tensor | None, lam_x_value: float,
    lam_y: Tensor | None, lam_y_value: float, perm: Tensor | None, box: Tensor | None, box_values: list[int],
    mean: Tensor | None, std: Tensor | None, num_classes: int, label_smoothing: float,
) -> Tensor:
    soft = _new_soft(x, target, num_classes)
    _run(x, out, target, soft if target is not None else None, perm, _weight(lam_x, lam_x_value),
         _weight(lam_y, lam_y_value), _box(box, box_values), mean, std, num_classes, label_smoothing)
    return soft


_mix_out_op = torch.library.custom_op("mixrecipe::mix_out", _mix_out_body, mutates_args=("out",))


@_mix_out_op.register_fake
def _(x, out, target, lam_x, lam_x_value, lam_y, lam_y_value, perm, box, box_values, mean, std, num_classes,
      label_smoothing):
    return _new_soft(x, target, num_classes)


def _mix_body(
    x: Tensor, target: Tensor | None, lam_x: Tensor | None, lam_x_value: float, lam_y: Tensor | None,
    lam_y_value: float, perm: Tensor | None, box: Tensor | None, box_values: list[int], mean: Tensor | None,
    std: Tensor | None, num_classes: int, label_smoothing: float, out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    out = torch.empty_like(x, dtype=out_dtype)  # x's layout (contiguous or channels_last)
    soft = _mix_out_body(x, out, target, lam_x, lam_x_value, lam_y, lam_y_value, perm, box, box_values, mean,
                         std, num_classes, label_smoothing)
    return out, soft


_mix_op = torch.library.custom_op("mixrecipe::mix", _mix_body, mutates_args=())


@_mix_op.register_fake
def _(x, target, lam_x, lam_x_value, lam_y, lam_y_value, perm, box, box_values, mean, std, num_classes,
      label_smoothing, out_dtype):
    return torch.empty_like(x, dtype=out_dtype), _new_soft(x, target, num_classes)


def _mix_inplace_body(
    x: Tensor, target: Tensor | None, lam_x: Tensor | None, lam_x_value: float, lam_y: Tensor | None,
    lam_y_value: float, box: Tensor | None, box_values: list[int], mean: Tensor | None, std: Tensor | None,
    num_classes: int, label_smoothing: float,
) -> Tensor:
    # x is its own output: flip pairing only (a row's partner is read before either is written).
    return _mix_out_body(x, x, target, lam_x, lam_x_value, lam_y, lam_y_value, None, box, box_values, mean,
                         std, num_classes, label_smoothing)


_mix_inplace_op = torch.library.custom_op("mixrecipe::mix_", _mix_inplace_body, mutates_args=("x",))


@_mix_inplace_op.register_fake
def _(x, target, lam_x, lam_x_value, lam_y, lam_y_value, box, box_values, mean, std, num_classes,
      label_smoothing):
    return _new_soft(x, target, num_classes)


def _mix_target_body(
    target: Tensor, lam: Tensor | None, lam_value: float, perm: Tensor | None, num_classes: int,
    label_smoothing: float,
) -> Tensor:
    soft = _new_soft(target, target, num_classes)
    _run(None, None, target, soft, perm, 1.0, _weight(lam, lam_value), None, None, None, num_classes,
         label_smoothing)
    return soft


_mix_target_op = torch.library.custom_op("mixrecipe::mix_target", _mix_target_body, mutates_args=())


@_mix_target_op.register_fake
def _(target, lam, lam_value, perm, num_classes, label_smoothing):
    return _new_soft(target, target, num_classes)


def _lam_parts(name: str, lam, batch: int, device) -> tuple[Tensor | None, float]:
    """A checked lam as the registered ops take it: (a () or contiguous (B,) tensor, 0.0) or (None, the
    float). The kernel reads any floating dtype; nothing is converted on the device."""
    lam = check_lam(name, lam, batch, device)
    if not isinstance(lam, Tensor):
        return None, lam
    return (lam if lam.is_contiguous() else lam.contiguous()), 0.0


# --------------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------------
def mix(
    x: Tensor,
    target: Tensor | None,
    lam_x,
    lam_y=None,
    perm: Tensor | None = None,
    box: Tensor | None = None,
    *,
    num_classes: int | None = None,
    label_smoothing: float = 0.0,
    mean=None,
    std=None,
    out_dtype: torch.dtype | None = None,
    inplace: bool = False,
    out: Tensor | None = None,
):
    """The fused op in full: partner gather, optional normalization and CutMix box, lerp, soft labels.

    Args:
        x: (B, ...) images, float32/float16/bfloat16, or uint8 (then ``out_dtype`` is required).
        target: (B,) int64 class indices, (B, K) float targets, or None (then no labels are returned).
        lam_x: the weight of each sample's own pixels: a float, a 0-d tensor or a (B,) tensor in [0, 1].
            Checked on the host for numbers and CPU tensors (ValueError); a CUDA tensor is checked by the
            kernel as it reads it: a row whose weight lies outside [0, 1] (or is NaN) is written as NaN.
        lam_y: the weight of each sample's own label; defaults to ``lam_x`` (differs for CutMix).
        perm: None for timm's flip pairing (sample i with B-1-i), or an int32/int64 permutation of
            range(B). Checked
            on CPU tensors (ValueError); on CUDA reading it would cost a synchronization, so the kernel
            checks each index as it reads it: a row whose partner lies outside [0, B) (or whose class
            index is out of range) is written as NaN, never read from outside the batch.
        box: None, or CutMix boxes (y0, y1, x0, x1), half-open, in pixels: (4,) for the whole batch
            or (B, 4) per sample; x must then be 4-D (B, C, H, W). Inside the box the pixels come from
            the partner; outside they are mixed with ``lam_x`` (pure CutMix: ``lam_x=1``). One box as four
            Python ints (a tuple or list) reaches the GPU kernel as scalars: no tensor, no copy.
        num_classes: K; required for class-index targets.
        label_smoothing: timm's smoothing: off = smoothing / K, on = 1 - smoothing + off.
        mean, std: per-channel (dim 1) normalization applied before mixing; uint8 inputs are scaled
            to [0, 1] first, so mean/std are in [0, 1] units (e.g. timm's IMAGENET_DEFAULT_MEAN).
        out_dtype: dtype of the mixed images; defaults to x's dtype.
        inplace: write the result into x (flip pairing and an unchanged dtype only).
        out: write the mixed images into this buffer instead of a new tensor (x's shape and strides,
            ``out_dtype``, not sharing memory with x), as a data loader that reuses its buffers does.

    Returns:
        (x_mixed, soft_target): x_mixed is ``out`` when given; soft_target is (B, K) float32, or None when
        target is None.
    """
    x, mean, std, out_dtype = check_images(x, mean, std, out_dtype, inplace)
    batch, device = x.shape[0], x.device
    label_smoothing = check_unit_interval("label_smoothing", label_smoothing)
    if target is not None:
        target, num_classes = check_target(target, batch, num_classes, device)
    else:
        num_classes = 0
    lam_x_t, lam_x_v = _lam_parts("lam_x", lam_x, batch, device)
    lam_y_t, lam_y_v = (lam_x_t, lam_x_v) if lam_y is None else _lam_parts("lam_y", lam_y, batch, device)
    perm = check_perm(perm, batch, device)
    box = check_box(box, x, device)
    box_t, box_values = (None, list(box)) if isinstance(box, tuple) else (box, [])
    out = check_out(out, x, out_dtype, inplace)
    if inplace and perm is not None:
        raise ValueError("inplace=True needs the flip pairing (perm=None): with an explicit permutation "
                         "a row may be read after its partner overwrote it")
    if out is not None:
        soft = _call(_mix_out_op, _mix_out_body, x, out, target, lam_x_t, lam_x_v, lam_y_t, lam_y_v, perm,
                     box_t, box_values, mean, std, num_classes, label_smoothing, mutated=out)
    elif inplace:
        soft = _call(_mix_inplace_op, _mix_inplace_body, x, target, lam_x_t, lam_x_v, lam_y_t, lam_y_v, box_t,
                     box_values, mean, std, num_classes, label_smoothing, mutated=x)
        out = x
    else:
        out, soft = _call(_mix_op, _mix_body, x, target, lam_x_t, lam_x_v, lam_y_t, lam_y_v, perm, box_t,
                          box_values, mean, std, num_classes, label_smoothing, out_dtype)
    return out, (soft if target is not None else None)


def mixup(
    x: Tensor,
    target: Tensor | None,
    lam,
    perm: Tensor | None = None,
    *,
    num_classes: int | None = None,
    label_smoothing: float = 0.0,
    mean=None,
    std=None,
    out_dtype: torch.dtype | None = None,
    inplace: bool = False,
    out: Tensor | None = None,
):
    """Mixup in one pass: ``x[i] <- lam_i * x[i] + (1 - lam_i) * x[perm[i]]`` and the same for labels.

    Args:
        x: (B, ...) images: float32/float16/bfloat16, or uint8 with a float ``out_dtype``.
        target: (B,) class indices, (B, K) float targets, or None.
        lam: the weight of each sample itself: a float, 0-d tensor or (B,) tensor in [0, 1].
        perm: None for timm's flip pairing (i <-> B-1-i, may run in place), or a permutation of range(B);
            on CUDA (unchecked on the host: no sync) a row whose partner lies outside [0, B) comes out NaN.
        num_classes: K, required for class-index targets.
        label_smoothing: timm's label smoothing, applied before mixing.
        mean, std: per-channel normalization fused into the pass (uint8 is scaled to [0, 1] first).
        out_dtype: dtype of the mixed images (default: x's).
        inplace: overwrite x (flip pairing, same dtype).
        out: a preallocated buffer for the mixed images (see :func:`mix`).

    Returns:
        (x_mixed, soft_target) with soft_target (B, K) float32, or None without target.
    """
    return mix(x, target, lam, None, perm, None, num_classes=num_classes, label_smoothing=label_smoothing,
               mean=mean, std=std, out_dtype=out_dtype, inplace=inplace, out=out)


def mixup_target(
    target: Tensor, num_classes: int | None, lam, perm: Tensor | None = None, label_smoothing: float = 0.0
) -> Tensor:
    """Soft targets only: timm's ``mixup_target`` for any pairing and per-sample lam. (B, K) float32."""
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a tensor, got {type(target).__name__}")
    if target.ndim < 1:
        raise ValueError("target must have shape (B,) or (B, K)")
    batch, device = target.shape[0], target.device
    target, num_classes = check_target(target, batch, num_classes, device)
    lam_t, lam_v = _lam_parts("lam", lam, batch, device)
    perm = check_perm(perm, batch, device)
    smoothing = check_unit_interval("label_smoothing", label_smoothing)
    return _call(_mix_target_op, _mix_target_body, target, lam_t, lam_v, perm, num_classes, smoothing)
