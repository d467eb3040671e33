"""Every random draw of the mixing policies, made once, on the host.

λ ~ Beta(α, α), the apply coin, the Mixup/CutMix switch, CutMix boxes and partner permutations are drawn
from a CPU ``torch.Generator`` (None: the CPU default generator, seeded by ``torch.manual_seed``), as timm
draws from numpy's: nothing is computed on the GPU, so a CUDA call gets host numbers for the fused kernel's
scalar arguments (one λ and box per batch) or one host-to-device copy of all its per-sample values.

The formulas are written once, for one call's ``n`` draws (1 for mode "batch", a value per pair or per
sample otherwise), on an array namespace: Python floats with ``math`` for one draw (a few µs; numpy on
1-element arrays costs several times that), numpy arrays for many. Both take the same uniform and Gamma
draws in the same order, so one draw made either way has the same value.

Beta(a, a) = G1 / (G1 + G2) with G1, G2 ~ Gamma(a). For a < 1 it is computed in log space, as
``sigmoid(log G1 - log G2)`` with ``log G(a) = log G(a + 1) - E / a`` (E ~ Exp(1)): the plain ratio
underflows to 0/0 for small a. For a = 1 (CIFAR's α, CutMix's default) Beta(1, 1) is the uniform law.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from .checks import check_generator

__all__ = ["Draw", "host_generator", "uniforms", "beta", "cut_box", "minmax_box", "box_area_lam",
           "draw_mix", "random_permutation", "random_involution", "to_device"]


def host_generator(generator):
    """The generator as the draws take it: a CPU ``torch.Generator`` or None (the CPU default one)."""
    generator = check_generator(generator)
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator (mixrecipe draws on the host), got one on "
                         f"{generator.device}")
    return generator


class _Scalars:
    """The array namespace for one draw: Python floats."""
    floor, sqrt, log, exp = math.floor, math.sqrt, math.log, math.exp

    @staticmethod
    def where(cond, a, b):
        return a if cond else b

    @staticmethod
    def clip(v, lo, hi):
        return min(max(v, lo), hi)

    @staticmethod
    def minimum(a, b):
        return min(a, b)


class _Arrays:
    """The array namespace for many draws: float64 numpy arrays."""
    floor, sqrt, log, exp = np.floor, np.sqrt, np.log, np.exp
    where, clip, minimum = np.where, np.clip, np.minimum


def uniforms(rows: int, n: int, generator):
    """``rows`` rows of ``n`` U[0, 1) draws: a list of floats per row for n = 0 (one draw each: a list of
    ``rows`` floats), else a (rows, n) float64 array."""
    u = torch.rand(rows * max(n, 1), generator=generator, dtype=torch.float64)
    return u.tolist() if n == 0 else u.numpy().reshape(rows, n)


def beta(alpha: float, n: int, generator):
    """``n`` draws of Beta(alpha, alpha) (n = 0: one float)."""
    xp = _Scalars if n == 0 else _Arrays
    if alpha == 1.0:
        return uniforms(1, n, generator)[0]
    rows = 2 if alpha > 1.0 else 4
    conc = torch.full((rows, max(n, 1)), alpha + (alpha < 1.0), dtype=torch.float64)
    if alpha < 1.0:
        conc[2:] = 1.0
    g = torch._standard_gamma(conc, generator=generator)
    g = [row[0] for row in g.tolist()] if n == 0 else g.numpy()
    if alpha > 1.0:
        return g[0] / (g[0] + g[1])
    d = (xp.log(g[0]) - g[2] / alpha) - (xp.log(g[1]) - g[3] / alpha)
    e = xp.exp(-abs(d))  # the logistic function without overflow
    return xp.where(d >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def cut_box(height: int, width: int, lam, u_y, u_x):
    """timm's ``rand_bbox``: sides floor(H * sqrt(1 - λ)), centre uniform (from ``u_y``, ``u_x``), clipped
    to the image. -> (y0, y1, x0, x1) as floats or float arrays (whole numbers)."""
    xp = _Scalars if isinstance(lam, float) else _Arrays
    ratio = xp.sqrt(xp.clip(1.0 - lam, 0.0, 1.0))
    sides = []
    for n, u in ((height, u_y), (width, u_x)):
        cut = xp.floor(n * ratio)
        centre = xp.minimum(xp.floor(u * n), n - 1.0)
        sides += [xp.clip(centre - xp.floor(cut / 2), 0, n), xp.clip(centre + xp.floor((cut + 1) / 2), 0, n)]
    return tuple(sides)


def minmax_box(height: int, width: int, minmax, u_cut_y, u_y, u_cut_x, u_x):
    """timm's ``rand_bbox_minmax``: side lengths uniform over the integers in [int(n * min), int(n * max))
    (at least one value), the corner uniform over the positions that keep the box inside."""
    xp = _Scalars if isinstance(u_y, float) else _Arrays
    sides = []
    for n, u_cut, u in ((height, u_cut_y, u_y), (width, u_cut_x, u_x)):
        lo = int(n * minmax[0])
        span = max(int(n * minmax[1]), lo + 1) - lo
        cut = xp.minimum(lo + xp.minimum(xp.floor(u_cut * span), span - 1.0), float(n))
        start = xp.minimum(xp.floor(u * (n - cut + 1)), n - cut)
        sides += [start, start + cut]
    return tuple(sides)


def box_area_lam(box, height: int, width: int):
    """The kept-area fraction ``1 - area / (H * W)`` of (y0, y1, x0, x1): timm's corrected CutMix λ."""
    y0, y1, x0, x1 = box
    return 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)


