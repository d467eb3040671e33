"""Data readers on small files written here in the real formats, the splits, label noise, augmentation.

The writers at the top are also used by tests/test_train.py.
"""

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from mixrecipe.config import DataConfig, RecipeError
from mixrecipe.data import (
    DataNotFoundError,
    ImageFiles,
    ImageTensors,
    build_data,
    normalize_batch,
    read_cifar10,
    read_idx,
)
from mixrecipe.reference import normalize as reference_normalize

# ----------------------------------------------------------------------------------------------------
# Writers of the real on-disk formats


def write_idx(path, array: np.ndarray, compress: bool = True) -> None:
    """An IDX file: 0, 0, type 0x08 (uint8), ndim, big-endian int32 dims, then the bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "i" * array.ndim, *array.shape)
    raw = header + array.tobytes()
    with open(path, "wb") as fh:
        fh.write(gzip.compress(raw) if compress else raw)


def write_fashion_mnist(root, n_train=96, n_test=40, compress=True, seed=0):
    """The four Fashion-MNIST IDX files, named as Debian ships them; images encode their class."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    ext = ".gz" if compress else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        y = rng.integers(0, 10, n).astype(np.uint8)
        x = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(y):  # a bright bar whose row says the class: learnable
            x[i, 2 + 2 * c: 4 + 2 * c, 4:24] = 250
        write_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte{ext}"), x, compress)
        write_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte{ext}"), y, compress)
    return root


def write_cifar10(root, per_batch=12, n_test=20, seed=0, meta=True):
    """cifar-10-batches-py/ with data_batch_1..5 and test_batch as python pickles of numpy arrays."""
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(base, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        labels = rng.integers(0, 10, n).tolist()
        data = rng.integers(0, 256, (n, 3072)).astype(np.uint8)
        with open(os.path.join(base, name), "wb") as fh:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [f"{i}.png".encode() for i in range(n)]}, fh, protocol=2)
    if meta:
        with open(os.path.join(base, "batches.meta"), "wb") as fh:
            pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)],
                         b"num_cases_per_batch": per_batch, b"num_vis": 3072}, fh, protocol=2)
    return root


