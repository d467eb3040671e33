"""The recipe runner: ``python -m mixrecipe.train [RECIPE.yaml] [key=value ...]``.

One epoch is: shuffle (a DistributedSampler, also with one process), uint8 batches to the device, one fused
pass that normalizes and mixes them (``mixrecipe.Mixup`` with mean/std), forward (bf16 autocast and
channels_last on CUDA), ``mixup_cross_entropy`` against the two labels, backward, step; the learning rate
is updated every step. Then top-1/top-5 on the validation set, reduced across ranks, and on rank 0 a line
in ``metrics.jsonl``, ``curves.png`` and an atomic checkpoint (``last.pt``, and ``best.pt``).

Reproducible resume: every random stream (shuffling, augmentation, mixup, dropout) is re-seeded from
(seed, epoch, rank) at the start of each epoch, and a checkpoint is written at each epoch's end, so a run
killed at any point and resumed with ``resume=true`` ends with the same metrics as one never interrupted
(on CPU, with the same number of threads and processes).

Launched with ``torchrun`` it trains with DistributedDataParallel (nccl on GPU, gloo on CPU): each rank
mixes its own batches, metrics are summed across ranks, only rank 0 writes files.

Programmatic use: ``main(["recipes/cifar10.yaml", "epochs=1"])`` or ``run(load_config(...))`` return the
final metrics as a dict; :func:`main` turns :class:`RecipeError` into exit status 2.
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import signal
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from .config import (
    Config,
    RecipeError,
    config_to_dict,
    format_help,
    load_config,
    save_config,
)
from .data import DataBundle, ImageTensors, build_data, keep_batch, normalize_batch

__all__ = [
    "main",
    "run",
    "fit",
    "resolve_recipe",
    "save_checkpoint",
    "load_checkpoint",
    "append_metrics",
    "write_metrics",
    "write_summary",
    "write_preview",
    "write_reliability",
    "test_from_val",
    "build_mixup",
    "create_schedule",
]

CHECKPOINT_VERSION = 1
ECE_BINS = 15  # equal-width confidence bins of val_ece / test_ece and reliability.png
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


# ----------------------------------------------------------------------------------------------------
# Run outputs, shared by every engine


def save_checkpoint(state: dict, path: str) -> None:
    """torch.save to a temporary file, then rename: a kill mid-write never leaves a torn checkpoint."""
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors and plain data only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def restore_checkpoint(path: str, model, optimizer, scheduler) -> tuple[int, list[dict], float]:
    """Load a checkpoint into the training objects; -> (epochs done, metrics history, best val top-1)."""
    state = load_checkpoint(path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    return state["epoch"], list(state["history"]), state.get("best_top1", -math.inf)


def append_metrics(path: str, record: dict) -> None:
    """Add one epoch's record to metrics.jsonl."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def write_metrics(path: str, history: list[dict]) -> None:
    """Rewrite metrics.jsonl from the checkpoint's history (on resume: drops lines of a lost epoch)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        for record in history:
            fh.write(json.dumps(record) + "\n")
    os.replace(tmp, path)


def write_summary(path: str, summary: dict) -> None:
    """Write the final metrics (summary.json)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------
# Building blocks


def build_mixup(cfg: Config, num_classes: int, *, mean=None, std=None, out_dtype=None, generator=None):
    """The ``mixrecipe.Mixup`` of a config, or None for ERM (mixup.alpha = cutmix_alpha = 0)."""
    from .mixup import Mixup

    m = cfg.mixup
    if m.alpha == 0 and m.cutmix_alpha == 0 and m.cutmix_minmax is None:
        return None
    try:
        return Mixup(
            mixup_alpha=m.alpha, cutmix_alpha=m.cutmix_alpha, cutmix_minmax=m.cutmix_minmax, prob=m.prob,
            switch_prob=m.switch_prob, mode=m.mode, correct_lam=m.correct_lam,
            label_smoothing=m.label_smoothing, num_classes=num_classes, pairing=m.pairing,
            generator=generator, mean=None if mean is None else list(mean),
            std=None if std is None else list(std), out_dtype=out_dtype,
        )
    except ValueError as exc:
        raise RecipeError(f"mixup: {exc}") from None


