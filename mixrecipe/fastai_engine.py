"""``engine: fastai``: the recipe runner's training loop as a fastai ``Learner`` with :class:`MixupCallback`.

The same recipe keys mean the same things as with the default torch engine (``mixrecipe.train``): the same
data sets and loaders (uint8 batches, a seeded ``DistributedSampler`` order), the same model and its
initialization, timm's optimizer (wrapped by fastai's ``OptimWrapper``) and timm's per-step schedule,
the same ``mixrecipe.Mixup`` policy (normalization fused into the mixing pass) and
``mixup_cross_entropy``, the same per-epoch reseeding. The outputs are the same files: ``config.yaml``,
``metrics.jsonl``, ``curves.png``, ``mixup_preview.png``, ``last.pt`` / ``best.pt`` (same checkpoint
layout, so ``resume=true`` works) and ``summary.json``. On CPU the two engines give the same numbers.

Only fastai does the looping: forward, loss, backward, step, validation, callbacks. Single process only
(launch the torch engine with torchrun for DistributedDataParallel).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from contextlib import nullcontext

import fastai.callback.progress  # noqa: F401  (Learner.no_bar, the progress bar)
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.optimizer import OptimWrapper

from .config import Config, RecipeError, config_to_dict
from .data import normalize_batch
from .fastai import MixupCallback
from .metrics import calibration_bins, ece_from_bins
from .mixup import Mixup
from .train import (
    CHECKPOINT_VERSION,
    ECE_BINS,
    _epoch_seed,
    _eval_loader,
    _fmt,
    _prepare_run,
    _reseed,
    _setup_distributed,
    append_metrics,
    build_mixup,
    count_memorization,
    load_checkpoint,
    memorization_percent,
    save_checkpoint,
    test_from_val,
    write_metrics,
    write_preview,
    write_reliability,
    write_summary,
)

__all__ = ["run_fastai"]


class _Prepare(Callback):
    """channels_last batches (before the mixing callback), then normalization of still-uint8 batches.

    Training batches are normalized by the mixing pass itself (``Mixup(mean=, std=)``); validation batches
    (and training batches of an ERM run without a policy) are normalized here, by the same op at λ = 1.
    """

    order = -5

    def __init__(self, mean, std, in_dtype, channels_last):
        self.mean, self.std, self.in_dtype, self.channels_last = mean, std, in_dtype, channels_last
        self.norm = _Normalize(self)

    def before_batch(self):
        x = self.xb[0]
        if self.channels_last and x.ndim == 4:
            self.learn.xb = (x.contiguous(memory_format=torch.channels_last),) + tuple(self.xb[1:])


class _Normalize(Callback):
    order = 5  # after MixupCallback (order 0)

    def __init__(self, prep: _Prepare):
        self.prep = prep

    def before_batch(self):
        x = self.xb[0]
        if x.dtype == torch.uint8:
            p = self.prep
            self.learn.xb = (normalize_batch(x, p.mean, p.std, p.in_dtype),) + tuple(self.xb[1:])


class _Schedule(Callback):
    """timm's scheduler, updated at every training step (as the torch engine does)."""

    order = -10
    run_valid = False

    def __init__(self, scheduler, steps: int, start_epoch: int):
        self.scheduler, self.steps, self.start_epoch = scheduler, steps, start_epoch

    def before_batch(self):
        if self.scheduler is not None:
            self.scheduler.step_update((self.start_epoch + self.epoch) * self.steps + self.iter)


