"""One pass from a uint8 data set to an augmented, normalized, mixed batch: gather + crop/flip + normalize +
CutMix box + lerp + soft labels.

The data set (N, C, H, W) uint8 lives on the device. Each output row ``r`` is sample ``idx[r]`` read at its
cropped and flipped coordinates: output pixel (h, w) comes from (h + oy[r] - pad, w' + ox[r] - pad) with
w' = W-1-w when ``flip[r]`` (crop first, then flip: the padded image's window, mirrored), zero outside the
image (zero padding, before normalization, as ``F.pad`` on the uint8 image). Then, as kernels/mixup.py:
``out_r = lerp(partner, own, w)`` with w = λ_r outside row r's CutMix box and 0 inside, the partner being
row B-1-r (flip pairing) or perm[r]. Labels: timm's smoothed one-hot targets, mixed with the label λ.

Programs, told apart by their id:
- image programs: one per (row group, block of a sample). Flip pairing: a group is the pair (i, B-1-i), both
  rows written from the same two gathers; a permutation: a group is one row i, its partner gathered too;
- label programs: one per row group.

Bytes moved for B rows of M = C*H*W pixels, output of E bytes a pixel:
  flip pairing: read B*M (uint8, from the data set) + write B*M*E;
  a permutation: read 2*B*M + write B*M*E. Per row also idx, offsets, flip bit (and λ, box): ~30 bytes.
  The same batch through loader workers: gather + crop + flip on the host (B*M read, B*M written twice),
  a host-to-device copy of B*M, then the mix kernel's B*M read + B*M*E write.
Labels add B*K*4 bytes written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    box_kind,
    cast_to,
    image_block,
    label_block,
    lam_kind,
    lam_ok,
    launch_planned,
    lerp,
    mix_labels,
    partner,
    per_channel,
    pixel_weight,
    plan_for_interpreter,
    row_lam,
)

__all__ = ["augment_mix_launch"]


@triton.jit
def _gather(data_ptr, idx_ptr, oy_ptr, ox_ptr, flip_ptr, row, ch, hh, ww, mask, mean, std, in_scale,
            N_data, H, W, pad, stride_dn, stride_dc, stride_dh, stride_dw,
            HAS_CROP: tl.constexpr, HAS_FLIP: tl.constexpr):
    """Row ``row`` of the batch at output pixels (ch, hh, ww), normalized fp32; (values, sample valid)."""
    sample = tl.load(idx_ptr + row)
    ok = (sample >= 0) & (sample < N_data)
    sample = tl.where(ok, sample, 0)
    sy = hh
    sx = ww
    if HAS_FLIP:
        f = tl.load(flip_ptr + row)
        sx = tl.where(f != 0, W - 1 - ww, ww)
    if HAS_CROP:
        dy = tl.load(oy_ptr + row).to(tl.int32) - pad
        dx = tl.load(ox_ptr + row).to(tl.int32) - pad
        sy = sy + dy
        sx = sx + dx
    inb = mask & (sy >= 0) & (sy < H) & (sx >= 0) & (sx < W)
    src = data_ptr + sample * stride_dn
    v = tl.load(src + ch * stride_dc + sy * stride_dh + sx * stride_dw, mask=inb, other=0).to(tl.float32)
    v = (v * in_scale - mean) / std  # as kernels/mixup.py: the same rounding
    return v, ok


@triton.jit
def _augment_images(
    data_ptr, idx_ptr, oy_ptr, ox_ptr, flip_ptr, out_ptr, perm_ptr,
    lam_ptr, lam_value, stride_lam, box_ptr, stride_box, box_y0, box_y1, box_x0, box_x1,
    mean_ptr, std_ptr, in_scale,
    pid, B, N, N_data, C, H, W, pad, stride_dn, stride_dc, stride_dh, stride_dw,
    stride_ob, stride_oc, stride_oh, stride_ow, n_blocks,
    PAIRED: tl.constexpr, LAM_KIND: tl.constexpr, BOX_KIND: tl.constexpr,
    HAS_CROP: tl.constexpr, HAS_FLIP: tl.constexpr, NORM_SELECT: tl.constexpr, ROUND_BF16: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    row_i = pid // n_blocks
    blk = (pid % n_blocks).to(tl.int32)  # in-sample offsets stay int32 (N < 2**31 is checked on the host)
    row_j, valid = partner(perm_ptr, row_i, B, PAIRED)

    offs = blk * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)  # offset inside one output sample, in memory order
    mask = offs < N
    ch = (offs // stride_oc) % C
    hh = (offs // stride_oh) % H
    ww = (offs // stride_ow) % W
    mean = per_channel(mean_ptr, ch, C, mask, 0.0, NORM_SELECT)
    std = per_channel(std_ptr, ch, C, mask, 1.0, NORM_SELECT)

    a, ok_i = _gather(data_ptr, idx_ptr, oy_ptr, ox_ptr, flip_ptr, row_i, ch, hh, ww, mask, mean, std,
                      in_scale, N_data, H, W, pad, stride_dn, stride_dc, stride_dh, stride_dw, HAS_CROP,
                      HAS_FLIP)
    b, ok_j = _gather(data_ptr, idx_ptr, oy_ptr, ox_ptr, flip_ptr, row_j, ch, hh, ww, mask, mean, std,
                      in_scale, N_data, H, W, pad, stride_dn, stride_dc, stride_dh, stride_dw, HAS_CROP,
                      HAS_FLIP)
    good = valid & ok_i & ok_j
    out_dtype = out_ptr.dtype.element_ty

    lam_i = row_lam(lam_ptr, lam_value, row_i, stride_lam, LAM_KIND)
    w_i = pixel_weight(lam_i, box_ptr, stride_box, box_y0, box_y1, box_x0, box_x1, row_i, hh, ww,
                       BOX_KIND)
    out_i = tl.where(good & lam_ok(lam_i, LAM_KIND), lerp(b, a, w_i), float("nan"))
    tl.store(out_ptr + row_i * stride_ob + offs, cast_to(out_i, out_dtype, ROUND_BF16), mask=mask)
    if PAIRED:
        # The partner row from the same two gathers (with an odd B the middle row writes itself twice).
        lam_j = row_lam(lam_ptr, lam_value, row_j, stride_lam, LAM_KIND)
        w_j = pixel_weight(lam_j, box_ptr, stride_box, box_y0, box_y1, box_x0, box_x1, row_j, hh, ww,
                           BOX_KIND)
        out_j = tl.where(good & lam_ok(lam_j, LAM_KIND), lerp(a, b, w_j), float("nan"))
        tl.store(out_ptr + row_j * stride_ob + offs, cast_to(out_j, out_dtype, ROUND_BF16), mask=mask)


# The scalar box moves every call: specializing on its values would compile new variants as it moves.
@triton.jit(do_not_specialize=["box_y0", "box_y1", "box_x0", "box_x1"])
def _augment_mix_kernel(
    data_ptr, idx_ptr, oy_ptr, ox_ptr, flip_ptr, out_ptr, perm_ptr,
    lamx_ptr, lamx_value, stride_lamx, box_ptr, stride_box, box_y0, box_y1, box_x0, box_x1,
    mean_ptr, std_ptr, in_scale,
    target_ptr, soft_ptr, lamy_ptr, lamy_value, stride_lamy, off, keep,
    B, N, N_data, C, H, W, K, pad, stride_dn, stride_dc, stride_dh, stride_dw,
    stride_ob, stride_oc, stride_oh, stride_ow, stride_sb, n_blocks, n_image_programs,
    PAIRED: tl.constexpr, LAMX_KIND: tl.constexpr, LAMY_KIND: tl.constexpr, BOX_KIND: tl.constexpr,
    HAS_CROP: tl.constexpr, HAS_FLIP: tl.constexpr, NORM_SELECT: tl.constexpr,
    HAS_TARGET: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # int64: row * stride overflows int32 on big batches
    if pid < n_image_programs:
        _augment_images(
            data_ptr, idx_ptr, oy_ptr, ox_ptr, flip_ptr, out_ptr, perm_ptr,
            lamx_ptr, lamx_value, stride_lamx, box_ptr, stride_box, box_y0, box_y1, box_x0, box_x1,
            mean_ptr, std_ptr, in_scale,
            pid, B, N, N_data, C, H, W, pad, stride_dn, stride_dc, stride_dh, stride_dw,
            stride_ob, stride_oc, stride_oh, stride_ow, n_blocks,
            PAIRED, LAMX_KIND, BOX_KIND, HAS_CROP, HAS_FLIP, NORM_SELECT, ROUND_BF16, BLOCK_SIZE,
        )
    if HAS_TARGET:
        if pid >= n_image_programs:
            mix_labels(target_ptr, soft_ptr, perm_ptr, lamy_ptr, lamy_value, stride_lamy,
                       pid - n_image_programs, B, K, 0, stride_sb, off, keep, PAIRED, LAMY_KIND, False,
                       BLOCK_K)


def augment_mix_launch(
    data: torch.Tensor,
    idx: torch.Tensor,
    oy: torch.Tensor | None,
    ox: torch.Tensor | None,
    flip: torch.Tensor | None,
    out: torch.Tensor,
    target: torch.Tensor | None,
    soft: torch.Tensor | None,
    *,
    pad: int,
    perm: torch.Tensor | None,
    lam_x: torch.Tensor | float,
    lam_y: torch.Tensor | float,
    box: torch.Tensor | tuple | None,
    mean: torch.Tensor,
    std: torch.Tensor,
    in_scale: float,
    label_off: float,
    label_keep: float,
) -> None:
    """Launch the fused kernel. Validation and allocation are the caller's (``mixrecipe.gpu_data``).

    Args:
        data: (N, C, H, W) uint8 data set, any strides.
        idx: (B,) int64 sample of each row.
        oy, ox: (B,) integer crop offsets in [0, 2 * pad], or both None (no crop).
        flip: (B,) bool or uint8 horizontal flip bits, or None.
        out: (B, C, H, W) float32/float16/bfloat16 output, each sample dense (NCHW or channels_last).
        target: (B,) int64 class indices (the rows' labels), or None; soft: (B, K) float32 with target.
        pad: the crop's zero padding on each side.
        perm: (B,) int64 partners, or None for the flip pairing i <-> B-1-i.
        lam_x, lam_y: pixel and label weight of each row itself: a float, a 0-d or a (B,) float32 tensor.
        box: CutMix boxes (y0, y1, x0, x1) in output pixels: (4,) or (B, 4) int32 tensor, four ints, or None.
        mean, std: (C,) float32 normalization, (value * in_scale - mean) / std; in_scale: 1/255 for
            values in [0, 1] units.
        label_off, label_keep: soft target = onehot * label_keep + label_off.
    """
    batch, channels, height, width = out.shape
    paired = perm is None
    n_groups = (batch + 1) // 2 if paired else batch
    n_elems = channels * height * width
    block, warps = image_block(n_elems)
    n_blocks = triton.cdiv(n_elems, block) if batch else 0
    n_image_programs = n_groups * n_blocks
    has_target = target is not None
    n_programs = n_image_programs + (n_groups if has_target else 0)
    if n_programs == 0:
        return
    dummy = out  # stands in for pointers the kernel never reads
    num_classes = soft.shape[1] if has_target else 1
    block_k = label_block(num_classes)
    lamx_kind, stride_lamx = lam_kind(lam_x)
    lamy_kind, stride_lamy = lam_kind(lam_y)
    lamx_ptr, lamx_value = (lam_x, 0.0) if lamx_kind else (None, float(lam_x))
    lamy_ptr, lamy_value = (lam_y, 0.0) if lamy_kind else (None, float(lam_y))
    kind = box_kind(box)
    box_values = tuple(int(v) for v in box) if kind == 1 else (0, 0, 0, 0)
    box_tensor = box if kind == 2 else None
    stride_box = (box.stride(0) if box.ndim == 2 else 0) if kind == 2 else 0
    has_crop = oy is not None
    round_bf16 = out.dtype == torch.bfloat16 and plan_for_interpreter()

    launch_planned(
        _augment_mix_kernel, (n_programs,),
        (
            data, idx, oy if has_crop else dummy, ox if has_crop else dummy,
            flip if flip is not None else dummy, out, perm if perm is not None else dummy,
            lamx_ptr if lamx_ptr is not None else dummy, lamx_value, stride_lamx,
            box_tensor if box_tensor is not None else dummy, stride_box, *box_values,
            mean, std, float(in_scale),
            target if has_target else dummy, soft if has_target else dummy,
            lamy_ptr if lamy_ptr is not None else dummy, lamy_value, stride_lamy,
            float(label_off), float(label_keep),
            batch, n_elems, data.shape[0], channels, height, width, num_classes, int(pad) if has_crop else 0,
            data.stride(0), data.stride(1), data.stride(2), data.stride(3),
            out.stride(0), out.stride(1), out.stride(2), out.stride(3), soft.stride(0) if has_target else 0,
            n_blocks, n_image_programs,
        ),
        dict(
            PAIRED=paired, LAMX_KIND=lamx_kind, LAMY_KIND=lamy_kind, BOX_KIND=kind, HAS_CROP=has_crop,
            HAS_FLIP=flip is not None,
            NORM_SELECT=channels <= 4, HAS_TARGET=has_target, ROUND_BF16=round_bf16,
            BLOCK_SIZE=block, BLOCK_K=block_k, num_warps=warps,
        ),
    )
