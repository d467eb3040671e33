"""Training JPEGs decoded a batch at a time on the training device, then cropped, resized and flipped in one
kernel (``data.decoder=device``).

Loader workers only read files (:class:`mixrecipe.data.ImageFiles` with ``encoded``): a batch reaches the
main process as JPEG bytes (an image in another format arrives decoded by the worker). :class:`DeviceDecoder`
then

1. decodes the JPEGs with ``torchvision.io.decode_jpeg(list, device=...)``: nvJPEG's batched decode on
   CUDA, libjpeg-turbo on CPU;
2. draws each image's crop box and flip coin on the host from the data set's generator, with the workers'
   rule (:meth:`mixrecipe.data.RandomResizedCropFlip.box`);
3. makes the uint8 (B, 3, S, S) batch with :func:`resize_crops`: on CUDA one pinned copy of the per-image
   table, one concatenation of the decoded images and ONE kernel (``mixrecipe.kernels.resize``); on CPU its
   twin, torch's float antialiased resize per image rounded the same way.

The batch then takes the loader batch's path: the fused normalize + mix op.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .backend import runs_kernel
from .data import DECODE_ERRORS, ImageFiles, UnreadableImageError, decode_bytes, unreadable_image
from .draws import to_device
from .kernels.resize import TABLE_COLUMNS, resize_crops_launch

__all__ = ["DeviceDecoder", "resize_crops"]


def _flat(img: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    """A dense (C, H, W) image as a flat view and its (channel, row, column) strides (CHW or HWC order)."""
    c, h, w = img.shape
    if not img.is_contiguous() and img.permute(1, 2, 0).is_contiguous():  # decode_jpeg's HWC buffer
        return img.permute(1, 2, 0).reshape(-1), (1, w * c, c)
    img = img.contiguous()
    return img.reshape(-1), (h * w, w, 1)


def _check(images, boxes, flips, size):
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if len(boxes) != len(images) or len(flips) != len(images):
        raise ValueError(f"one box and one flip per image: {len(images)} images, {len(boxes)} boxes, "
                         f"{len(flips)} flips")
    for k, img in enumerate(images):
        if not isinstance(img, Tensor) or img.dtype != torch.uint8 or img.ndim != 3:
            got = f"{getattr(img, 'dtype', type(img).__name__)} {tuple(getattr(img, 'shape', ()))}"
            raise ValueError(f"image {k} must be a uint8 (C, H, W) tensor, got {got}")
        if img.device != images[0].device or img.shape[0] != images[0].shape[0]:
            raise ValueError(f"image {k}: every image must be on {images[0].device} with "
                             f"{images[0].shape[0]} channels")
        top, left, h, w = (int(v) for v in boxes[k])
        if not (h > 0 and w > 0 and 0 <= top <= img.shape[1] - h and 0 <= left <= img.shape[2] - w):
            raise ValueError(f"box {k} (top, left, h, w) = {tuple(boxes[k])} is not inside its "
                             f"{img.shape[1]}x{img.shape[2]} image")


def resize_crops(images: list[Tensor], boxes, flips, size: int,
                 memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
    """Each image's box resized to ``size`` x ``size`` (antialiased bilinear, as PIL and torch), mirrored
    where ``flips``, rounded half up to uint8: one kernel for the batch on CUDA.

    Args:
        images: uint8 (C, H, W) tensors on one device, any sizes (dense: CHW, or decode_jpeg's HWC).
        boxes: per image (top, left, h, w), inside the image.
        flips: per image, whether to mirror the output left-right.
        size: the output side S.
        memory_format: of the (B, C, S, S) output.

    Returns:
        (B, C, S, S) uint8 on the images' device.
    """
    _check(images, boxes, flips, size)
    if not images:
        return torch.empty((0, 3, size, size), dtype=torch.uint8)
    device, c = images[0].device, images[0].shape[0]
    out = torch.empty((len(images), c, size, size), dtype=torch.uint8, device=device,
                      memory_format=memory_format)
    if not runs_kernel(images[0]):  # the CPU twin: torch's float resize of each crop, rounded the same way
        for k, (img, (top, left, h, w)) in enumerate(zip(images, boxes)):
            crop = img[None, :, top:top + h, left:left + w].float()
            r = torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear", antialias=True,
                                                align_corners=False)[0]
            r = (r + 0.5).floor_().clamp_(0, 255).to(torch.uint8)
            out[k] = r.flip(-1) if flips[k] else r
        return out
    flats, table, offset = [], np.empty((len(images), len(TABLE_COLUMNS)), np.int64), 0
    for k, img in enumerate(images):
        flat, strides = _flat(img)
        flats.append(flat)
        table[k] = (offset, img.shape[1], img.shape[2], *strides, *(int(v) for v in boxes[k]), bool(flips[k]))
        offset += flat.numel()
    src = flats[0] if len(flats) == 1 else torch.cat(flats)
    (table_dev,) = to_device(device, table)  # one pinned, asynchronous copy
    resize_crops_launch(src, table_dev, out)
    return out


class DeviceDecoder:
    """Makes the training batches of an encoded :class:`~mixrecipe.data.ImageFiles` on ``device``.

    Args:
        ds: the training set (``encoded``); its ``transform`` (a ``RandomResizedCropFlip``) gives the crop
            rule, the size and the flip probability, its ``generator`` the draws, ``skip_corrupt`` what an
            undecodable JPEG does.
        device: the training device.
        memory_format: of the batches (channels_last for a channels_last model).
    """

    def __init__(self, ds: ImageFiles, device, memory_format: torch.memory_format = torch.contiguous_format):
        if not getattr(ds, "encoded", False):
            raise ValueError("DeviceDecoder needs an ImageFiles data set with encoded=True")
        self.ds, self.device, self.memory_format = ds, torch.device(device), memory_format

    def batch(self, items: list, targets: Tensor) -> tuple[Tensor, Tensor]:
        """One training batch: ``(x, y)`` on the device, x uint8 (B, 3, S, S), y the labels of the images
        kept (an undecodable JPEG is skipped with ``skip_corrupt``, else it stops the run naming the file).

        Args:
            items: the loader's ``(index, data)`` pairs (:func:`mixrecipe.data.collate_encoded`).
            targets: their labels, in the same order.
        """
        images, kept = self._decode(items)
        if not images:
            raise UnreadableImageError(f"all {len(items)} images of a batch were unreadable and skipped: "
                                       "check the data set's files (data.root)")
        tf = self.ds.transform
        u = torch.rand(len(images), tf.DRAWS, generator=self.ds.generator, dtype=torch.float64).tolist()
        boxes = [tf.box(img.shape[1], img.shape[2], row) for img, row in zip(images, u)]
        flips = [row[-1] < tf.flip for row in u]
        x = resize_crops(images, boxes, flips, tf.size, self.memory_format)
        if len(kept) != len(items):
            targets = targets[torch.as_tensor(kept, dtype=torch.long)]
        return x, targets.to(self.device, non_blocking=True)

    def _decode(self, items: list) -> tuple[list[Tensor], list[int]]:
        from torchvision.io import ImageReadMode, decode_jpeg

        jpegs = [k for k, (_, data) in enumerate(items) if data.ndim == 1]
        decoded: dict[int, Tensor | None] = {}
        if jpegs:
            try:
                images = decode_jpeg([items[k][1] for k in jpegs], mode=ImageReadMode.RGB, device=self.device)
                decoded.update(zip(jpegs, images))
            except RuntimeError:  # one bad file fails the batch: find it (them) one at a time
                for k in jpegs:
                    decoded[k] = self._decode_one(*items[k])
        for k, (_, data) in enumerate(items):
            if data.ndim == 3:  # another format, decoded by the worker (pinned by the loader on CUDA)
                decoded[k] = data.to(self.device, non_blocking=True)
        kept = [k for k in range(len(items)) if decoded[k] is not None]
        return [decoded[k] for k in kept], kept

    def _decode_one(self, index: int, data: Tensor) -> Tensor | None:
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            pass
        try:  # what the device's decoder refuses (a CMYK JPEG for nvJPEG, say), the host decodes
            return decode_bytes(data.numpy().tobytes()).to(self.device)
        except DECODE_ERRORS as exc:
            if self.ds.skip_corrupt:
                self.ds.bad[index] = 1
                return None
            raise unreadable_image(self.ds.paths[index], exc) from None
