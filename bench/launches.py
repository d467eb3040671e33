"""The launches the public API makes, recorded as a GPU would compile them (no GPU needed).

``record_public_api`` drives ``mix``, ``mixup``, ``cutmix``, ``mixup_target``, ``Mixup`` and
``mixup_cross_entropy`` (forward and backward) over their option space inside
``record_launches(as_gpu=True)``: the launchers pick a GPU's block sizes, warps and switches, and nothing
runs. ``main_paths`` records the launches a training loop makes at ImageNet size. Used by
tests/test_gpu_compile.py and bench/ptx_report.py.

Recording routes CPU tensors to the Triton launchers, which needs Triton's interpreter in the process. Where
this process has none (a GPU machine, or ``TRITON_INTERPRET=0``), both functions record in a child process
with ``TRITON_INTERPRET=1`` and return what it recorded.
"""

import contextlib
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import mixrecipe
from mixrecipe.backend import cpu_backend
from mixrecipe.kernels import interpreting
from mixrecipe.kernels._common import record_launches
from mixrecipe.kernels.aot import describe

__all__ = ["kernels_planned_for_gpu", "record_public_api", "record_augment", "record_resize", "main_paths",
           "IMAGE_PATHS", "compile_in_subprocess", "compile_failures"]

IMAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (B, C, H, W): odd and tiny (one small block), CIFAR (one block a sample), above 8192 elements (big blocks).
SHAPES = ((5, 3, 7, 5), (4, 3, 32, 32), (3, 3, 48, 64))
NUM_CLASSES = 10


@contextlib.contextmanager
def kernels_planned_for_gpu():
    """Route CPU tensors to the Triton launchers and record what a GPU would compile, without running it."""
    with cpu_backend("triton"), record_launches(as_gpu=True) as recorder:
        yield recorder


def _images(shape, dtype, layout):
    if dtype == torch.uint8:
        x = torch.randint(0, 256, shape, dtype=torch.uint8)
    else:
        x = torch.rand(shape).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def _drive_ops(gen, full: bool = False):
    """mix() over its option space: every combination of the options that switch code paths in the kernel
    (pairing, λ kind, box, normalization, target kind), each with a dtype pair and a (shape, layout) cycled
    through all of them. ``full``: the whole product with every dtype pair, shape and layout too (about 8x
    the specializations; ``python bench/ptx_report.py --full`` compiles it)."""
    same = [(d, d) for d in IMAGE_DTYPES]
    in_out = same + [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)]
    in_out += [(torch.uint8, d) for d in IMAGE_DTYPES]
    geometries = list(itertools.product(SHAPES, ("nchw", "channels_last")))
    switches = itertools.product(("flip", "flip-inplace", "perm"), ("scalar", "per-sample"),
                                 (None, "tensor", "ints"), (False, True), (None, "index", "dense"))
    for i, (pairing, lam_kind, with_box, norm, target_kind) in enumerate(switches):
        dtype_pairs = same if pairing == "flip-inplace" else in_out
        cases = (itertools.product(dtype_pairs, geometries) if full else
                 [(dtype_pairs[i % len(dtype_pairs)], geometries[i % len(geometries)])])
        for (dt_in, dt_out), (shape, layout) in cases:
            b = shape[0]
            x = _images(shape, dt_in, layout)
            lam = 0.3 if lam_kind == "scalar" else torch.rand(b, generator=gen)
            target = None
            if target_kind == "index":
                target = torch.randint(0, NUM_CLASSES, (b,), generator=gen)
            elif target_kind == "dense":
                target = torch.rand(b, NUM_CLASSES, generator=gen)
            # One box as a tensor, or as four ints (the kernel's scalar box, a host-drawn policy box).
            box = {None: None, "tensor": torch.tensor([1, 4, 2, 5]), "ints": (1, 4, 2, 5)}[with_box]
            mean, std = ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3)) if norm else (None, None)
            perm = torch.randperm(b, generator=gen) if pairing == "perm" else None
            mixrecipe.mix(x, target, lam, None if with_box else lam, perm, box, num_classes=NUM_CLASSES,
                          label_smoothing=0.1 if norm else 0.0, mean=mean, std=std, out_dtype=dt_out,
                          inplace=pairing == "flip-inplace")


