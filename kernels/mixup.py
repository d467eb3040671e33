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

from ._common import cast_to, launch, lerp, per_channel, plan_for_interpreter

__all__ = ["mix_launch"]


# Helpers below assign in both branches of a constexpr `if` and return once: `triton.compile` rejects a
# function whose branches return different types (a block vs a scalar), which the interpreter accepts.
@triton.jit
def _row_lam(lam_ptr, lam_value, row, LAM_SCALAR: tl.constexpr):
    if LAM_SCALAR:
        lam = lam_value
    else:
        lam = tl.load(lam_ptr + row).to(tl.float32)
    return lam


@triton.jit
def _pixel_weight(lam, box_ptr, box_y0, box_y1, box_x0, box_x1, row, hh, ww, HAS_BOX: tl.constexpr,
                  BOX_SCALAR: tl.constexpr):
    # Inside the CutMix box the pixel comes from the partner (weight 0); outside it is lam. One box for the
    # batch comes as four scalars (y0, y1, x0, x1): a host-drawn box needs no copy to the device.
    if HAS_BOX:
        if BOX_SCALAR:
            y0, y1, x0, x1 = box_y0, box_y1, box_x0, box_x1
        else:
            y0 = tl.load(box_ptr + row * 4 + 0)
            y1 = tl.load(box_ptr + row * 4 + 1)
            x0 = tl.load(box_ptr + row * 4 + 2)
            x1 = tl.load(box_ptr + row * 4 + 3)
        inside = (hh >= y0) & (hh < y1) & (ww >= x0) & (ww < x1)
        w = tl.where(inside, 0.0, lam)
    else:
        w = lam
    return w


@triton.jit
def _load_normalized(ptr, offs, mask, mean, inv_std, in_scale, HAS_NORM: tl.constexpr):
    v = tl.load(ptr + offs, mask=mask, other=0).to(tl.float32)
    if HAS_NORM:
        v = (v * in_scale - mean) * inv_std
    return v


@triton.jit
def _partner(perm_ptr, row_i, B, PAIRED: tl.constexpr):
    """(row_j, valid): flip pairing or perm[row_i]. Bad indices can't be checked on the host without a
    sync, so an out-of-range partner is replaced by the row itself and reported invalid (-> NaN output)."""
    if PAIRED:
        row_j = B - 1 - row_i
    else:
        row_j = tl.load(perm_ptr + row_i)
    valid = (row_j >= 0) & (row_j < B)
    return tl.where(valid, row_j, row_i), valid


