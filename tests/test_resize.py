"""kernels/resize.py and mixrecipe/gpu_decode.py: a batch of random-resized crops in one launch, and the
training JPEGs decoded a batch at a time on the training device (data.decoder=device)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mixrecipe.backend import cpu_backend
from mixrecipe.data import ImageFiles, RandomResizedCropFlip, UnreadableImageError, collate_encoded
from mixrecipe.gpu_decode import DeviceDecoder, resize_crops
from mixrecipe.kernels._common import interpreting

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from launches import compile_failures, compile_in_subprocess, record_resize  # noqa: E402


def reference(img, box, flip, size):
    """float64: torch's antialiased bilinear resize of the box, rounded half up; and the unrounded values."""
    top, left, h, w = box
    crop = img[None, :, top:top + h, left:left + w].double()
    r = torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear", antialias=True,
                                        align_corners=False)[0]
    r = r.flip(-1) if flip else r
    return (r + 0.5).floor().clamp(0, 255).to(torch.uint8), r


def _images(seed, device):
    """Odd sizes, both dense layouts (CHW, and decode_jpeg's HWC buffer), smooth and noisy content."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k, (h, w) in enumerate(((37, 53), (120, 90), (9, 200), (64, 64), (5, 6))):
        img = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        if k % 2:
            img = img.permute(1, 2, 0).contiguous().permute(2, 0, 1)  # HWC in memory
        out.append(img.to(device))
    return out


def _boxes(images, size, seed):
    """Drawn boxes (downscales up to ~13x, upscales), the whole image, and a one-pixel-wide box."""
    tf = RandomResizedCropFlip(size)
    rng = np.random.default_rng(seed)
    boxes = [tf.box(img.shape[1], img.shape[2], rng.random(tf.DRAWS).tolist()) for img in images]
    boxes[0] = (0, 0, images[0].shape[1], images[0].shape[2])
    boxes[-1] = (1, 2, 4, 1)
    flips = [bool(v) for v in rng.integers(0, 2, len(images))]
    return boxes, flips


def _assert_matches(out, images, boxes, flips, size):
    """Equal to the float64 reference, except by 1 where the exact value lies within float32 rounding of a
    half (the kernel sums the window in float32)."""
    for k, img in enumerate(images):
        expected, exact = reference(img.cpu(), boxes[k], flips[k], size)
        got = out[k].cpu()
        diff = (got.int() - expected.int()).abs()
        assert diff.max() <= 1, (k, boxes[k])
        frac = exact - exact.floor()
        assert ((frac[diff > 0] - 0.5).abs() < 1e-3).all(), (k, boxes[k])


@pytest.mark.parametrize("size", [7, 16, 33])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_kernel_matches_the_float64_reference(triton_device, size, layout):
    images = _images(size, triton_device)
    boxes, flips = _boxes(images, size, size)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    ctx = cpu_backend("triton") if triton_device == "cpu" else torch.no_grad()
    with ctx:
        out = resize_crops(images, boxes, flips, size, fmt)
    assert out.dtype == torch.uint8 and out.shape == (len(images), 3, size, size)
    assert out.is_contiguous(memory_format=fmt)
    _assert_matches(out, images, boxes, flips, size)


def test_kernel_writes_every_output_byte(triton_device):
    """The launcher allocates its output; a poisoned buffer passed to the kernel itself is overwritten."""
    from mixrecipe.kernels.resize import resize_crops_launch

    images = _images(1, triton_device)[:3]
    boxes, flips = _boxes(images, 12, 1)
    table = torch.tensor([[0, 0, 0, 0, 0, 0, *b, f] for b, f in zip(boxes, flips)], dtype=torch.int64)
    offsets, flats = 0, []
    for k, img in enumerate(images):
        hwc = not img.is_contiguous()
        flats.append(img.permute(1, 2, 0).reshape(-1) if hwc else img.reshape(-1))
        h, w = img.shape[1:]
        table[k, :6] = torch.tensor([offsets, h, w, *((1, w * 3, 3) if hwc else (h * w, w, 1))])
        offsets += img.numel()
    out = torch.full((3, 3, 12, 12), 77, dtype=torch.uint8, device=triton_device)
    ctx = cpu_backend("triton") if triton_device == "cpu" else torch.no_grad()
    with ctx:
        resize_crops_launch(torch.cat(flats), table.to(triton_device), out)
    _assert_matches(out, images, boxes, flips, 12)


def test_every_resize_launch_compiles_for_sm80_and_sm90(tmp_path):
    """resize_crops' launches, planned for a GPU, compile for both targets (the interpreter is not the
    compiler: its runtime-bounded tap loops and int64 table reads must pass triton.compile too)."""
    descs = record_resize()
    assert {d["kernel"].split(":")[1] for d in descs} == {"_resize_crops_kernel"}
    proc, results = compile_in_subprocess(descs, tmp_path)
    assert not compile_failures(proc, results), compile_failures(proc, results)
    assert {r["arch"] for r in results} == {80, 90}


def test_cpu_twin_matches_the_float64_reference():
    images = _images(5, "cpu")
    boxes, flips = _boxes(images, 20, 5)
    with cpu_backend("eager"):
        out = resize_crops(images, boxes, flips, 20)
    _assert_matches(out, images, boxes, flips, 20)


def test_the_workers_uint8_resize_is_within_one_level_of_the_reference():
    """What README promises of data.decoder=device against the default: torch's fixed-point uint8 resize (the
    workers' RandomResizedCropFlip) and the rounded float64 reference differ by at most one level."""
    for seed in range(4):
        images = _images(seed, "cpu")
        boxes, flips = _boxes(images, 24, seed)
        for img, (top, left, h, w), flip in zip(images, boxes, flips):
            crop = img[None, :, top:top + h, left:left + w].contiguous(memory_format=torch.channels_last)
            workers = torch.nn.functional.interpolate(crop, size=(24, 24), mode="bilinear", antialias=True)[0]
            workers = workers.flip(-1) if flip else workers
            expected, _ = reference(img, (top, left, h, w), flip, 24)
            assert (workers.int() - expected.int()).abs().max() <= 1