def _drive_wrappers(gen):
    """The other public entry points, each with its own argument preparation."""
    x = torch.rand(6, 3, 16, 16)
    y = torch.randint(0, NUM_CLASSES, (6,), generator=gen)
    for lam, perm in itertools.product((0.7, torch.rand(6, generator=gen)), (None, torch.randperm(6))):
        mixrecipe.mixup(x, y, lam, perm, num_classes=NUM_CLASSES)
        mixrecipe.mixup_target(y, NUM_CLASSES, lam, perm, label_smoothing=0.1)
        mixrecipe.mixup_target(torch.rand(6, NUM_CLASSES), None, lam, perm)
    for per_sample, dtype in itertools.product((False, True), (torch.float32, torch.bfloat16, torch.uint8)):
        mixrecipe.cutmix(_images((6, 3, 16, 16), dtype, "nchw"), y, per_sample=per_sample,
                         num_classes=NUM_CLASSES, generator=gen,
                         out_dtype=torch.float32 if dtype == torch.uint8 else None)
    alphas = ((1.0, 0.0), (0.0, 1.0), (0.8, 1.0))  # mixup only, CutMix only, both
    for mode, pairing, (mix_a, cut_a), multi in itertools.product(
            ("batch", "pair", "elem"), ("flip", "random"), alphas, (False, True)):
        policy = mixrecipe.Mixup(mixup_alpha=mix_a, cutmix_alpha=cut_a, mode=mode, pairing=pairing,
                                 num_classes=NUM_CLASSES, multi_label=multi, generator=gen)
        target = torch.rand(6, NUM_CLASSES, generator=gen) if multi else y
        policy(torch.rand(6, 3, 16, 16), target)
    for channels in (1, 5):  # normalization selects among up to 4 channel values, gathers beyond
        mixrecipe.mixup(_images((2, channels, 8, 8), torch.uint8, "nchw"), None, 0.5, mean=[0.5] * channels,
                        std=[0.25] * channels, out_dtype=torch.bfloat16)
    # torchvision v2 drop-ins: roll(1, 0) pairing, one box or one per sample, timm's flip pairing in place.
    from mixrecipe.transforms import CutMix, MixUp

    for cls, per_sample, pairing, dtype in itertools.product(
            (MixUp, CutMix), (False, True), ("roll", "flip"), (torch.float32, torch.bfloat16)):
        kwargs = {"pairing": pairing, "inplace": True} if pairing == "flip" else {}
        cls(num_classes=NUM_CLASSES, per_sample=per_sample, label_smoothing=0.1, **kwargs)(
            torch.rand(6, 3, 16, 16).to(dtype), y)
    # A weight held on the device as one value (a 0-d CUDA tensor; a CPU one is read as a number), launched
    # directly: what ops.mix passes the kernel for it.
    from mixrecipe.kernels import mix_launch

    for lam_x, lam_y in ((torch.tensor(0.3), torch.tensor(0.6)), (torch.tensor(0.3), 0.6)):
        x4 = torch.rand(4, 3, 8, 8)
        mix_launch(x4, x4, y[:4], torch.empty(4, NUM_CLASSES), batch_size=4, perm=None, lam_x=lam_x,
                   lam_y=lam_y, box=None, mean=None, std=None, in_scale=1.0, label_off=0.0, label_keep=1.0)


def _drive_loss(gen):
    """mixup_cross_entropy forward and backward: logit dtypes, pairings, smoothing, K below/above a block."""
    for dtype, k, perm_kind, smoothing, lam_kind in itertools.product(
            IMAGE_DTYPES, (10, 1000, 5000), ("flip", "perm"), (0.0, 0.1), ("scalar", "per-sample")):
        b = 5
        logits = torch.randn(b, k, generator=gen).to(dtype).requires_grad_()
        target = torch.randint(0, k, (b,), generator=gen)
        perm = torch.randperm(b, generator=gen) if perm_kind == "perm" else None
        lam = 0.4 if lam_kind == "scalar" else torch.rand(b, generator=gen)
        mixrecipe.mixup_cross_entropy(logits, target, lam, perm, label_smoothing=smoothing).backward()