def create_schedule(optimizer, cfg: Config, steps_per_epoch: int):
    """A timm scheduler updated every step (``step_update(step)``), or None for a constant lr.

    ``multistep`` milestones are epochs from which the lr is decayed (the paper's "divide by 10 at 30, 60,
    80"); timm's MultiStepLRScheduler applies milestone m at index m - 1, hence the +1 below.
    """
    from timm.scheduler import MultiStepLRScheduler, create_scheduler_v2

    s = cfg.sched
    if s.name == "none":
        return None
    if s.name == "multistep":
        return MultiStepLRScheduler(
            optimizer, decay_t=[m * steps_per_epoch + 1 for m in s.milestones], decay_rate=s.decay_rate,
            warmup_t=s.warmup_epochs * steps_per_epoch, warmup_lr_init=s.warmup_lr, warmup_prefix=False,
            t_in_epochs=False,
        )
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=s.name, num_epochs=cfg.epochs, decay_epochs=s.decay_epochs, decay_rate=s.decay_rate,
        min_lr=s.min_lr, warmup_lr=s.warmup_lr, warmup_epochs=s.warmup_epochs, step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )
    return scheduler


def create_optimizer(model: nn.Module, cfg: Config, lr: float):
    """timm's ``create_optimizer_v2`` from the optim section."""
    from timm.optim import create_optimizer_v2

    o = cfg.optim
    kwargs = {} if o.eps is None else {"eps": o.eps}
    try:
        return create_optimizer_v2(model, opt=o.opt, lr=lr, weight_decay=o.weight_decay, momentum=o.momentum,
                                   filter_bias_and_bn=o.filter_bias_and_bn, **kwargs)
    except (AssertionError, ValueError, TypeError) as exc:
        raise RecipeError(f"optim.opt={o.opt}: {exc}") from None


def write_preview(path: str, bundle: DataBundle, cfg: Config, rows: int = 4, cols: int = 4) -> None:
    """mixup_preview.png: training images mixed as in training, titled with both labels and their weights.

    Each row is one separate draw on a batch of ``cols`` images, so a one-λ-per-batch recipe still shows
    ``rows`` different λ.
    """
    from .plots import plot_mixup_preview

    ds = bundle.train
    n = min(rows * cols, len(ds))
    if isinstance(ds, ImageTensors):
        x, y = ds.__getitems__(list(range(n)))
    else:
        items = [ds[i] for i in range(n)]
        x, y = torch.stack([it[0] for it in items]), torch.stack([torch.as_tensor(it[1]) for it in items])
    mixup = build_mixup(cfg, bundle.num_classes, out_dtype=torch.float32,
                        generator=torch.Generator().manual_seed(cfg.seed))
    if mixup is None:
        images, lam, partner = x.float() / 255.0, torch.ones(n), y
        title = "training images (mixup off: ERM)"
    else:
        images, lam, partner = [], [], []
        for start in range(0, n, cols):
            xb, yb = x[start:start + cols], y[start:start + cols]
            mb = mixup.mix_batch(xb, yb)
            images.append(mb.x)
            lam.append(mb.lam)
            partner.append(yb.flip(0) if mb.perm is None else yb[mb.perm])
        images, lam, partner = torch.cat(images), torch.cat(lam), torch.cat(partner)
        title = (f"mixup α={cfg.mixup.alpha:g}, {cfg.mixup.mode} mode, {cfg.mixup.pairing} pairing "
                 f"(one draw per row)")
    plot_mixup_preview(images, y, partner, lam, bundle.classes, path, title=title, cols=cols)


# ----------------------------------------------------------------------------------------------------
# Distributed plumbing


@dataclass
class _Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    enabled: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _setup_distributed(cfg: Config) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RecipeError("device=cuda, but no CUDA device is available (use device=auto or device=cpu)")
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return _Dist(rank, world, local, device, world > 1)


def _sum(values: list[float], d: _Dist, device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if d.enabled:
        dist.all_reduce(t)
    return t.tolist()


def _max(value: float, d: _Dist, device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1009 + rank) % (2**62)


def _reseed(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))


