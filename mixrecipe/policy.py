"""Mixup and CutMix policy: timm's ``Mixup`` call on top of the one-pass fused op.

``mixup_fn = Mixup(...)`` then ``x, y = mixup_fn(x, y)``, with timm's arguments and meanings, except that:

- the images, the CutMix box and the labels are done by ONE ``mixrecipe.ops.mix`` call (one pass over the
  batch, in place for timm's flip pairing); a CutMix box is not a second pass;
- any batch size works (timm asserts an even one): with the flip pairing the middle row of an odd batch
  pairs with itself and stays as it is;
- ``pairing="random"`` draws a fresh partner permutation per call (fastai / Composer style, out of place);
- every random quantity (λ ~ Beta(α, α), apply/switch coins, boxes, permutations) is a torch tensor drawn
  with a ``torch.Generator``, so runs are reproducible; nothing is read back to the host, so a CUDA batch
  costs no host-device synchronization per call. "No mixing this time" is λ = 1 (an exact identity), never
  a Python branch on a drawn value;
- uint8 batches are normalized (``mean``/``std``) and converted by the same pass.

Small sampling helpers come first (``sample_beta``, ``rand_box``, ``rand_box_minmax``, ``box_lam``,
``cutmix_box_and_lam``, ``random_involution``), then ``cutmix`` (CutMix alone), then the ``Mixup`` class.

Random draws happen on the generator's device (a CPU ``torch.Generator()`` by default when one is given;
without one, on the batch's device with that device's default generator, seeded by ``torch.manual_seed``)
and the results are moved to the batch's device with ``non_blocking=True``. Mode ``"batch"`` (one λ, coin,
switch and box per call) draws on the host whenever the generator is a CPU one or None (then the CPU
default generator, also seeded by ``torch.manual_seed``; timm draws from numpy's): the values reach the
kernel as numbers, so a CUDA call issues the fused launch and nothing else, and a CUDA batch gets the values a
CPU batch gets from the same generator.
"""

from __future__ import annotations

import math
import threading
from typing import NamedTuple

import torch
from torch import Tensor

from . import cpu_kernel, ops
from .checks import (
    check_alpha,
    check_choice,
    check_generator,
    check_lam,
    check_minmax,
    check_num_classes,
    check_out_dtype,
    check_unit_interval,
    tracing,
)

__all__ = [
    "sample_beta",
    "rand_box",
    "rand_box_minmax",
    "box_lam",
    "cutmix_box_and_lam",
    "random_involution",
    "cutmix",
    "MixParams",
    "MixedBatch",
    "Mixup",
]

_MODES = ("batch", "pair", "elem")
_PAIRINGS = ("flip", "random")


# --------------------------------------------------------------------------------------------------
# Small helpers: devices and uniform draws.
# --------------------------------------------------------------------------------------------------
def _gen_device(generator: torch.Generator | None, device=None) -> torch.device:
    """Where draws happen: the generator's device, else ``device`` (its default generator), else CPU."""
    if generator is not None:
        return generator.device
    return torch.device(device) if device is not None else torch.device("cpu")


def _to(t: Tensor, device) -> Tensor:
    """Move without a host-device synchronization (a blocking copy only when the destination is the CPU)."""
    device = torch.device(device)
    if t.device == device:
        return t
    return t.to(device, non_blocking=device.type != "cpu")


def _uniform(size, generator, device) -> Tensor:
    """U[0, 1) in float64, drawn with ``generator`` on its device and moved to ``device``."""
    u = torch.rand(size, generator=generator, device=_gen_device(generator, device), dtype=torch.float64)
    return _to(u, device)


def _randint_below(high: Tensor, generator) -> Tensor:
    """A uniform integer in [0, high) per element of the (positive, integer-valued) float64 ``high``."""
    u = _uniform(high.shape, generator, high.device)
    return torch.minimum((u * high).floor(), high - 1)


def _dense(x: Tensor) -> bool:
    """Whether x is one dense block the op can mix in place: contiguous or channels_last."""
    return x.is_contiguous() or (x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last))


def _size(size) -> tuple[int, ...]:
    if isinstance(size, int):
        return (size,)
    return tuple(int(s) for s in size)


def _image_hw(img_shape) -> tuple[int, int]:
    if len(img_shape) < 2:
        raise ValueError(f"img_shape must end with (H, W), got {tuple(img_shape)}")
    h, w = int(img_shape[-2]), int(img_shape[-1])
    if h < 1 or w < 1:
        raise ValueError(f"image height and width must be >= 1, got {h}x{w}")
    return h, w


# --------------------------------------------------------------------------------------------------
# Sampling helpers.
# --------------------------------------------------------------------------------------------------
def sample_beta(alpha: float, size=(), *, generator=None, device=None, dtype=torch.float32) -> Tensor:
    """Draw λ ~ Beta(alpha, alpha) as a tensor, with no host-device synchronization.

    Uses Beta(a, a) = G1 / (G1 + G2) with G1, G2 ~ Gamma(a). For a < 1 it is computed in log space, as
    ``sigmoid(log G1 - log G2)`` with ``log G(a) = log G(a + 1) - E / a`` (E ~ Exp(1) = Gamma(1), i.e.
    -log U for U uniform), so one Gamma draw of four values (a + 1, a + 1, 1, 1) makes one λ: the log form
    never underflows to 0/0, which the plain ratio does in float32 for small alpha (e.g. the ImageNet
    default alpha = 0.2) and in float64 for tiny alpha. For a > 1 Gamma(a) has no mass near 0 to lose: two
    draws (a, a) and the plain ratio, half the sampling work and no log or exp. For a = 1 (CIFAR's alpha,
    CutMix's default) Beta(1, 1) is the uniform law: one ``torch.rand`` value per λ, in [0, 1), a fifth of
    the Gamma sampler's time for a per-sample draw.

    Args:
        alpha: concentration, > 0.
        size: shape of the result (an int or a tuple; ``()`` for one λ).
        generator: a ``torch.Generator``; draws happen on its device. None: the default generator of
            ``device`` (CPU when ``device`` is None).
        device: device of the result (default: the generator's device, else CPU).
        dtype: dtype of the result.

    Returns:
        A tensor of shape ``size`` with values in [0, 1].
    """
    alpha = check_alpha("alpha", alpha)
    size = _size(size)
    draw_device = _gen_device(generator, device)
    if size == () and draw_device.type == "cpu" and not tracing():
        return _to(torch.tensor(_beta_value(alpha, generator), dtype=dtype), device or draw_device)
    if alpha == 1.0:
        lam = _uniform(size, generator, draw_device)
    else:
        lam = _beta_from_gamma(alpha, size, generator, draw_device)
    if dtype != torch.float64:  # each skipped no-op is a dispatch (a launch on a GPU)
        lam = lam.to(dtype)
    return _to(lam, device if device is not None else draw_device)


