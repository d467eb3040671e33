"""The input pipeline alone, and the whole training loop against the model-only step.

    python bench/bench_input.py [--device cpu|cuda] [--quick] [--out DIR] [--threads N] [--images N]

Writes ``<out>/<device>-input.csv``, ``.md`` and (with matplotlib) ``.png``, each file whole or not at all.

Part 1, image folders (CPU, one core: ``torch.set_num_threads(1)``, no loader workers, so images/s is per
core): a folder of generated JPEGs (ImageNet-like sizes, 300-500 px a side, textured so they compress
like photos) in a temporary directory, read through :class:`mixrecipe.data.ImageFiles` exactly as a
loader worker reads them, with each decoder:

- ``pil``: PIL decodes, timm's transform augments (``data.decoder=pil``, the previous default);
- ``torchvision``: ``torchvision.io.decode_image`` to a uint8 tensor, v2 transforms on it (the default).

For the training transform (random-resized-crop 224 + flip, the imagenet recipe) and the evaluation one
(resize 256 + center-crop 224), plus decoding alone. The decoders are timmed interleaved: every round
reads the whole folder once with each, so background load hits them alike; images/s is the median round.

Part 2, in-memory data (the cifar10 recipe's pipeline, CIFAR-sized random images): the input pipeline
alone (a loader batch: gather + pad-4 crop + flip, to the device, normalize + mix: ``Mixup.mix_batch``),
and the whole loop (input pipeline + forward + loss + backward + SGD) against the model-only step on a
batch already on the device, mixup on. On CPU the recipe's PreAct ResNet-18 takes seconds a step, so the
loop rows there use a small model (``--loop-model``, default ``digits_cnn``); on CUDA the recipe's own.
``vs model-only`` is the share of the model-only step's images/s that a row keeps.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import time
from pathlib import Path

import common
import numpy as np
import torch

from mixrecipe.data import ImageFiles, ImageTensors, decode_file, keep_batch, tensor_transform

TARGET_RATIO = 1.8  # the goal for torchvision.io decode + augment vs PIL's images/s per core


# --------------------------------------------------------------------------------------------------
# Part 1: image folders.
# --------------------------------------------------------------------------------------------------
def write_jpegs(folder: Path, n: int, seed: int = 0) -> list[str]:
    """``n`` JPEGs (quality 90) of 300-500 px a side: smooth colour fields plus noise and edges, so they
    compress to tens of KB like photos (pure noise would not, flat colour would be unrealistically small)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = int(rng.integers(300, 501)), int(rng.integers(300, 501))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        img = np.empty((h, w, 3), np.float32)
        for c in range(3):
            fy, fx, ph = rng.uniform(0.005, 0.05, 2).tolist() + [rng.uniform(0, 6.28)]
            img[..., c] = 128 + 80 * np.sin(fy * yy + ph) * np.cos(fx * xx)
        img += rng.normal(0, 12, (h, w, 1))  # texture
        y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        img[y0:y0 + h // 3, x0:x0 + w // 3] = rng.uniform(0, 255, 3)  # an object with sharp edges
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        path = folder / f"img_{i:04d}.JPEG"
        path.write_bytes(buf.getvalue())
        paths.append(str(path))
    return paths


def _pil_decode(path: str):
    from PIL import Image

    with Image.open(path) as img:
        return torch.from_numpy(np.asarray(img.convert("RGB")).copy())


def folder_readers(paths: list[str], size: int = 224) -> dict[str, dict[str, object]]:
    """mode -> decoder -> a callable reading index i the way a loader worker does."""
    from timm.data import create_transform

    targets = torch.zeros(len(paths), dtype=torch.long)
    common_kw = dict(interpolation="bilinear", use_prefetcher=True)
    timm_train = create_transform(size, is_training=True, scale=(0.08, 1.0), hflip=0.5, color_jitter=None,
                                  **common_kw)
    timm_eval = create_transform(size, is_training=False, crop_pct=0.875, **common_kw)
    tv_train, tv_eval = tensor_transform(size, True), tensor_transform(size, False)
    ds = {
        ("train", "pil"): ImageFiles(paths, targets, timm_train, decoder="pil"),
        ("train", "torchvision"): ImageFiles(paths, targets, tv_train, decoder="torchvision"),
        ("eval", "pil"): ImageFiles(paths, targets, timm_eval, decoder="pil"),
        ("eval", "torchvision"): ImageFiles(paths, targets, tv_eval, decoder="torchvision"),
    }
    out: dict[str, dict[str, object]] = {"decode only": {"pil": lambda i: _pil_decode(paths[i]),
                                                         "torchvision": lambda i: decode_file(paths[i])}}
    for (mode, decoder), d in ds.items():
        out.setdefault(f"{mode} ({'rrc 224 + flip' if mode == 'train' else 'resize 256 + crop 224'})",
                       {})[decoder] = d.__getitem__
    return out


def bench_folder(args, device: torch.device, rows: list[dict]) -> None:
    n = 12 if args.quick else args.images
    rounds = 1 if args.quick else args.rounds
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core: what one loader worker gets
    try:
        with tempfile.TemporaryDirectory() as tmp:
            paths = write_jpegs(Path(tmp), n)
            mean_kb = sum(os.path.getsize(p) for p in paths) / len(paths) / 1024
            for mode, readers in folder_readers(paths, 64 if args.quick else 224).items():
                for fn in readers.values():  # warm-up: imports, first-call allocations
                    fn(0)
                times = {name: [] for name in readers}
                load0 = common.load1()
                for _ in range(rounds):
                    for name, fn in readers.items():
                        t0 = time.perf_counter()
                        for i in range(n):
                            fn(i)
                        times[name].append(time.perf_counter() - t0)
                load1 = common.load1()
                per_s = {name: n / float(np.median(t)) for name, t in times.items()}
                for name in readers:
                    rows.append({
                        "part": "image folder", "case": mode, "provider": name,
                        "shape": f"{n} JPEGs, {mean_kb:.0f} KB mean", "threads": 1,
                        "images_per_s": per_s[name],
                        "p20": n / float(np.quantile(times[name], 0.8)),
                        "p80": n / float(np.quantile(times[name], 0.2)),
                        "vs_pil": per_s[name] / per_s["pil"], "rounds": rounds,
                        "device": common.device_name(torch.device("cpu")), "load_before": load0,
                        "load_after": load1,
                    })
                print(f"{mode:34s} " + "  ".join(f"{k} {v:8.1f}/s" for k, v in per_s.items())
                      + f"  ratio {per_s['torchvision'] / per_s['pil']:.2f}", flush=True)
            _bench_device_decoder(args, device, paths, mean_kb, rows, pil_train=next(
                r["images_per_s"] for r in rows if r["case"].startswith("train") and r["provider"] == "pil"))
    finally:
        torch.set_num_threads(threads)


def _bench_device_decoder(args, device, paths, mean_kb, rows, pil_train: float) -> None:
    """data.decoder=device: file reads (what the workers do), then a batch's decode + crop/resize/flip on
    ``device`` (nvJPEG and one kernel on CUDA; on CPU libjpeg-turbo and the per-image twin, one thread)."""
    from mixrecipe.data import RandomResizedCropFlip, collate_encoded
    from mixrecipe.gpu_decode import DeviceDecoder

    size, batch = (64, 4) if args.quick else (224, 32)
    ds = ImageFiles(paths, torch.zeros(len(paths), dtype=torch.long), RandomResizedCropFlip(size),
                    encoded=True)
    decoder = DeviceDecoder(ds, device, torch.channels_last)
    groups = [list(range(i, min(i + batch, len(paths)))) for i in range(0, len(paths), batch)]

    def one_pass():
        for g in groups:
            decoder.batch(*collate_encoded([ds[i] for i in g]))
        common.sync(device)

    one_pass()  # warm-up: imports, the kernel's compilation, nvJPEG's handles
    times = []
    for _ in range(1 if args.quick else args.rounds):
        t0 = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - t0)
    n = len(paths)
    per_s = n / float(np.median(times))
    rows.append({
        "part": "image folder", "case": f"train (rrc {size} + flip), batches of {batch}",
        "provider": f"device decoder ({device.type})", "shape": f"{n} JPEGs, {mean_kb:.0f} KB mean",
        "threads": 1, "images_per_s": per_s, "p20": n / float(np.quantile(times, 0.8)),
        "p80": n / float(np.quantile(times, 0.2)), "vs_pil": per_s / pil_train, "rounds": len(times),
        "device": common.device_name(device),
    })
    print(f"{'train, data.decoder=device':34s} {device.type} {per_s:8.1f}/s  vs pil {per_s / pil_train:.2f}",
          flush=True)


