"""fastai callbacks: ``cbs=MixUp()`` on the one-pass op, without fastai's known failures.

Three callbacks for a fastai ``Learner``:

- :class:`MixUp` and :class:`CutMix`: drop-in replacements for ``fastai.callback.mixup.MixUp`` /
  ``CutMix``, with fastai's argument names, defaults and random draws (same seed, same λ, permutation and
  box, hence the same per-batch loss), mixing the images with ``mixrecipe.mixup`` / ``mixrecipe.mix``;
- :class:`MixupCallback`: runs a :class:`mixrecipe.Mixup` policy (timm semantics: Mixup/CutMix switching,
  per-batch/pair/element λ, label smoothing) inside any Learner.

The loss. While training, ``learn.loss_func`` is wrapped; the wrapper picks, per batch:

- integer class targets with a cross-entropy loss (fastai's ``CrossEntropyLossFlat``,
  ``LabelSmoothingCrossEntropy(Flat)``, ``nn.CrossEntropyLoss`` with or without ``label_smoothing``,
  ``F.cross_entropy``, timm's ``LabelSmoothingCrossEntropy``, mixrecipe's ``SoftTargetCrossEntropy``):
  :func:`mixrecipe.loss.mixup_cross_entropy` with per-sample λ and the loss's own smoothing, no (B, K) target
  matrix. fastai's smoothed loss ``eps/K * sum_k(-log p_k) + (1 - eps) * nll`` is exactly the cross-entropy
  against timm's smoothed one-hot (off = eps/K), so it maps to ``label_smoothing=eps`` exactly; the result
  equals fastai's ``lerp(loss(pred, y_partner), loss(pred, y), λ)`` to float rounding;
- integer targets with a soft-target loss (a class named ``SoftTargetCrossEntropy``, e.g. timm's): the dense
  mixed targets ``mixrecipe.mixup_target(y, K, λ, perm)``;
- float targets (one-hot, multi-label, soft): the targets are mixed with the same λ and partner and passed
  to the loss (with a cross-entropy loss, the soft-target cross-entropy is computed directly, since the
  ``Flat`` losses cannot take (B, K) targets);
- anything else (a weighted cross-entropy, a focal loss, your own loss): fastai's form
  ``lerp(loss(pred, y_partner), loss(pred, y), λ)`` with ``reduction='none'``, then the loss's reduction.

At validation nothing is mixed and the original loss is used; the original loss is back in
``learn.loss_func`` after training, after a cancelled fit (``lr_find``), and even when an earlier fit died
halfway (the next fit unwraps it).

What differs from fastai (its failures): plain ``nn.CrossEntropyLoss`` / ``F.cross_entropy`` work (fastai
lerps integer targets and fails); a batch of 1 works (fastai squeezes λ to 0-d and fails); float16/bfloat16
and channels_last batches stay as they are; fastai's ``CutMix`` writes into the loader's batch, ours out of
place.
"""

from __future__ import annotations

import warnings

try:
    from fastai.callback.core import Callback
    from fastai.losses import BaseLoss, LabelSmoothingCrossEntropy
    from fastai.torch_core import retain_type
except ImportError as _exc:  # pragma: no cover - exercised only without fastai
    raise ImportError(
        "mixrecipe.fastai needs fastai, which is an optional dependency: "
        'pip install fastai  (from a mixrecipe checkout: pip install ".[fastai]")'
    ) from _exc

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions.beta import Beta

from .checks import check_alpha
from .loss import SoftTargetCrossEntropy, mixup_cross_entropy, reduce_loss
from .ops import mix, mixup, mixup_target
from .policy import Mixup

__all__ = ["MixUp", "CutMix", "MixupCallback", "loss_kind"]


# --------------------------------------------------------------------------------------------------
# Small helpers.
# --------------------------------------------------------------------------------------------------
def _plain(t):
    """A fastai tensor subclass (TensorImage, TensorCategory, ...) as a plain ``torch.Tensor`` view."""
    if isinstance(t, Tensor) and type(t) is not Tensor and not isinstance(t, nn.Parameter):
        return t.as_subclass(Tensor)
    return t


def _is_index_target(y) -> bool:
    return isinstance(y, Tensor) and y.ndim == 1 and not y.is_floating_point() and not y.is_complex() \
        and y.dtype != torch.bool


def _is_timm(obj, name: str) -> bool:
    cls = type(obj)
    return cls.__name__ == name and cls.__module__.startswith("timm.")


