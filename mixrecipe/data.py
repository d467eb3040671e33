"""Data set readers that hand out uint8 images, and the splits the recipes need.

Every reader returns uint8 (N, C, H, W) images (or image files decoded to uint8 tensors by torchvision.io
and augmented on them by torchvision's v2 transforms, or by PIL and timm's transforms: ``data.decoder``):
normalization happens on the training device, fused with mixup in one pass (``Mixup(mean=, std=)``), so
loader workers never touch floats. Readers:

- ``digits``: scikit-learn's bundled 8x8 digits (1797 images), split 1437 / 360 with ``data.seed``.
- ``fashion_mnist``: the four IDX files (gzipped or raw), as Debian's ``dataset-fashion-mnist`` ships them.
- ``cifar10``: the python-pickle batches of ``cifar-10-python.tar.gz`` (read without executing code).
- ``imagefolder``: ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg`` (ImageNet's usual layout).

On top of a reader, :func:`build_data` carves the validation split, draws the training subset and the
symmetric label noise (both seeded by ``data.seed``, independent of the training seed).
"""

from __future__ import annotations

import gzip
import os
import pickle
import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .config import DataConfig, RecipeError

__all__ = [
    "DataNotFoundError",
    "UnreadableImageError",
    "collate_readable",
    "collate_encoded",
    "read_encoded",
    "unreadable_image",
    "DECODE_ERRORS",
    "count_unreadable",
    "DataBundle",
    "ImageTensors",
    "crop_flip",
    "ImageFiles",
    "decode_file",
    "decode_bytes",
    "tensor_transform",
    "RandomResizedCropFlip",
    "DECODERS",
    "build_data",
    "read_idx",
    "read_cifar10",
    "normalize_batch",
    "keep_batch",
    "loader_collate",
    "DEFAULT_ROOTS",
]

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DEFAULT_ROOTS = {
    "fashion_mnist": "/usr/share/datasets/fashion-mnist",
    "cifar10": "data",
    "imagefolder": "data/imagenet",
}
# Usual per-channel statistics in [0, 1] units (what data.mean/std = null means).
DEFAULT_STATS = {
    "digits": ((0.305,), (0.375,)),
    "fashion_mnist": ((0.286,), (0.353,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),  # the mixup paper's CIFAR code
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # timm's IMAGENET_DEFAULT_*
}
DIGITS_TEST_SIZE = 360
DECODERS = ("torchvision", "pil")  # how image files are decoded (data.decoder)


class DataNotFoundError(RecipeError):
    """The data set is not where the recipe says; the message says where it is expected and how to get it."""


class UnreadableImageError(RecipeError):
    """An image file that cannot be decoded; the message names the file and what to do."""

    def __init__(self, message: str):
        # Raised in a loader worker, the error reaches the main process re-created from the worker's
        # formatted traceback: keep only our own line, so the CLI still reports one line.
        marker = f"{type(self).__name__}: "
        ours = [line.split(marker, 1)[1] for line in str(message).splitlines() if marker in line]
        super().__init__(ours[-1] if ours else message)


# ----------------------------------------------------------------------------------------------------
# Data sets


class ImageTensors(Dataset):
    """In-memory uint8 images with batch-level augmentation.

    The training loop fetches whole batches through ``__getitems__`` (one gather and one vectorized
    augmentation per batch instead of B Python calls); pass :func:`keep_batch` as the loader's collate_fn.

    Args:
        images: (N, C, H, W) uint8.
        targets: (N,) int64 labels, or (N, 2) (given label, true label) for the memorization check.
        augment: "none", "flip" (horizontal, p=0.5) or "crop_flip" (zero-pad by ``pad``, random crop, flip).
        pad: padding of crop_flip.
    """

    def __init__(self, images: Tensor, targets: Tensor, augment: str = "none", pad: int = 4):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if augment not in ("none", "flip", "crop_flip"):
            raise ValueError(f"in-memory images support augment none, flip, crop_flip; got {augment!r}")
        self.images, self.targets = images, targets
        self.augment, self.pad = augment, pad
        self.generator = torch.Generator().manual_seed(0)

    def reseed(self, seed: int) -> None:
        """Restart the augmentation stream (the loop does this every epoch, so resumed runs match)."""
        self.generator.manual_seed(seed)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i):
        x, y = self.__getitems__([i])
        return x[0], y[0]

    def __getitems__(self, indices) -> tuple[Tensor, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        oy, ox, flip = self.draw(idx.shape[0])
        x = crop_flip(self.images, idx, oy, ox, flip, self.pad)  # a copy: mixing it in place cannot touch
        return x, self.targets[idx]

    def draw(self, batch: int) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """The augmentation draws of the next batch of ``batch`` samples, on the host from :attr:`generator`.

        Returns:
            (oy, ox, flip): (B,) int64 crop offsets in [0, 2 * pad] (None without crop) and (B,) bool flip
            bits (None without flip), drawn in this order: the stream the loader's batches take, which
            ``mixrecipe.gpu_data`` takes too for batches made on the device.
        """
        g = self.generator
        oy = ox = flip = None
        if self.augment == "crop_flip":
            oy = torch.randint(0, 2 * self.pad + 1, (batch,), generator=g)
            ox = torch.randint(0, 2 * self.pad + 1, (batch,), generator=g)
        if self.augment in ("flip", "crop_flip"):
            flip = torch.rand(batch, generator=g) < 0.5
        return oy, ox, flip


def crop_flip(data: Tensor, idx: Tensor, oy: Tensor | None = None, ox: Tensor | None = None,
              flip: Tensor | None = None, pad: int = 0) -> Tensor:
    """The uint8 batch ``data[idx]``, zero-padded by ``pad``, cropped at (oy, ox) and flipped where ``flip``.

    Row r is ``F.pad(data[idx[r]], pad)[:, oy[r]:oy[r] + H, ox[r]:ox[r] + W]``, mirrored left-right where
    ``flip[r]`` (crop first, then flip), as one gather; a new tensor whatever the draws.
    """
    x = data[idx.to(data.device)]
    dev = x.device
    if oy is not None:
        b, c, h, w = x.shape
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        rows = (oy.to(dev)[:, None] + torch.arange(h, device=dev))[:, None, :, None]
        cols = (ox.to(dev)[:, None] + torch.arange(w, device=dev))[:, None, None, :]
        x = padded[torch.arange(b, device=dev)[:, None, None, None],
                   torch.arange(c, device=dev)[None, :, None, None], rows, cols]
    if flip is not None:
        x = torch.where((flip.to(dev) != 0).view(-1, 1, 1, 1), x.flip(-1), x)
    return x


def keep_batch(batch):
    """collate_fn for :class:`ImageTensors`: ``__getitems__`` already returns a collated batch."""
    return batch


def loader_collate(ds):
    """The DataLoader ``collate_fn`` for a data set of this module (None: PyTorch's default)."""
    if isinstance(ds, ImageFiles):
        return collate_encoded if ds.encoded else collate_readable
    return keep_batch if isinstance(ds, ImageTensors) else None


class ImageFiles(Dataset):
    """Image files decoded to uint8 (C, H, W) tensors and transformed, without any float math.

    Two decoders (``data.decoder``):

    - ``"torchvision"`` (the default): JPEG, PNG, GIF and WebP files are decoded by ``torchvision.io``
      (libjpeg-turbo, straight to a uint8 tensor) and augmented by torchvision's v2 transforms on that
      tensor (random-resized-crop crops before it resizes, so only the kept region is resampled); files in
      other formats (BMP, TIFF, PPM...) are decoded by PIL and then take the same tensor transforms.
    - ``"pil"``: PIL decodes and timm's transforms augment (``create_transform(..., use_prefetcher=True)``),
      as before.

    With ``encoded`` (``data.decoder=device``, training sets) an item is ``((i, data), label)``: ``data`` is
    the file's bytes when it is a JPEG (decoded later, a batch at a time, on the training device:
    ``mixrecipe.gpu_decode``), else the decoded uint8 (3, H, W) image; ``transform`` is then the
    :class:`RandomResizedCropFlip` the device applies, with draws from :attr:`generator`
    (:func:`collate_encoded` collates them).

    An unreadable or corrupt file raises :class:`UnreadableImageError` naming it; with ``skip_corrupt`` the
    item is None instead (:func:`collate_readable` drops it from its batch) and the file is remembered in
    shared memory, so the count covers the loader's worker processes too (:meth:`unreadable`).

    Args:
        paths: image file paths.
        targets: (N,) int64 labels, or (N, 2) (given label, true label).
        transform: uint8 (3, H, W) tensor -> uint8 tensor (decoder "torchvision"), or PIL image -> uint8
            tensor (decoder "pil").
        skip_corrupt: skip unreadable files instead of stopping.
        decoder: "torchvision" or "pil".
        encoded: hand out JPEG bytes for the training device to decode (decoder "torchvision" only).
    """

    def __init__(self, paths: list[str], targets: Tensor, transform, skip_corrupt: bool = False,
                 decoder: str = "torchvision", encoded: bool = False):
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        if encoded and (decoder != "torchvision" or not isinstance(transform, RandomResizedCropFlip)):
            raise ValueError("encoded items need decoder 'torchvision' and a RandomResizedCropFlip transform")
        self.paths, self.targets, self.transform = list(paths), targets, transform
        self.skip_corrupt, self.decoder, self.encoded = skip_corrupt, decoder, encoded
        self.bad = torch.zeros(len(self.paths), dtype=torch.uint8).share_memory_()
        # The device's crop and flip draws (encoded items): reseeded every epoch, saved with the run.
        self.generator = torch.Generator().manual_seed(0) if encoded else None
        self.seed = 0  # the epoch's seed: with it, a RandomResizedCropFlip's draws depend on the item alone

    def unreadable(self) -> list[str]:
        """The files found unreadable so far (with ``skip_corrupt``)."""
        return [self.paths[i] for i in self.bad.nonzero().flatten().tolist()]

    def reseed(self, seed: int) -> None:
        """Start an epoch's draws: a :class:`RandomResizedCropFlip` transform draws item i's crop and flip
        from (``seed``, i) alone, whichever worker reads it (so a run resumed inside an epoch, or run with
        another number of workers, gets the same crops); the device's stream (encoded items) restarts. Other
        transforms (decoder "pil") draw from the worker's global RNG, which the loader seeds."""
        self.seed = seed
        if self.generator is not None:
            self.generator.manual_seed(seed)

    def item_generator(self, i: int) -> torch.Generator:
        """The generator of item ``i``'s draws in this epoch."""
        mixed = (self.seed * 0x9E3779B97F4A7C15 + i * 0xBF58476D1CE4E5B9) % 2**63  # (epoch seed, item)
        return torch.Generator().manual_seed(mixed)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        try:
            if self.encoded:
                x = (i, read_encoded(self.paths[i]))
            elif isinstance(self.transform, RandomResizedCropFlip):
                x = self.transform(decode_file(self.paths[i]), self.item_generator(i))
            elif self.decoder == "torchvision":
                x = self.transform(decode_file(self.paths[i]))
            else:
                from PIL import Image

                with Image.open(self.paths[i]) as img:
                    x = self.transform(img.convert("RGB"))
        except DECODE_ERRORS as exc:
            if self.skip_corrupt:
                self.bad[i] = 1
                return None
            raise unreadable_image(self.paths[i], exc) from None
        return x, self.targets[i]


def unreadable_image(path: str, exc: BaseException) -> UnreadableImageError:
    """The error that stops a run at an unreadable file: its name, the reason, what to do."""
    return UnreadableImageError(
        f"cannot read image {path} ({type(exc).__name__}: {_short(exc)}): replace or delete the file, or set "
        "data.skip_corrupt=true to skip unreadable images")


# What decoding a truncated or garbled file raises: PIL's OSError / ValueError / SyntaxError, torchvision.io's
# RuntimeError (libjpeg-turbo, libpng: "Image is incomplete or truncated", "Not a JPEG file", ...).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, RuntimeError)
# File signatures torchvision.io decodes itself (the rest go through PIL).
_JPEG_MAGIC = b"\xff\xd8\xff"
_TORCHVISION_MAGIC = (_JPEG_MAGIC, b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a")


def _short(exc: BaseException) -> str:
    """An exception's message without torchvision's C++ source ("decode_jpeg, .../x.cpp:171, ...")."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    parts = [p.strip() for p in msg.split(", ")]
    if len(parts) >= 3 and re.search(r"\.(cpp|h):\d+$", parts[1]):
        return ", ".join(parts[2:])
    return msg


def decode_file(path: str) -> Tensor:
    """An image file as a uint8 (3, H, W) RGB tensor (:func:`decode_bytes` of its contents).

    Raises:
        OSError, RuntimeError, ValueError, SyntaxError: the file cannot be read or decoded.
    """
    with open(path, "rb") as fh:
        return decode_bytes(fh.read())


def decode_bytes(data: bytes) -> Tensor:
    """An encoded image as a uint8 (3, H, W) RGB tensor: torchvision.io for JPEG, PNG, GIF and WebP, PIL
    for the other formats.

    Raises:
        OSError, RuntimeError, ValueError, SyntaxError: the bytes cannot be decoded.
    """
    from torchvision.io import ImageReadMode, decode_image

    if data.startswith(_TORCHVISION_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        arr = np.asarray(img.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def read_encoded(path: str) -> Tensor:
    """A JPEG file's bytes as a 1-D uint8 tensor (for a batched decode on the training device); any other
    image decoded here (:func:`decode_bytes`) to a uint8 (3, H, W) tensor."""
    with open(path, "rb") as fh:
        data = fh.read()
    if data.startswith(_JPEG_MAGIC):
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return decode_bytes(data)


def tensor_transform(size: int, train: bool, scale=(0.08, 1.0), crop_pct: float = 0.875):
    """Transforms of uint8 (C, H, W) tensors, the same operations as timm's PIL ones.

    Training: :class:`RandomResizedCropFlip` (random-resized-crop to ``size``, area fraction in ``scale``,
    aspect ratio in [3/4, 4/3], bilinear, antialiased; a horizontal flip with p = 0.5). Evaluation:
    torchvision v2's resize of the shorter side to ``floor(size / crop_pct)`` and center crop of ``size``
    (timm's eval transform).
    """
    import math

    if train:
        return RandomResizedCropFlip(size, scale)
    from torchvision.transforms import InterpolationMode, v2

    return v2.Compose([v2.Resize(math.floor(size / crop_pct), interpolation=InterpolationMode.BILINEAR,
                                 antialias=True), v2.CenterCrop(size)])


class RandomResizedCropFlip:
    """timm's and torchvision's training crop on a uint8 (C, H, W) tensor, then a horizontal flip.

    The crop box is torchvision's ``RandomResizedCrop``'s (up to 10 tries of an area fraction in ``scale``
    and a log-uniform aspect ratio in ``ratio``, then the center crop of the clamped ratio); the crop is
    resized bilinearly with antialiasing (as PIL and torchvision do) and mirrored with probability
    ``flip``. The box's pixels are copied channels-last before resizing: torch's vectorized uint8 resize
    then reads them in order (on a strided view of the decoded image it runs about 1.7x slower).

    Draws: one ``torch.rand`` of :attr:`DRAWS` uniforms per image, from the ``generator`` given to the call
    (:class:`ImageFiles` gives each item its own) or torch's global one; :meth:`box` turns them into the
    crop.
    """

    TRIES = 10
    DRAWS = 2 * TRIES + 3  # (area, ratio) per try, then top, left and the flip coin

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip: float = 0.5):
        if not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {tuple(scale)}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must be (low, high) with 0 < low <= high, got {tuple(ratio)}")
        self.size, self.scale, self.ratio, self.flip = int(size), tuple(scale), tuple(ratio), float(flip)

    def box(self, height: int, width: int, u: list[float]) -> tuple[int, int, int, int]:
        """(top, left, h, w) of the crop of a ``height`` x ``width`` image for the uniforms ``u``."""
        import math

        area = height * width
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for t in range(self.TRIES):
            target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[2 * t])
            aspect = math.exp(lo + (hi - lo) * u[2 * t + 1])
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = min(int(u[-3] * (height - h + 1)), height - h)
                left = min(int(u[-2] * (width - w + 1)), width - w)
                return top, left, h, w
        in_ratio = width / height  # no try fits: the center crop of the clamped aspect ratio
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            w, h = int(round(height * self.ratio[1])), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: Tensor, generator: torch.Generator | None = None) -> Tensor:
        u = torch.rand(self.DRAWS, dtype=torch.float64, generator=generator).tolist()
        top, left, h, w = self.box(img.shape[-2], img.shape[-1], u)
        crop = img[None, :, top:top + h, left:left + w].contiguous(memory_format=torch.channels_last)
        out = torch.nn.functional.interpolate(crop, size=(self.size, self.size), mode="bilinear",
                                              antialias=True, align_corners=False)[0]
        return out.flip(-1) if u[-1] < self.flip else out

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
                f"flip={self.flip})")


def collate_readable(batch):
    """collate_fn for :class:`ImageFiles`: PyTorch's default, without the items of skipped files."""
    from torch.utils.data import default_collate

    kept = [item for item in batch if item is not None]
    if not kept:
        raise UnreadableImageError(f"all {len(batch)} images of a batch were unreadable and skipped: check "
                                   "the data set's files (data.root)")
    return default_collate(kept)


def collate_encoded(batch):
    """collate_fn for encoded :class:`ImageFiles` items: (the list of ``(index, data)``, the stacked labels),
    without the items of skipped files."""
    from torch.utils.data import default_collate

    kept = [item for item in batch if item is not None]
    if not kept:
        raise UnreadableImageError(f"all {len(batch)} images of a batch were unreadable and skipped: check "
                                   "the data set's files (data.root)")
    return [item[0] for item in kept], default_collate([item[1] for item in kept])


def count_unreadable(bundle) -> list[str]:
    """Every file of the bundle's data sets skipped as unreadable so far (``data.skip_corrupt=true``)."""
    found = set()
    for ds in (bundle.train, bundle.val, bundle.test, bundle.train_eval):
        if isinstance(ds, ImageFiles):
            found.update(ds.unreadable())
    return sorted(found)


def _select(ds, idx: Tensor, targets: Tensor | None = None, plain: Dataset | None = None):
    """``ds`` restricted to ``idx``, optionally with new targets, or without augmentation (like ``plain``)."""
    targets = ds.targets[idx] if targets is None else targets
    if isinstance(ds, ImageTensors):
        return ImageTensors(ds.images[idx], targets, "none" if plain is not None else ds.augment, ds.pad)
    transform = plain.transform if plain is not None else ds.transform
    return ImageFiles([ds.paths[i] for i in idx.tolist()], targets, transform, ds.skip_corrupt, ds.decoder,
                      encoded=ds.encoded and plain is None)


# ----------------------------------------------------------------------------------------------------
# Readers


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (MNIST's format), gzipped or not, as a numpy array."""
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataNotFoundError(f"{path} is not an IDX file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in dtypes:
        raise DataNotFoundError(f"{path}: unknown IDX element type 0x{raw[2]:02x}")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4).astype(np.int64)
    data = np.frombuffer(raw, dtype=dtypes[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataNotFoundError(f"{path}: truncated IDX file ({data.size} of {int(np.prod(dims))} values)")
    return data.reshape(tuple(dims))


def _find_idx(root: str, prefix: str, kind: str) -> str | None:
    ndim = 3 if kind == "images" else 1
    for name in (f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"):
        for ext in (".gz", ""):
            path = os.path.join(root, name + ext)
            if os.path.isfile(path):
                return path
    return None


def _read_fashion_mnist(root: str):
    prefixes = {"train": "train", "test": "t10k"}
    files = {(s, k): _find_idx(root, p, k) for s, p in prefixes.items() for k in ("images", "labels")}
    missing = [f"{prefixes[s]}-{k}-idx{3 if k == 'images' else 1}-ubyte.gz"
               for (s, k), f in files.items() if f is None]
    if missing:
        raise DataNotFoundError(
            f"Fashion-MNIST not found in {root} (missing {', '.join(missing)}). Install it with "
            "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu, files in "
            "/usr/share/datasets/fashion-mnist), or download the four *-ubyte.gz files from "
            "https://github.com/zalandoresearch/fashion-mnist and pass data.root=DIR."
        )
    out = {}
    for split in ("train", "test"):
        x = torch.from_numpy(read_idx(files[split, "images"]).copy())
        y = torch.from_numpy(read_idx(files[split, "labels"]).astype(np.int64))
        if x.ndim != 3 or x.dtype != torch.uint8 or x.shape[0] != y.shape[0]:
            raise DataNotFoundError(f"{files[split, 'images']}: expected N uint8 images matching the labels")
        out[split] = (x.unsqueeze(1), y)
    return out["train"], out["test"], FASHION_CLASSES


class _ArraysOnly(pickle.Unpickler):
    """An unpickler that builds only numpy arrays, lists, dicts and scalars: data, never code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # how python 3 writes bytes at pickle protocol 2
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _load_pickle(path: str) -> dict:
    with open(path, "rb") as fh:
        try:
            obj = _ArraysOnly(fh, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError) as exc:
            raise DataNotFoundError(f"{path} is not a CIFAR-10 batch: {exc}") from None
    if not isinstance(obj, dict):
        raise DataNotFoundError(f"{path} is not a CIFAR-10 batch (not a dict)")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def read_cifar10(root: str):
    """Read CIFAR-10's python batches from ``root`` or ``root/cifar-10-batches-py``.

    Returns:
        ((train_x, train_y), (test_x, test_y), class_names) with uint8 (N, 3, 32, 32) images.
    """
    base = os.path.join(root, "cifar-10-batches-py")
    if not os.path.isdir(base):
        base = root
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [n for n in names if not os.path.isfile(os.path.join(base, n))]
    if missing:
        raise DataNotFoundError(
            f"CIFAR-10 not found in {root} (expected {os.path.join(root, 'cifar-10-batches-py')}/"
            f"data_batch_1..5 and test_batch; missing {', '.join(missing)}). Get it with "
            "`mkdir -p data && curl -L https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz "
            "| tar xz -C data` "
            "(or torchvision.datasets.CIFAR10(root, download=True)) and pass data.root=DIR if not ./data."
        )

    def load(files):
        xs, ys = [], []
        for n in files:
            d = _load_pickle(os.path.join(base, n))
            x = np.asarray(d.get("data"))
            y = np.asarray(d.get("labels", d.get("fine_labels")), dtype=np.int64)
            if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x):
                raise DataNotFoundError(f"{os.path.join(base, n)}: expected uint8 'data' (N, 3072), N labels")
            xs.append(x)
            ys.append(y)
        x = torch.from_numpy(np.concatenate(xs)).view(-1, 3, 32, 32)
        return x, torch.from_numpy(np.concatenate(ys))

    classes = CIFAR10_CLASSES
    meta = os.path.join(base, "batches.meta")
    if os.path.isfile(meta):
        names_ = _load_pickle(meta).get("label_names")
        if names_:
            classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names_)
    return load(names[:5]), load(names[5:]), classes


def _read_digits(seed: int):
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataNotFoundError(
            "the digits data set ships with scikit-learn: `pip install scikit-learn` "
            "(or `pip install -e .[data]`)"
        ) from None
    d = load_digits()
    x = torch.from_numpy(np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, train = order[:DIGITS_TEST_SIZE], order[DIGITS_TEST_SIZE:]
    return (x[train], y[train]), (x[test], y[test]), tuple(str(i) for i in range(10))


def _image_files(folder: str, class_to_idx: dict | None = None):
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    if class_to_idx is None:
        _, class_to_idx = find_classes(folder)
    samples = make_dataset(folder, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    paths = [p for p, _ in samples]
    return paths, torch.tensor([t for _, t in samples], dtype=torch.long), class_to_idx


def _read_imagefolder(root: str):
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    how = (
        f"expected {train_dir}/<class>/*.JPEG and {val_dir}/<class>/*.JPEG (torchvision ImageFolder layout). "
        "For ImageNet, download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from "
        "https://image-net.org, extract train/ per class and sort val/ into class folders "
        "(e.g. with the valprep.sh script used by PyTorch's ImageNet example); then pass data.root=DIR."
    )
    if not (os.path.isdir(train_dir) and os.path.isdir(val_dir)):
        raise DataNotFoundError(f"image folder data set not found in {root}: {how}")
    try:
        train_paths, train_y, class_to_idx = _image_files(train_dir)
        val_paths, val_y, _ = _image_files(val_dir, class_to_idx)
    except (FileNotFoundError, OSError) as exc:
        raise DataNotFoundError(f"cannot read the image folders in {root} ({exc}): {how}") from None
    if not train_paths or not val_paths:
        raise DataNotFoundError(f"no images found in {train_dir if not train_paths else val_dir}: {how}")
    classes = tuple(sorted(class_to_idx, key=class_to_idx.get))
    return (train_paths, train_y), (val_paths, val_y), classes


# ----------------------------------------------------------------------------------------------------
# Assembling the splits


@dataclass
class DataBundle:
    """Everything a training engine needs from the data side.

    Attributes:
        train: the training set, with augmentation and (possibly noisy) labels.
        val: the validation set (no augmentation).
        test: the test set, or None when ``val`` is the test set (data.val_size = 0).
        train_eval: the training set without augmentation, targets (N, 2) = (given, true) labels, for the
            memorization check; None without label noise.
        classes: class names.
        in_chans, input_size: image channels and (H, W) after the transforms.
        mean, std: per-channel statistics (in [0, 1] units) for the fused normalization.
    """

    train: Dataset
    val: Dataset
    test: Dataset | None
    train_eval: Dataset | None
    classes: tuple
    in_chans: int
    input_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def default_root(name: str) -> str | None:
    """The location a reader looks in when ``data.root`` is null."""
    return DEFAULT_ROOTS.get(name)


def _stats(cfg: DataConfig, in_chans: int):
    mean, std = DEFAULT_STATS[cfg.name]
    mean = tuple(cfg.mean) if cfg.mean is not None else mean
    std = tuple(cfg.std) if cfg.std is not None else std
    for key, v in (("data.mean", mean), ("data.std", std)):
        if len(v) not in (1, in_chans):
            raise RecipeError(f"{key} needs 1 or {in_chans} values for {in_chans}-channel images: {list(v)}")
    if any(s <= 0 for s in std):
        raise RecipeError(f"data.std must be positive, got {list(std)}")
    return tuple(mean) * (in_chans // len(mean)), tuple(std) * (in_chans // len(std))


def _noisy_labels(y: Tensor, fraction: float, num_classes: int, generator: torch.Generator) -> Tensor:
    """Symmetric label noise: a seeded ``fraction`` of labels moved to a uniformly drawn *other* class."""
    n = y.shape[0]
    k = int(round(fraction * n))
    idx = torch.randperm(n, generator=generator)[:k]
    shift = torch.randint(1, num_classes, (k,), generator=generator)
    noisy = y.clone()
    noisy[idx] = (y[idx] + shift) % num_classes
    return noisy


def build_data(cfg: DataConfig) -> DataBundle:
    """Read the data set named by ``cfg.name`` and build the train / val / test splits.

    Args:
        cfg: the ``data`` section of the config.

    Returns:
        A :class:`DataBundle`.

    Raises:
        DataNotFoundError: the files are missing or malformed (the message says where they are expected
            and how to get them).
        RecipeError: inconsistent settings (augmentation the reader cannot do, bad split sizes, ...).
    """
    root = cfg.root or default_root(cfg.name)
    files = cfg.name == "imagefolder"
    if files and cfg.augment not in ("none", "rrc_flip"):
        raise RecipeError(f"data.augment={cfg.augment} is for in-memory data sets; image folders use none or "
                          "rrc_flip")
    if not files and cfg.augment == "rrc_flip":
        raise RecipeError(f"data.augment=rrc_flip needs image files; for {cfg.name} use flip or crop_flip")
    if not 0.0 <= cfg.label_noise < 1.0:
        raise RecipeError(f"data.label_noise must lie in [0, 1), got {cfg.label_noise}")
    if cfg.val_size < 0 or cfg.train_subset < 0:
        raise RecipeError("data.val_size and data.train_subset must be >= 0")

    if cfg.name == "digits":
        (tx, ty), (vx, vy), classes = _read_digits(cfg.seed)
    elif cfg.name == "fashion_mnist":
        (tx, ty), (vx, vy), classes = _read_fashion_mnist(root)
    elif cfg.name == "cifar10":
        (tx, ty), (vx, vy), classes = read_cifar10(root)
    elif cfg.name == "imagefolder":
        (tx, ty), (vx, vy), classes = _read_imagefolder(root)
    else:  # the schema's choices make this unreachable from the CLI
        raise RecipeError(f"unknown data set {cfg.name!r}")

    if files:
        size = cfg.img_size or 224
        train_tf = eval_tf = None
        if cfg.decoder == "pil":
            from timm.data import create_transform

            common = dict(interpolation="bilinear", use_prefetcher=True)  # uint8 out, no float math
            eval_tf = create_transform(size, is_training=False, crop_pct=cfg.crop_pct, **common)
            train_tf = eval_tf
            if cfg.augment == "rrc_flip":
                train_tf = create_transform(size, is_training=True, scale=tuple(cfg.scale), hflip=0.5,
                                            color_jitter=None, **common)
        else:
            eval_tf = tensor_transform(size, train=False, crop_pct=cfg.crop_pct)
            train_tf = tensor_transform(size, train=True, scale=cfg.scale) if cfg.augment == "rrc_flip" \
                else eval_tf
        encoded = cfg.decoder == "device"  # training JPEGs decoded a batch at a time on the device
        if encoded and cfg.augment != "rrc_flip":
            raise RecipeError("data.decoder=device decodes and augments training batches on the device: it "
                              "needs data.augment=rrc_flip")
        decoder = "pil" if cfg.decoder == "pil" else "torchvision"
        train_full = ImageFiles(tx, ty, train_tf, cfg.skip_corrupt, decoder, encoded=encoded)
        test = ImageFiles(vx, vy, eval_tf, cfg.skip_corrupt, decoder)
        in_chans, input_size = 3, (size, size)
    else:
        if cfg.img_size is not None and cfg.img_size != tx.shape[-1]:
            raise RecipeError(f"data.img_size applies to image folders; {cfg.name} images are "
                              f"{tx.shape[-2]}x{tx.shape[-1]} (leave it null)")
        train_full = ImageTensors(tx, ty, cfg.augment, cfg.pad)
        test = ImageTensors(vx, vy, "none")
        in_chans, input_size = tx.shape[1], (tx.shape[-2], tx.shape[-1])

    n = len(train_full)
    g = torch.Generator().manual_seed(cfg.seed)
    if cfg.val_size >= n:
        raise RecipeError(f"data.val_size={cfg.val_size} leaves no training images (the set has {n})")
    if files:  # folders are sorted by class: hold out a seeded random choice
        order = torch.randperm(n, generator=g)
    else:  # arrays: the first val_size images, as the Keras example does
        order = torch.arange(n)
    val_idx, train_idx = order[: cfg.val_size], order[cfg.val_size:]
    val = _select(train_full, val_idx, plain=test) if cfg.val_size else test
    if cfg.train_subset:
        if cfg.train_subset > len(train_idx):
            raise RecipeError(f"data.train_subset={cfg.train_subset} exceeds the {len(train_idx)} "
                              "training images")
        pick = torch.randperm(len(train_idx), generator=g)[: cfg.train_subset]
        train_idx = train_idx[pick.sort().values]
    true_y = train_full.targets[train_idx]
    train_eval = None
    given_y = true_y
    if cfg.label_noise > 0:
        given_y = _noisy_labels(true_y, cfg.label_noise, len(classes), g)
        pair = torch.stack([given_y, true_y], dim=1)
        train_eval = _select(train_full, train_idx, pair, plain=test)
    train = _select(train_full, train_idx, given_y)
    mean, std = _stats(cfg, in_chans)
    return DataBundle(train, val, test if cfg.val_size else None, train_eval, tuple(classes), in_chans,
                      input_size, mean, std)


# ----------------------------------------------------------------------------------------------------
# Device-side normalization


def normalize_batch(x: Tensor, mean, std, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 batch -> ``(x / 255 - mean) / std`` in ``out_dtype``: the fused op at lam = 1 (no mixing)."""
    from . import ops

    if x.dtype != torch.uint8:
        raise ValueError(f"normalize_batch expects a uint8 batch, got {x.dtype}")
    return ops.mix(x, None, 1.0, mean=list(mean), std=list(std), out_dtype=out_dtype)[0]
