"""The device-resident training set in the torch loop (``data.on_device``), on CPU: its twin gives the batches
the loader gives, so a run with it equals a run without it, bit for bit, resumed or not; the fused kernel
(Triton's interpreter here) gives the same run to float32 rounding."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_data import write_cifar10  # noqa: E402

from mixrecipe import train  # noqa: E402
from mixrecipe.data import ImageTensors  # noqa: E402
from mixrecipe.gpu_data import DeviceImages  # noqa: E402

TIMING = ("seconds", "images_per_s")


def _records(out):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cifar_run(tmp_path, name, *extra):
    root = tmp_path / "data"
    if not root.exists():
        write_cifar10(str(root), per_batch=8, n_test=8)
    return train.main(["cifar10", f"data.root={root}", f"output={tmp_path / name}", "batch_size=7",
                       "epochs=2",
                       "model=digits_cnn", "preview=false", "progress=false", "optim.lr=0.01", *extra])


@pytest.mark.parametrize("mixing", [["mixup.alpha=1.0"], ["mixup.alpha=0", "mixup.cutmix_alpha=0"],
                                    ["mixup.cutmix_alpha=1.0", "mixup.mode=elem", "mixup.pairing=flip"]])
def test_on_device_twin_equals_the_loader_run(tmp_path, mixing):
    """crop_flip + pad 4, odd batch of 7 (a last batch of 5), mixup / ERM / per-sample CutMix+mixup."""
    a = _cifar_run(tmp_path, "loader", "data.on_device=false", *mixing)
    b = _cifar_run(tmp_path, "device", "data.on_device=true", *mixing)
    assert _records(tmp_path / "device") == _records(tmp_path / "loader")
    assert a["test_loss"] == b["test_loss"] and a["train_loss"] == b["train_loss"]


def test_on_device_through_the_fused_kernel(tmp_path):
    """The engine's on-device path with the Triton kernel (the interpreter on CPU tensors): the same run
    as the loader's, to float32 rounding of the normalize + mix arithmetic."""
    from conftest import triton_device

    if triton_device() != "cpu":
        pytest.skip("the engine test of the kernel runs on CPU tensors through the interpreter")
    from mixrecipe.backend import cpu_backend

    ref = _cifar_run(tmp_path, "loader", "data.on_device=false", "epochs=1")
    with cpu_backend("triton"):
        got = _cifar_run(tmp_path, "fused", "data.on_device=true", "epochs=1")
    assert got["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-4)
    assert got["test_loss"] == pytest.approx(ref["test_loss"], rel=1e-4)


def test_on_device_needs_an_in_memory_set(tmp_path, capsys):
    from test_data import write_imagefolder

    root = write_imagefolder(str(tmp_path / "inet"), n_train=2, n_val=1)
    with pytest.raises(SystemExit) as info:
        train.main(["imagenet", f"data.root={root}", f"output={tmp_path / 'run'}", "data.on_device=true",
                    "model=digits_cnn", "data.img_size=16", "batch_size=2", "epochs=1", "data.workers=0",
                    "preview=false", "progress=false"])
    assert info.value.code == 2 and "data.on_device" in capsys.readouterr().err


def test_device_batches_follow_the_data_sets_stream():
    """DeviceImages.batch draws from the data set's generator in the loader's order: reseeding replays it,
    and its images are the loader's for the same indices."""
    g = torch.Generator().manual_seed(0)
    ds = ImageTensors(torch.randint(0, 256, (30, 3, 8, 8), dtype=torch.uint8, generator=g),
                      torch.randint(0, 10, (30,), generator=g), "crop_flip", 2)
    dev = DeviceImages(ds, torch.device("cpu"))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.2, 0.2)
    ds.reseed(5)
    x, y, lam, perm, _ = dev.batch([3, 1, 4, 1, 5], mean=mean, std=std, out_dtype=torch.float32)
    ds.reseed(5)
    xl, yl = ds.__getitems__([3, 1, 4, 1, 5])
    from mixrecipe.data import normalize_batch

    assert torch.equal(x, normalize_batch(xl, mean, std)) and torch.equal(y, yl)
    assert lam == 1.0 and perm is None