def test_bad_arguments_are_named():
    img = torch.zeros(3, 10, 12, dtype=torch.uint8)
    with pytest.raises(ValueError, match="box 0"):
        resize_crops([img], [(5, 0, 6, 4)], [False], 8)
    with pytest.raises(ValueError, match="image 0"):
        resize_crops([img.float()], [(0, 0, 4, 4)], [False], 8)
    with pytest.raises(ValueError, match="one box and one flip"):
        resize_crops([img], [], [False], 8)
    with pytest.raises(ValueError, match="size"):
        resize_crops([img], [(0, 0, 4, 4)], [False], 0)


# ----------------------------------------------------------------------------------------------------
# DeviceDecoder: loader items -> the uint8 batch on the device


def _folder(tmp_path, n=6, corrupt=False):
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        h, w = int(rng.integers(30, 70)), int(rng.integers(30, 70))
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3)).astype(np.uint8))
        path = str(tmp_path / (f"img{i}.png" if i == 2 else f"img{i}.jpg"))  # one PNG: decoded by the worker
        img.save(path, **({} if i == 2 else {"quality": 90}))
        paths.append(path)
    if corrupt:
        with open(paths[3], "r+b") as fh:  # a JPEG header, then garbage
            fh.seek(200)
            fh.write(os.urandom(400))
            fh.truncate(700)
    return paths


def _encoded(paths, skip=False):
    return ImageFiles(paths, torch.arange(len(paths)), RandomResizedCropFlip(16), skip_corrupt=skip,
                      encoded=True)


