"""In-memory data sets resident on the training device: each batch one index gather, augmented, normalized and
mixed in one pass.

CIFAR-10's training set is 150 MB of uint8, Fashion-MNIST's 47 MB, digits' 0.1 MB: they fit on any GPU. A
:class:`DeviceImages` keeps the images there; a training step then needs only the batch's indices (from the
loader's sampler), the augmentation draws (:meth:`mixrecipe.data.ImageTensors.draw`: crop offsets and flip
bits, on the host from the data set's generator, as the loader takes them) and the mixing draws
(``Mixup.draw``); indices, labels and augmentation draws travel in one pinned copy. :func:`augment_mix` turns
them into the batch:

- on CUDA (and on CPU tensors under ``cpu_backend("triton")``, through Triton's interpreter), ONE kernel
  (``mixrecipe.kernels.augment``) reads sample ``idx[r]`` at its cropped and flipped coordinates, normalizes
  it, mixes it with its partner under the CutMix box and λ, and writes the float batch and the soft labels;
- on CPU, its twin: :func:`crop_flip` (the same gather as the loader's ``ImageTensors.__getitems__``, bit for
  bit) followed by ``mixrecipe.ops.mix`` (what ``Mixup.mix_batch`` runs on a loader batch).

For the same draws the twin gives exactly the batch the loader path gives (tests/test_gpu_data.py: whole
runs are equal); the kernel equals a plain-PyTorch reference of its own formula bit for bit in float32
(tests/test_augment.py) and the twin to float32 rounding (the mixing op may round its lerp differently).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import ops
from .backend import runs_kernel
from .checks import channel_vector
from .data import crop_flip
from .draws import to_device
from .kernels.augment import augment_mix_launch

__all__ = ["DeviceImages", "augment_mix", "fits_on_device"]

_FLOAT_OUT = (torch.float32, torch.float16, torch.bfloat16)


def _check(data, idx, oy, ox, flip, pad, out_dtype):
    if not isinstance(data, Tensor) or data.dtype != torch.uint8 or data.ndim != 4:
        raise ValueError(f"data must be a uint8 (N, C, H, W) tensor, got "
                         f"{getattr(data, 'dtype', type(data).__name__)} {tuple(getattr(data, 'shape', ()))}")
    if not isinstance(idx, Tensor) or idx.dtype != torch.int64 or idx.ndim != 1 or idx.device != data.device:
        raise ValueError(f"idx must be a (B,) int64 tensor on {data.device}")
    if (oy is None) != (ox is None):
        raise ValueError("oy and ox go together: pass both (a crop) or neither")
    for name, t in (("oy", oy), ("ox", ox), ("flip", flip)):
        if t is not None and (not isinstance(t, Tensor) or t.shape != idx.shape or t.device != data.device
                              or t.is_floating_point()):
            raise ValueError(f"{name} must be an integer or bool tensor of shape {tuple(idx.shape)} on "
                             f"{data.device}")
    if not isinstance(pad, int) or pad < 0:
        raise ValueError(f"pad must be an int >= 0, got {pad!r}")
    if out_dtype not in _FLOAT_OUT:
        raise ValueError(f"out_dtype must be one of {_FLOAT_OUT}, got {out_dtype}")
    if data[0].numel() >= 2**31:
        raise ValueError("a sample of 2**31 pixels or more is not supported")


def _stats(values, channels: int, name: str, device) -> Tensor:
    if not isinstance(values, Tensor):  # numbers: kept on the device (checks.channel_vector), no copy a step
        values = tuple(float(v) for v in (values if hasattr(values, "__len__") else (values,)))
        if len(values) not in (1, channels):
            raise ValueError(f"{name} needs 1 or {channels} values, got {len(values)}")
        return channel_vector(name, values * channels if len(values) == 1 else values, channels, device)
    t = torch.as_tensor(values, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.expand(channels)
    if t.numel() != channels:
        raise ValueError(f"{name} needs 1 or {channels} values, got {t.numel()}")
    return t.contiguous().to(device)


def augment_mix(
    data: Tensor,
    idx: Tensor,
    *,
    oy: Tensor | None = None,
    ox: Tensor | None = None,
    flip: Tensor | None = None,
    pad: int = 0,
    target: Tensor | None = None,
    lam_x=1.0,
    lam_y=None,
    perm: Tensor | None = None,
    box=None,
    num_classes: int | None = None,
    label_smoothing: float = 0.0,
    mean=(0.0,),
    std=(1.0,),
    out_dtype: torch.dtype = torch.float32,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> tuple[Tensor, Tensor | None]:
    """Gather, crop/flip, normalize and mix a batch from a uint8 data set: one kernel on CUDA.

    Args:
        data: (N, C, H, W) uint8 data set (on the training device).
        idx: (B,) int64 samples of the batch, on ``data``'s device.
        oy, ox: (B,) crop offsets in [0, 2 * pad] (both or neither); flip: (B,) bool flip bits, or None.
        pad: zero padding of the crop.
        target: (B,) int64 class indices of the rows, or None (no soft labels).
        lam_x: own-pixel weight (outside the box): a float, a 0-d or a (B,) float32 tensor; 1 = no mixing.
        lam_y: own-label weight (default ``lam_x``).
        perm: None (flip pairing, row r with B-1-r) or a (B,) int64 permutation.
        box: None, or CutMix boxes (y0, y1, x0, x1): (4,) or (B, 4) int32, or four ints.
        num_classes, label_smoothing: the soft labels' K and timm's smoothing.
        mean, std: per-channel normalization in [0, 1] units (applied to value / 255).
        out_dtype: float32, float16 or bfloat16.
        memory_format: of the output (channels_last for a channels_last model).

    Returns:
        (images (B, C, H, W) ``out_dtype``, soft labels (B, K) float32 or None).
    """
    _check(data, idx, oy, ox, flip, pad, out_dtype)
    same = lam_y is None or lam_y is lam_x
    if target is not None and num_classes is None:
        raise ValueError("num_classes is required with a target")
    if not runs_kernel(data):  # the CPU twin: the loader's gather, then the mixing op on the batch
        x = crop_flip(data, idx, oy, ox, flip, pad)
        lam_x = _host_value(lam_x)
        lam_y = lam_x if same else _host_value(lam_y)
        if isinstance(box, Tensor) and box.ndim == 1 and box.device.type == "cpu":
            box = tuple(int(v) for v in box.tolist())  # one box as ints, as Mixup passes a host-drawn one
        if isinstance(box, (tuple, list)) and not any(box):
            box = None  # cuts nothing: no box (the same result)
        if x.shape[0] == 0:
            return x.to(out_dtype), None
        return ops.mix(x, target, lam_x, None if same else lam_y, perm, box, num_classes=num_classes,
                       label_smoothing=label_smoothing, mean=list(_as_list(mean)), std=list(_as_list(std)),
                       out_dtype=out_dtype)
    batch = idx.shape[0]
    _, c, h, w = data.shape
    out = torch.empty((batch, c, h, w), dtype=out_dtype, device=data.device, memory_format=memory_format)
    soft = None
    if target is not None:
        soft = torch.empty((batch, num_classes), dtype=torch.float32, device=data.device)
    mean_t = _stats(mean, c, "mean", data.device)
    std_t = _stats(std, c, "std", data.device)
    if isinstance(box, list):
        box = tuple(box)
    if isinstance(box, Tensor):
        box = box.to(data.device, torch.int32)
    lam_x = _device_value(lam_x, data.device)
    lam_y = lam_x if same else _device_value(lam_y, data.device)
    augment_mix_launch(
        data, idx, oy, ox, flip, out, target, soft, pad=pad, perm=perm, lam_x=lam_x, lam_y=lam_y, box=box,
        mean=mean_t, std=std_t, in_scale=1.0 / 255.0,
        label_off=label_smoothing / num_classes if target is not None else 0.0,
        label_keep=1.0 - label_smoothing,
    )
    return out, soft


def _as_list(v):
    return v.tolist() if isinstance(v, Tensor) else list(v)


def _host_value(lam):
    """A 0-d CPU λ as the float it holds (the op then takes its scalar path, as for a host-drawn λ)."""
    if isinstance(lam, Tensor) and lam.ndim == 0 and lam.device.type == "cpu":
        return float(lam)
    return lam


def _device_value(lam, device):
    if isinstance(lam, Tensor):
        lam = lam.to(device, torch.float32)
        return lam if lam.ndim == 0 else lam.contiguous()
    return float(lam)


def fits_on_device(nbytes: int, device: torch.device, fraction: float = 0.25) -> bool:
    """Whether ``nbytes`` of data may live on ``device``: a CUDA device with at least ``nbytes / fraction``
    bytes free (the rest is the model's, the activations' and the allocator's)."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= fraction * free


class DeviceImages:
    """An in-memory training set (``mixrecipe.data.ImageTensors``) copied to ``device`` as uint8.

    Args:
        ds: the training set; its ``augment`` ("none", "flip", "crop_flip") and ``pad`` apply, its
            ``generator`` draws the augmentation on the host, in the order the loader's batches take it.
        device: where the images live and the batches are made.
        memory_format: layout of the copy (channels_last for a channels_last model: the kernel then reads
            and writes in the same order).
    """

    def __init__(self, ds, device: torch.device,
                 memory_format: torch.memory_format = torch.contiguous_format):
        self.ds, self.device = ds, torch.device(device)
        self.images = ds.images.to(self.device).contiguous(memory_format=memory_format)
        self.memory_format = memory_format

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def batch(self, indices, *, mixup=None, mean, std, out_dtype: torch.dtype, num_classes: int | None = None,
              label_smoothing: float = 0.0):
        """One training batch: ``(x, y, lam, perm, label_smoothing)`` for ``mixup_cross_entropy``.

        Args:
            indices: the batch's sample indices (a list from the loader's batch sampler, or a tensor).
            mixup: a ``mixrecipe.Mixup`` (its ``draw`` gives λ, partners and box; ``mixup_enabled``
                honoured) or None for ERM.
            mean, std, out_dtype: the normalization and the network's input dtype.

        Returns:
            x (B, C, H, W) ``out_dtype``; y (B,) labels; lam: the label weights, a float (one λ for the
            batch, 1.0 for ERM) or (B,) float32; perm (None: flip pairing); the label smoothing for the loss.
            The same as ``Mixup.mix_batch`` returns for the loader's batch of these indices and draws.
        """
        idx = torch.as_tensor(indices, dtype=torch.long)
        batch = idx.shape[0]
        oy, ox, flip = self.ds.draw(batch)  # on the host, from the data set's generator: the loader's stream
        # The step's host values (indices, labels, crop offsets, flip bits) reach the device in ONE pinned,
        # asynchronous copy: no device op draws or gathers them, no wait on the GPU.
        idx, y, oy, ox, flip = to_device(self.device, idx, self.ds.targets[idx], oy, ox, flip)
        pad = self.ds.pad if oy is not None else 0
        common = dict(oy=oy, ox=ox, flip=flip, pad=pad, mean=mean, std=std, out_dtype=out_dtype,
                      memory_format=self.memory_format)
        if mixup is None or not mixup.mixup_enabled:  # ERM: the augmented, normalized batch (λ = 1)
            x, _ = augment_mix(self.images, idx, **common)
            return x, y, 1.0, None, label_smoothing if mixup is None else mixup.label_smoothing
        # host numbers for one λ and box per batch (the kernel's scalars), else one copy of per-sample values
        lam_x, lam_y, perm, box = mixup.draw((batch, *self.sample_shape), self.device)
        x, _ = augment_mix(self.images, idx, lam_x=lam_x, lam_y=lam_y, perm=perm, box=box, **common)
        return x, y, lam_y, perm, mixup.label_smoothing