@triton.jit
def _mix_images(
    x_ptr, out_ptr, perm_ptr, lam_ptr, lam_value, box_ptr, box_y0, box_y1, box_x0, box_x1, mean_ptr,
    inv_std_ptr, in_scale,
    pid, B, N, C, H, W, stride_xb, stride_ob, stride_c, stride_h, stride_w, n_blocks,
    PAIRED: tl.constexpr, LAM_SCALAR: tl.constexpr, HAS_BOX: tl.constexpr, BOX_SCALAR: tl.constexpr,
    HAS_NORM: tl.constexpr, NORM_SELECT: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    group = pid // n_blocks
    blk = (pid % n_blocks).to(tl.int32)  # in-sample offsets stay int32 (ops checks N < 2**31): cheap div/mod
    row_i = group
    row_j, valid = _partner(perm_ptr, row_i, B, PAIRED)

    offs = blk * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)  # offset inside one sample, in memory order
    mask = offs < N
    mean = 0.0
    inv_std = 1.0
    hh = offs
    ww = offs
    if HAS_NORM:
        ch = (offs // stride_c) % C
        mean = per_channel(mean_ptr, ch, C, mask, 0.0, NORM_SELECT)
        inv_std = per_channel(inv_std_ptr, ch, C, mask, 1.0, NORM_SELECT)
    if HAS_BOX:
        hh = (offs // stride_h) % H
        ww = (offs // stride_w) % W

    a = _load_normalized(x_ptr + row_i * stride_xb, offs, mask, mean, inv_std, in_scale, HAS_NORM)
    b = _load_normalized(x_ptr + row_j * stride_xb, offs, mask, mean, inv_std, in_scale, HAS_NORM)

    lam_i = _row_lam(lam_ptr, lam_value, row_i, LAM_SCALAR)
    w_i = _pixel_weight(lam_i, box_ptr, box_y0, box_y1, box_x0, box_x1, row_i, hh, ww, HAS_BOX, BOX_SCALAR)
    out_i = lerp(b, a, w_i)
    out_i = tl.where(valid, out_i, float("nan"))
    out_dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + row_i * stride_ob + offs, cast_to(out_i, out_dtype, ROUND_BF16), mask=mask)
    if PAIRED:
        # The partner row, from the same two loads: this is what makes the in-place pass safe.
        lam_j = _row_lam(lam_ptr, lam_value, row_j, LAM_SCALAR)
        w_j = _pixel_weight(lam_j, box_ptr, box_y0, box_y1, box_x0, box_x1, row_j, hh, ww, HAS_BOX,
                            BOX_SCALAR)
        out_j = lerp(a, b, w_j)
        tl.store(out_ptr + row_j * stride_ob + offs, cast_to(out_j, out_dtype, ROUND_BF16), mask=mask)


@triton.jit
def _smoothed(target_ptr, stride_tb, row, ks, kmask, off, keep, TARGET_DENSE: tl.constexpr):
    # s(t) = t * (1 - smoothing) + smoothing / K; for class indices t is one-hot.
    if TARGET_DENSE:
        t = tl.load(target_ptr + row * stride_tb + ks, mask=kmask, other=0.0).to(tl.float32)
    else:
        t = (ks == tl.load(target_ptr + row)).to(tl.float32)
    return t * keep + off


@triton.jit
def _mix_labels(
    target_ptr, soft_ptr, perm_ptr, lam_ptr, lam_value, group, B, K, stride_tb, stride_sb, off, keep,
    PAIRED: tl.constexpr, LAM_SCALAR: tl.constexpr, TARGET_DENSE: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row_i = group
    row_j, valid = _partner(perm_ptr, row_i, B, PAIRED)
    if not TARGET_DENSE:
        # A class index outside [0, K) poisons its own row (and its partner's) with NaN: never silent.
        ci = tl.load(target_ptr + row_i)
        cj = tl.load(target_ptr + row_j)
        valid = valid & (ci >= 0) & (ci < K) & (cj >= 0) & (cj < K)
    lam_i = _row_lam(lam_ptr, lam_value, row_i, LAM_SCALAR)
    lam_j = _row_lam(lam_ptr, lam_value, row_j, LAM_SCALAR)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        s_i = _smoothed(target_ptr, stride_tb, row_i, ks, kmask, off, keep, TARGET_DENSE)
        s_j = _smoothed(target_ptr, stride_tb, row_j, ks, kmask, off, keep, TARGET_DENSE)
        y_i = tl.where(valid, lerp(s_j, s_i, lam_i), float("nan"))
        tl.store(soft_ptr + row_i * stride_sb + ks, y_i, mask=kmask)
        if PAIRED:
            y_j = tl.where(valid, lerp(s_i, s_j, lam_j), float("nan"))
            tl.store(soft_ptr + row_j * stride_sb + ks, y_j, mask=kmask)


# The scalar box's values change every call: specializing on them (== 1, multiples of 16) would compile
# new variants as the boxes move.
@triton.jit(do_not_specialize=["box_y0", "box_y1", "box_x0", "box_x1"])
def _mix_fwd_kernel(
    x_ptr, out_ptr, perm_ptr, lamx_ptr, lamx_value, box_ptr, box_y0, box_y1, box_x0, box_x1,
    mean_ptr, inv_std_ptr, in_scale,
    target_ptr, soft_ptr, lamy_ptr, lamy_value, off, keep,
    B, N, C, H, W, K, stride_xb, stride_ob, stride_c, stride_h, stride_w, stride_tb, stride_sb,
    n_blocks, n_image_programs,
    PAIRED: tl.constexpr, LAMX_SCALAR: tl.constexpr, LAMY_SCALAR: tl.constexpr, HAS_IMAGE: tl.constexpr,
    HAS_BOX: tl.constexpr, BOX_SCALAR: tl.constexpr, HAS_NORM: tl.constexpr, NORM_SELECT: tl.constexpr,
    HAS_TARGET: tl.constexpr,
    TARGET_DENSE: tl.constexpr,
    ROUND_BF16: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # int64: row * stride overflows int32 on big batches
    if HAS_IMAGE:
        if pid < n_image_programs:
            _mix_images(
                x_ptr, out_ptr, perm_ptr, lamx_ptr, lamx_value, box_ptr, box_y0, box_y1, box_x0, box_x1,
                mean_ptr, inv_std_ptr, in_scale,
                pid, B, N, C, H, W, stride_xb, stride_ob, stride_c, stride_h, stride_w, n_blocks,
                PAIRED, LAMX_SCALAR, HAS_BOX, BOX_SCALAR, HAS_NORM, NORM_SELECT, ROUND_BF16, BLOCK_SIZE,
            )
    if HAS_TARGET:
        if pid >= n_image_programs:
            _mix_labels(
                target_ptr, soft_ptr, perm_ptr, lamy_ptr, lamy_value, pid - n_image_programs, B, K,
                stride_tb, stride_sb, off, keep, PAIRED, LAMY_SCALAR, TARGET_DENSE, BLOCK_K,
            )


def _block_size(n: int) -> tuple[int, int]:
    """(BLOCK_SIZE, num_warps). The interpreter runs programs one by one, so it gets few, big ones."""
    if plan_for_interpreter():
        return min(triton.next_power_of_2(max(n, 1)), 1 << 14), 1
    if n >= 8192:
        return 4096, 8
    return max(128, min(triton.next_power_of_2(n), 2048)), 4


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
    inv_std: torch.Tensor | None,
    in_scale: float,
    label_off: float,
    label_keep: float,
) -> None:
    """Launch the fused kernel. Validation, allocation and layout are the caller's job (mixrecipe.ops).

    Args:
        x: (B, ...) batch whose samples are each dense in memory (NCHW or channels_last), or None.
        out: output with x's strides (may be x itself for flip pairing), or None with x.
        target: (B,) int64 class indices or (B, K) float targets, or None.
        soft: (B, K) float32 output for the soft targets, or None with target.
        batch_size: B.
        perm: (B,) int64 partners on the device, or None for the flip pairing i <-> B-1-i.
        lam_x: pixel weight of each sample itself: a float or a (B,) float32 tensor.
        lam_y: label weight, likewise.
        box: (B, 4) int32 CutMix boxes (y0, y1, x0, x1); or one box for every sample as four ints, passed
            as scalars (no tensor, no host-device copy); or None.
        mean, inv_std: (C,) float32 per-channel normalization on dim 1, or None.
        in_scale: multiplies raw inputs before normalization (1/255 for uint8).
        label_off, label_keep: soft target = t * label_keep + label_off (timm smoothing).
    """
    paired = perm is None
    n_groups = (batch_size + 1) // 2 if paired else batch_size
    has_image = x is not None
    has_target = target is not None
    ref = x if has_image else target
    dummy = torch.empty(1, dtype=torch.float32, device=ref.device)

    n_blocks = 0
    block, warps = 128, 4
    n_elems, channels, height, width = 1, 1, 1, 1
    stride_c = stride_h = stride_w = 1
    if has_image:
        n_elems = x[0].numel() if batch_size else 0
        block, warps = _block_size(n_elems)
        n_blocks = triton.cdiv(n_elems, block)
        if x.ndim >= 2:
            channels, stride_c = x.shape[1], x.stride(1)
        if x.ndim == 4:
            height, width, stride_h, stride_w = x.shape[2], x.shape[3], x.stride(2), x.stride(3)
    n_image_programs = n_groups * n_blocks
    n_programs = n_image_programs + (n_groups if has_target else 0)
    if n_programs == 0:
        return

    num_classes = soft.shape[1] if has_target else 1
    block_k = min(triton.next_power_of_2(num_classes), 1 << 14 if plan_for_interpreter() else 2048)
    lamx_scalar = not isinstance(lam_x, torch.Tensor)
    lamy_scalar = not isinstance(lam_y, torch.Tensor)
    round_bf16 = has_image and out.dtype == torch.bfloat16 and plan_for_interpreter()
    box_scalar = isinstance(box, tuple)
    box_values = tuple(int(v) for v in box) if box_scalar else (0, 0, 0, 0)

    launch(
        _mix_fwd_kernel, (n_programs,),
        x if has_image else dummy, out if has_image else dummy, perm if perm is not None else dummy,
        dummy if lamx_scalar else lam_x, float(lam_x) if lamx_scalar else 0.0,
        dummy if box is None or box_scalar else box, *box_values,
        mean if mean is not None else dummy, inv_std if inv_std is not None else dummy, float(in_scale),
        target if has_target else dummy, soft if has_target else dummy,
        dummy if lamy_scalar else lam_y, float(lam_y) if lamy_scalar else 0.0,
        float(label_off), float(label_keep),
        batch_size, n_elems, channels, height, width, num_classes,
        x.stride(0) if has_image else 0, out.stride(0) if has_image else 0, stride_c, stride_h, stride_w,
        target.stride(0) if has_target else 0, soft.stride(0) if has_target else 0,
        n_blocks, n_image_programs,
        PAIRED=paired, LAMX_SCALAR=lamx_scalar, LAMY_SCALAR=lamy_scalar, HAS_IMAGE=has_image,
        HAS_BOX=box is not None, BOX_SCALAR=box_scalar, HAS_NORM=mean is not None,
        NORM_SELECT=mean is not None and channels <= 4, HAS_TARGET=has_target,
        TARGET_DENSE=has_target and target.ndim == 2, ROUND_BF16=round_bf16,
        BLOCK_SIZE=block, BLOCK_K=block_k, num_warps=warps,
    )