class Draw(NamedTuple):
    """One call's draws: floats for one draw (n = 0), float64 arrays of n values otherwise.

    ``lam_x`` weighs a sample's own pixels outside its box, ``lam_y`` its own label; ``box`` is None when
    CutMix is off, else (y0, y1, x0, x1) with an empty box where a sample is not cut; ``cut`` says which
    are cut (a bool, or a bool array)."""
    lam_x: object
    lam_y: object
    box: tuple | None
    cut: object


def draw_mix(n: int, *, mixup_alpha: float, cutmix_alpha: float, prob: float, switch_prob: float,
             minmax, correct_lam: bool, height: int, width: int, generator) -> Draw:
    """timm's ``_params_per_batch`` (n = 0) and ``_params_per_elem`` (n values).

    Draw order: the apply coin (when prob < 1), the switch (when both methods are on), λ of CutMix then of
    Mixup (each alpha that is on), then the box's uniforms (when CutMix is on): the same for every n.
    """
    xp = _Scalars if n == 0 else _Arrays
    mixup_on, cutmix_on = mixup_alpha > 0.0, cutmix_alpha > 0.0
    coins = uniforms(2, n, generator) if prob < 1.0 or (mixup_on and cutmix_on) else (None, None)
    apply = True if prob >= 1.0 else coins[0] < prob
    cut = cutmix_on and (not mixup_on or coins[1] < switch_prob)
    if mixup_on and cutmix_on:
        lam_cut, lam_mix = beta(cutmix_alpha, n, generator), beta(mixup_alpha, n, generator)
        lam = xp.where(cut, lam_cut, lam_mix)
    else:
        lam = beta(mixup_alpha if mixup_on else cutmix_alpha, n, generator)
    lam = xp.where(apply, lam, 1.0)
    if not cutmix_on:
        return Draw(lam, lam, None, False)
    u = uniforms(4, n, generator)
    if minmax is not None:
        box = minmax_box(height, width, minmax, *u)
    else:
        box = cut_box(height, width, lam, u[0], u[1])
    cut = cut & apply
    lam_cut = box_area_lam(box, height, width) if correct_lam or minmax is not None else lam
    box = tuple(xp.where(cut, side, 0.0) for side in box)
    return Draw(xp.where(cut, 1.0, lam), xp.where(cut, lam_cut, lam), box, cut)


def random_permutation(n: int, generator) -> np.ndarray:
    """A uniformly random permutation of range(n), int64."""
    return torch.randperm(n, generator=generator).numpy()


def random_involution(n: int, generator) -> tuple[np.ndarray, np.ndarray]:
    """A uniformly random pairing of range(n): ``perm[perm[i]] == i``; for odd n one sample pairs with
    itself. -> (perm, pair): ``pair[i]`` in [0, (n + 1) // 2) numbers i's pair (the same for i and
    perm[i]); the unpaired sample of an odd n has pair ``n // 2``."""
    sigma = random_permutation(n, generator)
    pos = np.arange(n)
    partner = np.where((pos ^ 1) < n, pos ^ 1, pos)  # odd n: the last position stays alone
    perm, pair = np.empty(n, np.int64), np.empty(n, np.int64)
    perm[sigma] = sigma[partner]
    pair[sigma] = pos // 2
    return perm, pair


_ROW_DTYPES = {"f": (np.float32, torch.float32), "i": (np.int32, torch.int32), "l": (np.int64, torch.int64)}


def to_device(device, *rows) -> list:
    """Host values (a call's per-sample draws) on ``device`` in ONE copy: each of ``rows`` is None, a float
    array (-> float32), an int64 array (a permutation, stays int64) or another integer array (-> int32; a
    box is (n, 4)); numpy arrays or CPU tensors. They travel packed in one buffer (pinned on CUDA, so the
    copy is asynchronous: no wait on the GPU) and come back as views of it."""
    device = torch.device(device)
    parts = []
    for r in rows:
        a = None if r is None else np.asarray(r.numpy() if isinstance(r, torch.Tensor) else r)
        kind = None if a is None else "f" if a.dtype.kind == "f" else "l" if a.dtype == np.int64 else "i"
        parts.append(None if a is None else (np.ascontiguousarray(a, _ROW_DTYPES[kind][0]), kind))
    words = [0 if p is None else p[0].nbytes // 4 for p in parts]
    offsets, at = {}, 0
    for i in sorted(range(len(parts)), key=lambda i: parts[i] is None or parts[i][1] != "l"):  # 8-byte first
        offsets[i], at = at, at + words[i]
    buf = np.empty(at, np.int32)
    for i, p in enumerate(parts):
        if p is not None:
            buf[offsets[i]:offsets[i] + words[i]] = p[0].reshape(-1).view(np.int32)
    packed = torch.from_numpy(buf)
    if device.type != "cpu":
        if torch.cuda.is_available():
            packed = packed.pin_memory()
        packed = packed.to(device, non_blocking=True)
    return [None if p is None else packed[offsets[i]:offsets[i] + words[i]].view(_ROW_DTYPES[p[1]][1])
            .view(p[0].shape) for i, p in enumerate(parts)]