def record_resize() -> list[dict]:
    """Descriptions of the launches ``mixrecipe.gpu_decode.resize_crops`` makes (data.decoder=device: a batch
    of random-resized crops), planned for a GPU: ImageNet's 224 and a small odd size, NCHW and channels_last
    output, one image and several. Compiled for sm_80/sm_90 by tests/test_resize.py."""
    if not interpreting():
        return _in_interpreter("record_resize")
    from mixrecipe.gpu_decode import resize_crops

    gen = torch.Generator().manual_seed(0)
    with kernels_planned_for_gpu() as recorder:
        for size, n, cl in ((224, 3, True), (224, 1, False), (13, 4, False), (13, 2, True)):
            images = [torch.randint(0, 256, (3, 40 + 7 * k, 50 + 3 * k), dtype=torch.uint8, generator=gen)
                      for k in range(n)]
            boxes = [(1, 2, img.shape[1] - 3, img.shape[2] - 4) for img in images]
            resize_crops(images, boxes, [k % 2 == 0 for k in range(n)], size,
                         torch.channels_last if cl else torch.contiguous_format)
    return describe(recorder.launches)


def compile_in_subprocess(descs: list[dict], folder: Path, *extra: str):
    """``python -m mixrecipe.kernels.aot`` on ``descs`` in a child process WITHOUT TRITON_INTERPRET (the
    real compiler), ``extra`` its options. Returns (the finished process, its per-specialization results;
    [] when it failed before writing them)."""
    launches = Path(folder) / "launches.json"
    launches.write_text(json.dumps(descs))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "mixrecipe.kernels.aot", str(launches),
                           "--out", str(Path(folder) / "results.json"), *extra],
                          capture_output=True, text=True, env=env, timeout=900)
    results = json.loads((Path(folder) / "results.json").read_text()) if proc.returncode in (0, 1) else []
    return proc, results