# ----------------------------------------------------------------------------------------------------
# Loops


@dataclass
class _Ctx:
    """What the loops need besides the model: device, dtypes, normalization, progress, test hook."""

    cfg: Config
    dist: _Dist
    mean: tuple
    std: tuple
    in_dtype: torch.dtype
    autocast: object
    channels_last: bool
    show_progress: bool
    steps_done: int = 0


def _to_device(x, y, ctx: _Ctx):
    x = x.to(ctx.dist.device, non_blocking=True)
    y = y.to(ctx.dist.device, non_blocking=True)
    if ctx.channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def _train_one_epoch(net, loader, optimizer, scheduler, mixup, ctx: _Ctx, epoch: int) -> dict:
    from tqdm import tqdm

    from .loss import mixup_cross_entropy

    cfg, steps = ctx.cfg, len(loader)
    net.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.dist.device)
    seen, lr = 0, optimizer.param_groups[0]["lr"]
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not ctx.show_progress,
               leave=False, dynamic_ncols=True)
    start = time.perf_counter()
    for i, (x, y) in enumerate(loader):
        if scheduler is not None:
            scheduler.step_update(epoch * steps + i)
        lr = optimizer.param_groups[0]["lr"]
        x, y = _to_device(x, y, ctx)
        if mixup is not None:
            mb = mixup.mix_batch(x, y)
            inputs, lam, perm, smoothing = mb.x, mb.lam, mb.perm, mb.label_smoothing
        else:  # ERM: the same fused op, at lam = 1
            inputs = normalize_batch(x, ctx.mean, ctx.std, ctx.in_dtype)
            lam, perm, smoothing = 1.0, None, cfg.mixup.label_smoothing
        with ctx.autocast:
            logits = net(inputs)
        loss = mixup_cross_entropy(logits.float(), y, lam, perm, label_smoothing=smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach().double() * y.shape[0]
        seen += y.shape[0]
        ctx.steps_done += 1
        if cfg._kill_after_steps and ctx.steps_done >= cfg._kill_after_steps:
            os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))  # a hard kill: no cleanup
        if ctx.show_progress and (i % 10 == 0 or i == steps - 1):
            rate = seen * ctx.dist.world / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{rate:,.0f}", refresh=False)
        bar.update(1)
    bar.close()
    seconds = _max(time.perf_counter() - start, ctx.dist, ctx.dist.device)
    total_loss, total_seen = _sum([loss_sum.item(), float(seen)], ctx.dist, ctx.dist.device)
    return {"train_loss": total_loss / max(total_seen, 1), "lr": lr,
            "images_per_s": total_seen / max(seconds, 1e-9)}


@torch.no_grad()
def _predict(model, loader, ctx: _Ctx):
    """Yield (float32 logits, targets) over this rank's shard, without augmentation or mixing."""
    model.eval()
    for x, y in loader:
        x, y = _to_device(x, y, ctx)
        with ctx.autocast:
            logits = model(normalize_batch(x, ctx.mean, ctx.std, ctx.in_dtype))
        yield logits.float(), y


def _evaluate(model, loader, ctx: _Ctx, prefix: str) -> dict:
    """Top-1, top-5 (%), cross-entropy, NLL and ECE (%), summed over ranks."""
    return _evaluate_bins(model, loader, ctx, prefix)[0]