# --------------------------------------------------------------------------------------------------
# Part 2: in-memory data, the cifar10 recipe's pipeline.
# --------------------------------------------------------------------------------------------------
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def _loop_parts(device: torch.device, model_name: str, n_images: int, batch: int, quick: bool):
    import mixrecipe
    from mixrecipe.models import create_model

    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n_images, 3, 32, 32), dtype=torch.uint8, generator=gen)
    targets = torch.randint(0, 10, (n_images,), generator=gen)
    ds = ImageTensors(images, targets, "crop_flip", 4)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True,
                                         collate_fn=keep_batch, pin_memory=device.type == "cuda",
                                         generator=torch.Generator().manual_seed(0))
    cuda = device.type == "cuda"
    in_dtype = torch.bfloat16 if cuda else torch.float32
    mixup = mixrecipe.Mixup(mixup_alpha=1.0, pairing="random", label_smoothing=0.0, num_classes=10,
                            mean=list(CIFAR_MEAN), std=list(CIFAR_STD), out_dtype=in_dtype,
                            generator=torch.Generator().manual_seed(0))  # the draws are the host's
    model = create_model(model_name, 10, 3, False, img_size=32).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    return loader, mixup, model, opt, in_dtype


def bench_memory(args, device: torch.device, rows: list[dict]) -> None:
    from mixrecipe.loss import mixup_cross_entropy

    cuda = device.type == "cuda"
    batch = 16 if args.quick else 128
    n_images = batch * (3 if args.quick else args.batches)
    model_name = args.loop_model or ("preact_resnet18" if cuda else "digits_cnn")
    loader, mixup, model, opt, in_dtype = _loop_parts(device, model_name, n_images, batch, args.quick)
    cl = torch.channels_last if cuda else torch.contiguous_format
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def to_device(x, y):
        x = x.to(device, non_blocking=True).contiguous(memory_format=cl)
        return x, y.to(device, non_blocking=True)

    def step(x, y, lam, perm):
        with autocast:
            logits = model(x)
        loss = mixup_cross_entropy(logits.float(), y, lam, perm)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    def input_only():
        n = 0
        for x, y in loader:
            x, y = to_device(x, y)
            mixup.mix_batch(x, y)
            n += x.shape[0]
        common.sync(device)
        return n

    def whole_loop():
        n = 0
        for x, y in loader:
            x, y = to_device(x, y)
            mb = mixup.mix_batch(x, y)
            step(mb.x, y, mb.lam, mb.perm)
            n += x.shape[0]
        common.sync(device)
        return n

    fixed_x, fixed_y = to_device(*next(iter(loader)))
    fixed = mixup.mix_batch(fixed_x, fixed_y)
    steps = len(loader)

    def model_only():
        for _ in range(steps):
            step(fixed.x, fixed_y, fixed.lam, fixed.perm)
        common.sync(device)
        return steps * batch

    # The device path (data.on_device): the training set on the device, each batch its indices and one
    # fused crop/flip/normalize/mix pass (on CPU its twin: the same gather, then the op).
    from mixrecipe.gpu_data import DeviceImages

    device_ds = ImageTensors(loader.dataset.images, loader.dataset.targets, "crop_flip", 4)
    resident = DeviceImages(device_ds, device, cl)
    sampler = loader.batch_sampler

    def device_batches():
        for idx in sampler:
            yield resident.batch(idx, mixup=mixup, mean=CIFAR_MEAN, std=CIFAR_STD, out_dtype=in_dtype)

    def device_input_only():
        n = sum(x.shape[0] for x, *_ in device_batches())
        common.sync(device)
        return n

    def device_whole_loop():
        n = 0
        for x, y, lam, perm, _ in device_batches():
            step(x, y, lam, perm)
            n += x.shape[0]
        common.sync(device)
        return n

    cases = {"input pipeline alone (gather, crop, flip, H2D, normalize + mix)": input_only,
             f"whole loop ({model_name}, mixup on)": whole_loop,
             f"model-only step ({model_name}, batch on the device)": model_only,
             "device path: input pipeline alone (one fused kernel per batch)": device_input_only,
             f"device path: whole loop ({model_name}, mixup on)": device_whole_loop}
    rounds = 1 if args.quick else max(2, args.rounds // 2)
    for fn in cases.values():
        fn()  # warm-up (cudnn.benchmark, Triton compiles, allocator)
    times = {name: [] for name in cases}
    load0 = common.load1()
    for _ in range(rounds):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            n = fn()
            times[name].append((time.perf_counter() - t0, n))
    load1 = common.load1()
    rate = {name: float(np.median([n / t for t, n in ts])) for name, ts in times.items()}
    model_rate = rate[next(k for k in cases if k.startswith("model-only"))]
    for name in cases:
        rows.append({
            "part": "in memory (cifar10 recipe)", "case": name.removeprefix("device path: "),
            "provider": "device path" if name.startswith("device path") else "workers path",
            "shape": f"{n_images} x 3x32x32 uint8, batch {batch}", "threads": torch.get_num_threads(),
            "images_per_s": rate[name], "vs_model_only": rate[name] / model_rate, "rounds": rounds,
            "device": common.device_name(device), "load_before": load0, "load_after": load1,
        })
        print(f"{name:60s} {rate[name]:10.1f} img/s  {rate[name] / model_rate:.2f} of model-only", flush=True)


# --------------------------------------------------------------------------------------------------
# Results.
# --------------------------------------------------------------------------------------------------
def _plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    folder = [r for r in rows if r["part"] == "image folder"]
    cases = list(dict.fromkeys(r["case"] for r in folder))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    providers = list(dict.fromkeys(r["provider"] for r in folder))
    width = 0.8 / len(providers)
    for k, provider in enumerate(providers):
        vals = [next((r["images_per_s"] for r in folder if r["case"] == c and r["provider"] == provider), 0.0)
                for c in cases]
        ax.barh([i + (k - (len(providers) - 1) / 2) * width for i in range(len(cases))], vals, height=width,
                label=provider)
    ax.set_yticks(range(len(cases)), cases)
    ax.invert_yaxis()
    ax.set_xlabel("images/s on one core")
    ax.set_title(f"Image-folder input pipeline, {folder[0]['device'].split(' (')[0]}", fontsize=9)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=len(providers), fontsize=8, frameon=False)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def write_results(rows: list[dict], args, device: torch.device) -> None:
    out = common.stem(args, device, "input")
    train = {r["provider"]: r["images_per_s"] for r in rows
             if r["part"] == "image folder" and r["case"].startswith("train")}
    lines = [f"# Input pipeline benchmark ({device.type})", "", f"`{common.command_line()}`", "",
             common.environment(device), "",
             "Image folders: one core (torch.set_num_threads(1), no loader workers): images/s of "
             "`ImageFiles.__getitem__` as a loader worker calls it, decoders timed interleaved "
             "(median round). The device decoder row (`data.decoder=device`): the workers' file reads, "
             "then each batch of 32 decoded, cropped, resized and flipped on the bench's device "
             "(CUDA: nvJPEG and one kernel; CPU: libjpeg-turbo and the per-image twin on one thread). "
             "In memory: the cifar10 recipe's pipeline on CIFAR-sized random images, mixup alpha 1 "
             "with a random permutation.", "", common.load_note(rows), ""]
    if train:
        ratio = train["torchvision"] / train["pil"]
        lines += ["## Target", "",
                  f"- image-folder decode + augment (train transform), torchvision.io vs PIL, per core: "
                  f"{ratio:.2f}x (target >= {TARGET_RATIO}x) -> "
                  f"{'met' if ratio >= TARGET_RATIO else 'NOT met'}",
                  ""]
    lines += ["## Rows", "", common.markdown_table(rows, [
        ("part", "part"), ("case", "case"), ("provider", "provider"), ("shape", "data"),
        ("threads", "threads"),
        ("images_per_s", "images/s"), ("p20", "p20"), ("p80", "p80"), ("vs_pil", "vs pil"),
        ("vs_model_only", "vs model-only")]), ""]
    common.write_csv(rows, out.with_suffix(".csv"))
    tmp = out.with_name(out.name + ".md.tmp")
    common.write_text("\n".join(lines), tmp)
    os.replace(tmp, out.with_suffix(".md"))
    if any(r["part"] == "image folder" for r in rows) and _plot(rows, out.with_suffix(".png")):
        print(f"wrote {out.with_suffix('.png')}")
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.md')}")


def main(argv=None) -> None:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=120, help="JPEGs in the generated folder (default 120)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds per case (default 7)")
    p.add_argument("--batches", type=int, default=40, help="in memory: batches of 128 per pass (default 40)")
    p.add_argument("--loop-model", default=None,
                   help="model of the loop rows (default: preact_resnet18 on CUDA, digits_cnn on CPU)")
    p.add_argument("--parts", default="folder,memory", help="comma-separated: folder, memory")
    args = p.parse_args(argv)
    device = common.setup(args)
    parts = set(args.parts.split(","))
    rows: list[dict] = []
    if "folder" in parts:
        bench_folder(args, device, rows)
    if "memory" in parts:
        bench_memory(args, device, rows)
    write_results(rows, args, device)


if __name__ == "__main__":
    sys.exit(main())