def _beta_from_gamma(alpha: float, size: tuple, generator, device) -> Tensor:
    """:func:`sample_beta`'s float64 λ for alpha != 1, from one Gamma draw of :func:`_new_concentrations`."""
    gamma = torch._standard_gamma(_new_concentrations(alpha, size, device), generator=generator)
    if alpha >= 1.0:
        return gamma[0] / gamma.sum(0)  # the sum of two values is G1 + G2, rounded once
    log_g = gamma[:2].log() - gamma[2:] / alpha
    return torch.sigmoid(torch.sub(*log_g.unbind(0)))  # one op for both rows, not two selects


def _new_concentrations(alpha: float, size: tuple, device) -> Tensor:
    """:func:`sample_beta`'s Gamma concentrations for ``size`` λ (alpha != 1), float64: (2, *size) of alpha
    for alpha > 1, else (4, *size) with rows alpha + 1, alpha + 1 (Gamma(a + 1)) and 1, 1 (Exp(1))."""
    if alpha >= 1.0:
        return torch.full((2,) + size, alpha, dtype=torch.float64, device=device)
    conc = torch.full((4,) + size, alpha + 1.0, dtype=torch.float64, device=device)
    conc[2:] = 1.0
    return conc


_CONCENTRATIONS: dict[tuple, Tensor] = {}


def _concentrations(alpha: float, size: tuple) -> Tensor:
    """:func:`_new_concentrations` on the CPU, kept (building them is two tensor ops per call)."""
    conc = _CONCENTRATIONS.get((alpha, size))
    if conc is None:
        if len(_CONCENTRATIONS) >= 64:
            _CONCENTRATIONS.clear()
        conc = _CONCENTRATIONS[(alpha, size)] = _new_concentrations(alpha, size, "cpu")
    return conc


_DRAW = threading.local()  # each thread's float64 tensors that its CPU uniform draws are made in


def _thread_uniforms(shape: tuple, generator) -> Tensor:
    """``torch.rand(shape, generator=generator, dtype=torch.float64)`` (the same draws and values) on the
    CPU, made in place in this thread's own tensor of that shape, which its next such draw overwrites: for
    values read at once (a new tensor per draw cost ~2 µs of a CIFAR-sized call)."""
    try:
        cells = _DRAW.cells
    except AttributeError:
        cells = _DRAW.cells = {}
    cell = cells.get(shape)
    if cell is None:
        if len(cells) >= 16:
            cells.clear()
        with torch.inference_mode(False):  # made in inference mode, no later in-place draw could use it
            cell = cells[shape] = torch.empty(shape, dtype=torch.float64)
    return cell.uniform_(generator=generator)


def _uniform_value(generator) -> float:
    """One U[0, 1) as a Python float: the draw of ``_uniform((), generator, "cpu")``."""
    return _thread_uniforms((), generator).tolist()


def _randint_below_value(high: float, generator) -> float:
    """:func:`_randint_below` of one value, on floats: the same draw and value."""
    return min(math.floor(_uniform_value(generator) * high), high - 1.0)


def _float_box(img_shape, lam: float, minmax, generator) -> tuple:
    """:func:`rand_box` of one float λ (:func:`rand_box_minmax` with ``minmax``) on floats: the same draws
    and the same box, as (y0, y1, x0, x1) ints."""
    h, w = _image_hw(img_shape)
    if minmax is not None:
        lo_f, hi_f = minmax
        sides = []
        for n in (h, w):
            lo = int(n * lo_f)
            hi = max(int(n * hi_f), lo + 1)
            cut = min(lo + _randint_below_value(float(hi - lo), generator), n)
            start = _randint_below_value(n - cut + 1.0, generator)
            sides += [int(start), int(start + cut)]
        return tuple(sides)
    ratio = math.sqrt(min(max(1.0 - lam, 0.0), 1.0))
    cut_h, cut_w = math.floor(h * ratio), math.floor(w * ratio)
    cy = _randint_below_value(float(h), generator)
    cx = _randint_below_value(float(w), generator)
    y0, y1 = cy - math.floor(cut_h / 2), cy + math.floor((cut_h + 1) / 2)
    x0, x1 = cx - math.floor(cut_w / 2), cx + math.floor((cut_w + 1) / 2)
    return (int(min(max(y0, 0), h)), int(min(max(y1, 0), h)), int(min(max(x0, 0), w)),
            int(min(max(x1, 0), w)))