def _evaluate_bins(model, loader, ctx: _Ctx, prefix: str) -> tuple[dict, torch.Tensor]:
    """:func:`_evaluate`'s metrics and the calibration bins behind the ECE (for reliability.png)."""
    from .metrics import calibration_bins, ece_from_bins

    sums = torch.zeros(4, dtype=torch.float64, device=ctx.dist.device)  # loss, top-1, top-5, count
    bins = torch.zeros(3, ECE_BINS, dtype=torch.float64, device=ctx.dist.device)
    for logits, y in _predict(model, loader, ctx):
        hit = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]
        sums += torch.stack([torch.nn.functional.cross_entropy(logits, y, reduction="sum").double(),
                             hit[:, 0].sum().double(), hit.any(dim=1).sum().double(),
                             torch.tensor(float(y.shape[0]), dtype=torch.float64, device=y.device)])
        bins += calibration_bins(logits.softmax(dim=1), y, ECE_BINS)
    totals = _sum(sums.tolist() + bins.flatten().tolist(), ctx.dist, ctx.dist.device)
    loss, c1, c5, n = totals[:4]
    bins = torch.tensor(totals[4:], dtype=torch.float64).view(3, ECE_BINS)
    n = max(n, 1.0)
    return ({f"{prefix}_loss": loss / n, f"{prefix}_top1": 100.0 * c1 / n, f"{prefix}_top5": 100.0 * c5 / n,
             f"{prefix}_nll": loss / n, f"{prefix}_ece": 100.0 * ece_from_bins(bins)}, bins)


def test_from_val(record: dict) -> dict:
    """An epoch's val_* metrics renamed test_* (the summary of a run validated on its test set)."""
    keys = ("val_loss", "val_top1", "val_top5", "val_nll", "val_ece")
    return {k.replace("val_", "test_"): record[k] for k in keys if k in record}


def write_reliability(path: str, bins, cfg: Config) -> None:
    """reliability.png: the final model's confidence against its accuracy on the test set (the validation set
    when ``data.val_size`` is 0, which is then the test set)."""
    from .plots import plot_reliability

    title = f"{cfg.model} on the {cfg.data.name} test set, " + (
        "ERM" if cfg.mixup.alpha == 0 and cfg.mixup.cutmix_alpha == 0 else f"mixup α={cfg.mixup.alpha:g}")
    plot_reliability(bins, path, title=title)


def count_memorization(batches) -> list[float]:
    """Over (logits, y) batches, y = (given label, true label): [n_noisy, fit_noisy, true_noisy, n_clean,
    fit_clean], where 'fit' means predicted as the given (training) label."""
    n_noisy = fit_noisy = true_noisy = n_clean = fit_clean = 0.0
    for logits, y in batches:
        pred = logits.argmax(dim=1)
        given, true = y[:, 0], y[:, 1]
        noisy = given != true
        n_noisy += noisy.sum().item()
        fit_noisy += (noisy & (pred == given)).sum().item()
        true_noisy += (noisy & (pred == true)).sum().item()
        n_clean += (~noisy).sum().item()
        fit_clean += (~noisy & (pred == given)).sum().item()
    return [n_noisy, fit_noisy, true_noisy, n_clean, fit_clean]


def memorization_percent(counts: list[float]) -> dict:
    n_noisy, fit_noisy, true_noisy, n_clean, fit_clean = counts
    return {"train_fit_noisy": 100.0 * fit_noisy / max(n_noisy, 1.0),
            "train_true_noisy": 100.0 * true_noisy / max(n_noisy, 1.0),
            "train_fit_clean": 100.0 * fit_clean / max(n_clean, 1.0)}


def _memorization(model, loader, ctx: _Ctx) -> dict:
    """On the un-augmented training set with label noise: how much of the noise the model has fitted.

    ``train_fit_noisy``: % of corrupted samples predicted as their corrupted (training) label;
    ``train_true_noisy``: % of them predicted as their true label; ``train_fit_clean``: % of clean samples
    predicted as their label.
    """
    counts = count_memorization(_predict(model, loader, ctx))
    return memorization_percent(_sum(counts, ctx.dist, ctx.dist.device))


def _eval_loader(ds, cfg: Config, d: _Dist):
    shard = list(range(d.rank, len(ds), d.world))  # no padding: every image counted exactly once
    tensors = isinstance(ds, ImageTensors)
    return DataLoader(ds, batch_size=cfg.batch_size * 2, sampler=shard,
                      collate_fn=keep_batch if tensors else None,
                      num_workers=0 if tensors else cfg.data.workers, pin_memory=d.device.type == "cuda")


