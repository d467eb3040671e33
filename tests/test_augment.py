"""The fused crop/flip + normalize + mix kernel (kernels/augment.py) against a plain-PyTorch reference.

For the same sample indices, crop offsets, flip bits, partners, λ and boxes the kernel (the interpreter here,
CUDA on a GPU machine) equals the reference bit for bit in float32 (the same formula, op for op) and to the
rounding of the output in bf16/fp16; every output element is written (outputs poisoned with NaN first).
Its launches compile for sm_80/sm_90.
"""

import itertools
import sys
from pathlib import Path

import pytest
import torch

from mixrecipe.data import ImageTensors, crop_flip
from mixrecipe.gpu_data import augment_mix
from mixrecipe.kernels.augment import augment_mix_launch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from launches import compile_failures, compile_in_subprocess, record_augment  # noqa: E402

MEAN, STD = (0.49, 0.48, 0.45, 0.5, 0.3), (0.2, 0.19, 0.21, 0.25, 0.3)


# ----------------------------------------------------------------------------------------------------
# PyTorch reference: the kernel's formula op for op, in float32.
def reference(data, idx, oy, ox, flip, pad, perm, lam_x, lam_y, box, mean, std, target, k, smoothing):
    b, c = idx.shape[0], data.shape[1]
    x = crop_flip(data, idx, oy, ox, flip, pad).float()
    m = torch.tensor(mean, dtype=torch.float32)[:c].view(1, c, 1, 1)
    sd = torch.tensor(std, dtype=torch.float32)[:c].view(1, c, 1, 1)
    own = (x * (1.0 / 255.0) - m) / sd
    part = own.flip(0) if perm is None else own[perm]
    w = torch.as_tensor(lam_x, dtype=torch.float32).expand(b).reshape(b, 1, 1, 1).expand_as(own).clone()
    if box is not None:
        boxes = torch.as_tensor(box, dtype=torch.int64).expand(b, 4)
        h, wd = own.shape[-2:]
        hh, ww = torch.arange(h).view(1, h, 1), torch.arange(wd).view(1, 1, wd)
        y0, y1, x0, x1 = (boxes[:, i].view(b, 1, 1) for i in range(4))
        inside = ((hh >= y0) & (hh < y1) & (ww >= x0) & (ww < x1)).unsqueeze(1).expand_as(own)
        w[inside] = 0.0
    diff = own - part
    out = torch.where(w < 0.5, part + w * diff, own - diff * (1.0 - w))
    soft = None
    if target is not None:
        s = torch.nn.functional.one_hot(target, k).float() * (1.0 - smoothing) + smoothing / k
        sp = s.flip(0) if perm is None else s[perm]
        ly = torch.as_tensor(lam_y, dtype=torch.float32).expand(b).reshape(b, 1)
        d = s - sp
        soft = torch.where(ly < 0.5, sp + ly * d, s - d * (1.0 - ly))
    return out, soft