def _beta_value(alpha: float, generator) -> float:
    """One λ ~ Beta(alpha, alpha) from a CPU generator as a Python float: :func:`sample_beta`'s draws and
    formula, with the arithmetic on floats (a dozen tiny tensor ops cost more than a CIFAR batch's mixing)."""
    if alpha == 1.0:  # Beta(1, 1): the uniform draw itself
        return _uniform_value(generator)
    conc = _CONCENTRATIONS.get((alpha, ()))  # looked up here: a call less on every draw
    if conc is None:
        conc = _concentrations(alpha, ())
    draws = torch._standard_gamma(conc, generator=generator).tolist()  # one op
    if alpha >= 1.0:
        g1, g2 = draws
        return g1 / (g1 + g2)
    g1, g2, e1, e2 = draws
    d = (math.log(g1) - e1 / alpha) - (math.log(g2) - e2 / alpha)
    if d >= 0.0:  # the logistic function without overflow
        return 1.0 / (1.0 + math.exp(-d))
    e = math.exp(d)
    return e / (1.0 + e)


def rand_box(img_shape, lam, *, generator=None) -> Tensor:
    """timm's ``rand_bbox`` with tensors: a box of side fraction sqrt(1 - λ), centred uniformly, clipped.

    ``cut_h = floor(H * sqrt(1 - λ))``, centre ``cy`` uniform in [0, H), ``y0 = clip(cy - cut_h // 2)``,
    ``y1 = clip(cy + (cut_h + 1) // 2)`` to [0, H]; the same along W. Boxes clipped by the border keep
    less area than 1 - λ: see :func:`box_lam` for the corrected λ.

    Args:
        img_shape: a shape ending in (H, W), e.g. ``x.shape``.
        lam: λ as a float or a tensor of any shape (one box per element).
        generator: ``torch.Generator`` for the centres (drawn on its device, then moved to lam's device).

    Returns:
        int32 tensor of shape ``lam.shape + (4,)``: (y0, y1, x0, x1), half-open, on lam's device.
    """
    h, w = _image_hw(img_shape)
    lam = torch.as_tensor(lam, dtype=torch.float64, device=None if isinstance(lam, Tensor)
                          else _gen_device(generator)).double()
    ratio = (1.0 - lam).clamp(0.0, 1.0).sqrt()
    cut_h, cut_w = (h * ratio).floor(), (w * ratio).floor()
    cy = _randint_below(torch.full_like(lam, h), generator)
    cx = _randint_below(torch.full_like(lam, w), generator)
    y0 = (cy - (cut_h / 2).floor()).clamp(0, h)
    y1 = (cy + ((cut_h + 1) / 2).floor()).clamp(0, h)
    x0 = (cx - (cut_w / 2).floor()).clamp(0, w)
    x1 = (cx + ((cut_w + 1) / 2).floor()).clamp(0, w)
    return torch.stack([y0, y1, x0, x1], dim=-1).to(torch.int32)


def rand_box_minmax(img_shape, minmax, size=(), *, generator=None, device=None) -> Tensor:
    """timm's ``rand_bbox_minmax`` with tensors: side fractions uniform in [min, max), box fully inside.

    ``cut_h`` is uniform over the integers in [int(H * min), int(H * max)) (at least one value, where
    timm raises), the top-left corner uniform over the positions that keep the box inside the image.

    Args:
        img_shape: a shape ending in (H, W).
        minmax: (min, max) fractions of the image side, 0 <= min <= max <= 1.
        size: number/shape of boxes (``()`` for one).
        generator: ``torch.Generator`` (draws on its device).
        device: device of the result (default: the generator's device, else CPU).

    Returns:
        int32 tensor of shape ``size + (4,)``: (y0, y1, x0, x1), half-open.
    """
    h, w = _image_hw(img_shape)
    lo_f, hi_f = check_minmax(minmax)
    size = _size(size)
    device = _gen_device(generator, device) if device is None else torch.device(device)
    sides = []
    for n in (h, w):
        lo = int(n * lo_f)
        hi = max(int(n * hi_f), lo + 1)
        cut = lo + _randint_below(torch.full(size, float(hi - lo), dtype=torch.float64, device=device),
                                  generator)
        cut = cut.clamp(max=n)
        start = _randint_below(n - cut + 1, generator)
        sides += [start, start + cut]
    return torch.stack(sides, dim=-1).to(torch.int32)


def box_lam(box, img_shape, dtype=torch.float32) -> Tensor:
    """The kept-area fraction ``1 - box_area / (H * W)`` of each box: timm's corrected CutMix λ.

    Args:
        box: integer tensor (..., 4) of (y0, y1, x0, x1), half-open.
        img_shape: a shape ending in (H, W).
        dtype: dtype of the result.

    Returns:
        A tensor of shape ``box.shape[:-1]``.
    """
    h, w = _image_hw(img_shape)
    b = torch.as_tensor(box).double()
    area = (b[..., 1] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 2]).clamp(min=0)
    return (1.0 - area / float(h * w)).to(dtype)


def cutmix_box_and_lam(img_shape, lam, *, minmax=None, correct_lam=True, generator=None):
    """timm's ``cutmix_bbox_and_lam`` with tensors: random box(es) and the label weight.

    Args:
        img_shape: a shape ending in (H, W).
        lam: the sampled λ: a float or a tensor (one box per element).
        minmax: (min, max) side fractions: boxes from :func:`rand_box_minmax` instead of λ.
        correct_lam: replace λ by the kept area of the (clipped) box. Always done with ``minmax``, as timm.
        generator: ``torch.Generator`` for the box positions.

    Returns:
        (box, lam_y): int32 boxes ``lam.shape + (4,)`` and float32 label weights ``lam.shape``, on lam's
        device (the generator's, or CPU, for a float lam).
    """
    lam = torch.as_tensor(lam, dtype=torch.float64, device=None if isinstance(lam, Tensor)
                          else _gen_device(generator))
    if minmax is not None:
        box = rand_box_minmax(img_shape, minmax, lam.shape, generator=generator)
        box = _to(box, lam.device)
    else:
        box = rand_box(img_shape, lam, generator=generator)
    if correct_lam or minmax is not None:
        return box, box_lam(box, img_shape)
    return box, lam.float()