def _train_loader(ds, cfg: Config, d: _Dist):
    sampler = DistributedSampler(ds, num_replicas=d.world, rank=d.rank, shuffle=True, seed=cfg.seed)
    tensors = isinstance(ds, ImageTensors)
    loader = DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler, drop_last=cfg.drop_last,
                        collate_fn=keep_batch if tensors else None,
                        num_workers=0 if tensors else cfg.data.workers, pin_memory=d.device.type == "cuda")
    return loader, sampler


# ----------------------------------------------------------------------------------------------------
# The run


def _check_output(cfg: Config) -> str | None:
    """The checkpoint to resume from, or None for a fresh run; refuses to clobber an unfinished run."""
    last = os.path.join(cfg.output, "last.pt")
    if not os.path.isfile(last):
        if cfg.resume:
            print(f"note: no checkpoint in {cfg.output}; starting a new run", file=sys.stderr)
        return None
    if cfg.resume:
        return last
    state = torch.load(last, map_location="cpu", weights_only=True, mmap=True)  # mmap: no tensor is read
    done, planned = state.get("epoch", 0), state.get("epochs", 0)
    if done < planned and not cfg.overwrite:
        raise RecipeError(
            f"{cfg.output} holds an unfinished run ({done}/{planned} epochs): pass resume=true to continue "
            "it, overwrite=true to start over, or output=DIR for a new run"
        )
    return None


def _fresh_output(out: str) -> None:
    for name in ("last.pt", "best.pt", "metrics.jsonl", "summary.json", "curves.png", "mixup_preview.png",
                 "reliability.png", "evaluation.json"):
        path = os.path.join(out, name)
        if os.path.exists(path):
            os.remove(path)


def _fmt(record: dict, epochs: int) -> str:
    parts = [f"epoch {record['epoch']}/{epochs}", f"train_loss {record['train_loss']:.4f}",
             f"val_loss {record['val_loss']:.4f}", f"val_top1 {record['val_top1']:.2f}%",
             f"val_top5 {record['val_top5']:.2f}%", f"val_ece {record['val_ece']:.2f}%"]
    if "train_fit_noisy" in record:
        parts.append(f"noisy fitted {record['train_fit_noisy']:.1f}%")
    parts += [f"lr {record['lr']:.3g}", f"{record['images_per_s']:,.0f} img/s", f"{record['seconds']:.1f}s"]
    return "  ".join(parts)


class _Holder:
    """Owns the (possibly DDP-wrapped) network so teardown can drop it before destroy_process_group."""

    net: nn.Module | None = None


def fit(cfg: Config) -> dict:
    """Train with the torch loop described in the module docstring; return the final metrics.

    Raises:
        RecipeError: bad settings or missing data (before any training step).
    """
    d = _setup_distributed(cfg)
    holder = _Holder()
    try:
        return _fit(cfg, d, holder)
    except BaseException as exc:
        traceback.clear_frames(exc.__traceback__)  # frames would keep the DDP module alive
        raise
    finally:
        # DDP must be gone before the process group, else gloo runs abort at exit now and then.
        holder.net = None
        gc.collect()
        if d.enabled and dist.is_initialized():
            dist.destroy_process_group()


class _Prepared(NamedTuple):
    out: str
    resume_from: str | None
    bundle: object
    model: nn.Module
    cuda: bool
    channels_last: bool
    global_batch: int
    lr: float
    optimizer: torch.optim.Optimizer
    train_loader: object
    train_sampler: object
    steps: int
    val_loader: object
    mem_loader: object
    scheduler: object
    start_epoch: int
    history: list
    best: float