# ----------------------------------------------------------------------------------------------------
def _case(shape, n_data, pad, aug, pairing, lam_kind, box_kind, seed, device):
    g = torch.Generator().manual_seed(seed)
    b, c, h, w = shape
    data = torch.randint(0, 256, (n_data, c, h, w), dtype=torch.uint8, generator=g)
    idx = torch.randint(0, n_data, (b,), generator=g)
    oy = ox = flip = None
    if aug in ("crop_flip", "crop"):
        oy = torch.randint(0, 2 * pad + 1, (b,), generator=g)
        ox = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    if aug in ("crop_flip", "flip"):
        flip = torch.rand(b, generator=g) < 0.5
    perm = None if pairing == "flip" else torch.randperm(b, generator=g)
    lam = {"float": 0.3, "0-d": torch.tensor(0.7), "rows": torch.rand(b, generator=g)}[lam_kind]
    rows = torch.stack([torch.randint(0, h, (b,), generator=g), torch.randint(0, h + 1, (b,), generator=g),
                        torch.randint(0, w, (b,), generator=g), torch.randint(0, w + 1, (b,), generator=g)],
                       1)
    one = torch.tensor([0, h // 2, 1, w - 1], dtype=torch.int32)
    box = {None: None, "ints": (1, h - 1, 2, w), "tensor": one, "rows": rows.int()}[box_kind]
    target = torch.randint(0, 7, (b,), generator=g)
    move = (lambda t: t.to(device) if isinstance(t, torch.Tensor) else t)
    return dict(data=move(data), idx=move(idx), oy=move(oy), ox=move(ox), flip=move(flip), pad=pad,
                perm=move(perm), lam=move(lam), box=move(box), target=move(target))


def _launch(case, out_dtype, layout, smoothing=0.1, k=7, lam_y=None):
    data = case["data"]
    b = case["idx"].shape[0]
    c, h, w = data.shape[1:]
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    out = torch.full((b, c, h, w), float("nan"), dtype=out_dtype, device=data.device)
    out = out.contiguous(memory_format=fmt)
    soft = torch.full((b, k), float("nan"), device=data.device)
    mean = torch.tensor(MEAN[:c], device=data.device)
    std = torch.tensor(STD[:c], device=data.device)
    lam_y = case["lam"] if lam_y is None else lam_y
    augment_mix_launch(data, case["idx"], case["oy"], case["ox"], case["flip"], out, case["target"], soft,
                       pad=case["pad"], perm=case["perm"], lam_x=case["lam"], lam_y=lam_y, box=case["box"],
                       mean=mean, std=std, in_scale=1.0 / 255.0, label_off=smoothing / k,
                       label_keep=1.0 - smoothing)
    return out, soft


def _ref(case, smoothing=0.1, k=7):
    cpu = {key: (v.cpu() if isinstance(v, torch.Tensor) else v) for key, v in case.items()}
    return reference(cpu["data"], cpu["idx"], cpu["oy"], cpu["ox"], cpu["flip"], cpu["pad"], cpu["perm"],
                     cpu["lam"], cpu["lam"], cpu["box"], MEAN, STD, cpu["target"], k, smoothing)


SHAPES = [((1, 3, 5, 7), 3, 2), ((2, 1, 8, 8), 5, 4), ((5, 3, 6, 9), 4, 1), ((7, 4, 11, 5), 9, 3),
          ((4, 5, 7, 7), 6, 2), ((3, 3, 32, 32), 4, 4)]
OPTIONS = list(itertools.product(("crop_flip", "flip", "crop", "none"), ("flip", "perm"),
                                 ("float", "0-d", "rows"), (None, "ints", "tensor", "rows")))


@pytest.mark.parametrize("n", range(24))
def test_kernel_equals_reference_bit_for_bit_fp32(n, triton_device):
    """Every option switch (augment x pairing x λ kind x box kind) over shapes: odd/even/one-row batches,
    1/3/4/5 channels, pads, NCHW and channels_last outputs; all in float32, compared exactly."""
    for j, (aug, pairing, lam_kind, box_kind) in enumerate(OPTIONS[n::24]):
        shape, n_data, pad = SHAPES[(n + j) % len(SHAPES)]
        case = _case(shape, n_data, pad, aug, pairing, lam_kind, box_kind, 100 * n + j, triton_device)
        layout = ("nchw", "channels_last")[(n + j) % 2]
        out, soft = _launch(case, torch.float32, layout)
        ref_out, ref_soft = _ref(case)
        what = f"{shape} pad={pad} {aug} {pairing} lam={lam_kind} box={box_kind} {layout}"
        assert not out.isnan().any() and not soft.isnan().any(), what  # every element written
        assert torch.equal(out.cpu(), ref_out), what
        assert torch.equal(soft.cpu(), ref_soft), what


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pairing", ["flip", "perm"])
def test_half_precision_outputs_are_the_rounded_reference(dtype, pairing, triton_device):
    case = _case((5, 3, 9, 10), 6, 2, "crop_flip", pairing, "rows", "rows", 7, triton_device)
    out, _ = _launch(case, dtype, "channels_last")
    ref_out, _ = _ref(case)
    assert out.dtype == dtype and not out.isnan().any()
    torch.testing.assert_close(out.cpu().float(), ref_out.to(dtype).float(), rtol=0, atol=0)


def test_lam_one_is_the_augmentation_alone_and_raw_values_are_exact(triton_device):
    """λ = 1 (ERM): the normalized crop/flip itself. With identity normalization (scale 1, mean 0, std 1) the
    output is the uint8 crop/flip exactly, on any device (no rounding involved): the indexing is bit-exact."""
    case = _case((6, 3, 8, 8), 5, 4, "crop_flip", "flip", "float", None, 3, triton_device)
    case["lam"] = 1.0
    out, _ = _launch(case, torch.float32, "nchw")
    cpu = {key: (v.cpu() if isinstance(v, torch.Tensor) else v) for key, v in case.items()}
    x = crop_flip(cpu["data"], cpu["idx"], cpu["oy"], cpu["ox"], cpu["flip"], cpu["pad"]).float()
    m = torch.tensor(MEAN[:3]).view(1, 3, 1, 1)
    sd = torch.tensor(STD[:3]).view(1, 3, 1, 1)
    assert torch.equal(out.cpu(), (x * (1.0 / 255.0) - m) / sd) or triton_device == "cuda"
    torch.testing.assert_close(out.cpu(), (x * (1.0 / 255.0) - m) / sd)
    raw = torch.full((6, 3, 8, 8), float("nan"), device=triton_device)
    one = torch.ones(3, device=triton_device)
    augment_mix_launch(case["data"], case["idx"], case["oy"], case["ox"], case["flip"], raw, None, None,
                       pad=4, perm=None, lam_x=1.0, lam_y=1.0, box=None, mean=one * 0, std=one,
                       in_scale=1.0, label_off=0.0, label_keep=1.0)
    assert torch.equal(raw.cpu(), x)


def test_bad_indices_and_partners_write_nan_rows_not_reads_outside(triton_device):
    case = _case((4, 3, 6, 6), 5, 2, "crop_flip", "perm", "float", None, 5, triton_device)
    case["idx"] = torch.tensor([0, 7, 1, 2], device=triton_device)  # 7: outside the 5-sample data set
    case["perm"] = torch.tensor([1, 0, 9, 2], device=triton_device)  # 9: outside the batch
    out, _ = _launch(case, torch.float32, "nchw")
    rows_nan = out.isnan().flatten(1).all(1).cpu().tolist()
    assert rows_nan == [True, True, True, False], rows_nan  # rows 0, 1 touch sample 7; row 2 partner 9


def test_cpu_twin_is_the_loader_batch_mixed(triton_device):
    """augment_mix on CPU (crop_flip, then ops.mix) equals the loader's batch (ImageTensors.__getitems__)
    mixed by Mixup.mix_batch, for the same streams; the kernel agrees with it to float32 rounding."""
    import mixrecipe

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (20, 3, 12, 12), dtype=torch.uint8, generator=g)
    ds = ImageTensors(images, torch.randint(0, 10, (20,), generator=g), "crop_flip", 3)
    indices = [4, 17, 0, 9, 9, 3, 11]
    mean, std = MEAN[:3], STD[:3]
    for mode, cut in (("batch", 0.0), ("elem", 0.0), ("batch", 1.0)):
        policy = mixrecipe.Mixup(mixup_alpha=1.0, cutmix_alpha=cut, mode=mode, pairing="random",
                                 num_classes=10, mean=list(mean), std=list(std), generator=torch.Generator())
        ds.reseed(1)
        policy.generator.manual_seed(2)
        x, y = ds.__getitems__(indices)
        expected = policy.mix_batch(x, y)
        ds.reseed(1)
        policy.generator.manual_seed(2)
        oy, ox, flip = ds.draw(len(indices))
        p = policy.sample((len(indices), 3, 12, 12))
        idx = torch.tensor(indices)
        got, _ = augment_mix(images, idx, oy=oy, ox=ox, flip=flip, pad=3, lam_x=p.lam_x, lam_y=p.lam_y,
                             perm=p.perm, box=p.box, mean=mean, std=std)
        assert torch.equal(got, expected.x), (mode, cut)
        dev = {k: v.to(triton_device) if isinstance(v, torch.Tensor) else v
               for k, v in dict(oy=oy, ox=ox, flip=flip, lam_x=p.lam_x, lam_y=p.lam_y, perm=p.perm,
                                box=p.box).items()}
        if triton_device == "cpu":
            from mixrecipe.backend import cpu_backend

            with cpu_backend("triton"):
                fused, _ = augment_mix(images, idx, pad=3, mean=mean, std=std, **dev)
        else:
            fused, _ = augment_mix(images.cuda(), idx.cuda(), pad=3, mean=mean, std=std, **dev)
        torch.testing.assert_close(fused.cpu(), expected.x, rtol=1e-6, atol=1e-6)


def test_bad_arguments_are_named():
    data = torch.zeros(4, 3, 5, 5, dtype=torch.uint8)
    idx = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="data"):
        augment_mix(data.float(), idx)
    with pytest.raises(ValueError, match="idx"):
        augment_mix(data, idx.int())
    with pytest.raises(ValueError, match="oy and ox"):
        augment_mix(data, idx, oy=idx)
    with pytest.raises(ValueError, match="flip"):
        augment_mix(data, idx, flip=torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="out_dtype"):
        augment_mix(data, idx, out_dtype=torch.uint8)
    with pytest.raises(ValueError, match="mean"):
        from mixrecipe.backend import cpu_backend

        with cpu_backend("triton"):
            augment_mix(data, idx, mean=(0.1, 0.2), std=(0.3, 0.3))


def test_every_augment_launch_compiles_for_sm80_and_sm90(tmp_path):
    """The engine's launches (CIFAR and odd shapes, every dtype, pairing, λ kind, box kind, crop/flip
    switches, NCHW and channels_last), planned for a GPU, compile for both targets."""
    descs = record_augment()
    assert {d["kernel"].split(":")[1] for d in descs} == {"_augment_mix_kernel"}
    switches = {k for d in descs for k, v in d["kwargs"].items() if v == {"const": True}}
    for name in ("PAIRED", "HAS_CROP", "HAS_FLIP", "HAS_TARGET", "NORM_SELECT"):
        assert name in switches, name
        assert any(d["kwargs"][name] == {"const": False} for d in descs), name
    kinds = {(k, v["int"]) for d in descs for k, v in d["kwargs"].items() if k.endswith("_KIND")}
    for name in ("LAMX_KIND", "BOX_KIND"):  # a number, one device value / four numbers, one per row
        assert {(name, 0), (name, 1), (name, 2)} <= kinds, (name, kinds)
    proc, results = compile_in_subprocess(descs, tmp_path)
    assert not compile_failures(proc, results), compile_failures(proc, results)
    assert {r["arch"] for r in results} == {80, 90}
