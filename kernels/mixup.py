"""One-pass mixup: partner gather + optional uint8->normalized + CutMix box + lerp + soft labels.

One launch covers a whole batch. Programs come in two kinds, told apart by their id:
- image programs: one per (row group, block of a sample). A row group is a pair (i, B-1-i) under the flip
  pairing, each pair owned by ONE program so the batch can be rewritten in place; or a single row i with an
  explicit permutation (always out of place: in place would be a read-after-write race);
- label programs: one per row group, writing the soft targets of its rows.

Bytes moved for a batch of M elements of E bytes (flip pairing, in place, no uint8):
  read M*E + write M*E  -- the same as ``dst.copy_(x)``, the floor for any pass over the batch.
Explicit permutation: read 2*M*E + write M*E (each row and its partner are read).
uint8 in, 2-byte out: read M + write 2*M.  Labels add B*K*4 bytes written (plus B*K*4 read if dense).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    Launch,
    box_kind,
    cast_to,
    image_block,
    label_block,
    lam_kind,
    lam_ok,
    lerp,
    mix_labels,
    partner,
    per_channel,
    pixel_weight,
    plan_for_interpreter,
    row_lam,
)

__all__ = ["mix_launch"]


# Helpers below assign in both branches of a constexpr `if` and return once: `triton.compile` rejects a
# function whose branches return different types (a block vs a scalar), which the interpreter accepts.
@triton.jit
def _load_normalized(ptr, offs, mask, mean, std, in_scale, HAS_NORM: tl.constexpr):
    v = tl.load(ptr + offs, mask=mask, other=0).to(tl.float32) * in_scale  # 1/255 for uint8, else exact
    if HAS_NORM:
        v = (v - mean) / std
    return v


@triton.jit
def _mix_images(
    x_ptr, out_ptr, perm_ptr, lam_ptr, lam_value, box_ptr, box_y0, box_y1, box_x0, box_x1, mean_ptr,
    std_ptr, in_scale,
    pid, B, N, C, H, W, stride_xb, stride_ob, stride_c, stride_h, stride_w, n_blocks,
    PAIRED: tl.constexpr, LAM_KIND: tl.constexpr, BOX_KIND: tl.constexpr,
    HAS_NORM: tl.constexpr, NORM_SELECT: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    group = pid // n_blocks
    blk = (pid % n_blocks).to(tl.int32)  # in-sample offsets stay int32 (ops checks N < 2**31): cheap div/mod
    row_i = group
    row_j, valid = partner(perm_ptr, row_i, B, PAIRED)

    offs = blk * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)  # offset inside one sample, in memory order
    mask = offs < N
    mean = 0.0
    std = 1.0
    hh = offs
    ww = offs
    if HAS_NORM:
        ch = (offs // stride_c) % C
        mean = per_channel(mean_ptr, ch, C, mask, 0.0, NORM_SELECT)
        std = per_channel(std_ptr, ch, C, mask, 1.0, NORM_SELECT)
    if BOX_KIND != 0:
        hh = (offs // stride_h) % H
        ww = (offs // stride_w) % W

    a = _load_normalized(x_ptr + row_i * stride_xb, offs, mask, mean, std, in_scale, HAS_NORM)
    b = _load_normalized(x_ptr + row_j * stride_xb, offs, mask, mean, std, in_scale, HAS_NORM)

    lam_i = row_lam(lam_ptr, lam_value, row_i, 1, LAM_KIND)  # (B,) weights and (B, 4) boxes: contiguous
    w_i = pixel_weight(lam_i, box_ptr, 4, box_y0, box_y1, box_x0, box_x1, row_i, hh, ww, BOX_KIND)
    out_i = tl.where(valid & lam_ok(lam_i, LAM_KIND), lerp(b, a, w_i), float("nan"))
    out_dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + row_i * stride_ob + offs, cast_to(out_i, out_dtype, ROUND_BF16), mask=mask)
    if PAIRED:
        # The partner row, from the same two loads: this is what makes the in-place pass safe.
        lam_j = row_lam(lam_ptr, lam_value, row_j, 1, LAM_KIND)
        w_j = pixel_weight(lam_j, box_ptr, 4, box_y0, box_y1, box_x0, box_x1, row_j, hh, ww, BOX_KIND)
        out_j = tl.where(lam_ok(lam_j, LAM_KIND), lerp(a, b, w_j), float("nan"))
        tl.store(out_ptr + row_j * stride_ob + offs, cast_to(out_j, out_dtype, ROUND_BF16), mask=mask)


# The scalar box's values change every call: specializing on them (== 1, multiples of 16) would compile
# new variants as the boxes move.
@triton.jit(do_not_specialize=["box_y0", "box_y1", "box_x0", "box_x1"])
def _mix_fwd_kernel(
    x_ptr, out_ptr, perm_ptr, lamx_ptr, lamx_value, box_ptr, box_y0, box_y1, box_x0, box_x1,
    mean_ptr, std_ptr, in_scale,
    target_ptr, soft_ptr, lamy_ptr, lamy_value, off, keep,
    B, N, C, H, W, K, stride_xb, stride_ob, stride_c, stride_h, stride_w, stride_tb, stride_sb,
    n_blocks, n_image_programs,
    PAIRED: tl.constexpr, LAMX_KIND: tl.constexpr, LAMY_KIND: tl.constexpr, HAS_IMAGE: tl.constexpr,
    BOX_KIND: tl.constexpr, HAS_NORM: tl.constexpr, NORM_SELECT: tl.constexpr, HAS_TARGET: tl.constexpr,
    TARGET_DENSE: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # int64: row * stride overflows int32 on big batches
    if HAS_IMAGE:
        if pid < n_image_programs:
            _mix_images(
                x_ptr, out_ptr, perm_ptr, lamx_ptr, lamx_value, box_ptr, box_y0, box_y1, box_x0, box_x1,
                mean_ptr, std_ptr, in_scale,
                pid, B, N, C, H, W, stride_xb, stride_ob, stride_c, stride_h, stride_w, n_blocks,
                PAIRED, LAMX_KIND, BOX_KIND, HAS_NORM, NORM_SELECT, ROUND_BF16, BLOCK_SIZE,
            )
    if HAS_TARGET:
        if pid >= n_image_programs:
            mix_labels(
                target_ptr, soft_ptr, perm_ptr, lamy_ptr, lamy_value, 1, pid - n_image_programs, B, K,
                stride_tb, stride_sb, off, keep, PAIRED, LAMY_KIND, TARGET_DENSE, BLOCK_K,
            )


def _meta(t):
    """What of a tensor decides its kernel specialization and layout (None stays None)."""
    if t is None:
        return None
    return t.dtype, t.shape, t.stride(), t.data_ptr() % 16 == 0


def _plan_key(x, out, target, soft, perm, lam_x, lam_y, box, mean, std, in_scale, batch_size):
    return (
        _meta(x), _meta(out), x is not None and out is x, _meta(target), _meta(soft), _meta(perm),
        _meta(lam_x) if isinstance(lam_x, torch.Tensor) else 0,
        _meta(lam_y) if isinstance(lam_y, torch.Tensor) else 0,
        _meta(box) if isinstance(box, torch.Tensor) else box is not None,
        _meta(mean), _meta(std), in_scale, batch_size, plan_for_interpreter(),
        (x if x is not None else target).device,
    )


def _make_plan(x, out, target, soft, perm, lam_x, lam_y, box, mean, std, batch_size):
    """The launch for one call signature: (Launch, the layout integers the kernel takes)."""
    paired = perm is None
    n_groups = (batch_size + 1) // 2 if paired else batch_size
    has_image, has_target = x is not None, target is not None
    n_blocks, n_elems, channels, height, width = 0, 1, 1, 1, 1
    stride_c = stride_h = stride_w = 1
    block, warps = 128, 4
    if has_image:
        n_elems = x[0].numel() if batch_size else 0
        block, warps = image_block(n_elems)
        n_blocks = triton.cdiv(n_elems, block)
        if x.ndim >= 2:
            channels, stride_c = x.shape[1], x.stride(1)
        if x.ndim == 4:
            height, width, stride_h, stride_w = x.shape[2], x.shape[3], x.stride(2), x.stride(3)
    n_image_programs = n_groups * n_blocks
    n_programs = n_image_programs + (n_groups if has_target else 0)
    num_classes = soft.shape[1] if has_target else 1
    constexprs = dict(
        PAIRED=paired, LAMX_KIND=lam_kind(lam_x)[0], LAMY_KIND=lam_kind(lam_y)[0], HAS_IMAGE=has_image,
        BOX_KIND=box_kind(box), HAS_NORM=mean is not None, NORM_SELECT=mean is not None and channels <= 4,
        HAS_TARGET=has_target, TARGET_DENSE=has_target and target.ndim == 2,
        ROUND_BF16=has_image and out.dtype == torch.bfloat16 and plan_for_interpreter(),
        BLOCK_SIZE=block,
        BLOCK_K=label_block(num_classes),
        num_warps=warps,
    )
    layout = (
        batch_size, n_elems, channels, height, width, num_classes,
        x.stride(0) if has_image else 0, out.stride(0) if has_image else 0, stride_c, stride_h, stride_w,
        target.stride(0) if has_target else 0, soft.stride(0) if has_target else 0,
        n_blocks, n_image_programs,
    )
    if n_programs == 0:
        return None, layout
    return Launch(_mix_fwd_kernel, (n_programs,), constexprs), layout


_PLANS: dict = {}
_PLANS_MAX = 256


def mix_launch(
    x: torch.Tensor | None,
    out: torch.Tensor | None,
    target: torch.Tensor | None,
    soft: torch.Tensor | None,
    *,
    batch_size: int,
    perm: torch.Tensor | None,
    lam_x: torch.Tensor | float,
    lam_y: torch.Tensor | float,
    box: torch.Tensor | tuple | None,
    mean: torch.Tensor | None,
    std: torch.Tensor | None,
    in_scale: float,
    label_off: float,
    label_keep: float,
) -> None:
    """Launch the fused kernel. Validation, allocation and layout are the caller's job (mixrecipe.ops).

    A call signature (dtypes, shapes, strides, pointer alignment, which arguments are tensors) is planned
    once: later calls look the plan up and pass only the pointers and the numbers that change.

    Args:
        x: (B, ...) batch whose samples are each dense in memory (NCHW or channels_last), or None.
        out: output with x's strides (may be x itself for flip pairing), or None with x.
        target: (B,) int64 class indices or (B, K) float targets, or None.
        soft: (B, K) float32 output for the soft targets, or None with target.
        batch_size: B.
        perm: (B,) int32/int64 partners on the device, or None for the flip pairing i <-> B-1-i.
        lam_x: pixel weight of each sample itself: a float, a one-element or a contiguous (B,) float tensor.
        lam_y: label weight, likewise.
        box: (B, 4) int32 CutMix boxes (y0, y1, x0, x1); or one box for every sample as four ints, passed
            as scalars (no tensor, no host-device copy); or None.
        mean, std: (C,) float32 per-channel normalization on dim 1, or None.
        in_scale: multiplies raw inputs before normalization (1/255 for uint8).
        label_off, label_keep: soft target = t * label_keep + label_off (timm smoothing).
    """
    key = _plan_key(x, out, target, soft, perm, lam_x, lam_y, box, mean, std, in_scale, batch_size)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        plan = _PLANS[key] = _make_plan(x, out, target, soft, perm, lam_x, lam_y, box, mean, std, batch_size)
    run, layout = plan
    if run is None:
        return
    ref = x if x is not None else target  # stands in for pointers the kernel never reads
    if isinstance(box, torch.Tensor):
        box_tensor, (y0, y1, x0, x1) = box, (0, 0, 0, 0)
    else:
        box_tensor, (y0, y1, x0, x1) = ref, box or (0, 0, 0, 0)
    lam_x_t, lam_x_v = (lam_x, 0.0) if isinstance(lam_x, torch.Tensor) else (ref, float(lam_x))
    lam_y_t, lam_y_v = (lam_y, 0.0) if isinstance(lam_y, torch.Tensor) else (ref, float(lam_y))
    run(
        ref if x is None else x, ref if out is None else out, ref if perm is None else perm, lam_x_t, lam_x_v,
        box_tensor, int(y0), int(y1), int(x0), int(x1), ref if mean is None else mean,
        ref if std is None else std, float(in_scale),
        ref if target is None else target, ref if soft is None else soft, lam_y_t, lam_y_v,
        float(label_off), float(label_keep), *layout,
    )
