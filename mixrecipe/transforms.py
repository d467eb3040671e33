"""torchvision v2 ``MixUp`` / ``CutMix`` drop-ins that run mixrecipe's one-pass op.

``from mixrecipe.transforms import MixUp, CutMix`` in place of ``from torchvision.transforms.v2 import ...``:
the same arguments, the same random draws (torchvision's, from the global torch RNG, in torchvision's
order: with the same seed you get torchvision's λ and box), the same pairing (sample i with i-1, i.e.
``roll(1, 0)``), one λ per call, one box per call with the label weight = the kept area, and the same
outputs (images in their dtype and ``tv_tensors`` type, (B, K) float labels). Each class *is* a
``torchvision.transforms.v2.MixUp`` / ``CutMix`` (a subclass: ``v2.RandomChoice``, ``v2.Compose`` and
``isinstance`` checks keep working); only the work is different: images and labels come out of one
``mixrecipe.mix`` call (a fused kernel on CUDA) instead of torchvision's roll + mul + add (+ clone and
slice copy for CutMix) and a separate one-hot.

Call them on ``(images, labels)`` after the loader, or inside a ``collate_fn``::

    cutmix_or_mixup = v2.RandomChoice([CutMix(num_classes=K), MixUp(num_classes=K)])
    loader = DataLoader(ds, batch_size=64, collate_fn=lambda b: cutmix_or_mixup(*default_collate(b)))

Options torchvision lacks (all off by default):

- ``per_sample=True``: one λ per sample (and for CutMix one box per sample), drawn as torchvision draws
  one, vectorized;
- ``pairing="flip"``: timm's pairing (sample i with B-1-i, an involution) instead of ``roll(1, 0)``;
  with ``inplace=True`` the images are mixed in place (one read and one write of the batch);
- ``label_smoothing``: timm's smoothing of the labels before mixing (off = s/K, on = 1 - s + off).

Images whose dtype the op does not take (uint8, float64, ...) are mixed by an eager path with the same
semantics (CutMix of uint8 images copies pixels exactly, as torchvision does; MixUp rounds).

Constructor arguments follow ``mixrecipe.checks``, as at every mixrecipe entry point, and are checked
before torchvision's ``__init__`` runs: a value of the wrong kind (``alpha="1"``, ``num_classes=1.5`` or
``True``, ``label_smoothing=True``) is a ``TypeError``, one out of range (``alpha=0`` or NaN,
``num_classes=0``, ``label_smoothing=1.5``, an unknown ``pairing``) a ``ValueError``. torchvision itself
would take ``alpha=True`` as 1.0 and fail on ``alpha=0`` with its Beta's own error.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2

from . import draws, ops
from .checks import check_alpha, check_choice, check_num_classes, check_unit_interval
from .reference import lerp, pixel_weights

__all__ = ["MixUp", "CutMix"]

_OP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PAIRINGS = ("roll", "flip")


# --------------------------------------------------------------------------------------------------
# Argument checks: mixrecipe.checks' rules, run before torchvision's __init__ sees the arguments (it
# takes alpha=True as 1.0 and leaves alpha=0 to its Beta's error); only the in-place rule is ours.
# --------------------------------------------------------------------------------------------------
def _check_inplace(inplace: bool, pairing: str) -> bool:
    if inplace and pairing != "flip":
        raise ValueError("inplace=True needs pairing='flip' (with roll(1, 0) a row would be read after "
                         "its partner overwrote it)")
    return inplace


# --------------------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------------------
def _is_image_like(inpt) -> bool:
    """What torchvision's MixUp/CutMix mix: Image, Video, or a plain tensor."""
    return isinstance(inpt, (tv_tensors.Image, tv_tensors.Video)) or (
        isinstance(inpt, Tensor) and not isinstance(inpt, tv_tensors.TVTensor))


def _roll_perm(batch: int, device) -> Tensor:
    """Partner indices of ``x.roll(1, 0)``: sample i takes sample i - 1 (sample 0 takes B - 1). Made on the
    host and copied: one device op (kept per batch size by the transform)."""
    return draws.to_device(device, torch.arange(batch).roll(1))[0]


def _torchvision_box(lam: Tensor, r_x: Tensor, r_y: Tensor, height: int, width: int) -> Tensor:
    """torchvision's CutMix box for each λ and centre, as int32 (y0, y1, x0, x1): (..., 4).

    ``r = 0.5 * sqrt(1 - λ)``, half sides ``int(r * W)``, ``int(r * H)``, clipped to the image; float64
    here computes the same values as torchvision's Python floats.
    """
    r = 0.5 * (1.0 - lam.double()).sqrt()
    w_half, h_half = (r * width).floor(), (r * height).floor()
    x1 = (r_x - w_half).clamp(min=0)
    y1 = (r_y - h_half).clamp(min=0)
    x2 = (r_x + w_half).clamp(max=width)
    y2 = (r_y + h_half).clamp(max=height)
    return torch.stack([y1, y2, x1, x2], dim=-1).to(torch.int32)


