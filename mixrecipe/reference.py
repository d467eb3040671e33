"""Plain-PyTorch reference of every mixrecipe op: the semantics, written for clarity, not speed.

Everything here computes in float64 by default. Tests compare the Triton kernels and the fast eager
CPU path against these functions; benchmarks use them as the "eager" baseline so the two never drift.

Conventions shared by every op:
- ``lam`` is the weight of the sample itself: ``out[i] = lam[i] * x[i] + (1 - lam[i]) * x[perm[i]]``.
- ``perm=None`` is timm's flip pairing ``perm[i] = B - 1 - i``.
- Mixing uses torch.lerp's formula, so ``lam == 1`` gives ``x`` and ``lam == 0`` gives ``x[perm]`` exactly.
- A CutMix ``box`` is ``(y0, y1, x0, x1)`` per sample (half-open); pixels inside it take weight 0 (the
  partner's pixel), pixels outside take the pixel weight ``lam_x`` (1 for pure CutMix).
- Soft targets follow timm's ``mixup_target``: ``off = smoothing / K``, ``on = 1 - smoothing + off``;
  dense targets ``t`` are smoothed as ``t * (1 - smoothing) + off`` (the same for one-hot rows).
"""

from __future__ import annotations

import torch

__all__ = [
    "flip_perm",
    "lerp",
    "smooth_targets",
    "pixel_weights",
    "normalize",
    "mix_reference",
    "mixup_target_reference",
    "cutmix_lam",
]


def flip_perm(batch_size: int, device=None) -> torch.Tensor:
    """timm's pairing: sample i is mixed with sample B-1-i (an involution)."""
    return torch.arange(batch_size - 1, -1, -1, device=device)


def lerp(start: torch.Tensor, end: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """torch.lerp's two-sided formula, spelled out: exact at weight 0 (start) and 1 (end)."""
    diff = end - start
    return torch.where(weight < 0.5, start + weight * diff, end - diff * (1 - weight))


def _per_sample(value, batch_size: int, dtype=torch.float64, device=None) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=dtype, device=device)
    if t.ndim == 0:
        t = t.expand(batch_size)
    return t.reshape(batch_size)


def smooth_targets(
    target: torch.Tensor, num_classes: int, smoothing: float = 0.0, dtype=torch.float64
) -> torch.Tensor:
    """(B,) class indices or (B, K) dense targets -> (B, K) smoothed targets in ``dtype``."""
    off = smoothing / num_classes
    if target.ndim == 1:
        dense = torch.nn.functional.one_hot(target.long(), num_classes).to(dtype)
    else:
        dense = target.to(dtype)
    return dense * (1.0 - smoothing) + off


def normalize(x: torch.Tensor, mean=None, std=None, dtype=torch.float64) -> torch.Tensor:
    """Upcast; uint8 is scaled to [0, 1] first; then per-channel (dim 1) ``(x - mean) / std``."""
    y = x.to(dtype)
    if x.dtype == torch.uint8:
        y = y / 255.0
    if mean is not None:
        shape = [1, -1] + [1] * (x.ndim - 2)
        m = torch.as_tensor(mean, dtype=dtype, device=x.device).reshape(shape)
        s = torch.as_tensor(std, dtype=dtype, device=x.device).reshape(shape)
        y = (y - m) / s
    return y


def pixel_weights(x_shape, lam_x, box=None, dtype=torch.float64, device=None) -> torch.Tensor:
    """The weight of each sample's own pixel, broadcastable to ``x_shape``: lam_x, or 0 inside the box."""
    batch_size = x_shape[0]
    lam = _per_sample(lam_x, batch_size, dtype, device)
    w = lam.reshape([batch_size] + [1] * (len(x_shape) - 1))
    if box is None:
        return w
    height, width = x_shape[-2], x_shape[-1]
    box = torch.as_tensor(box, device=device).long()
    if box.ndim == 1:
        box = box.expand(batch_size, 4)
    rows = torch.arange(height, device=device).view(1, height, 1)
    cols = torch.arange(width, device=device).view(1, 1, width)
    y0, y1, x0, x1 = (box[:, k].view(-1, 1, 1) for k in range(4))
    inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)  # (B, H, W)
    w = torch.where(inside, torch.zeros((), dtype=dtype, device=device), lam.view(-1, 1, 1))
    return w.unsqueeze(1)  # (B, 1, H, W): the same box in every channel


def mix_reference(
    x: torch.Tensor | None,
    target: torch.Tensor | None,
    lam_x,
    lam_y=None,
    perm: torch.Tensor | None = None,
    box=None,
    num_classes: int | None = None,
    label_smoothing: float = 0.0,
    mean=None,
    std=None,
    out_dtype: torch.dtype | None = None,
    compute_dtype=torch.float64,
):
    """The fused op's semantics: (mixed images in ``out_dtype``, soft targets in float32).

    Images and targets are both optional; the absent one comes back as None.
    """
    ref = x if x is not None else target
    batch_size = ref.shape[0]
    device = ref.device
    p = flip_perm(batch_size, device) if perm is None else perm.to(device).long()
    lam_y = lam_x if lam_y is None else lam_y

    x_out = None
    if x is not None:
        xf = normalize(x, mean, std, compute_dtype)
        w = pixel_weights(x.shape, lam_x, box, compute_dtype, device)
        mixed = lerp(xf[p], xf, w)
        if out_dtype is None:
            out_dtype = x.dtype
        x_out = mixed.to(out_dtype)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            x_out = x_out.contiguous(memory_format=torch.channels_last)

    soft = None
    if target is not None:
        if num_classes is None:
            num_classes = target.shape[1]
        s = smooth_targets(target, num_classes, label_smoothing, compute_dtype)
        ly = _per_sample(lam_y, batch_size, compute_dtype, device).unsqueeze(1)
        soft = lerp(s[p], s, ly).to(torch.float32)
    return x_out, soft


def mixup_target_reference(target, num_classes, lam, perm=None, label_smoothing=0.0):
    """Soft targets only (timm's ``mixup_target`` generalised to per-sample lam and any perm)."""
    return mix_reference(
        None, target, lam, perm=perm, num_classes=num_classes, label_smoothing=label_smoothing
    )[1]


def cutmix_lam(box, height: int, width: int) -> torch.Tensor:
    """The kept-area fraction of each box: what timm calls the corrected lam."""
    box = torch.as_tensor(box).double()
    area = (box[..., 1] - box[..., 0]) * (box[..., 3] - box[..., 2])
    return 1.0 - area / float(height * width)