def _prepare_run(cfg: Config, d: _Dist) -> _Prepared:
    """What every engine does before its first epoch: output directory, data, model, optimizer, loaders,
    schedule, and the state of a run being resumed."""
    from .models import create_model

    out = cfg.output
    resume_from = _check_output(cfg)
    bundle = build_data(cfg.data)
    if d.enabled:
        dist.barrier()  # every rank has looked at the output directory before rank 0 clears it
    if d.is_main:
        os.makedirs(out, exist_ok=True)
        if resume_from is None:
            _fresh_output(out)
        save_config(cfg, os.path.join(out, "config.yaml"))

    cuda = d.device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    _reseed(cfg.seed)  # the model init: the same on every rank and in every engine
    model = create_model(cfg.model, bundle.num_classes, bundle.in_chans, cfg.pretrained,
                         img_size=bundle.input_size[0])
    channels_last = cfg.channels_last if cfg.channels_last is not None else cuda
    model.to(d.device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    global_batch = cfg.batch_size * d.world
    lr = cfg.optim.lr
    if lr is None:  # the linear scaling rule (Goyal et al.), as the paper's ImageNet runs
        lr = cfg.optim.lr_base * global_batch / cfg.optim.lr_base_size
    optimizer = create_optimizer(model, cfg, lr)

    train_loader, train_sampler = _train_loader(bundle.train, cfg, d)
    steps = len(train_loader)
    if steps == 0:
        raise RecipeError(f"the training set ({len(bundle.train)} images) is smaller than one batch "
                          f"(batch_size={cfg.batch_size} x {d.world} processes): lower batch_size or "
                          "set drop_last=false")
    val_loader = _eval_loader(bundle.val, cfg, d)
    mem_loader = _eval_loader(bundle.train_eval, cfg, d) if bundle.train_eval is not None else None
    scheduler = create_schedule(optimizer, cfg, steps)

    start_epoch, history, best = 0, [], -math.inf
    if resume_from is not None:
        start_epoch, history, best = restore_checkpoint(resume_from, model, optimizer, scheduler)
        if d.is_main:
            print(f"resuming {out} after epoch {start_epoch}/{cfg.epochs}", file=sys.stderr)
    return _Prepared(out, resume_from, bundle, model, cuda, channels_last, global_batch, lr, optimizer,
                     train_loader, train_sampler, steps, val_loader, mem_loader, scheduler, start_epoch,
                     history, best)


def _fit(cfg: Config, d: _Dist, holder: _Holder) -> dict:
    (out, resume_from, bundle, model, cuda, channels_last, global_batch, lr, optimizer, train_loader,
     train_sampler, steps, val_loader, mem_loader, scheduler, start_epoch, history,
     best) = _prepare_run(cfg, d)
    if d.is_main:
        write_metrics(os.path.join(out, "metrics.jsonl"), history)

    amp = cuda and cfg.amp
    in_dtype = torch.bfloat16 if amp else torch.float32
    net = torch.compile(model) if cfg.compile else model
    fwd = net  # evaluation runs this (compiled, not DDP-wrapped: ranks evaluate shards of unequal length)
    if d.enabled:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[d.local_rank] if cuda else None)
    holder.net = net
    generator = torch.Generator(device=d.device)
    mixup = build_mixup(cfg, bundle.num_classes, mean=bundle.mean, std=bundle.std, out_dtype=in_dtype,
                        generator=generator)
    ctx = _Ctx(cfg, d, bundle.mean, bundle.std, in_dtype,
               torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext(), channels_last,
               show_progress=cfg.progress and d.is_main and sys.stderr.isatty())
    preview = os.path.join(out, "mixup_preview.png")
    if d.is_main and cfg.preview and (resume_from is None or not os.path.exists(preview)):
        write_preview(preview, bundle, cfg)
    if d.is_main:
        print(f"training {cfg.model} on {cfg.data.name}: {len(bundle.train)} images, {steps} steps/epoch, "
              f"global batch {global_batch}, lr {lr:g}, "
              f"{'ERM' if mixup is None else f'mixup alpha={cfg.mixup.alpha:g}'}, {d.world} process(es) "
              f"on {d.device.type} -> {out}", flush=True)

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        seed = _epoch_seed(cfg.seed, epoch, d.rank)
        _reseed(seed)
        bundle.train.reseed(seed)
        generator.manual_seed(seed)
        train_sampler.set_epoch(epoch)
        if mixup is not None:
            mixup.mixup_enabled = not (cfg.mixup.off_epoch and epoch >= cfg.mixup.off_epoch)
        record = {"epoch": epoch + 1}
        record.update(_train_one_epoch(net, train_loader, optimizer, scheduler, mixup, ctx, epoch))
        if d.enabled:  # BN running stats drift apart per rank: evaluate and save rank 0's everywhere
            for buf in model.buffers():
                dist.broadcast(buf, src=0)
        record.update(_evaluate(fwd, val_loader, ctx, "val"))
        if mem_loader is not None:
            record.update(_memorization(fwd, mem_loader, ctx))
        record["seconds"] = _max(time.perf_counter() - t0, d, d.device)
        history.append(record)
        if d.is_main:
            improved = record["val_top1"] > best
            best = max(best, record["val_top1"])
            state = {
                "version": CHECKPOINT_VERSION, "epoch": epoch + 1, "epochs": cfg.epochs,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "history": history, "best_top1": best, "config": config_to_dict(cfg),
                "classes": list(bundle.classes),
            }
            save_checkpoint(state, os.path.join(out, "last.pt"))
            if improved:
                save_checkpoint(state, os.path.join(out, "best.pt"))
            append_metrics(os.path.join(out, "metrics.jsonl"), record)
            from .plots import plot_curves

            plot_curves(history, os.path.join(out, "curves.png"))
            print(_fmt(record, cfg.epochs), flush=True)
        else:
            best = max(best, record["val_top1"])

    summary = dict(history[-1]) if history else {}
    final_loader = _eval_loader(bundle.test, cfg, d) if bundle.test is not None else val_loader
    final, bins = _evaluate_bins(fwd, final_loader, ctx, "test")
    if bundle.test is not None:
        summary.update(final)
    elif history:
        summary.update(test_from_val(history[-1]))
    summary["best_val_top1"] = best if history else None
    summary["output"] = out
    if d.is_main:
        write_summary(os.path.join(out, "summary.json"), summary)
        write_reliability(os.path.join(out, "reliability.png"), bins, cfg)
        if "test_top1" in summary:
            print(f"test top-1: {summary['test_top1']:.2f}%  (top-5 {summary['test_top5']:.2f}%, "
                  f"loss {summary['test_loss']:.4f}, ECE {summary.get('test_ece', math.nan):.2f}%; "
                  f"outputs in {out})", flush=True)
    return summary