def _eager_mix(x: Tensor, lam_x, perm: Tensor, box) -> Tensor:
    """Images of a dtype the op does not take: the op's semantics in float64, rounded back for integers."""
    xf = x.double()
    w = pixel_weights(x.shape, lam_x, box, torch.float64, x.device)
    out = lerp(xf[perm], xf, w)
    if not x.is_floating_point():
        out = out.round()
    return out.to(x.dtype)


class _FusedMixMixin:
    """What MixUp and CutMix share: options, the check of each image, the fused call, the label path.

    torchvision's ``forward`` (inherited) validates the labels, draws the parameters (``make_params``) and
    calls ``transform`` on each image and on the labels with the same ``params`` dict. The first image
    computes the soft labels in the same op call and leaves them in ``params`` for the labels.
    """

    def __init__(self, *, alpha: float = 1.0, num_classes: int | None = None, labels_getter="default",
                 per_sample: bool = False, pairing: str = "roll", inplace: bool = False,
                 label_smoothing: float = 0.0) -> None:
        alpha = check_alpha("alpha", alpha)
        num_classes = check_num_classes(num_classes, allow_none=True)
        pairing = check_choice("pairing", pairing, _PAIRINGS)
        inplace = _check_inplace(bool(inplace), pairing)
        label_smoothing = check_unit_interval("label_smoothing", label_smoothing)
        super().__init__(alpha=alpha, num_classes=num_classes, labels_getter=labels_getter)
        self.per_sample = bool(per_sample)
        self.pairing, self.inplace, self.label_smoothing = pairing, inplace, label_smoothing
        self._perms: dict = {}

    # Parameters -------------------------------------------------------------------------------------
    def _sample_lam(self, flat_inputs) -> Tensor:
        """Per-sample λ: torchvision's Beta draw, (B,) float32 on the CPU."""
        if not flat_inputs:
            raise ValueError(f"{type(self).__name__}(per_sample=True) needs an image batch in the input")
        batch = flat_inputs[0].shape[0]
        return self._dist.sample((batch,)).reshape(batch)

    def _mix_params(self, params) -> tuple:
        """-> (lam_x, lam_y, box) for the op: floats or (B,) tensors; box None or int32 (4,)/(B, 4)."""
        raise NotImplementedError

    def _perm(self, batch: int, device):
        if self.pairing == "flip":
            return None
        key = (batch, str(device))
        perm = self._perms.get(key)
        if perm is None:
            perm = self._perms[key] = _roll_perm(batch, device)
        return perm

    # Transform --------------------------------------------------------------------------------------
    def transform(self, inpt, params):
        labels = params["labels"]
        if inpt is labels:
            soft = params.get("_mixrecipe_soft")
            if soft is None:  # no image on the labels' device came first: the labels alone
                soft = params["_mixrecipe_soft"] = self._mix_labels(labels, params)
            return soft
        if not _is_image_like(inpt):
            return inpt
        self._check_batch(inpt, params["batch_size"])
        lam_x, lam_y, box = self._mix_params(params)
        x = inpt.as_subclass(Tensor)
        batch = x.shape[0]
        perm = self._perm(batch, x.device)
        with_labels = params.get("_mixrecipe_soft") is None and labels.device == x.device
        if x.ndim == 5:  # a video (B, T, C, H, W): the box applies to every frame
            x4 = x.reshape(batch, -1, *x.shape[-2:])
        else:
            x4 = x
        if x.dtype in _OP_DTYPES:
            target, num_classes = self._op_target(labels) if with_labels else (None, None)
            # one box (a (4,) CPU tensor) reaches the kernel as four numbers; per-sample values are copied
            lam_x, lam_y, box = _on_device(x.device, lam_x, lam_y, box)
            out, soft = ops.mix(x4, target, lam_x, lam_y, perm, box,
                                num_classes=num_classes, label_smoothing=self.label_smoothing,
                                inplace=self.inplace and _writable_view(x4, x))
            if soft is not None:
                params["_mixrecipe_soft"] = self._label_dtype(soft, labels)
        else:
            p = perm if perm is not None else torch.arange(batch - 1, -1, -1, device=x.device)
            out = _eager_mix(x4, lam_x, p, box)
        out = out.view(x.shape) if out.shape != x.shape else out
        if isinstance(inpt, (tv_tensors.Image, tv_tensors.Video)):
            out = tv_tensors.wrap(out, like=inpt)
        return out

    def _check_batch(self, inpt, batch_size: int) -> None:
        expected = 5 if isinstance(inpt, tv_tensors.Video) else 4
        if inpt.ndim != expected:
            raise ValueError(f"Expected a batched input with {expected} dims, but got {inpt.ndim} "
                             "dimensions instead.")
        if inpt.shape[0] != batch_size:
            raise ValueError(f"The batch size of the image or video does not match the batch size of the "
                             f"labels: {inpt.shape[0]} != {batch_size}.")

    def _op_target(self, labels: Tensor):
        labels = labels.as_subclass(Tensor)
        if labels.ndim == 2:
            return (labels if labels.is_floating_point() else labels.float()), labels.shape[1]
        return labels, self.num_classes

    @staticmethod
    def _label_dtype(soft: Tensor, labels: Tensor) -> Tensor:
        if labels.is_floating_point() and labels.dtype != soft.dtype:
            return soft.to(labels.dtype)
        return soft

    def _mix_labels(self, labels: Tensor, params) -> Tensor:
        """Labels alone (no image on their device): the same mix of the labels, on their device."""
        _, lam_y, _ = self._mix_params(params)
        target, num_classes = self._op_target(labels)
        soft = ops.mixup_target(target, num_classes, _on_device(labels.device, lam_y, lam_y, None)[1],
                                self._perm(labels.shape[0], labels.device), self.label_smoothing)
        return self._label_dtype(soft, labels)