def compile_failures(proc, results: list[dict]) -> str:
    """What to say when :func:`compile_in_subprocess` did not compile everything ("" when it did)."""
    failed = [f"sm_{r['arch']} {r['label']}: {r['error']}" for r in results if not r["ok"]]
    if proc.returncode == 0 and results and not failed:
        return ""
    return (f"{len(failed)} of {len(results)} specializations do not compile:\n" + "\n".join(failed[:20])
            + f"\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def _in_interpreter(name: str, *args):
    """``name(*args)`` of this module, run in a child process under Triton's interpreter (JSON results)."""
    code = ("import json, sys\n"
            f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
            "import launches\n"
            f"print(json.dumps(launches.{name}(*{args!r})))\n")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"recording {name} under TRITON_INTERPRET=1 failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def record_public_api(full: bool = False) -> list[dict]:
    """Descriptions of every launch the public API makes over its option space, planned for a GPU."""
    if not interpreting():
        return _in_interpreter("record_public_api", full)
    gen = torch.Generator().manual_seed(0)
    with kernels_planned_for_gpu() as recorder:
        _drive_ops(gen, full)
        _drive_wrappers(gen)
        _drive_loss(gen)
    return describe(recorder.launches)


def record_augment() -> list[dict]:
    """Descriptions of the launches ``mixrecipe.gpu_data.augment_mix`` makes (the device-resident data sets'
    fused crop/flip + normalize + mix kernel), planned for a GPU: the switches that change its code (pairing,
    λ kind, box kind, crop, flip, labels, channel count) each cycled through dtypes, shapes and layouts.
    Compiled for sm_80/sm_90 by tests/test_augment.py."""
    if not interpreting():
        return _in_interpreter("record_augment")
    from mixrecipe.gpu_data import augment_mix

    gen = torch.Generator().manual_seed(0)
    shapes = ((5, 3, 7, 5), (4, 3, 32, 32), (3, 1, 28, 28), (2, 5, 48, 64))  # odd, CIFAR, MNIST, C > 4
    # (pairing, lam kind, box kind, augment, labels, out dtype, channels_last): every value of every switch
    # at least once, the cifar10 recipe's launches (perm, 0-d λ, crop_flip, bf16 channels_last; ERM) first.
    cases = (("perm", "0-d", None, "crop_flip", False, torch.bfloat16, True),
             ("flip", "float", None, "crop_flip", False, torch.bfloat16, True),
             ("perm", "0-d", "tensor", "crop_flip", False, torch.float32, False),
             ("flip", "rows", "rows", "flip", True, torch.float16, False),
             ("perm", "rows", "ints", "none", True, torch.float32, True),
             ("flip", "0-d", "ints", "crop_flip", True, torch.bfloat16, False),
             ("perm", "float", "rows", "flip", False, torch.float16, True),
             ("flip", "float", "tensor", "none", True, torch.float32, False))
    with kernels_planned_for_gpu() as recorder:
        for i, (pairing, lam_kind, box_kind, aug, labels, dtype, cl) in enumerate(cases):
            b, c, h, w = shapes[i % len(shapes)]
            data = torch.randint(0, 256, (2 * b, c, h, w), dtype=torch.uint8, generator=gen)
            idx = torch.randint(0, 2 * b, (b,), generator=gen)
            oy = ox = flip = None
            if aug == "crop_flip":
                oy, ox = torch.randint(0, 9, (b,), generator=gen), torch.randint(0, 9, (b,), generator=gen)
            if aug != "none":
                flip = torch.rand(b, generator=gen) < 0.5
            lam = {"float": 0.4, "0-d": torch.tensor(0.4), "rows": torch.rand(b, generator=gen)}[lam_kind]
            box = {None: None, "ints": (1, 4, 2, 5), "tensor": torch.tensor([1, 4, 2, 5], dtype=torch.int32),
                   "rows": torch.tensor([[1, 4, 2, 5]] * b, dtype=torch.int32)}[box_kind]
            augment_mix(data, idx, oy=oy, ox=ox, flip=flip, pad=4, lam_x=lam,
                        perm=torch.randperm(b, generator=gen) if pairing == "perm" else None, box=box,
                        target=torch.randint(0, NUM_CLASSES, (b,), generator=gen) if labels else None,
                        num_classes=NUM_CLASSES, label_smoothing=0.1 if labels else 0.0,
                        mean=[0.5] * c, std=[0.25] * c, out_dtype=dtype,
                        memory_format=torch.channels_last if cl else torch.contiguous_format)
    return describe(recorder.launches)


# The image paths whose compiled code must be 128-bit wide without spills (tests/test_gpu_compile.py).
IMAGE_PATHS = ("fp32 in-place flip", "bf16 in-place flip", "uint8 -> bf16 normalized", "fp32 CutMix box")


def main_paths() -> dict[str, list[dict]]:
    """The launches a training loop makes, at ImageNet size: name -> descriptions (the loss has two)."""
    if not interpreting():
        return _in_interpreter("main_paths")
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 224, 224, generator=gen)
    y = torch.randint(0, 1000, (4,), generator=gen)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    logits = torch.randn(256, 1000, generator=gen).bfloat16().requires_grad_()
    target = torch.randint(0, 1000, (256,), generator=gen)
    x8 = (x * 255).to(torch.uint8)
    calls = {
        "fp32 in-place flip": lambda: mixrecipe.mixup(x, y, 0.7, num_classes=1000, inplace=True),
        "bf16 in-place flip": lambda: mixrecipe.mixup(x.bfloat16(), y, 0.7, num_classes=1000, inplace=True),
        "fp16 in-place flip": lambda: mixrecipe.mixup(x.half(), y, 0.7, num_classes=1000, inplace=True),
        "uint8 -> bf16 normalized": lambda: mixrecipe.mixup(x8, y, 0.7, num_classes=1000, mean=mean, std=std,
                                                            out_dtype=torch.bfloat16),
        "fp32 CutMix box": lambda: mixrecipe.mix(x, y, 1.0, 0.6, None, torch.tensor([10, 100, 20, 90]),
                                                 num_classes=1000, inplace=True),
        "fp32 random perm, per-sample lam": lambda: mixrecipe.mixup(
            x, y, torch.rand(4, generator=gen), torch.tensor([2, 0, 3, 1]), num_classes=1000),
        "mixup_cross_entropy bf16 (256, 1000)": lambda: mixrecipe.mixup_cross_entropy(
            logits, target, 0.7, label_smoothing=0.1).backward(),
    }
    out = {}
    for name, call in calls.items():
        with kernels_planned_for_gpu() as recorder:
            call()
        out[name] = describe(recorder.launches)
    return out