def run(cfg: Config) -> dict:
    """Train ``cfg`` with its engine and return the final metrics (see :func:`fit`)."""
    if cfg.engine == "fastai":
        try:
            from .fastai import run_recipe
        except ImportError as exc:
            raise RecipeError(f"engine=fastai is not available here ({exc}); use engine=torch") from None
        return run_recipe(cfg)
    return fit(cfg)


# ----------------------------------------------------------------------------------------------------
# Command line


def resolve_recipe(arg: str) -> str:
    """A recipe path as given, or a bare name such as ``cifar10`` looked up in the repository's recipes/."""
    if os.path.isfile(arg):
        return arg
    for candidate in (RECIPES_DIR / arg, RECIPES_DIR / f"{arg}.yaml"):
        if candidate.is_file():
            return str(candidate)
    known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []
    hint = f" (recipes: {', '.join(known)})" if known else ""
    raise RecipeError(f"recipe file not found: {arg}{hint}")


def main(argv: list[str] | None = None) -> dict | None:
    """Command-line entry point: parse ``[RECIPE] [key=value ...]`` and train.

    Returns:
        The final metrics, or None for ``--help``.

    Raises:
        SystemExit: status 2 for a bad recipe, key, value or missing data (message on stderr).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(format_help())
        return None
    positional = [a for a in argv if "=" not in a]
    overrides = [a for a in argv if "=" in a]
    try:
        dashed = [a for a in positional if a.startswith("-")]
        if dashed:
            raise RecipeError(f"options are written key=value (e.g. epochs=2), got {dashed[0]}; see --help")
        if len(positional) > 1:
            raise RecipeError(f"expected one recipe and key=value overrides, got {' '.join(positional)}")
        recipe = resolve_recipe(positional[0]) if positional else None
        cfg = load_config(recipe, overrides)
        return run(cfg)
    except RecipeError as exc:
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
        print(f"{prefix}error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            print("\ninterrupted; add resume=true to continue from the last finished epoch", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