class _Recipe(Callback):
    """Per-epoch reseeding and the run's outputs: metrics.jsonl, curves.png, checkpoints, console line."""

    order = 90  # after fastai's Recorder: reads the finished epoch

    def __init__(self, run: dict):
        self.recipe = run

    # Seeds and switches ------------------------------------------------------------------------------
    def before_epoch(self):
        r = self.recipe
        cfg, epoch = r["cfg"], r["start_epoch"] + self.epoch
        seed = _epoch_seed(cfg.seed, epoch, 0)
        _reseed(seed)
        r["bundle"].train.reseed(seed)
        r["generator"].manual_seed(seed)
        r["sampler"].set_epoch(epoch)
        mixup = r["mixup"]
        mixup.mixup_enabled = r["mix"] and not (cfg.mixup.off_epoch and epoch >= cfg.mixup.off_epoch)
        self.t_epoch = time.perf_counter()
        self.loss_sum = torch.zeros((), dtype=torch.float64)
        self.n_seen = 0
        self.val_sums = [0.0, 0.0, 0.0, 0.0]  # loss sum, top-1 hits, top-5 hits, count
        self.val_bins = torch.zeros(3, ECE_BINS, dtype=torch.float64)
        self.last_lr = float("nan")

    def before_train(self):
        self.t_train = time.perf_counter()

    def after_train(self):
        self.train_seconds = time.perf_counter() - self.t_train

    def after_batch(self):
        y = self.yb[0]
        if self.training:
            self.loss_sum += self.loss.detach().double().cpu() * y.shape[0]
            self.n_seen += y.shape[0]
            self.last_lr = self.opt.opt.param_groups[0]["lr"]
            r = self.recipe
            r["steps_done"] += 1
            kill = r["cfg"]._kill_after_steps
            if kill and r["steps_done"] >= kill:  # the resume tests' hard kill, as in the torch engine
                os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
        else:
            logits = self.pred.float()
            k = min(5, logits.shape[1])
            hit = logits.topk(k, dim=1).indices == y[:, None]
            v = self.val_sums
            v[0] += F.cross_entropy(logits, y, reduction="sum").item()
            v[1] += hit[:, 0].sum().item()
            v[2] += hit.any(dim=1).sum().item()
            v[3] += y.shape[0]
            self.val_bins += calibration_bins(logits.softmax(dim=1), y, ECE_BINS).cpu()

    # The epoch's record and files ----------------------------------------------------------------------
    def after_epoch(self):
        r = self.recipe
        cfg, out = r["cfg"], r["cfg"].output
        epoch = r["start_epoch"] + self.epoch
        v = self.val_sums
        n = max(v[3], 1.0)
        record = {"epoch": epoch + 1, "train_loss": float(self.loss_sum) / max(self.n_seen, 1),
                  "lr": self.last_lr, "images_per_s": self.n_seen / max(self.train_seconds, 1e-9),
                  "val_loss": v[0] / n, "val_top1": 100.0 * v[1] / n, "val_top5": 100.0 * v[2] / n,
                  "val_nll": v[0] / n, "val_ece": 100.0 * ece_from_bins(self.val_bins)}
        if r["mem_loader"] is not None:
            record.update(_memorization(self.model, r["mem_loader"], r))
        record["seconds"] = time.perf_counter() - self.t_epoch
        r["history"].append(record)
        improved = record["val_top1"] > r["best"]
        r["best"] = max(r["best"], record["val_top1"])
        state = {
            "version": CHECKPOINT_VERSION, "epoch": epoch + 1, "epochs": cfg.epochs,
            "model": self.model.state_dict(), "optimizer": self.opt.opt.state_dict(),
            "scheduler": r["scheduler"].state_dict() if r["scheduler"] is not None else None,
            "history": r["history"], "best_top1": r["best"], "config": config_to_dict(cfg),
            "classes": list(r["bundle"].classes), "engine": "fastai",
        }
        save_checkpoint(state, os.path.join(out, "last.pt"))
        if improved:
            save_checkpoint(state, os.path.join(out, "best.pt"))
        append_metrics(os.path.join(out, "metrics.jsonl"), record)
        from .plots import plot_curves

        plot_curves(r["history"], os.path.join(out, "curves.png"))
        print(_fmt(record, cfg.epochs), flush=True)


@torch.no_grad()
def _predict(model, loader, run: dict):
    model.eval()
    for x, y in loader:
        x, y = x.to(run["device"]), y.to(run["device"])
        if run["channels_last"] and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with run["autocast"]():
            logits = model(normalize_batch(x, run["mean"], run["std"], run["in_dtype"]))
        yield logits.float(), y


def _evaluate(model, loader, run: dict) -> tuple[dict, torch.Tensor]:
    """Test metrics (as the torch engine's) and the calibration bins behind the ECE."""
    loss = c1 = c5 = n = 0.0
    bins = torch.zeros(3, ECE_BINS, dtype=torch.float64)
    for logits, y in _predict(model, loader, run):
        hit = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        c1 += hit[:, 0].sum().item()
        c5 += hit.any(dim=1).sum().item()
        n += y.shape[0]
        bins += calibration_bins(logits.softmax(dim=1), y, ECE_BINS).cpu()
    n = max(n, 1.0)
    return ({"test_loss": loss / n, "test_top1": 100.0 * c1 / n, "test_top5": 100.0 * c5 / n,
             "test_nll": loss / n, "test_ece": 100.0 * ece_from_bins(bins)}, bins)


def _memorization(model, loader, run: dict) -> dict:
    return memorization_percent(count_memorization(_predict(model, loader, run)))