def loss_kind(loss_func) -> tuple[str, float, str]:
    """How the callbacks treat ``loss_func`` for integer class targets.

    Args:
        loss_func: the Learner's loss.

    Returns:
        ``(kind, smoothing, reduction)``: kind ``"ce"`` (a cross-entropy: the mixed loss is
        ``mixup_cross_entropy`` with ``label_smoothing=smoothing``), ``"soft"`` (wants dense (B, K)
        targets) or ``"other"`` (fastai's lerp of per-sample losses); reduction is the loss's own.
    """
    reduction = getattr(loss_func, "reduction", "mean")
    reduction = reduction if reduction in ("mean", "sum", "none") else "mean"
    inner = loss_func
    if isinstance(loss_func, BaseLoss):
        lf = loss_func
        if not lf.flatten or lf.floatify or not lf.is_2d or lf.axis not in (-1, 1):
            return "other", 0.0, reduction
        inner = loss_func.func
    cls = type(inner)
    if cls is nn.CrossEntropyLoss:
        if inner.weight is None:
            return "ce", float(inner.label_smoothing), inner.reduction
    elif cls is LabelSmoothingCrossEntropy:
        if inner.weight is None:
            return "ce", float(inner.eps), inner.reduction
    elif inner is F.cross_entropy:
        return "ce", 0.0, "mean"
    elif cls is SoftTargetCrossEntropy:
        return "ce", 0.0, inner.reduction
    elif _is_timm(inner, "LabelSmoothingCrossEntropy"):
        return "ce", float(inner.smoothing), "mean"
    elif cls.__name__ == "SoftTargetCrossEntropy":
        return "soft", 0.0, reduction
    return "other", 0.0, reduction


def _per_sample(loss_func, pred, *yb) -> Tensor:
    """``loss_func`` with ``reduction='none'`` (fastai's NoneReduce, restoring the attribute afterwards)."""
    reduction = getattr(loss_func, "reduction", None)
    if isinstance(reduction, str):
        loss_func.reduction = "none"
        try:
            return loss_func(pred, *yb)
        finally:
            loss_func.reduction = reduction
    try:
        return loss_func(pred, *yb, reduction="none")
    except TypeError as exc:
        raise TypeError(
            f"mixing needs per-sample losses, but {loss_func!r} has no `reduction` attribute and takes no "
            "reduction='none' argument; use a loss that does (e.g. nn.CrossEntropyLoss)"
        ) from exc


def _lerp_rows(start: Tensor, end: Tensor, lam: Tensor) -> Tensor:
    """``start + lam * (end - start)`` in (at least) float32, lam (B,) broadcast over each row."""
    dtype = torch.promote_types(end.dtype, torch.float32) if end.is_floating_point() else torch.float32
    w = lam.to(dtype).view([-1] + [1] * (end.ndim - 1))
    return torch.lerp(start.to(dtype), end.to(dtype), w)


def _soft_ce(pred: Tensor, soft: Tensor, smoothing: float, reduction: str) -> Tensor:
    """Cross-entropy against dense targets, smoothed first (off = smoothing / K)."""
    if smoothing:
        soft = soft * (1.0 - smoothing) + smoothing / soft.shape[-1]
    return SoftTargetCrossEntropy(reduction)(pred, soft)


def _combine_smoothing(a: float, b: float) -> float:
    """Smoothing ``a`` then ``b`` is one smoothing of ``1 - (1 - a)(1 - b)`` (off = total / K)."""
    return 1.0 - (1.0 - a) * (1.0 - b)


# --------------------------------------------------------------------------------------------------
# The loss wrapper.
# --------------------------------------------------------------------------------------------------
class _MixedLoss:
    """``learn.loss_func`` while training: the mixed loss for mixed batches, the original loss otherwise.

    Attributes other than the call (``reduction``, ``activation``, ``decodes``, ``y_int``...) are the
    original loss's.
    """

    def __init__(self, cb: _MixBase, loss_func):
        self.cb, self.loss_func = cb, loss_func

    def __call__(self, pred, *yb, **kwargs):
        cb = self.cb
        if kwargs or not cb._pending or not cb.learn.training:
            return self.loss_func(pred, *yb, **kwargs)
        return cb._mixed_loss(self.loss_func, pred, *yb)

    def __getattr__(self, name):
        if name in ("cb", "loss_func"):  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loss_func, name)

    def __repr__(self) -> str:
        return f"{type(self.cb).__name__}-mixed {self.loss_func!r}"