def test_decoder_batches_replay_under_the_seed_and_match_the_reference(tmp_path):
    from torchvision.io import decode_image, read_file

    paths = _folder(tmp_path)
    ds = _encoded(paths)
    items, y = collate_encoded([ds[i] for i in range(len(ds))])
    assert [i for i, _ in items] == list(range(6)) and items[2][1].ndim == 3 and items[0][1].ndim == 1
    dec = DeviceDecoder(ds, "cpu")
    ds.reseed(4)
    x, labels = dec.batch(items, y)
    assert x.dtype == torch.uint8 and x.shape == (6, 3, 16, 16) and torch.equal(labels, y)
    ds.reseed(4)
    x2, _ = dec.batch(items, y)
    assert torch.equal(x, x2)
    assert not torch.equal(dec.batch(items, y)[0], x)  # the stream moves on
    # The same boxes and flips through resize_crops on the images decoded one by one.
    ds.reseed(4)
    u = torch.rand(6, ds.transform.DRAWS, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    images = [decode_image(read_file(p)) for p in paths]
    boxes = [ds.transform.box(img.shape[1], img.shape[2], row) for img, row in zip(images, u.tolist())]
    assert torch.equal(x, resize_crops(images, boxes, [row[-1] < 0.5 for row in u.tolist()], 16))


def test_decoder_names_or_skips_a_corrupt_jpeg(tmp_path):
    paths = _folder(tmp_path, corrupt=True)
    ds = _encoded(paths)
    items, y = collate_encoded([ds[i] for i in range(len(ds))])  # the worker only read the bytes
    with pytest.raises(UnreadableImageError, match="img3.jpg"):
        DeviceDecoder(ds, "cpu").batch(items, y)
    ds = _encoded(paths, skip=True)
    x, labels = DeviceDecoder(ds, "cpu").batch(items, y)
    assert x.shape[0] == 5 and labels.tolist() == [0, 1, 2, 4, 5]
    assert ds.unreadable() == [paths[3]]


def test_a_jpeg_the_device_refuses_is_decoded_on_the_host(tmp_path, monkeypatch):
    """nvJPEG refuses some valid files (CMYK JPEGs): the batch decode fails, each file is retried alone and
    the refused one is decoded by the host instead of being reported corrupt."""
    import torchvision.io

    paths = _folder(tmp_path)
    ds = _encoded(paths)
    items, y = collate_encoded([ds[i] for i in range(len(ds))])
    dec = DeviceDecoder(ds, "cpu")
    ds.reseed(1)
    expected, _ = dec.batch(items, y)
    real = torchvision.io.decode_jpeg
    refused = items[4][1]

    def device_decoder(data, **kwargs):
        if isinstance(data, list) or data is refused:
            raise RuntimeError("nvjpegDecode failed: unsupported JPEG (stand-in)")
        return real(data, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", device_decoder)
    ds.reseed(1)
    got, labels = dec.batch(items, y)
    assert torch.equal(got, expected) and torch.equal(labels, y) and ds.unreadable() == []


def test_encoded_sets_need_the_device_crop():
    with pytest.raises(ValueError, match="RandomResizedCropFlip"):
        ImageFiles(["a.jpg"], torch.zeros(1), lambda x: x, encoded=True)
    with pytest.raises(ValueError, match="encoded"):
        DeviceDecoder(ImageFiles(["a.jpg"], torch.zeros(1), RandomResizedCropFlip(8)), "cpu")


# ----------------------------------------------------------------------------------------------------
# The recipe runner with data.decoder=device

def _run(tmp_path, name, *extra):
    from test_data import write_imagefolder

    from mixrecipe import train

    root = tmp_path / "inet"
    if not root.exists():
        write_imagefolder(str(root), n_train=6, n_val=2, size=(30, 40))
    return train.main(["imagenet", f"data.root={root}", f"output={tmp_path / name}", "model=digits_cnn",
                       "data.img_size=16", "batch_size=4", "epochs=1", "data.workers=0", "preview=false",
                       "progress=false", *extra])


def test_a_run_through_the_kernel_matches_its_cpu_twin(tmp_path):
    """The whole loop with data.decoder=device, its batches made by the resize kernel (the interpreter on
    CPU tensors) and by the CPU twin: the same run up to the rare rounding step of a pixel."""
    if torch.cuda.is_available() or not interpreting():
        pytest.skip("the engine test of the kernel runs on CPU tensors through the interpreter")
    ref = _run(tmp_path, "twin", "data.decoder=device")
    with cpu_backend("triton"):
        got = _run(tmp_path, "kernel", "data.decoder=device")
    assert got["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-3)
    assert got["test_loss"] == pytest.approx(ref["test_loss"], rel=1e-3)


@pytest.mark.parametrize("extra, words", [
    (("data.augment=none",), "data.augment=rrc_flip"),
    (("engine=fastai",), "engine=torch"),
])
def test_device_decoder_settings_are_checked(tmp_path, capsys, extra, words):
    with pytest.raises(SystemExit) as info:
        _run(tmp_path, "run", "data.decoder=device", *extra)
    assert info.value.code == 2 and words in capsys.readouterr().err