def _policy(cfg: Config, num_classes: int, mean, std, in_dtype, generator) -> tuple[Mixup, bool]:
    """The run's Mixup policy and whether it mixes; ERM is the same policy with mixing switched off
    (normalization and the recipe's label smoothing still go through it)."""
    mixup = build_mixup(cfg, num_classes, mean=mean, std=std, out_dtype=in_dtype, generator=generator)
    if mixup is not None:
        return mixup, True
    m = cfg.mixup
    mixup = Mixup(mixup_alpha=1.0, label_smoothing=m.label_smoothing, num_classes=num_classes,
                  generator=generator, mean=list(mean), std=list(std), out_dtype=in_dtype)
    return mixup, False


def run_fastai(cfg: Config) -> dict:
    """Train ``cfg`` with a fastai ``Learner`` and :class:`mixrecipe.fastai.MixupCallback`.

    Args:
        cfg: a resolved config (``load_config``); ``cfg.engine`` is not looked at.

    Returns:
        The final metrics, as :func:`mixrecipe.train.fit` returns them (also written to summary.json).

    Raises:
        RecipeError: bad settings, missing data, or a multi-process launch.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RecipeError("engine=fastai trains in one process; use engine=torch with torchrun for several")
    if cfg.compile:
        raise RecipeError("compile=true is supported by engine=torch only")
    d = _setup_distributed(cfg)
    (out, resume_from, bundle, model, cuda, channels_last, _, lr, optimizer, train_loader, sampler, steps,
     val_loader, mem_loader, scheduler, start_epoch, history, best) = _prepare_run(cfg, d)
    write_metrics(os.path.join(out, "metrics.jsonl"), history)

    amp = cuda and cfg.amp
    in_dtype = torch.bfloat16 if amp else torch.float32
    generator = torch.Generator(device=d.device)
    mixup, mixing = _policy(cfg, bundle.num_classes, bundle.mean, bundle.std, in_dtype, generator)
    preview = os.path.join(out, "mixup_preview.png")
    if cfg.preview and (resume_from is None or not os.path.exists(preview)):
        write_preview(preview, bundle, cfg)
    print(f"training {cfg.model} on {cfg.data.name} with a fastai Learner: {len(bundle.train)} images, "
          f"{steps} steps/epoch, batch {cfg.batch_size}, lr {lr:g}, "
          f"{f'mixup alpha={cfg.mixup.alpha:g}' if mixing else 'ERM'} on {d.device.type} -> {out}",
          flush=True)

    run = dict(cfg=cfg, bundle=bundle, generator=generator, sampler=sampler, mixup=mixup, mix=mixing,
               scheduler=scheduler, history=history, best=best, start_epoch=start_epoch,
               mem_loader=mem_loader, device=d.device, channels_last=channels_last, mean=bundle.mean,
               std=bundle.std, in_dtype=in_dtype, steps_done=0,
               autocast=(lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else nullcontext)
    prep = _Prepare(bundle.mean, bundle.std, in_dtype, channels_last)
    dls = DataLoaders(train_loader, val_loader)
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), opt_func=OptimWrapper(opt=optimizer), lr=lr,
                    cbs=[MixupCallback(mixup), prep, prep.norm, _Schedule(scheduler, steps, start_epoch),
                         _Recipe(run)])
    if amp:
        learn.to_bf16()
    learn.create_opt()  # fastai clears the optimizer state when it creates its own: do it before loading
    if resume_from is not None:
        learn.opt.opt.load_state_dict(load_checkpoint(resume_from)["optimizer"])
    remaining = cfg.epochs - start_epoch
    if remaining > 0:
        show = cfg.progress and sys.stderr.isatty()
        with learn.no_logging():
            if show:
                learn.fit(remaining, lr)
            else:
                with learn.no_bar():
                    learn.fit(remaining, lr)
    history, best = run["history"], run["best"]

    summary = dict(history[-1]) if history else {}
    final_loader = _eval_loader(bundle.test, cfg, d) if bundle.test is not None else val_loader
    final, bins = _evaluate(model, final_loader, run)
    if bundle.test is not None:
        summary.update(final)
    elif history:
        summary.update(test_from_val(history[-1]))
    summary["best_val_top1"] = best if history else None
    summary["output"] = out
    summary["engine"] = "fastai"
    write_summary(os.path.join(out, "summary.json"), summary)
    write_reliability(os.path.join(out, "reliability.png"), bins, cfg)
    if "test_top1" in summary:
        print(f"test top-1: {summary['test_top1']:.2f}%  (top-5 {summary['test_top5']:.2f}%, "
              f"loss {summary['test_loss']:.4f}; outputs in {out})", flush=True)
    return summary
