"""Mixup and CutMix policy: timm's ``Mixup`` call on top of the one-pass fused op.

``mixup_fn = Mixup(...)`` then ``x, y = mixup_fn(x, y)``, with timm's arguments and meanings, except that:

- the images, the CutMix box and the labels are done by ONE ``mixrecipe.ops.mix`` call (one pass over the
  batch, in place for timm's flip pairing); a CutMix box is not a second pass;
- any batch size works (timm asserts an even one): with the flip pairing the middle row of an odd batch
  pairs with itself and stays as it is;
- ``pairing="random"`` draws a fresh partner permutation per call (fastai / Composer style, out of place);
- every random quantity is drawn on the host by ``mixrecipe.draws`` from a CPU ``torch.Generator`` (None:
  the CPU default generator, seeded by ``torch.manual_seed``), so runs are reproducible and a CUDA batch
  gets the values a CPU batch gets. Mode ``"batch"`` hands the fused kernel its λ and box as numbers: a
  CUDA call is the one launch. Per-pair and per-sample draws reach the device in one asynchronous copy.
  Nothing is read back from the device: no host-device synchronization;
- uint8 batches are normalized (``mean``/``std``) and converted by the same pass.

The public sampling helpers (``sample_beta``, ``rand_box``, ``rand_box_minmax``, ``box_lam``,
``cutmix_box_and_lam``, ``random_involution``) return tensors made from those same draws, then ``cutmix``
(CutMix alone), then the ``Mixup`` class.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from . import draws, ops
from .checks import (
    check_alpha,
    check_choice,
    check_lam,
    check_minmax,
    check_num_classes,
    check_out_dtype,
    check_unit_interval,
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


def _dense(x: Tensor) -> bool:
    """Whether x is one dense block the op can mix in place: contiguous or channels_last."""
    return x.is_contiguous() or (x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last))


def _device(device) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


def _as_rows(value, n: int) -> np.ndarray:
    """A draw as n values (one host draw made for a batch of size n)."""
    return np.full(n, value) if np.ndim(value) == 0 else np.asarray(value)


# --------------------------------------------------------------------------------------------------
# Sampling helpers: tensors from the host draws.
# --------------------------------------------------------------------------------------------------
def sample_beta(alpha: float, size=(), *, generator=None, device=None, dtype=torch.float32) -> Tensor:
    """Draw λ ~ Beta(alpha, alpha) as a tensor (drawn on the host, see ``mixrecipe.draws``).

    Args:
        alpha: concentration, > 0.
        size: shape of the result (an int or a tuple; ``()`` for one λ).
        generator: a CPU ``torch.Generator``; None: the CPU default generator.
        device: device of the result (default CPU).
        dtype: dtype of the result.

    Returns:
        A tensor of shape ``size`` with values in [0, 1].
    """
    alpha = check_alpha("alpha", alpha)
    g = draws.host_generator(generator)
    size = _size(size)
    n = math.prod(size)
    lam = draws.beta(alpha, n, g) if n else np.empty(0)
    return torch.as_tensor(_as_rows(lam, n), dtype=torch.float64).reshape(size).to(dtype).to(_device(device))


def _box_tensor(box, shape) -> Tensor:
    return torch.from_numpy(np.stack([_as_rows(s, math.prod(shape)) for s in box], -1).astype(np.int32)
                            ).reshape(tuple(shape) + (4,))


def rand_box(img_shape, lam, *, generator=None) -> Tensor:
    """timm's ``rand_bbox`` with tensors: a box of side fraction sqrt(1 - λ), centred uniformly, clipped.

    ``cut_h = floor(H * sqrt(1 - λ))``, centre ``cy`` uniform in [0, H), ``y0 = clip(cy - cut_h // 2)``,
    ``y1 = clip(cy + (cut_h + 1) // 2)`` to [0, H]; the same along W. Boxes clipped by the border keep
    less area than 1 - λ: see :func:`box_lam` for the corrected λ.

    Args:
        img_shape: a shape ending in (H, W), e.g. ``x.shape``.
        lam: λ as a float or a tensor of any shape (one box per element; a device tensor is read on the
            host: a synchronization).
        generator: a CPU ``torch.Generator`` for the centres.

    Returns:
        int32 tensor of shape ``lam.shape + (4,)``: (y0, y1, x0, x1), half-open, on lam's device.
    """
    h, w = _image_hw(img_shape)
    g = draws.host_generator(generator)
    lam_t = torch.as_tensor(lam, dtype=torch.float64)
    values = lam_t.detach().cpu().numpy().reshape(-1)
    u = draws.uniforms(2, values.size, g) if values.size else (values, values)
    box = draws.cut_box(h, w, values, u[0], u[1])
    return _box_tensor(box, lam_t.shape).to(lam_t.device)


def rand_box_minmax(img_shape, minmax, size=(), *, generator=None, device=None) -> Tensor:
    """timm's ``rand_bbox_minmax`` with tensors: side fractions uniform in [min, max), box fully inside.

    ``cut_h`` is uniform over the integers in [int(H * min), int(H * max)) (at least one value, where
    timm raises), the top-left corner uniform over the positions that keep the box inside the image.

    Args:
        img_shape: a shape ending in (H, W).
        minmax: (min, max) fractions of the image side, 0 <= min <= max <= 1.
        size: number/shape of boxes (``()`` for one).
        generator: a CPU ``torch.Generator``.
        device: device of the result (default CPU).

    Returns:
        int32 tensor of shape ``size + (4,)``: (y0, y1, x0, x1), half-open.
    """
    h, w = _image_hw(img_shape)
    minmax = check_minmax(minmax)
    g = draws.host_generator(generator)
    size = _size(size)
    n = math.prod(size)
    u = draws.uniforms(4, n, g) if n else [np.empty(0)] * 4
    box = draws.minmax_box(h, w, minmax, *(np.asarray(r, np.float64).reshape(-1) for r in u))
    return _box_tensor(box, size).to(_device(device))


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
        generator: a CPU ``torch.Generator`` for the box positions.

    Returns:
        (box, lam_y): int32 boxes ``lam.shape + (4,)`` and float32 label weights ``lam.shape``, on lam's
        device (CPU for a float lam).
    """
    lam = torch.as_tensor(lam, dtype=torch.float64)
    if minmax is not None:
        box = rand_box_minmax(img_shape, minmax, lam.shape, generator=generator, device=lam.device)
    else:
        box = rand_box(img_shape, lam, generator=generator)
    if correct_lam or minmax is not None:
        return box, box_lam(box, img_shape)
    return box, lam.float()


def random_involution(n: int, *, generator=None, device=None) -> tuple[Tensor, Tensor]:
    """A uniformly random pairing of range(n): ``perm[perm[i]] == i``; for odd n one sample pairs with itself.

    Args:
        n: number of samples, >= 1.
        generator: a CPU ``torch.Generator``.
        device: device of the result (default CPU).

    Returns:
        (perm, pair): int64 tensors (n,); ``pair[i]`` in [0, (n + 1) // 2) numbers i's pair (the same
        for i and perm[i]); the unpaired sample of an odd n has pair ``n // 2``.
    """
    perm, pair = draws.random_involution(n, draws.host_generator(generator))
    device = _device(device)
    return torch.from_numpy(perm).to(device), torch.from_numpy(pair).to(device)


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
    ``cutmix_minmax``). With ``box``: that box, and ``lam`` (if given) as the label weight. The draws are
    the host's (one box: the kernel's scalars; per sample: one copy to the device).

    For the index-target loss (``mixup_cross_entropy``) use ``Mixup(mixup_alpha=0., cutmix_alpha=alpha,
    ...).mix_batch(x, y)``, which returns the label weights instead of soft targets; to build your own,
    :func:`cutmix_box_and_lam` gives boxes and label weights and ``mixrecipe.ops.mix`` applies them.

    Args:
        x: (B, C, H, W) images: float32/float16/bfloat16, or uint8 (normalized with mean/std into a float
            ``out_dtype``, float32 by default).
        target: (B,) class indices, (B, K) float targets, or None.
        alpha: Beta(alpha, alpha) concentration for λ when neither ``lam`` nor ``box`` is given.
        lam: a float, 0-d or (B,) tensor: λ for the random box (a device tensor is read on the host: a
            synchronization), or the label weight of a given ``box``.
        box: (4,) or (B, 4) integer (y0, y1, x0, x1), half-open, on x's device; None for a random one.
        perm: partner of each sample: None for timm's flip (i <-> B-1-i), or a LongTensor permutation on
            x's device, e.g. ``torch.randperm(B, device=x.device)`` (out of place).
        per_sample: draw one λ and box per sample instead of one per batch.
        minmax: (min, max) side fractions of the random box (timm's ``cutmix_minmax``).
        correct_lam: label weight = kept area of the clipped box (else the sampled λ).
        num_classes: K, needed for class-index targets.
        label_smoothing: timm's label smoothing, applied before mixing.
        generator: a CPU ``torch.Generator`` for λ and the box; None: the CPU default generator.
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
        g = draws.host_generator(generator)
        h, w = x.shape[-2:]
        n = batch if per_sample else 0
        if lam is None:
            lam = draws.beta(check_alpha("alpha", alpha), n, g)
        elif isinstance(lam, Tensor):  # the box needs λ on the host
            lam = _as_rows(lam.detach().double().cpu().numpy(), batch) if per_sample else float(lam)
        elif per_sample:
            lam = _as_rows(lam, batch)
        if minmax is not None:
            cut = draws.minmax_box(h, w, minmax, *draws.uniforms(4, n, g))
        else:
            cut = draws.cut_box(h, w, lam, *draws.uniforms(2, n, g))
        lam_y = draws.box_area_lam(cut, h, w) if correct_lam or minmax is not None else lam
        if per_sample:
            lam_y, box = draws.to_device(x.device, lam_y, np.stack(cut, -1).astype(np.int32))
        else:
            box = tuple(int(v) for v in cut)
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
        lam: the label weight of each sample itself: a float (one λ for the batch: mode "batch", or mixing
            off) or a (B,) float32 tensor on x's device. ``mixup_cross_entropy`` takes either.
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
    ``generator`` for reproducible draws (on the host); no host-device synchronization on CUDA; uint8
    input with ``mean``/``std``; unknown arguments raise ``ValueError`` at construction.

    Per call (timm's order of decisions, drawn on the host): with probability ``prob`` (per batch in mode
    ``"batch"``, per pair in ``"pair"``, per sample in ``"elem"``) a sample is mixed, else it is left as is
    (λ = 1). When both ``mixup_alpha`` and
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
        generator: a CPU ``torch.Generator`` for all draws, made on the host (``mixrecipe.draws``). None:
            the CPU default generator (``torch.manual_seed``). Mode ``"batch"`` hands the kernel numbers
            (a CUDA call is the one launch); per-pair and per-sample values reach the device in one copy.
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
        self.generator = draws.host_generator(generator)
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
    def draw(self, x_shape, device=None) -> tuple:
        """One call's parameters as ``mixrecipe.ops.mix`` takes them: ``(lam_x, lam_y, perm, box)``.

        In mode "batch" λ are Python floats and the box four ints (None when this call cuts nothing): the
        fused kernel's scalar arguments, no tensor and no device op. Otherwise (B,) float32 and (B, 4) int32
        tensors on ``device`` from one asynchronous copy. ``lam_y`` is ``lam_x`` itself when nothing can be
        cut; ``perm`` is None (flip pairing) or a (B,) int64 tensor on ``device``. :meth:`sample` gives the
        same draw as tensors.
        """
        device = _device(device)
        batch = int(x_shape[0])
        if batch < 1:
            raise ValueError("the batch must hold at least one sample")
        cutmix_on = self.cutmix_alpha > 0.0
        if cutmix_on and len(x_shape) != 4:
            raise ValueError(f"CutMix needs a batch of shape (B, C, H, W), got {tuple(x_shape)}")
        h, w = (int(x_shape[2]), int(x_shape[3])) if cutmix_on else (1, 1)
        g = self.generator
        pair = self.mode == "pair"
        n = 0 if self.mode == "batch" else (batch + 1) // 2 if pair else batch
        d = draws.draw_mix(n, mixup_alpha=self.mixup_alpha, cutmix_alpha=self.cutmix_alpha,
                           prob=self.mix_prob, switch_prob=self.switch_prob, minmax=self.cutmix_minmax,
                           correct_lam=self.correct_lam, height=h, width=w, generator=g)
        if n == 0:
            box = tuple(int(v) for v in d.box) if d.cut else None
            perm = None
            if self.pairing == "random":
                perm = draws.to_device(device, draws.random_permutation(batch, g))[0]
            return d.lam_x, d.lam_y, perm, box
        lam_x, lam_y = d.lam_x, d.lam_y
        box = None if d.box is None else np.stack(d.box, -1).astype(np.int32)
        perm = None
        if pair:  # one draw per pair, shared by both samples; the unpaired one (odd B) stays as is
            if self.pairing == "random":
                perm, index = draws.random_involution(batch, g)
            else:
                index = np.minimum(np.arange(batch), batch - 1 - np.arange(batch))
            if batch % 2:
                lam_x, lam_y = lam_x.copy(), lam_y.copy()
                lam_x[-1] = lam_y[-1] = 1.0
                if box is not None:
                    box[-1] = 0
            lam_x, lam_y = lam_x[index], lam_y[index]
            box = None if box is None else box[index]
        elif self.pairing == "random":
            perm = draws.random_permutation(batch, g)
        same = d.lam_y is d.lam_x
        lam_x, lam_y, box, perm = draws.to_device(device, lam_x, None if same else lam_y, box, perm)
        return lam_x, lam_x if same else lam_y, perm, box

    def sample(self, x_shape, device=None) -> MixParams:
        """Draw one call's parameters for a batch of shape ``x_shape`` (ignores ``mixup_enabled``).

        Args:
            x_shape: the batch's shape (B, ...); (B, C, H, W) when CutMix is active.
            device: the batch's device (where the parameters end up; default CPU).

        Returns:
            :class:`MixParams` on ``device``.
        """
        device = _device(device)
        lam_x, lam_y, perm, box = self.draw(x_shape, device)
        if isinstance(lam_x, float):
            same = lam_y is lam_x
            lam_x = torch.tensor(lam_x, dtype=torch.float32, device=device)
            lam_y = lam_x if same else torch.tensor(lam_y, dtype=torch.float32, device=device)
            if self.cutmix_alpha > 0.0:  # an empty box where this call cuts nothing
                box = torch.tensor(box or (0, 0, 0, 0), dtype=torch.int32, device=device)
        return MixParams(lam_x, lam_y, perm, box)

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
        """-> (x_out, soft or None, op target, label smoothing, lam_y (float or (B,) tensor), perm)."""
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
        op_target = target if with_soft else None
        if self.mixup_enabled:
            lam_x, lam_y, perm, box = self.draw(x.shape, x.device)
        else:
            if same_dtype and self.mean is None and x.dtype != torch.uint8 and out is None:
                soft = None
                if op_target is not None:
                    soft = ops.mixup_target(op_target, self.num_classes, 1.0, None, smoothing)
                return x, soft, target, smoothing, 1.0, None
            lam_x = lam_y = 1.0
            perm = box = None
        inplace = self.inplace and perm is None and same_dtype and _dense(x) and out is None
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
        return MixedBatch(x_out, target, lam, perm, smoothing)