def write_imagefolder(root, classes=("ant", "bee", "cat"), n_train=6, n_val=2, size=(40, 48), seed=0):
    """root/train/<class>/*.JPEG and root/val/<class>/*.JPEG, each class its own colour."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for k, cls in enumerate(classes):
            folder = os.path.join(root, split, cls)
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 80, (*size, 3)).astype(np.uint8)
                img[..., k % 3] += 150
                Image.fromarray(img).save(os.path.join(folder, f"{cls}_{i}.JPEG"), quality=90)
    return root


# ----------------------------------------------------------------------------------------------------
# Readers


@pytest.mark.parametrize("compress", [True, False])
def test_idx_round_trip(tmp_path, compress):
    a = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    write_idx(tmp_path / "a", a, compress)
    np.testing.assert_array_equal(read_idx(str(tmp_path / "a")), a)


def test_idx_rejects_garbage(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04hello")
    with pytest.raises(DataNotFoundError, match="IDX"):
        read_idx(str(tmp_path / "bad"))
    write_idx(tmp_path / "short", np.zeros((4, 4), np.uint8), compress=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-3])
    with pytest.raises(DataNotFoundError, match="truncated"):
        read_idx(str(tmp_path / "short"))


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_reader(tmp_path, compress):
    root = write_fashion_mnist(str(tmp_path / "fm"), compress=compress)
    b = build_data(DataConfig(name="fashion_mnist", root=root, val_size=16))
    assert (len(b.train), len(b.val), len(b.test)) == (80, 16, 40)
    assert b.classes[0] == "T-shirt/top" and b.num_classes == 10 and b.in_chans == 1
    x, y = b.train.__getitems__([0, 1])
    assert x.dtype == torch.uint8 and x.shape == (2, 1, 28, 28)
    # Validation is the first val_size training images, as in the Keras example.
    raw = read_idx(os.path.join(root, "train-images-idx3-ubyte" + (".gz" if compress else "")))
    np.testing.assert_array_equal(b.val.images[:, 0].numpy(), raw[:16])
    np.testing.assert_array_equal(b.train.images[:, 0].numpy(), raw[16:])


def test_cifar10_reader(tmp_path):
    root = write_cifar10(str(tmp_path))
    (tx, ty), (vx, vy), classes = read_cifar10(root)
    assert tx.shape == (60, 3, 32, 32) and tx.dtype == torch.uint8 and vx.shape == (20, 3, 32, 32)
    assert classes[3] == "class3"
    # Row-major 3072 bytes: the first 1024 are the red plane.
    with open(os.path.join(root, "cifar-10-batches-py", "data_batch_1"), "rb") as fh:
        first = pickle.load(fh, encoding="bytes")
    np.testing.assert_array_equal(tx[0, 0].numpy().ravel(), first[b"data"][0, :1024])
    assert ty[:12].tolist() == first[b"labels"]
    # The directory itself works as root too; without batches.meta the standard names are used.
    os.remove(os.path.join(root, "cifar-10-batches-py", "batches.meta"))
    assert read_cifar10(os.path.join(root, "cifar-10-batches-py"))[2][0] == "airplane"


def test_cifar10_reader_never_runs_code_from_a_pickle(tmp_path):
    root = write_cifar10(str(tmp_path))
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(os.path.join(root, "cifar-10-batches-py", "data_batch_3"), "wb") as fh:
        pickle.dump({b"data": Evil(), b"labels": []}, fh)
    with pytest.raises(DataNotFoundError, match="refusing"):
        read_cifar10(root)
    assert not marker.exists()


def test_imagefolder_reader(tmp_path):
    root = write_imagefolder(str(tmp_path / "inet"))
    b = build_data(DataConfig(name="imagefolder", root=root, img_size=32, augment="rrc_flip"))
    assert b.classes == ("ant", "bee", "cat") and len(b.train) == 18 and len(b.val) == 6 and b.test is None
    x, y = b.train[0]
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32)
    xv, yv = b.val[0]
    assert xv.shape == (3, 32, 32) and int(yv) == 0
    assert isinstance(b.train, ImageFiles) and b.input_size == (32, 32)
    # With a held-out split the validation images are a seeded choice and not augmented.
    b2 = build_data(DataConfig(name="imagefolder", root=root, img_size=32, augment="rrc_flip", val_size=5))
    assert len(b2.val) == 5 and len(b2.train) == 13 and b2.test is not None
    assert set(b2.val.paths).isdisjoint(b2.train.paths)
    assert torch.equal(b2.val[0][0], b2.val[0][0])  # deterministic: no random crop


@pytest.mark.parametrize(
    "cfg, words",
    [
        (dict(name="fashion_mnist", root="{tmp}/nothing"),
         ["Fashion-MNIST", "apt-get install dataset-fashion-mnist", "data.root"]),
        (dict(name="cifar10", root="{tmp}/nothing"), ["CIFAR-10", "cifar-10-python.tar.gz", "data_batch_1"]),
        (dict(name="imagefolder", root="{tmp}/nothing"), ["train", "val", "image-net.org", "data.root"]),
    ],
)
def test_missing_data_says_where_and_how(tmp_path, cfg, words):
    cfg = DataConfig(**{k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in cfg.items()})
    with pytest.raises(DataNotFoundError) as info:
        build_data(cfg)
    for w in words:
        assert w in str(info.value)
    assert str(tmp_path / "nothing") in str(info.value)


def test_inconsistent_data_settings(tmp_path):
    with pytest.raises(RecipeError, match="rrc_flip"):
        build_data(DataConfig(name="digits", augment="rrc_flip"))
    with pytest.raises(RecipeError, match="val_size"):
        build_data(DataConfig(name="digits", val_size=5000))
    with pytest.raises(RecipeError, match="train_subset"):
        build_data(DataConfig(name="digits", train_subset=5000))
    with pytest.raises(RecipeError, match="data.mean"):
        build_data(DataConfig(name="digits", mean=[0.1, 0.2], std=[0.3, 0.3]))
    with pytest.raises(RecipeError, match="img_size"):
        build_data(DataConfig(name="digits", img_size=32))
    root = write_imagefolder(str(tmp_path / "inet"), n_train=1, n_val=1)
    with pytest.raises(RecipeError, match="image folders use"):
        build_data(DataConfig(name="imagefolder", root=root, augment="crop_flip"))


# ----------------------------------------------------------------------------------------------------
# Splits, subset, label noise


def test_digits_split_is_seeded_and_disjoint():
    a, b = build_data(DataConfig()), build_data(DataConfig())
    assert torch.equal(a.train.images, b.train.images) and len(a.train) == 1437 and len(a.val) == 360
    c = build_data(DataConfig(seed=1))
    assert not torch.equal(a.val.targets, c.val.targets)
    rows = {bytes(r) for r in a.train.images.flatten(1).numpy()}
    overlap = sum(bytes(r) in rows for r in a.val.images.flatten(1).numpy())
    assert overlap < 10  # the digits set holds a few duplicate images, nothing more


def test_train_subset_and_label_noise():
    clean = build_data(DataConfig(train_subset=500))
    noisy = build_data(DataConfig(train_subset=500, label_noise=0.4))
    assert len(clean.train) == len(noisy.train) == 500
    assert torch.equal(clean.train.images, noisy.train.images)  # noise changes labels, not the subset
    given, true = noisy.train_eval.targets[:, 0], noisy.train_eval.targets[:, 1]
    assert torch.equal(true, clean.train.targets) and torch.equal(given, noisy.train.targets)
    assert int((given != true).sum()) == 200  # exactly 40%, each moved to another class
    assert clean.train_eval is None
    assert noisy.train_eval.augment == "none"
    # Validation and test labels stay clean.
    assert torch.equal(noisy.val.targets, clean.val.targets)
    # Fixed by data.seed, not by the training seed.
    again = build_data(DataConfig(train_subset=500, label_noise=0.4))
    assert torch.equal(again.train.targets, noisy.train.targets)
    other = build_data(DataConfig(train_subset=500, label_noise=0.4, seed=3))
    assert not torch.equal(other.train.targets, noisy.train.targets)


def test_label_noise_spreads_over_the_other_classes():
    b = build_data(DataConfig(label_noise=0.8))
    given, true = b.train_eval.targets[:, 0], b.train_eval.targets[:, 1]
    moved = given != true
    shift = (given[moved] - true[moved]) % 10
    counts = torch.bincount(shift, minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 0.5 * counts[1:].float().mean()


# ----------------------------------------------------------------------------------------------------
# Augmentation and normalization


def test_crop_flip_is_a_shifted_window_of_the_padded_image():
    images = torch.randint(1, 255, (64, 3, 8, 8), dtype=torch.uint8)  # no zeros: padding is recognisable
    ds = ImageTensors(images, torch.zeros(64, dtype=torch.long), augment="crop_flip", pad=2)
    ds.reseed(0)
    out, _ = ds.__getitems__(list(range(64)))
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    found_flip = found_shift = 0
    for i in range(64):
        matches = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (0, 1)
                   if torch.equal(out[i], (padded[i, :, dy:dy + 8, dx:dx + 8].flip(-1) if f else
                                           padded[i, :, dy:dy + 8, dx:dx + 8]))]
        assert matches, f"sample {i} is not a crop of its padded image"
        found_flip += any(f for *_, f in matches)
        found_shift += any((dy, dx) != (2, 2) for dy, dx, _ in matches)
    assert 10 < found_flip < 54 and found_shift > 40
    ds.reseed(0)
    assert torch.equal(ds.__getitems__(list(range(64)))[0], out)  # reseeding replays the stream


def test_in_memory_batches_are_copies():
    images = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    ds = ImageTensors(images, torch.zeros(4, dtype=torch.long))
    x, _ = ds.__getitems__([0, 1])
    x += 7  # an in-place mix must not reach the data set
    assert images.sum() == 0


def test_normalize_batch_matches_the_reference():
    x = torch.randint(0, 256, (3, 3, 5, 4), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out = normalize_batch(x, mean, std)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference_normalize(x, mean, std), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        normalize_batch(x.float(), mean, std)


# ----------------------------------------------------------------------------------------------------
# Image files: torchvision.io decoding and v2 transforms on uint8 tensors (data.decoder)


def test_torchvision_decoder_matches_pil_and_timm(tmp_path):
    """The default decoder gives what PIL + timm give: the same uint8 shapes, the same evaluation view (up to
    the two libraries' resampling), random crops drawn from (epoch seed, item) alone."""
    root = write_imagefolder(str(tmp_path / "inet"), size=(60, 80))
    tv = build_data(DataConfig(name="imagefolder", root=root, img_size=32, augment="rrc_flip"))
    pil = build_data(DataConfig(name="imagefolder", root=root, img_size=32, augment="rrc_flip",
                                decoder="pil"))
    assert tv.train.decoder == "torchvision" and pil.train.decoder == "pil"
    for i in range(len(tv.val)):
        a, b = tv.val[i][0], pil.val[i][0]
        assert a.dtype == b.dtype == torch.uint8 and a.shape == b.shape == (3, 32, 32)
        assert (a.int() - b.int()).abs().float().mean() < 4.0  # libjpeg-turbo vs PIL's libjpeg, resamplers
    tv.train.reseed(7)
    x1 = tv.train[0][0]
    torch.manual_seed(123)  # the worker's global RNG plays no part: the draws are the item's
    assert torch.equal(tv.train[0][0], x1)
    assert x1.dtype == torch.uint8 and x1.shape == (3, 32, 32)
    crops = []
    for seed in range(8):  # each epoch seed its own crops
        tv.train.reseed(seed)
        crops.append(tv.train[0][0])
    assert len({c.numpy().tobytes() for c in crops}) > 1


def test_train_crop_resizes_its_box_like_torchvision_and_flips_on_its_coin():
    """RandomResizedCropFlip = torchvision's resized_crop of the drawn box (bit for bit), mirrored when
    the last uniform is below the flip probability; on a decoded JPEG's strided view and on a dense image."""
    from torchvision.io import decode_jpeg, encode_jpeg
    from torchvision.transforms.v2 import functional as F

    from mixrecipe.data import RandomResizedCropFlip

    g = torch.Generator().manual_seed(3)
    dense = torch.randint(0, 256, (3, 75, 103), dtype=torch.uint8, generator=g)
    decoded = decode_jpeg(encode_jpeg(dense, quality=90))  # decode_jpeg's layout: a permuted HWC buffer
    tf = RandomResizedCropFlip(32, scale=(0.08, 1.0))
    for img in (dense, decoded):
        for seed in range(12):
            torch.manual_seed(seed)
            out = tf(img)
            torch.manual_seed(seed)
            u = torch.rand(tf.DRAWS, dtype=torch.float64).tolist()
            top, left, h, w = tf.box(img.shape[-2], img.shape[-1], u)
            expected = F.resized_crop(img.contiguous(), top, left, h, w, [32, 32], antialias=True)
            if u[-1] < 0.5:
                expected = expected.flip(-1)
            assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
            assert torch.equal(out, expected), (seed, (top, left, h, w))


def test_train_crop_box_follows_scale_and_ratio():
    """The box of a fitting try has the drawn area fraction and aspect ratio (to rounding) and lies inside
    the image; when no try fits, the center crop of the clamped aspect ratio."""
    import math

    from mixrecipe.data import RandomResizedCropFlip

    tf = RandomResizedCropFlip(16, scale=(0.25, 0.75), ratio=(0.5, 2.0))
    rng = np.random.default_rng(0)
    for _ in range(200):
        height, width = (int(v) for v in rng.integers(20, 400, 2))
        u = rng.random(tf.DRAWS).tolist()
        top, left, h, w = tf.box(height, width, u)
        assert 0 <= top <= height - h and 0 <= left <= width - w and h > 0 and w > 0
        for t in range(tf.TRIES):
            fraction = 0.25 + 0.5 * u[2 * t]
            aspect = math.exp(math.log(0.5) + math.log(4.0) * u[2 * t + 1])
            tw, th = round(math.sqrt(fraction * height * width * aspect)), \
                round(math.sqrt(fraction * height * width / aspect))
            if 0 < tw <= width and 0 < th <= height:  # the first fitting try is the box
                assert (h, w) == (th, tw)
                break
    # Strips of 1000 x 10: no try of a fraction >= 0.9 with a ratio in [1/2, 2] fits; the center crop of
    # the ratio clamped to the nearest bound (10 x 20) is taken
    tall = RandomResizedCropFlip(16, scale=(0.9, 1.0), ratio=(0.5, 2.0))
    assert tall.box(1000, 10, [0.5] * tall.DRAWS) == ((1000 - 20) // 2, 0, 20, 10)
    wide = RandomResizedCropFlip(16, scale=(0.9, 1.0), ratio=(0.5, 2.0))
    assert wide.box(10, 1000, [0.5] * wide.DRAWS) == (0, (1000 - 20) // 2, 10, 20)
    with pytest.raises(ValueError, match="scale"):
        RandomResizedCropFlip(16, scale=(0.5, 0.1))
    with pytest.raises(ValueError, match="ratio"):
        RandomResizedCropFlip(16, ratio=(0.0, 1.0))


def test_torchvision_decoder_reads_every_format_pil_reads(tmp_path):
    """PNG and grayscale JPEGs through torchvision.io; BMP, TIFF and the rest through PIL: all RGB uint8."""
    from PIL import Image

    from mixrecipe.data import decode_file

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3)).astype(np.uint8)
    for ext, img in ((".png", Image.fromarray(rgb)), (".bmp", Image.fromarray(rgb)),
                     (".tif", Image.fromarray(rgb)), (".jpg", Image.fromarray(rgb[..., 0]))):
        path = str(tmp_path / f"img{ext}")
        img.save(path)
        x = decode_file(path)
        assert x.dtype == torch.uint8 and x.shape == (3, 20, 30), ext
        with Image.open(path) as ref:
            expected = torch.from_numpy(np.asarray(ref.convert("RGB")).copy()).permute(2, 0, 1)
        if ext == ".jpg":  # grayscale: three equal channels, as PIL's convert("RGB")
            assert torch.equal(x[0], x[1]) and (x.int() - expected.int()).abs().max() <= 2
        else:  # lossless formats decode to the same pixels
            assert torch.equal(x, expected), ext


@pytest.mark.parametrize("decoder", ["torchvision", "pil"])
def test_a_corrupt_file_is_named_or_skipped(tmp_path, decoder):
    from mixrecipe.data import UnreadableImageError, collate_readable

    root = write_imagefolder(str(tmp_path / "inet"), n_train=2, n_val=1)
    b = build_data(DataConfig(name="imagefolder", root=root, img_size=16, augment="rrc_flip",
                              decoder=decoder))
    bad = b.train.paths[1]
    with open(bad, "rb") as fh:
        data = fh.read()
    with open(bad, "wb") as fh:
        fh.write(data[: len(data) // 3])
    with pytest.raises(UnreadableImageError) as info:
        b.train[1]
    msg = str(info.value)
    assert bad in msg and "data.skip_corrupt=true" in msg and ".cpp" not in msg, msg
    skip = build_data(DataConfig(name="imagefolder", root=root, img_size=16, augment="rrc_flip",
                                 decoder=decoder, skip_corrupt=True))
    assert skip.train[1] is None and skip.train.unreadable() == [bad]
    x, y = collate_readable([skip.train[0], skip.train[1], skip.train[2]])
    assert x.shape == (2, 3, 16, 16)