def _writable_view(x4: Tensor, x: Tensor) -> bool:
    """Whether mixing ``x4`` in place writes ``x``: the same memory, dense enough for the in-place op."""
    dense = x4.is_contiguous() or x4.is_contiguous(memory_format=torch.channels_last)
    return dense and x4.data_ptr() == x.data_ptr()


def _on_device(device, lam_x, lam_y, box):
    """(lam_x, lam_y, box) for the op on ``device``: (B,) weights and (B, 4) boxes travel in one
    asynchronous copy; numbers and one box for the batch stay on the host (the kernel's scalars)."""
    values = (lam_x, lam_y, box)
    moving = [isinstance(v, Tensor) and v.ndim == ndim for v, ndim in zip(values, (1, 1, 2))]
    if not any(moving):
        return values
    moved = draws.to_device(device, *(v if m else None for v, m in zip(values, moving)))
    return tuple(c if m else v for v, c, m in zip(values, moved, moving))


class MixUp(_FusedMixMixin, v2.MixUp):
    """torchvision's ``v2.MixUp`` on the one-pass op: ``x_i <- λ x_i + (1 - λ) x_{i-1}``, same for labels.

    Args:
        alpha: Beta(alpha, alpha) concentration, > 0 (default 1.0).
        num_classes: K, needed for (B,) class-index labels; None for (B, K) labels.
        labels_getter: ``"default"`` (the second input, or a ``"labels"`` key) or a callable, as torchvision.
        per_sample: one λ per sample instead of one per call.
        pairing: ``"roll"`` (torchvision: sample i with i-1) or ``"flip"`` (timm: sample i with B-1-i).
        inplace: with ``pairing="flip"``, mix the images in place.
        label_smoothing: timm's label smoothing applied to the labels before mixing.
    """

    def make_params(self, flat_inputs):
        if not self.per_sample:
            return super().make_params(flat_inputs)  # torchvision's own draw: {"lam": float}
        return {"lam": self._sample_lam(flat_inputs)}

    def _mix_params(self, params):
        return params["lam"], params["lam"], None


class CutMix(_FusedMixMixin, v2.CutMix):
    """torchvision's ``v2.CutMix`` on the one-pass op: the previous sample's box pasted in, λ = kept area.

    One box per call (torchvision's: half sides ``int(0.5 * sqrt(1 - λ) * W)`` around a uniform centre,
    clipped), the same for every sample; the labels are mixed with the kept area of that box.

    Args:
        alpha: Beta(alpha, alpha) concentration, > 0 (default 1.0).
        num_classes: K, needed for (B,) class-index labels; None for (B, K) labels.
        labels_getter: as torchvision.
        per_sample: one λ and one box per sample.
        pairing: ``"roll"`` (torchvision) or ``"flip"`` (timm).
        inplace: with ``pairing="flip"``, mix the images in place.
        label_smoothing: timm's label smoothing applied to the labels before mixing.
    """

    def make_params(self, flat_inputs):
        if not self.per_sample:
            return super().make_params(flat_inputs)  # torchvision's own draws: box and lam_adjusted
        lam = self._sample_lam(flat_inputs)
        height, width = flat_inputs[0].shape[-2:]
        r_x = torch.randint(width, size=lam.shape)
        r_y = torch.randint(height, size=lam.shape)
        box = _torchvision_box(lam, r_x, r_y, height, width)
        area = (box[:, 1] - box[:, 0]).double() * (box[:, 3] - box[:, 2]).double()
        return {"box_yyxx": box, "lam_adjusted": (1.0 - area / (width * height)).float()}

    def _mix_params(self, params):
        box = params.get("box_yyxx")
        if box is None:
            x1, y1, x2, y2 = params["box"]
            box = params["box_yyxx"] = torch.tensor([y1, y2, x1, x2], dtype=torch.int32)
        return 1.0, params["lam_adjusted"], box
