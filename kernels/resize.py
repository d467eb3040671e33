"""One launch for a batch of random-resized crops: each decoded image's box, resized to S x S with an
antialiased bilinear filter, mirrored where asked, rounded to uint8.

The images of a batch have different sizes, so they travel as one flat uint8 buffer (their pixels, one
after another, each dense in CHW or HWC order) and a table with one int64 row per image:
``offset, H, W, stride_c, stride_h, stride_w, top, left, h, w, flip``.

The filter is PIL's and torch's antialiased bilinear resize (``F.interpolate(..., mode="bilinear",
antialias=True, align_corners=False)``): along each axis, output pixel i of a crop of n pixels resized to
S takes the input pixels j around ``center = scale * (i + 0.5)`` (scale = n / S) with the triangle weight
``max(0, 1 - |(j - center + 0.5) / max(scale, 1)|)``, normalized to sum to 1; the two axes are applied
together (one weighted sum over the 2-D window) in float32, then rounded half up and clamped to [0, 255].

Programs: one per (image, block of its output pixels). A program's window has at most
``(ceil(2 * max(scale_y, 1)) + 1) x (ceil(2 * max(scale_x, 1)) + 1)`` taps: 3 x 3 for an upscale, 5 x 5
for a crop of up to twice the output size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import image_block, launch_planned

__all__ = ["TABLE_COLUMNS", "resize_crops_launch"]

TABLE_COLUMNS = ("offset", "H", "W", "stride_c", "stride_h", "stride_w", "top", "left", "h", "w", "flip")


@triton.jit
def _axis(pos, n, S):
    """(first tap, taps, center, 1 / support scale, taps bound) of output positions ``pos`` along an axis
    of ``n`` crop pixels resized to ``S``."""
    scale = n.to(tl.float32) / S
    support = tl.maximum(scale, 1.0)
    inv = 1.0 / support
    center = scale * (pos.to(tl.float32) + 0.5)
    lo = tl.maximum((center - support + 0.5).to(tl.int32), 0)  # truncation toward zero, as torch's cast
    hi = tl.minimum((center + support + 0.5).to(tl.int32), n)
    bound = tl.ceil(2.0 * support).to(tl.int32) + 1
    return lo, hi - lo, center, inv, bound


@triton.jit
def _resize_crops_kernel(
    src_ptr, table_ptr, out_ptr, S, N, C,
    stride_ob, stride_oc, stride_oh, stride_ow, n_blocks,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_blocks
    blk = (pid % n_blocks).to(tl.int32)
    t = table_ptr + row * 11
    offset = tl.load(t)
    height = tl.load(t + 1).to(tl.int32)
    width = tl.load(t + 2).to(tl.int32)
    sc, sh, sw = tl.load(t + 3), tl.load(t + 4), tl.load(t + 5)
    top = tl.load(t + 6).to(tl.int32)
    left = tl.load(t + 7).to(tl.int32)
    h = tl.load(t + 8).to(tl.int32)
    w = tl.load(t + 9).to(tl.int32)
    flip = tl.load(t + 10)

    offs = blk * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)  # offset inside one output image, in memory order
    mask = offs < N
    ch = (offs // stride_oc) % C
    yy = (offs // stride_oh) % S
    xx = (offs // stride_ow) % S
    xx = tl.where(flip != 0, S - 1 - xx, xx)  # a mirrored output column shows the crop's column S-1-x

    y0, ny, cy, inv_y, bound_y = _axis(yy, h, S)
    x0, nx, cx, inv_x, bound_x = _axis(xx, w, S)
    # A box outside its image (a bad table row) reads nothing: its pixels come out 0.
    box_ok = (top >= 0) & (left >= 0) & (h > 0) & (w > 0) & (top + h <= height) & (left + w <= width)
    base = src_ptr + offset + ch.to(tl.int64) * sc
    acc = tl.zeros((BLOCK_SIZE,), tl.float32)
    sum_x = tl.zeros((BLOCK_SIZE,), tl.float32)
    for tx in range(0, bound_x):  # the horizontal weights' sum, once
        jx = x0 + tx
        wx = tl.maximum(1.0 - tl.abs((jx.to(tl.float32) - cx + 0.5) * inv_x), 0.0)
        sum_x += tl.where(tx < nx, wx, 0.0)
    sum_y = tl.zeros((BLOCK_SIZE,), tl.float32)
    for ty in range(0, bound_y):
        jy = y0 + ty
        wy = tl.maximum(1.0 - tl.abs((jy.to(tl.float32) - cy + 0.5) * inv_y), 0.0)
        wy = tl.where(ty < ny, wy, 0.0)
        sum_y += wy
        line = tl.zeros((BLOCK_SIZE,), tl.float32)
        for tx in range(0, bound_x):
            jx = x0 + tx
            wx = tl.maximum(1.0 - tl.abs((jx.to(tl.float32) - cx + 0.5) * inv_x), 0.0)
            take = mask & box_ok & (ty < ny) & (tx < nx)
            v = tl.load(base + (top + jy).to(tl.int64) * sh + (left + jx).to(tl.int64) * sw, mask=take,
                        other=0).to(tl.float32)
            line += wx * v  # a tap past the window was not loaded: v = 0
        acc += wy * line
    value = acc / (sum_x * sum_y)
    value = tl.minimum(tl.maximum(tl.floor(value + 0.5), 0.0), 255.0)
    value = tl.where(box_ok, value, 0.0)
    tl.store(out_ptr + row * stride_ob + offs, value.to(tl.uint8), mask=mask)


def resize_crops_launch(src: torch.Tensor, table: torch.Tensor, out: torch.Tensor) -> None:
    """Launch the kernel. Validation is the caller's (``mixrecipe.gpu_decode``).

    Args:
        src: flat uint8 buffer of the batch's images.
        table: (B, 11) int64, one row per image (:data:`TABLE_COLUMNS`), on ``src``'s device.
        out: (B, C, S, S) uint8, each image dense (NCHW or channels_last).
    """
    batch, channels, size, _ = out.shape
    n_elems = channels * size * size
    block, warps = image_block(n_elems)
    n_blocks = triton.cdiv(n_elems, block)
    if batch == 0:
        return
    launch_planned(
        _resize_crops_kernel, (batch * n_blocks,),
        (src, table, out, size, n_elems, channels,
         out.stride(0), out.stride(1), out.stride(2), out.stride(3), n_blocks),
        dict(BLOCK_SIZE=block, num_warps=warps),
    )