# --------------------------------------------------------------------------------------------------
# The callbacks.
# --------------------------------------------------------------------------------------------------
class _MixBase(Callback):
    """Shared machinery: wrap the loss while training, restore it after; the mixed loss per target kind.

    Subclasses set, in ``before_batch``: ``self.learn.xb`` (mixed), ``self.lam`` (fastai's attribute),
    ``self._lam_y`` ((B,) label weights), ``self.perm`` ((B,) partners, or None for the flip pairing),
    ``self.yb1`` (the partners' targets) and ``self._pending = True``.
    """

    run_valid = False
    _policy_smoothing = 0.0  # label smoothing asked by the mixing policy (MixupCallback)

    def __init__(self):
        super().__init__()
        self._pending = False
        self.lam = self.perm = self._lam_y = self._dense = self.old_lf = None
        self.stack_y = False
        self.yb1 = ()

    # Loss wrapping ------------------------------------------------------------------------------------
    def before_train(self):
        loss_func = self.learn.loss_func
        while isinstance(loss_func, _MixedLoss):  # left behind by a fit that raised: unwrap it
            loss_func = loss_func.loss_func
        self.old_lf = loss_func  # fastai's names, for code that inspects the callback
        self.stack_y = bool(getattr(loss_func, "y_int", False))
        self.learn.loss_func = _MixedLoss(self, loss_func)

    def lf(self, pred, *yb):
        """fastai's ``MixHandler.lf``: the current batch's mixed loss (the original one at validation)."""
        if not self.training or not self._pending:
            return self.old_lf(pred, *yb)
        return self._mixed_loss(self.old_lf, pred, *yb)

    def _restore(self):
        self._pending = False
        self._dense = None
        lf = getattr(self.learn, "loss_func", None)
        if isinstance(lf, _MixedLoss) and lf.cb is self:
            self.learn.loss_func = lf.loss_func

    def after_train(self):
        """Give ``learn.loss_func`` back (validation uses the original loss)."""
        self._restore()

    def after_cancel_train(self):
        self._restore()

    def after_cancel_fit(self):
        self._restore()

    def after_fit(self):
        self._restore()

    def after_batch(self):
        self._pending = False
        self._dense = None

    def after_cancel_batch(self):
        self.after_batch()

    # Helpers for subclasses --------------------------------------------------------------------------
    def _partner_perm(self, batch: int, device) -> Tensor:
        if self.perm is not None:
            return self.perm
        return torch.arange(batch - 1, -1, -1, device=device)

    # The mixed loss ----------------------------------------------------------------------------------
    def _mixed_loss(self, loss_func, pred, *yb):
        if self._dense is not None:  # targets mixed by the policy already (MixupCallback, float targets)
            kind, eps, reduction = loss_kind(loss_func)
            p = _plain(pred)
            if kind == "ce" and isinstance(p, Tensor) and p.shape == self._dense.shape:
                return _soft_ce(p, self._dense, eps, reduction)
            return loss_func(pred, self._dense)
        lam = self._lam_y
        batch = lam.shape[0]
        if len(yb) == 1 and isinstance(yb[0], Tensor) and isinstance(pred, Tensor):
            y, p = _plain(yb[0]), _plain(pred)
            kind, eps, reduction = loss_kind(loss_func)
            if y.is_floating_point() and y.shape[:1] == (batch,):
                partner = y.index_select(0, self._partner_perm(batch, y.device))
                dense = _lerp_rows(partner, y, lam)
                if kind == "ce" and p.ndim == 2 and dense.shape == p.shape:
                    return _soft_ce(p, dense.float(), _combine_smoothing(self._policy_smoothing, eps),
                                    reduction)
                return loss_func(pred, retain_type(dense, yb[0]))
            if _is_index_target(y) and p.ndim == 2 and p.shape[0] == batch == y.shape[0]:
                if kind == "ce":
                    smoothing = _combine_smoothing(self._policy_smoothing, eps)
                    return mixup_cross_entropy(p, y, lam, self.perm, label_smoothing=smoothing,
                                               reduction=reduction)
                if kind == "soft":
                    soft = mixup_target(y, p.shape[1], lam, self.perm, self._policy_smoothing)
                    return loss_func(pred, soft)
        return self._lerp_losses(loss_func, pred, *yb)

    def _lerp_losses(self, loss_func, pred, *yb):
        """fastai's form: ``lerp(loss(pred, y_partner), loss(pred, y), λ)``, then the loss's reduction."""
        if self._policy_smoothing and not getattr(self, "_warned", False):
            self._warned = True
            warnings.warn(
                f"label smoothing {self._policy_smoothing} cannot be applied to the loss "
                f"{loss_func!r}; it is trained on mixed losses without smoothing. Use a cross-entropy "
                "loss or Mixup(label_smoothing=0.0).",
                stacklevel=3,
            )
        lam = self._lam_y
        batch = lam.shape[0]
        yb1 = self.yb1
        if len(yb1) != len(yb):
            perm = self._partner_perm(batch, lam.device)
            yb1 = tuple(y[perm] if isinstance(y, Tensor) and y.shape[:1] == (batch,) else y for y in yb)
        own = _per_sample(loss_func, pred, *yb)
        other = _per_sample(loss_func, pred, *yb1)
        if own.ndim == 0 or own.shape[0] != batch:
            raise ValueError(
                f"mixing needs one loss per sample; {loss_func!r} with reduction='none' returned shape "
                f"{tuple(own.shape)} for a batch of {batch}"
            )
        loss = _lerp_rows(other, own, lam)
        return reduce_loss(loss, getattr(loss_func, "reduction", "mean"))


