"""mixrecipe.transforms.MixUp / CutMix against torchvision's v2 transforms on shared draws.

Shared draws two ways: the same global seed (ours draw λ and the box with torchvision's own code, in its
order), and torchvision's ``make_params`` patched to return fixed parameters (ours call it too). The
options torchvision lacks (per-sample λ and boxes, flip pairing in place, label smoothing) are checked
against the float64 reference, with the per-sample boxes rebuilt one by one with torchvision's formula.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, default_collate
from torchvision import tv_tensors
from torchvision.transforms import v2

from mixrecipe.reference import mix_reference
from mixrecipe.transforms import CutMix, MixUp

K = 5
PAIRS = [(MixUp, v2.MixUp), (CutMix, v2.CutMix)]


def _batch(b, dtype=torch.float32, shape=(3, 9, 13), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, *shape, generator=g).to(dtype)
    return x, torch.randint(0, K, (b,), generator=g)


def _both(ours, theirs, *inputs, seed=3):
    torch.manual_seed(seed)
    want = theirs(*[t.clone() for t in inputs])
    torch.manual_seed(seed)
    got = ours(*[t.clone() for t in inputs])
    return got, want


@pytest.mark.parametrize("b", [1, 2, 5, 8])
@pytest.mark.parametrize(("ours", "theirs"), PAIRS)
def test_same_seed_same_output_as_torchvision(ours, theirs, b, backend):
    x, y = _batch(b)
    for seed in range(3):
        torch.manual_seed(seed)
        wx, wy = theirs(alpha=0.7, num_classes=K)(x.clone(), y)
        torch.manual_seed(seed)  # both draw on the CPU, whichever device the batch is on
        gx, gy = ours(alpha=0.7, num_classes=K)(x.clone().to(backend.device), y.to(backend.device))
        assert gx.device.type == gy.device.type == backend.device
        gx, gy = gx.cpu(), gy.cpu()
        torch.testing.assert_close(gx, wx, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gy, wy, rtol=1e-6, atol=1e-7)
        assert gy.dtype == wy.dtype == torch.float32 and gx.dtype == x.dtype


@pytest.mark.parametrize(("params", "cls", "tv_cls"), [
    ({"lam": 0.0}, MixUp, v2.MixUp), ({"lam": 1.0}, MixUp, v2.MixUp), ({"lam": 0.37}, MixUp, v2.MixUp),
    ({"box": (0, 0, 13, 9), "lam_adjusted": 0.0}, CutMix, v2.CutMix),        # the whole image
    ({"box": (10, 5, 13, 9), "lam_adjusted": 1 - 12 / 117}, CutMix, v2.CutMix),  # at the border
    ({"box": (4, 4, 4, 7), "lam_adjusted": 1.0}, CutMix, v2.CutMix),         # empty
])
def test_patched_params_same_output_as_torchvision(monkeypatch, params, cls, tv_cls):
    monkeypatch.setattr(tv_cls, "make_params", lambda self, flat: dict(params))
    x, y = _batch(6)
    got, want = cls(num_classes=K)(x.clone(), y), tv_cls(num_classes=K)(x.clone(), y)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], want[1])
    if params.get("lam") in (0.0, 1.0):  # exact identities
        assert torch.equal(got[0], x.roll(1, 0) if params["lam"] == 0.0 else x)


@pytest.mark.parametrize(("ours", "theirs"), PAIRS)
def test_tv_tensors_dicts_videos_and_dense_labels(ours, theirs):
    x, y = _batch(4)
    img = tv_tensors.Image(x)
    (gx, gy), (wx, wy) = _both(ours(num_classes=K), theirs(num_classes=K), img, y)
    assert type(gx) is tv_tensors.Image
    torch.testing.assert_close(gx.as_subclass(torch.Tensor), wx.as_subclass(torch.Tensor))
    video = tv_tensors.Video(torch.randn(4, 2, 3, 6, 7))
    (gv, _), (wv, _) = _both(ours(num_classes=K), theirs(num_classes=K), video, y)
    assert type(gv) is tv_tensors.Video
    torch.testing.assert_close(gv.as_subclass(torch.Tensor), wv.as_subclass(torch.Tensor))
    dense = torch.nn.functional.one_hot(y, K).double()  # (B, K) labels keep their dtype
    (gx, gy), (wx, wy) = _both(ours(), theirs(), x, dense)
    assert gy.dtype == wy.dtype == torch.float64
    torch.testing.assert_close(gy, wy)
    # Labels first: torchvision then needs a tv_tensors.Image (it takes the first plain tensor for one).
    for make in (lambda: {"image": x.clone(), "labels": y},
                 lambda: {"labels": y, "image": tv_tensors.Image(x.clone())}):
        torch.manual_seed(0)
        got = ours(num_classes=K)(make())
        torch.manual_seed(0)
        want = theirs(num_classes=K)(make())
        torch.testing.assert_close(got["image"], want["image"])
        torch.testing.assert_close(got["labels"], want["labels"])


def test_dtypes_the_op_does_not_take():
    u8 = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    y = torch.arange(5) % K
    (gx, gy), (wx, wy) = _both(CutMix(num_classes=K), v2.CutMix(num_classes=K), u8, y)
    assert gx.dtype == torch.uint8 and torch.equal(gx, wx) and torch.equal(gy, wy)  # a pixel copy: exact
    x64 = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    (gx, _), (wx, _) = _both(MixUp(num_classes=K), v2.MixUp(num_classes=K), x64, y)
    assert gx.dtype == torch.float64
    torch.testing.assert_close(gx, wx)


def test_bf16_images_match_the_reference_and_torchvision():
    x, y = _batch(6, torch.bfloat16)
    (gx, _), (wx, _) = _both(MixUp(num_classes=K), v2.MixUp(num_classes=K), x, y)
    torch.manual_seed(3)
    lam = float(torch.distributions.Beta(torch.tensor([1.0]), torch.tensor([1.0])).sample(()))
    ref, _ = mix_reference(x, y, lam, perm=torch.arange(6).roll(1), num_classes=K)
    torch.testing.assert_close(gx, ref, rtol=0, atol=0)  # one rounding from fp32 math: the reference's
    torch.testing.assert_close(gx.float(), wx.float(), rtol=2e-2, atol=2e-2)  # torchvision rounds per op


def test_in_a_collate_fn_and_random_choice():
    data = [(torch.randn(3, 8, 8), i % K) for i in range(10)]
    mix = v2.RandomChoice([CutMix(num_classes=K), MixUp(num_classes=K)])
    tv_mix = v2.RandomChoice([v2.CutMix(num_classes=K), v2.MixUp(num_classes=K)])
    torch.manual_seed(5)
    got = list(DataLoader(data, batch_size=4, collate_fn=lambda b: mix(*default_collate(b))))
    torch.manual_seed(5)
    want = list(DataLoader(data, batch_size=4, collate_fn=lambda b: tv_mix(*default_collate(b))))
    assert [g[0].shape[0] for g in got] == [4, 4, 2]
    for (gx, gy), (wx, wy) in zip(got, want):
        torch.testing.assert_close(gx, wx, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gy, wy)


# --------------------------------------------------------------------------------------------------
# Options torchvision lacks.
# --------------------------------------------------------------------------------------------------
def test_per_sample_mixup(backend):
    x, y = _batch(7)
    torch.manual_seed(11)
    mixup = MixUp(alpha=0.5, num_classes=K, per_sample=True)
    gx, gy = mixup(x.clone().to(backend.device), y.to(backend.device))
    gx, gy = gx.cpu(), gy.cpu()
    torch.manual_seed(11)
    lam = torch.distributions.Beta(torch.tensor([0.5]), torch.tensor([0.5])).sample((7,)).view(7)
    assert lam.unique().numel() == 7
    rx, ry = mix_reference(x, y, lam, perm=torch.arange(7).roll(1), num_classes=K)
    torch.testing.assert_close(gx, rx.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gy, ry)


def test_per_sample_cutmix_boxes_are_torchvisions_one_by_one(backend):
    b, h, w = 6, 9, 13
    x, y = _batch(b)
    torch.manual_seed(4)
    gx, gy = CutMix(num_classes=K, per_sample=True)(x.clone().to(backend.device), y.to(backend.device))
    gx, gy = gx.cpu(), gy.cpu()
    torch.manual_seed(4)
    lam = torch.distributions.Beta(torch.tensor([1.0]), torch.tensor([1.0])).sample((b,)).view(b)
    r_x, r_y = torch.randint(w, size=(b,)), torch.randint(h, size=(b,))
    boxes, kept = [], []
    for i in range(b):  # torchvision's make_params, per sample
        r = 0.5 * math.sqrt(1.0 - float(lam[i]))
        rw, rh = int(r * w), int(r * h)
        x1, y1 = max(int(r_x[i]) - rw, 0), max(int(r_y[i]) - rh, 0)
        x2, y2 = min(int(r_x[i]) + rw, w), min(int(r_y[i]) + rh, h)
        boxes.append([y1, y2, x1, x2])
        kept.append(1.0 - (x2 - x1) * (y2 - y1) / (w * h))
    assert len(set(map(tuple, boxes))) > 1
    rx, ry = mix_reference(x, y, 1.0, torch.tensor(kept), perm=torch.arange(b).roll(1),
                           box=torch.tensor(boxes), num_classes=K)
    assert torch.equal(gx, rx.float())
    torch.testing.assert_close(gy, ry)


@pytest.mark.parametrize("cls", [MixUp, CutMix])
def test_flip_pairing_in_place_and_label_smoothing(cls, backend):
    orig, y = _batch(5)
    x, y_dev = orig.clone().to(backend.device), y.to(backend.device)
    torch.manual_seed(2)
    gx, gy = cls(num_classes=K, pairing="flip", inplace=True, label_smoothing=0.1)(x, y_dev)
    assert gx.data_ptr() == x.data_ptr()  # written in place
    gx, gy = gx.cpu(), gy.cpu()
    # torchvision's draws (same seed), timm's pairing and smoothing.
    torch.manual_seed(2)
    params = (v2.MixUp if cls is MixUp else v2.CutMix)(num_classes=K).make_params([orig])
    lam = params.get("lam", params.get("lam_adjusted"))
    box = None
    if "box" in params:
        x1, y1, x2, y2 = params["box"]
        box = torch.tensor([y1, y2, x1, x2])
    rx, ry = mix_reference(orig, y, 1.0 if box is not None else lam, lam, perm=None, box=box,
                           num_classes=K, label_smoothing=0.1)
    torch.testing.assert_close(gx, rx.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gy, ry)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(alpha=0), "alpha"), (dict(alpha=float("inf")), "alpha"), (dict(num_classes=0), "num_classes"),
    (dict(pairing="random"), "pairing"), (dict(inplace=True), "inplace"), (dict(label_smoothing=1.5),
                                                                             "label_smoothing"),
])
@pytest.mark.parametrize("cls", [MixUp, CutMix])
def test_bad_arguments_are_named(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_torchvision_input_checks_still_apply():
    x, y = _batch(4)
    with pytest.raises(ValueError, match="num_classes must be passed"):
        MixUp()(x, y)
    with pytest.raises(ValueError, match="batch size"):
        CutMix(num_classes=K)(x, y[:3])
    assert isinstance(MixUp(num_classes=K), v2.MixUp) and isinstance(CutMix(num_classes=K), v2.CutMix)


def test_readme_torchvision_snippet_runs():
    from readme_snippets import snippet

    scope: dict = {"__name__": "readme_torchvision"}
    exec(compile(snippet("torchvision"), "README.md:torchvision", "exec"), scope)
    x, y = scope["x"], scope["y"]
    assert y.shape == (32, scope["NUM_CLASSES"]) and torch.allclose(y.sum(1), torch.ones(32, device=y.device))
    assert scope["labels"].shape == (32, scope["NUM_CLASSES"]) and x.shape == (32, 3, 32, 32)