def random_involution(n: int, *, generator=None, device=None) -> tuple[Tensor, Tensor]:
    """A uniformly random pairing of range(n): ``perm[perm[i]] == i``; for odd n one sample pairs with itself.

    Args:
        n: number of samples, >= 1.
        generator: ``torch.Generator`` (draws on its device).
        device: device of the result (default: the generator's device, else CPU).

    Returns:
        (perm, pair): int64 tensors (n,); ``pair[i]`` in [0, (n + 1) // 2) numbers i's pair (the same
        for i and perm[i]); the unpaired sample of an odd n has pair ``n // 2``.
    """
    device = _gen_device(generator, device) if device is None else torch.device(device)
    sigma = torch.randperm(n, generator=generator, device=_gen_device(generator, device))
    sigma = _to(sigma, device)
    pos = torch.arange(n, device=device)
    partner_pos = pos ^ 1
    partner_pos = torch.where(partner_pos < n, partner_pos, pos)  # odd n: the last position stays alone
    inv = torch.empty_like(sigma).scatter_(0, sigma, pos)  # inv[sigma[k]] = k
    return sigma[partner_pos[inv]], inv // 2


# --------------------------------------------------------------------------------------------------
# CutMix alone.
# --------------------------------------------------------------------------------------------------
def cutmix(
    x: Tensor,
    target: Tensor | None = None,
    *,
    alpha: float = 1.0,
    lam=None,
    box=None,
    perm: Tensor | None = None,
    per_sample: bool = False,
    minmax=None,
    correct_lam: bool = True,
    num_classes: int | None = None,
    label_smoothing: float = 0.0,
    generator: torch.Generator | None = None,
    mean=None,
    std=None,
    out_dtype: torch.dtype | None = None,
    inplace: bool = False,
):
    """CutMix alone, in one pass: paste each partner's box into each image and weight the labels.

    ``x[i]`` keeps its own pixels outside the box and takes ``x[perm[i]]``'s pixels inside it; its label
    is ``lam_y * y[i] + (1 - lam_y) * y[perm[i]]`` with ``lam_y`` the kept area (``correct_lam``).

    Without ``box``: λ ~ Beta(alpha, alpha) (or the given ``lam``) and a box of side fraction
    sqrt(1 - λ) at a uniform centre, clipped (timm's ``rand_bbox``); one for the whole batch, or one
    per sample with ``per_sample=True``; ``minmax`` draws the box sides instead (timm's
    ``cutmix_minmax``). With ``box``: that box, and ``lam`` (if given) as the label weight.

    For the index-target loss (``mixup_cross_entropy``) use ``Mixup(mixup_alpha=0., cutmix_alpha=alpha,
    ...).mix_batch(x, y)``, which returns the per-sample label weights instead of soft targets; to build
    your own, :func:`cutmix_box_and_lam` gives boxes and label weights and ``mixrecipe.ops.mix`` applies them.

    Args:
        x: (B, C, H, W) images: float32/float16/bfloat16, or uint8 (normalized with mean/std into a float
            ``out_dtype``, float32 by default).
        target: (B,) class indices, (B, K) float targets, or None.
        alpha: Beta(alpha, alpha) concentration for λ when neither ``lam`` nor ``box`` is given.
        lam: a float, 0-d or (B,) tensor: λ for the random box, or the label weight of a given ``box``.
        box: (4,) or (B, 4) integer (y0, y1, x0, x1), half-open, on x's device; None for a random one.
        perm: partner of each sample: None for timm's flip (i <-> B-1-i), or a LongTensor permutation on
            x's device, e.g. ``torch.randperm(B, device=x.device)`` (out of place).
        per_sample: draw one λ and box per sample instead of one per batch.
        minmax: (min, max) side fractions of the random box (timm's ``cutmix_minmax``).
        correct_lam: label weight = kept area of the clipped box (else the sampled λ).
        num_classes: K, needed for class-index targets.
        label_smoothing: timm's label smoothing, applied before mixing.
        generator: ``torch.Generator`` for λ and the box (draws on its device; the result is moved to x's
            device without synchronizing). None: x's device default generator.
        mean, std: per-channel normalization fused into the pass (uint8 is scaled to [0, 1] first).
        out_dtype: dtype of the result (default: x's, float32 for uint8).
        inplace: write into x (flip pairing and unchanged dtype only).

    Returns:
        (x_mixed, soft_target): soft_target is (B, K) float32, or None without ``target``.
    """
    if not isinstance(x, Tensor) or x.ndim != 4:
        raise ValueError(f"cutmix needs x of shape (B, C, H, W), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    batch = x.shape[0]
    if batch < 1:
        raise ValueError("cutmix needs a batch of at least one sample")
    if lam is not None:
        lam = check_lam("lam", lam, batch, x.device)
    if box is None:
        minmax = check_minmax(minmax)
        if lam is None:
            alpha = check_alpha("alpha", alpha)
            lam = sample_beta(alpha, (batch,) if per_sample else (), generator=generator,
                              device=_gen_device(generator, x.device), dtype=torch.float64)
        elif not isinstance(lam, Tensor):
            lam = torch.full((batch,) if per_sample else (), float(lam), dtype=torch.float64,
                             device=_gen_device(generator, x.device))
        box, lam_y = cutmix_box_and_lam(x.shape, lam, minmax=minmax, correct_lam=correct_lam,
                                        generator=generator)
        box, lam_y = _to(box, x.device), _to(lam_y, x.device)
    else:
        box = torch.as_tensor(box, device=x.device)
        lam_y = lam if lam is not None else box_lam(box, x.shape)
    if x.dtype == torch.uint8 and out_dtype is None:
        out_dtype = torch.float32
    return ops.mix(x, target, 1.0, lam_y, perm, box, num_classes=num_classes,
                   label_smoothing=label_smoothing, mean=mean, std=std, out_dtype=out_dtype,
                   inplace=inplace)


# --------------------------------------------------------------------------------------------------
# The policy.
# --------------------------------------------------------------------------------------------------
class MixParams(NamedTuple):
    """One call's random parameters, on the batch's device, ready for ``mixrecipe.ops.mix``.

    Attributes:
        lam_x: own-pixel weight outside the box: 0-d (mode "batch") or (B,) float32; 1 for CutMix samples.
        lam_y: own-label weight: same shape; the kept area for CutMix samples. May be ``lam_x`` itself.
        perm: None (flip pairing) or the (B,) int64 partner permutation.
        box: None (no CutMix possible) or int32 (y0, y1, x0, x1): (4,) in mode "batch", else (B, 4);
            an empty box (0, 0, 0, 0) where a sample is not CutMixed.
    """

    lam_x: Tensor
    lam_y: Tensor
    perm: Tensor | None
    box: Tensor | None


class MixedBatch(NamedTuple):
    """A mixed batch for the index-target loss, without the dense (B, K) soft-target matrix.

    ``mixup_cross_entropy(logits, mb.target, mb.lam, mb.perm, label_smoothing=mb.label_smoothing)``
    equals ``SoftTargetCrossEntropy()(logits, soft_target)`` for the ``soft_target`` that ``Mixup``'s
    ``__call__`` would return with the same draw.

    Attributes:
        x: the mixed images.
        target: the original targets (class indices; pre-smoothed dense targets with ``multi_label``).
        lam: (B,) float32 label weight of each sample itself, on x's device.
        perm: None for the flip pairing, else the (B,) int64 partner permutation.
        label_smoothing: the smoothing to apply in the loss (0.0 with ``multi_label``: already applied).
    """

    x: Tensor
    target: Tensor | None
    lam: Tensor
    perm: Tensor | None
    label_smoothing: float


class Mixup:
    """Mixup/CutMix with per-batch, per-pair or per-sample parameters: timm's ``Mixup``, one fused pass.

    Drop-in for ``timm.data.Mixup``: the same arguments and meanings, ``mixup_enabled``, and
    ``x, soft_target = mixup_fn(x, target)``. Differences: any batch size >= 1; ``pairing="random"``;
    ``generator`` for reproducible draws; no host-device synchronization on CUDA; uint8 input with
    ``mean``/``std``; unknown arguments raise ``ValueError`` at construction.

    Per call (timm's order of decisions, as tensors): with probability ``prob`` (per batch in mode
    ``"batch"``, per pair in ``"pair"``, per sample in ``"elem"``) a sample is mixed, else it is left as is
    (λ = 1); with ``prob=1`` no coin is drawn (timm draws one anyway). When both ``mixup_alpha`` and
    ``cutmix_alpha`` are > 0, CutMix is chosen with probability ``switch_prob``, else Mixup.
    Mixup: λ ~ Beta(mixup_alpha, mixup_alpha), ``x = λ x + (1 - λ) x_partner``.
    CutMix: λ ~ Beta(cutmix_alpha, cutmix_alpha), the partner's box (timm's ``rand_bbox``, or
    ``rand_bbox_minmax`` with ``cutmix_minmax``) replaces the region, and the label weight is the kept area
    when ``correct_lam`` (always with ``cutmix_minmax``). Labels: timm's ``mixup_target`` with the label
    weight λ and the same partner.

    Pairing: ``"flip"`` (timm): sample i with B-1-i, in place (``inplace=True``); with an odd B the middle
    sample pairs with itself and is left as is. ``"random"``: a fresh uniformly random permutation per call
    (out of place; a sample may draw itself); in mode ``"pair"`` a uniformly random *pairing* (an
    involution: i and perm[i] mix with each other, with one shared λ and box; with an odd B one sample is
    left as is). In mode ``"pair"`` both samples of a pair share λ, the CutMix decision and the box.

    Args:
        mixup_alpha: Beta concentration for Mixup's λ; Mixup is active if > 0.
        cutmix_alpha: Beta concentration for CutMix's λ; CutMix is active if > 0.
        cutmix_minmax: (min, max) box side fractions; activates CutMix with boxes drawn from it (and sets
            ``cutmix_alpha`` to 1.0, as timm).
        prob: probability of mixing, per batch or per pair/sample (see ``mode``).
        switch_prob: probability of CutMix instead of Mixup when both are active.
        mode: ``"batch"`` (one λ and box for the batch), ``"pair"`` (per pair) or ``"elem"`` (per sample).
        correct_lam: label weight = kept area of the clipped CutMix box.
        label_smoothing: timm's label smoothing applied to the mixed targets.
        num_classes: K, number of classes of the targets.
        multi_label: dense (B, K) multi-label targets, smoothed towards 0.5 (timm's ``multi_label``).
        pairing: ``"flip"`` or ``"random"`` (see above).
        generator: ``torch.Generator`` for all draws (on its device; results move to the batch's device
            without synchronizing). None: the batch device's default generator (``torch.manual_seed``),
            except in mode ``"batch"``, which draws its few numbers on the host from the CPU default
            generator (a CUDA call then launches the fused kernel alone).
        mean, std: per-channel normalization fused into the pass (uint8 batches; in [0, 1] units).
        out_dtype: dtype of the mixed images (default: the input's; float32 for uint8).
        inplace: with flip pairing and an unchanged dtype, mix into the input tensor like timm does.

    Raises:
        TypeError: an argument of the wrong kind (a string or bool for a number, a float num_classes, ...).
        ValueError: a value out of range (negative or non-finite alphas, neither Mixup nor CutMix active,
            unknown mode or pairing, probabilities outside [0, 1], num_classes < 1, ...). The rules are
            those of every entry point (``mixrecipe.checks``).
    """

    def __init__(
        self,
        mixup_alpha: float = 1.0,
        cutmix_alpha: float = 0.0,
        cutmix_minmax=None,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        mode: str = "batch",
        correct_lam: bool = True,
        label_smoothing: float = 0.1,
        num_classes: int = 1000,
        multi_label: bool = False,
        *,
        pairing: str = "flip",
        generator: torch.Generator | None = None,
        mean=None,
        std=None,
        out_dtype: torch.dtype | None = None,
        inplace: bool = True,
    ):
        self.mixup_alpha = check_alpha("mixup_alpha", mixup_alpha, allow_zero=True)
        self.cutmix_alpha = check_alpha("cutmix_alpha", cutmix_alpha, allow_zero=True)
        self.cutmix_minmax = check_minmax(cutmix_minmax)
        if self.cutmix_minmax is not None:
            self.cutmix_alpha = 1.0  # as timm: the box comes from minmax, alpha only decides lam != 1
        if self.mixup_alpha == 0.0 and self.cutmix_alpha == 0.0:
            raise ValueError("neither Mixup nor CutMix is active: set mixup_alpha > 0, cutmix_alpha > 0 "
                             "or cutmix_minmax")
        self.mix_prob = check_unit_interval("prob", prob)
        self.switch_prob = check_unit_interval("switch_prob", switch_prob)
        self.mode = check_choice("mode", mode, _MODES)
        self.correct_lam = bool(correct_lam)
        self.label_smoothing = check_unit_interval("label_smoothing", label_smoothing)
        self.num_classes = check_num_classes(num_classes)
        self.multi_label = bool(multi_label)
        self.pairing = check_choice("pairing", pairing, _PAIRINGS)
        self.generator = check_generator(generator)
        if (mean is None) != (std is None):
            raise ValueError("mean and std go together: pass both or neither")
        self.mean, self.std = mean, std
        self.out_dtype = check_out_dtype(out_dtype)
        self.inplace = bool(inplace)
        self.mixup_enabled = True  # set to False to disable mixing (intended to be set by the train loop)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(mixup_alpha={self.mixup_alpha}, cutmix_alpha={self.cutmix_alpha}, "
                f"cutmix_minmax={self.cutmix_minmax}, prob={self.mix_prob}, switch_prob={self.switch_prob}, "
                f"mode={self.mode!r}, correct_lam={self.correct_lam}, "
                f"label_smoothing={self.label_smoothing}, num_classes={self.num_classes}, "
                f"pairing={self.pairing!r}, mixup_enabled={self.mixup_enabled})")

    # ----------------------------------------------------------------------------------------------
    # Sampling.
    # ----------------------------------------------------------------------------------------------
    def _draw(self, size, img_shape, device):
        """timm's ``_params_per_batch`` / ``_params_per_elem`` as tensors of shape ``size`` on ``device``.

        Returns (lam_x, lam_y, box) in float64/float64/int32; box is None when CutMix is inactive. One draw
        on the CPU comes as Python floats and a box of four ints: the same draws and values
        (:meth:`_float_params`), without the dozens of tiny tensor ops that cost more than mixing a CIFAR
        batch.
        """
        g = self.generator
        mixup_on, cutmix_on = self.mixup_alpha > 0.0, self.cutmix_alpha > 0.0
        always = self.mix_prob >= 1.0  # every sample is mixed: no coin is drawn
        if size == () and device.type == "cpu" and not tracing():  # the same draws, on floats
            lam_x, lam_y, box = self._float_params(img_shape)
            if cutmix_on:  # no box this call: the tensor path's all-zero box
                box = box or (0, 0, 0, 0)
            return lam_x, lam_y, box
        apply = None if always else _uniform(size, g, device) < self.mix_prob
        if mixup_on and cutmix_on:
            use_cut = _uniform(size, g, device) < self.switch_prob
            lam = torch.where(use_cut,
                              sample_beta(self.cutmix_alpha, size, generator=g, device=device,
                                          dtype=torch.float64),
                              sample_beta(self.mixup_alpha, size, generator=g, device=device,
                                          dtype=torch.float64))
        else:
            use_cut = None
            alpha = self.mixup_alpha if mixup_on else self.cutmix_alpha
            lam = sample_beta(alpha, size, generator=g, device=device, dtype=torch.float64)
        if apply is not None:
            lam = torch.where(apply, lam, 1.0)
        if not cutmix_on:
            return lam, lam, None
        cut = use_cut if apply is None else apply if use_cut is None else apply & use_cut
        box, lam_cut = cutmix_box_and_lam(img_shape, lam, minmax=self.cutmix_minmax,
                                          correct_lam=self.correct_lam, generator=g)
        if cut is None:  # CutMix alone, every sample
            return torch.ones_like(lam), lam_cut.double(), box
        box = torch.where(cut.unsqueeze(-1), box, 0)
        lam_y = torch.where(cut, lam_cut.double(), lam)
        lam_x = torch.where(cut, 1.0, lam)
        return lam_x, lam_y, box

    def _float_params(self, img_shape) -> tuple:
        """:meth:`_draw`'s one CPU draw on Python floats: (lam_x, lam_y, box), box (y0, y1, x0, x1) ints when
        this call cuts, else None. The tensor path's draws in its order (the coin when prob < 1, the switch
        when both are active, the CutMix then the Mixup λ, the box's positions) and its values in float64;
        lam_y is lam_x (the same object) when nothing is cut. Not rounded here: whatever takes them (the
        op's every backend, ``sample``'s and ``mix_batch``'s float32 tensors) rounds them to float32, as
        the tensor path's float32 λ is, and a rounding here cost ~2 µs of a CIFAR-sized call."""
        g = self.generator
        mixup_on, cutmix_on = self.mixup_alpha > 0.0, self.cutmix_alpha > 0.0
        apply = self.mix_prob >= 1.0 or _uniform_value(g) < self.mix_prob
        cut = cutmix_on
        if mixup_on and cutmix_on:
            cut = _uniform_value(g) < self.switch_prob
            lam_cut = _beta_value(self.cutmix_alpha, g)
            lam_mix = _beta_value(self.mixup_alpha, g)
            lam = lam_cut if cut else lam_mix
        else:
            lam = _beta_value(self.mixup_alpha if mixup_on else self.cutmix_alpha, g)
        lam = lam if apply else 1.0
        if not cutmix_on:
            return lam, lam, None
        box = _float_box(img_shape, lam, self.cutmix_minmax, g)  # drawn whether or not this call cuts
        if not (cut and apply):
            return lam, lam, None
        if self.correct_lam or self.cutmix_minmax is not None:
            h, w = _image_hw(img_shape)
            area = max(box[1] - box[0], 0) * max(box[3] - box[2], 0)
            return 1.0, 1.0 - area / float(h * w), box
        return 1.0, lam, box

    def _cpu_rows(self, batch: int) -> Tensor:
        """Modes "elem" and "pair" (flip pairing) on the CPU without CutMix: :meth:`_draw`'s draws (the coin
        when prob < 1, then :func:`sample_beta`'s draws: uniforms for alpha = 1, else Gamma draws) combined
        into (B,) float32 weights in one compiled pass, pairs already spread to both rows: what the tensor
        path computes, without its dozen tiny tensor ops."""
        g, alpha = self.generator, self.mixup_alpha
        pair = self.mode == "pair"
        n = (batch + 1) // 2 if pair else batch
        coin = None if self.mix_prob >= 1.0 else _thread_uniforms((n,), g)  # both read before returning
        if alpha == 1.0:
            draws = _thread_uniforms((1, n), g)
        else:
            draws = torch._standard_gamma(_concentrations(alpha, (n,)), generator=g)
        return cpu_kernel.beta_rows(draws, coin, alpha, self.mix_prob, batch, pair)

    def sample(self, x_shape, device=None) -> MixParams:
        """Draw one call's parameters for a batch of shape ``x_shape`` (ignores ``mixup_enabled``).

        Args:
            x_shape: the batch's shape (B, ...); (B, C, H, W) when CutMix is active.
            device: the batch's device (where the parameters end up; default CPU).

        Returns:
            :class:`MixParams` on ``device``.
        """
        device = torch.device(device) if device is not None else torch.device("cpu")
        lam_x, lam_y, perm, box = self._sample(x_shape, device)
        if isinstance(box, tuple):
            box = torch.tensor(box, dtype=torch.int32, device=device)
        if isinstance(lam_x, float):
            same = lam_y is lam_x
            lam_x = torch.tensor(lam_x, dtype=torch.float32, device=device)
            lam_y = lam_x if same else torch.tensor(lam_y, dtype=torch.float32, device=device)
        return MixParams(lam_x, lam_y, perm, box)

    def _sample(self, x_shape, device: torch.device) -> tuple:
        """:meth:`sample` as a plain tuple (lam_x, lam_y, perm, box), except that one λ drawn on the CPU
        stays a Python float and its box four ints (see :meth:`_draw`).

        Mode "batch" draws on the host whenever the generator is a CPU one or None (then the CPU default
        generator, seeded by ``torch.manual_seed``, as timm draws from numpy's): a CUDA batch gets numbers,
        the values a CPU batch gets from the same generator, and its call issues the fused launch alone."""
        batch = int(x_shape[0])
        if batch < 1:
            raise ValueError("the batch must hold at least one sample")
        if self.cutmix_alpha > 0.0 and len(x_shape) != 4:
            raise ValueError(f"CutMix needs a batch of shape (B, C, H, W), got {tuple(x_shape)}")
        # Mode "batch" draws one λ and box: on the host, so they reach the kernel as numbers (no device op).
        draw = _gen_device(self.generator, "cpu" if self.mode == "batch" else device)
        perm = None
        per_row = self.mode == "elem" or (self.mode == "pair" and self.pairing == "flip")
        if (per_row and self.cutmix_alpha == 0.0 and draw.type == "cpu" and device.type == "cpu"
                and cpu_kernel.available() and not tracing()):
            lam = self._cpu_rows(batch)
            if self.pairing == "random":
                perm = torch.randperm(batch, generator=self.generator)
            return lam, lam, perm, None
        if self.mode == "batch":
            lam_x, lam_y, box = self._draw((), x_shape, draw)
            if self.pairing == "random":
                perm = torch.randperm(batch, generator=self.generator, device=draw)
        elif self.mode == "elem":
            lam_x, lam_y, box = self._draw((batch,), x_shape, draw)
            if self.pairing == "random":
                perm = torch.randperm(batch, generator=self.generator, device=draw)
        else:  # pair: one draw per pair, shared by both samples; the unpaired one (odd B) stays as is
            n_pairs = (batch + 1) // 2
            lam_x, lam_y, box = self._draw((n_pairs,), x_shape, draw)
            if batch % 2:
                alone = torch.arange(n_pairs, device=draw) == batch // 2
                lam_x = torch.where(alone, 1.0, lam_x)
                lam_y = lam_x if box is None else torch.where(alone, 1.0, lam_y)
                if box is not None:
                    box = torch.where(alone.unsqueeze(-1), 0, box)
            if self.pairing == "random":
                perm, pair = random_involution(batch, generator=self.generator, device=draw)
            else:
                idx = torch.arange(batch, device=draw)
                pair = torch.minimum(idx, batch - 1 - idx)
            same = lam_y is lam_x
            lam_x = lam_x[pair]
            lam_y = lam_x if same else lam_y[pair]
            if box is not None:
                box = box[pair]
        if isinstance(lam_x, float):
            return lam_x, lam_y, None if perm is None else _to(perm, device), box
        same = lam_y is lam_x
        lam_x = _to(lam_x.float(), device)
        lam_y = lam_x if same else _to(lam_y.float(), device)
        perm = None if perm is None else _to(perm, device)
        box = None if box is None else _to(box, device)
        return lam_x, lam_y, perm, box

    # ----------------------------------------------------------------------------------------------
    # Applying.
    # ----------------------------------------------------------------------------------------------
    def _multi_label_target(self, target, batch):
        """Dense multi-label targets, smoothed towards 0.5 -> (target for the op, label smoothing 0)."""
        if not isinstance(target, Tensor) or target.ndim != 2 or target.shape != (batch, self.num_classes):
            got = tuple(target.shape) if isinstance(target, Tensor) else target
            raise ValueError(f"multi_label mixup expects dense targets of shape ({batch}, "
                             f"{self.num_classes}), got {got!r}")
        s = self.label_smoothing
        return target.float() * (1.0 - s) + 0.5 * s, 0.0

    def _apply(self, x: Tensor, target, with_soft: bool, out: Tensor | None = None):
        """-> (x_out, soft or None, op target, label smoothing, lam_y (float, () or (B,) tensor), perm)."""
        g = self.generator
        batch_mode = self.mode == "batch"
        if (out is None and self.mixup_enabled and self.pairing == "flip" and not self.multi_label
                and self.mean is None and self.out_dtype is None and type(x) is Tensor and x.is_cpu
                and x.ndim and x.shape[0] and x.is_floating_point() and (g is None or g.device.type == "cpu")
                and (self.cutmix_alpha == 0.0 or (batch_mode and x.ndim == 4))
                and (batch_mode or cpu_kernel.available()) and not tracing()):
            # The common call (flip pairing on the CPU), flattened: the same draws and op call as the path
            # below, without its layers, which with cold caches cost a tenth of a CIFAR-sized call. A call
            # that cuts nothing passes no box (an all-zero box changes nothing).
            if batch_mode:
                lam_x, lam_y, box = self._float_params(x.shape)
                box = None if box is None else torch.tensor(box, dtype=torch.int32)
            else:
                lam_x = lam_y = self._cpu_rows(x.shape[0])
                box = None
            x_out, soft = ops.mix(x, target if with_soft else None, lam_x, None if lam_y is lam_x else lam_y,
                                  None, box, num_classes=self.num_classes,
                                  label_smoothing=self.label_smoothing,
                                  inplace=self.inplace and (x.is_contiguous() or _dense(x)))
            return x_out, soft, target, self.label_smoothing, lam_y, None
        if not isinstance(x, Tensor) or x.ndim < 1:
            raise ValueError(f"x must be a tensor of shape (B, ...), got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        batch = x.shape[0]
        if self.multi_label and target is not None:
            target, smoothing = self._multi_label_target(target, batch)
        else:
            smoothing = self.label_smoothing
        out_dtype = self.out_dtype
        if out_dtype is None and x.dtype == torch.uint8:
            out_dtype = torch.float32
        same_dtype = out_dtype is None or out_dtype == x.dtype
        dense = _dense(x)
        op_target = target if with_soft else None
        if not self.mixup_enabled:
            if same_dtype and self.mean is None and x.dtype != torch.uint8 and out is None:
                soft = None
                if op_target is not None:
                    soft = ops.mixup_target(op_target, self.num_classes, 1.0, None, smoothing)
                return x, soft, target, smoothing, 1.0, None
            x_out, soft = ops.mix(x, op_target, 1.0, num_classes=self.num_classes, label_smoothing=smoothing,
                                  mean=self.mean, std=self.std, out_dtype=out_dtype,
                                  inplace=self.inplace and same_dtype and dense and out is None, out=out)
            return x_out, soft, target, smoothing, 1.0, None
        lam_x, lam_y, perm, box = self._sample(x.shape, x.device)
        if type(box) is tuple and not any(box):  # cuts nothing this call: no box (the same result)
            box = None
        inplace = self.inplace and perm is None and same_dtype and dense and out is None
        x_out, soft = ops.mix(
            x, op_target, lam_x, None if lam_y is lam_x else lam_y, perm, box,
            num_classes=self.num_classes, label_smoothing=smoothing, mean=self.mean, std=self.std,
            out_dtype=out_dtype, inplace=inplace, out=out,
        )
        return x_out, soft, target, smoothing, lam_y, perm

    def __call__(self, x: Tensor, target: Tensor | None, *, out: Tensor | None = None):
        """Mix a batch: ``(x, target) -> (x_mixed, soft_target)`` like timm's ``Mixup``.

        Args:
            x: (B, C, H, W) images (any (B, ...) for Mixup alone), float32/float16/bfloat16 or uint8.
            target: (B,) class indices or (B, K) float targets (or None: soft_target is None).
            out: a buffer for the mixed images (x's shape and strides, the output dtype), which a loader
                reusing its buffers passes to skip the allocation (see :func:`mixrecipe.mix`); x then
                stays unchanged.

        Returns:
            (x_mixed, soft_target): x_mixed is ``x`` itself when mixed in place (flip pairing), ``out`` when
            given; soft_target is (B, num_classes) float32.
        """
        x_out, soft, *_ = self._apply(x, target, with_soft=True, out=out)
        return x_out, soft

    def mix_batch(self, x: Tensor, target: Tensor | None = None, *, out: Tensor | None = None) -> MixedBatch:
        """Mix the images only and return what ``mixup_cross_entropy`` needs instead of soft targets.

        Args:
            x: the batch, as for ``__call__``.
            target: (B,) class indices (passed through), or None.
            out: a buffer for the mixed images, as for ``__call__``.

        Returns:
            :class:`MixedBatch`: ``loss = mixup_cross_entropy(logits, mb.target, mb.lam, mb.perm,
            label_smoothing=mb.label_smoothing)``.
        """
        x_out, _, target, smoothing, lam, perm = self._apply(x, target, with_soft=False, out=out)
        batch = x_out.shape[0]
        if isinstance(lam, float):
            lam = torch.full((batch,), lam, dtype=torch.float32, device=x_out.device)
        return MixedBatch(x_out, target, lam.expand(batch).contiguous(), perm, smoothing)