class MixUp(_MixBase):
    """fastai's ``MixUp`` (https://arxiv.org/abs/1710.09412) on mixrecipe's one-pass op.

    Per batch: λ_i ~ Beta(alpha, alpha) per sample, λ_i <- max(λ_i, 1 - λ_i), a uniformly random
    permutation (a sample may draw itself), ``x_i <- λ_i x_i + (1 - λ_i) x_perm(i)`` for every floating
    input of the batch (``mixrecipe.mixup``, out of place, channels_last and fp16/bf16 kept), and the loss
    mixed with the same λ (see the module docstring). The draws use the global torch RNG in fastai's order,
    so with the same seed this callback and fastai's draw the same λ and permutation.

    Args:
        alpha: Beta(alpha, alpha) concentration, > 0 (fastai's default 0.4).

    Attributes:
        lam: (B,) the last batch's λ; perm: (B,) its partners; yb1: the partners' targets.
    """

    def __init__(self, alpha: float = 0.4):
        super().__init__()
        self.alpha = check_alpha("alpha", alpha)
        self.distrib = Beta(torch.tensor(self.alpha), torch.tensor(self.alpha))

    def _draw(self, batch: int, device) -> tuple[Tensor, Tensor]:
        """λ (B,) and the permutation: fastai's draws, in fastai's order, on the CPU RNG."""
        lam = self.distrib.sample((batch,)).reshape(batch)
        lam = torch.maximum(lam, 1.0 - lam)
        perm = torch.randperm(batch)
        return lam.to(device), perm.to(device)

    def before_batch(self):
        x = self.xb[0]
        batch = x.shape[0]
        self.lam, self.perm = self._draw(batch, x.device)
        self._lam_y = self.lam
        self.learn.xb = tuple(_mix_input(t, self.lam, self.perm, batch) for t in self.xb)
        self.yb1 = tuple(y[self.perm] if isinstance(y, Tensor) and y.shape[:1] == (batch,) else y
                         for y in self.yb)
        self._pending = True


def _mix_input(t, lam: Tensor, perm: Tensor, batch: int):
    if not isinstance(t, Tensor) or t.ndim == 0 or t.shape[0] != batch:
        return t
    if not t.is_floating_point():
        raise TypeError(f"MixUp mixes floating-point inputs; this batch holds a {t.dtype} input of shape "
                        f"{tuple(t.shape)} (convert images to float first, e.g. with IntToFloatTensor)")
    if t.dtype == torch.float64:
        out = torch.lerp(t[perm], t, lam.to(t.dtype).view([-1] + [1] * (t.ndim - 1)))
        return out
    out, _ = mixup(_plain(t), None, lam, perm)
    return retain_type(out, t)


class CutMix(_MixBase):
    """fastai's ``CutMix`` (https://arxiv.org/abs/1905.04899) on mixrecipe's one-pass op.

    Per batch: λ ~ Beta(alpha, alpha), a random permutation, fastai's box (side ``round(sqrt(1 - λ) * size)``
    centred uniformly, clipped), the partners' box pasted in (``mixrecipe.mix``, out of place: fastai
    writes into the loader's batch) and the loss mixed with λ = the kept area. Same draws as fastai's in
    the same order, so the same seed gives the same λ, permutation and box.

    Args:
        alpha: Beta(alpha, alpha) concentration, > 0 (fastai's default 1.0).

    Attributes:
        lam: (1,) the last batch's kept area; perm: (B,) its partners; box: (y0, y1, x0, x1).
    """

    def __init__(self, alpha: float = 1.0):
        super().__init__()
        self.alpha = check_alpha("alpha", alpha)
        self.distrib = Beta(torch.tensor(self.alpha), torch.tensor(self.alpha))
        self.box = None

    def rand_bbox(self, W: int, H: int, lam: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # noqa: N803
        """fastai's box: (x1, y1, x2, y2), as CPU tensors, drawn with the global torch RNG."""
        cut_rat = torch.sqrt(1.0 - lam)
        cut_w = torch.round(W * cut_rat).long()
        cut_h = torch.round(H * cut_rat).long()
        cx = torch.randint(0, W, (1,))
        cy = torch.randint(0, H, (1,))
        x1 = torch.clamp(cx - cut_w // 2, 0, W)
        y1 = torch.clamp(cy - cut_h // 2, 0, H)
        x2 = torch.clamp(cx + cut_w // 2, 0, W)
        y2 = torch.clamp(cy + cut_h // 2, 0, H)
        return x1, y1, x2, y2

    def before_batch(self):
        x = self.xb[0]
        if not isinstance(x, Tensor) or x.ndim != 4:
            raise ValueError(f"CutMix needs image batches of shape (B, C, H, W), got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"CutMix mixes floating-point images, got {x.dtype}")
        batch, _, h, w = x.shape
        lam = self.distrib.sample((1,))
        perm = torch.randperm(batch)
        x1, y1, x2, y2 = self.rand_bbox(w, h, lam)
        box = torch.cat([y1, y2, x1, x2]).to(torch.int32)
        kept = 1.0 - ((x2 - x1) * (y2 - y1)).float() / float(w * h)
        self.perm = perm.to(x.device)
        self.box = box
        self.lam = kept.to(x.device)
        self._lam_y = self.lam.expand(batch)
        out, _ = mix(_plain(x), None, 1.0, None, self.perm, box.to(x.device))
        self.learn.xb = (retain_type(out, x),) + tuple(self.xb[1:])
        self.yb1 = (self.y[self.perm],) if isinstance(self.y, Tensor) else ()
        self._pending = True


class MixupCallback(_MixBase):
    """Run a :class:`mixrecipe.Mixup` policy inside any fastai ``Learner``.

    Images: ``mixup.mix_batch`` (integer targets; one pass, in place for the flip pairing) or
    ``mixup(x, y)`` (float targets). Loss: :func:`mixrecipe.loss.mixup_cross_entropy` with the policy's
    per-sample label weights and partners for a cross-entropy loss, with ``label_smoothing`` the policy's
    combined with the loss's own (smoothing by a then by b is one smoothing of ``1 - (1-a)(1-b)``); dense
    targets for a soft-target loss; fastai's lerp of per-sample losses otherwise (then the policy's label
    smoothing cannot apply: a warning says so).

    Args:
        mixup: the policy, e.g. ``Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1,
            num_classes=dls.c)``. ``mixup.mixup_enabled = False`` turns mixing off (e.g. for the last
            epochs) while the callback stays in place.

    Attributes:
        lam: (B,) the last batch's label weights; perm: its partners (None: the flip pairing i <-> B-1-i).
    """

    def __init__(self, mixup: Mixup):
        super().__init__()
        if not isinstance(mixup, Mixup):
            raise TypeError(f"MixupCallback needs a mixrecipe.Mixup, got {type(mixup).__name__}")
        self.mixup = mixup

    def before_batch(self):
        x = self.xb[0]
        if not isinstance(x, Tensor):
            raise TypeError(f"MixupCallback needs a tensor batch, got {type(x).__name__}")
        y = self.yb[0] if len(self.yb) == 1 else None
        y_plain = _plain(y)
        batch = x.shape[0]
        if isinstance(y_plain, Tensor) and y_plain.is_floating_point():
            # Dense targets: the policy mixes them (with its smoothing); the loss gets them as they are.
            out, self._dense = self.mixup(_plain(x), y_plain)
            self.learn.xb = (retain_type(out, x),) + tuple(self.xb[1:])
            self._pending = True
            return
        self._dense = None
        mb = self.mixup.mix_batch(_plain(x), y_plain if _is_index_target(y_plain) else None)
        self.learn.xb = (retain_type(mb.x, x),) + tuple(self.xb[1:])
        lam = mb.lam  # a float for one λ per batch: fastai's callbacks read one weight per sample
        if not isinstance(lam, Tensor):
            lam = torch.full((batch,), lam, device=x.device)
        self.lam = self._lam_y = lam
        self.perm = mb.perm
        self._policy_smoothing = mb.label_smoothing
        perm = self._partner_perm(batch, x.device)
        self.yb1 = tuple(t[perm] if isinstance(t, Tensor) and t.shape[:1] == (batch,) else t for t in self.yb)
        self._pending = True

