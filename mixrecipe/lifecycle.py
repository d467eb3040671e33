"""The run lifecycle, the same for every engine: prepare -> per epoch (train, evaluate, record) -> summary.

- prepare: the run directory checked (writable; a run already there is resumed with ``resume=true``,
  replaced with ``overwrite=true``, else refused), data, model, optimizer, loaders, schedule, the Mixup
  policy and the state of a run being resumed; only then, every value accepted, is the directory
  written: the resolved config saved beside the run (:func:`prepare`);
- each epoch: every random stream (shuffling, augmentation, mixup, dropout) is re-seeded from
  (seed, epoch, rank), the engine trains one epoch, the lifecycle evaluates through the engine's
  ``predict`` (:func:`mixrecipe.scoring.evaluate`) and records the epoch (:func:`record`): a line in
  ``metrics.jsonl``, ``curves.png``, an atomic ``last.pt`` (and ``best.pt``), a console line;
- summary: the test set (or the last validation), ``summary.json`` and ``reliability.png`` (the final
  model's confidence against its accuracy).

A training loss that is not finite stops the run at that step on every rank (the engines report each
step to an :class:`mixrecipe.engine.EpochTally`): the event goes into ``metrics.jsonl`` and
``summary.json``, ``last.pt`` keeps the last good state, and :class:`RunStopped` carries one line and
exit status :data:`EXIT_DIVERGED`.

Because of the per-epoch reseeding and the end-of-epoch checkpoint, a run killed at any point and resumed
with ``resume=true`` ends with the same metrics as one never interrupted (on CPU, with the same number of
threads and processes). SIGTERM or SIGINT does better than a kill: the step in progress finishes, every
rank stops at the same step, and ``last.pt`` gets the position inside the epoch (the steps done, every
rank's random streams and partial sums); ``resume=true`` re-seeds that epoch, restores the streams, skips
the batches done and goes on, to the same metrics (exit status 128 + the signal: 143, 130). A data loader
worker that dies ends the run with one line and exit status :data:`EXIT_LOADER_DIED`, ``last.pt`` as it
was. Under ``torchrun`` every rank runs this; only rank 0 writes files.

Engines are looked up by name in :data:`ENGINES` and imported only when used (fastai is optional).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import math
import os
import random
import signal
import sys
import threading
import time
import traceback

import numpy as np
import torch

from .config import Config, RecipeError, check_values, config_to_dict, save_config
from .data import DataBundle, ImageTensors, build_data, count_unreadable, decode_file
from .distributed import (
    DistContext,
    all_max,
    all_max_tensor,
    all_sum,
    broadcast_buffers,
    gather_objects,
    setup_distributed,
    shutdown_distributed,
)
from .engine import Engine, EpochTally, NonFiniteLoss, RunState, StopRequested
from .factories import build_mixup, create_optimizer, create_schedule, eval_loader, train_loader
from .outputs import (
    CHECKPOINT_VERSION,
    UnwritableOutputError,
    append_metrics,
    check_writable,
    clear_run_files,
    format_record,
    load_checkpoint,
    resume_point,
    save_checkpoint,
    write_metrics,
    write_summary,
)
from .scoring import evaluate, memorization

__all__ = ["ENGINES", "EXIT_DIVERGED", "EXIT_LOADER_DIED", "RunStopped", "run", "prepare", "begin_epoch",
           "continue_epoch", "evaluate_epoch", "record", "summarize", "write_preview", "write_reliability",
           "epoch_seed"]

# engine name -> "module:class"; the module is imported only for runs that use it.
ENGINES = {"torch": "mixrecipe.torch_engine:TorchEngine", "fastai": "mixrecipe.fastai_engine:FastaiEngine"}

EXIT_DIVERGED = 3  # the exit status of a run stopped by a loss that is not finite
EXIT_LOADER_DIED = 4  # ... by a data loader worker process that died (killed, out of memory)


class RunStopped(Exception):
    """The run stopped before its end for a reason other than a bad setting (a diverged loss, a signal, a
    dead loader worker). The message says what happened, what was kept and how to go on.

    Attributes:
        exit_status: the command's exit status.
        error: whether the command line reports it as an error (``error: ...``).
    """

    def __init__(self, message: str, exit_status: int, error: bool = True):
        super().__init__(message)
        self.exit_status, self.error = exit_status, error


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of every random stream in one epoch of one rank."""
    return ((seed * 1_000_003 + epoch) * 1009 + rank) % (2**62)


def _reseed(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))


def _rng_state(state: RunState) -> dict:
    """Every random stream a training step draws from, as tensors and plain data (a weights_only
    checkpoint): torch's (CPU and this rank's GPU: dropout...), Python's, NumPy's, the Mixup policy's and
    the training set's augmentation generator."""
    key = np.random.get_state(legacy=False)
    numpy_state = {"key": torch.from_numpy(key["state"]["key"].astype(np.int64)),
                   "pos": int(key["state"]["pos"]), "has_gauss": int(key["has_gauss"]),
                   "gauss": float(key["gauss"])}
    saved = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "mixup": state.generator.get_state(), "numpy": numpy_state}
    if state.dist.device.type == "cuda":
        saved["cuda"] = torch.cuda.get_rng_state(state.dist.device)
    augment = getattr(state.bundle.train, "generator", None)
    if isinstance(augment, torch.Generator):
        saved["data"] = augment.get_state()
    return saved


def _set_rng_state(state: RunState, saved: dict) -> None:
    """Put back what :func:`_rng_state` took."""
    torch.set_rng_state(saved["torch"])
    random.setstate(_as_tuples(saved["python"]))
    state.generator.set_state(saved["mixup"])
    n = saved["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "has_gauss": n["has_gauss"], "gauss": n["gauss"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]}})
    if "cuda" in saved:
        torch.cuda.set_rng_state(saved["cuda"], state.dist.device)
    if "data" in saved:
        state.bundle.train.generator.set_state(saved["data"])


def _as_tuples(value):
    """random.setstate wants the tuples getstate gave (a checkpoint may hand lists back)."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# ----------------------------------------------------------------------------------------------------
# Prepare


def prepare(cfg: Config, d: DistContext) -> RunState:
    """Everything before the first epoch (see the module docstring).

    Nothing is written to the run directory before every value has been accepted and the data, model,
    optimizer, loaders, schedule and policy are built: a command that fails its checks leaves the
    directory as it found it.

    Raises:
        RecipeError: an unwritable output, a run already there without resume=true or overwrite=true,
            missing data, bad settings; all before any training step.
    """
    from .models import create_model

    out = cfg.output
    if d.is_main:
        check_writable(out)
    resume_from = resume_point(out, cfg.resume, cfg.overwrite)  # refuses to replace a run
    bundle = build_data(cfg.data)
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

    loader, sampler = train_loader(bundle.train, cfg, d)
    steps = len(loader)
    if steps == 0:
        raise RecipeError(f"the training set ({len(bundle.train)} images) is smaller than one batch "
                          f"(batch_size={cfg.batch_size} x {d.world} processes): lower batch_size or "
                          "set drop_last=false")
    scheduler = create_schedule(optimizer, cfg, steps)
    amp = cuda and cfg.amp
    in_dtype = torch.bfloat16 if amp else torch.float32
    generator = torch.Generator()  # the mixing draws are made on the host (mixrecipe.draws)
    mixup = build_mixup(cfg, bundle.num_classes, mean=bundle.mean, std=bundle.std, out_dtype=in_dtype,
                        generator=generator)
    state = RunState(
        cfg=cfg, dist=d, out=out, resume_from=resume_from, bundle=bundle, model=model, optimizer=optimizer,
        scheduler=scheduler, lr=lr, global_batch=global_batch, train_loader=loader, train_sampler=sampler,
        steps_per_epoch=steps, val_loader=eval_loader(bundle.val, cfg, d),
        mem_loader=eval_loader(bundle.train_eval, cfg, d) if bundle.train_eval is not None else None,
        channels_last=channels_last, amp=amp, in_dtype=in_dtype, mixup=mixup, generator=generator,
    )
    if resume_from is not None:
        _restore(state, load_checkpoint(resume_from))
    # Only now, with every value accepted and everything built, is the run directory touched.
    if d.enabled:
        torch.distributed.barrier()  # every rank has looked at the output directory before rank 0 writes
    if d.is_main:
        try:
            os.makedirs(out, exist_ok=True)
            if resume_from is None:
                clear_run_files(out)  # overwrite=true, or the leftovers of a run that never saved an epoch
            save_config(cfg, os.path.join(out, "config.yaml"))
        except OSError as exc:
            raise UnwritableOutputError(out, exc.strerror or type(exc).__name__) from None
        if resume_from is not None:
            inside = (f", at step {state.resume_step}/{steps} of epoch {state.start_epoch + 1}"
                      if state.resume_step else "")
            print(f"resuming {out} after epoch {state.start_epoch}/{cfg.epochs}{inside}", file=sys.stderr)
    return state


def _restore(state: RunState, checkpoint: dict) -> None:
    state.model.load_state_dict(checkpoint["model"])
    state.optimizer.load_state_dict(checkpoint["optimizer"])
    if state.scheduler is not None and checkpoint.get("scheduler") is not None:
        state.scheduler.load_state_dict(checkpoint["scheduler"])
    state.start_epoch = checkpoint["epoch"]
    state.history = list(checkpoint["history"])
    state.best_top1 = checkpoint.get("best_top1", -math.inf)
    state.resume_step = checkpoint.get("step", 0)  # > 0: stopped inside epoch start_epoch + 1
    if state.resume_step:
        partial, saved_steps = checkpoint["partial"], checkpoint["steps"]
        if len(partial) != state.dist.world or saved_steps != state.steps_per_epoch:
            raise RecipeError(
                f"{state.resume_from} stopped inside an epoch of {saved_steps} steps with {len(partial)} "
                f"process(es); this run has {state.steps_per_epoch} steps per epoch with {state.dist.world}: "
                "resume it with the same processes, batch_size and data, or pass overwrite=true")
        state.resume_partial = partial


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
        items = [it for it in items if it is not None]  # unreadable images skipped by data.skip_corrupt
        if getattr(ds, "encoded", False):  # file bytes for the device: the same crop, here on the host
            items = [(ds.transform(decode_file(ds.paths[i])), label) for (i, _), label in items]
        n = len(items)
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
            lam.append(torch.as_tensor(mb.lam, dtype=torch.float32).expand(xb.shape[0]))  # a float: one λ
            partner.append(yb.flip(0) if mb.perm is None else yb[mb.perm])
        images, lam, partner = torch.cat(images), torch.cat(lam), torch.cat(partner)
        title = (f"mixup α={cfg.mixup.alpha:g}, {cfg.mixup.mode} mode, {cfg.mixup.pairing} pairing "
                 f"(one draw per row)")
    plot_mixup_preview(images, y, partner, lam, bundle.classes, path, title=title, cols=cols)


def write_reliability(path: str, bins, cfg: Config) -> None:
    """reliability.png: the final model's confidence against its accuracy on the test set (the validation
    set when ``data.val_size`` is 0: it is then the test set)."""
    from .plots import plot_reliability

    mixing = ("ERM" if cfg.mixup.alpha == 0 and cfg.mixup.cutmix_alpha == 0
              else f"mixup α={cfg.mixup.alpha:g}")
    plot_reliability(bins, path, title=f"{cfg.model} on the {cfg.data.name} test set, {mixing}")


# ----------------------------------------------------------------------------------------------------
# One epoch


def begin_epoch(state: RunState, epoch: int) -> None:
    """Re-seed every random stream from (seed, epoch, rank), start the epoch's tally and switch mixing."""
    cfg = state.cfg
    seed = epoch_seed(cfg.seed, epoch, state.dist.rank)
    _reseed(seed)
    state.bundle.train.reseed(seed)
    state.generator.manual_seed(seed)
    state.train_sampler.set_epoch(epoch)
    state.train_loader.generator.manual_seed(seed)  # the loader's worker seeds
    state.train_loader.batch_sampler.skip = 0
    state.tally = EpochTally(state, epoch)
    if state.mixup is not None:
        state.mixup.mixup_enabled = not (cfg.mixup.off_epoch and epoch >= cfg.mixup.off_epoch)


def continue_epoch(state: RunState, epoch: int) -> None:
    """After :func:`begin_epoch`, for a run stopped inside this epoch: put back every random stream as it
    was after the steps already done, have the loader skip their batches and the tally start from their
    sums. The epoch then goes on as if it had never stopped."""
    saved = state.resume_partial[state.dist.rank]
    _set_rng_state(state, saved["rng"])
    state.train_loader.batch_sampler.skip = saved["step"]
    state.tally = EpochTally(state, epoch, step=saved["step"], loss_sum=saved["loss_sum"], seen=saved["seen"],
                             seconds=saved["seconds"])
    state.resume_step, state.resume_partial = 0, None


def evaluate_epoch(engine: Engine, state: RunState) -> dict:
    """The epoch's evaluation: validation accuracy and loss, memorization with label noise, and the count
    of image files skipped as unreadable when ``data.skip_corrupt`` is on."""
    broadcast_buffers(state.model, state.dist)  # evaluate (and save) rank 0's BatchNorm statistics
    metrics, state.val_bins = evaluate(engine.predict(state.val_loader), state.dist, "val")
    if state.mem_loader is not None:
        metrics.update(memorization(engine.predict(state.mem_loader), state.dist))
    if state.cfg.data.skip_corrupt:
        skipped = count_unreadable(state.bundle)  # ranks read disjoint shards: their counts add up
        count = metrics["skipped_images"] = int(all_sum([float(len(skipped))], state.dist)[0])
        if skipped and state.dist.is_main:
            print(f"skipped {count} unreadable image file(s) so far (data.skip_corrupt=true), "
                  f"e.g. {skipped[0]}", file=sys.stderr, flush=True)
    return metrics


def _checkpoint(state: RunState, engine: Engine, epoch: int) -> dict:
    """What last.pt and best.pt hold after ``epoch`` finished epochs."""
    return {
        "version": CHECKPOINT_VERSION, "epoch": epoch, "epochs": state.cfg.epochs, "engine": engine.name,
        "model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict() if state.scheduler is not None else None,
        "history": state.history, "best_top1": state.best_top1, "config": config_to_dict(state.cfg),
        "classes": list(state.bundle.classes),
    }


def record(state: RunState, engine: Engine, metrics: dict) -> None:
    """Add one epoch's metrics to the history; on rank 0 write metrics.jsonl, curves.png, last.pt (and
    best.pt when val top-1 improved) and print the epoch's line.

    Args:
        metrics: ``epoch`` (1-based), ``val_top1`` and any other keys: every key is recorded as it is.
    """
    state.history.append(metrics)
    improved = metrics["val_top1"] > state.best_top1
    state.best_top1 = max(state.best_top1, metrics["val_top1"])
    if not state.dist.is_main:
        return
    cfg, out = state.cfg, state.out
    checkpoint = _checkpoint(state, engine, metrics["epoch"])
    save_checkpoint(checkpoint, os.path.join(out, "last.pt"))
    if improved:
        save_checkpoint(checkpoint, os.path.join(out, "best.pt"))
    append_metrics(os.path.join(out, "metrics.jsonl"), metrics)
    from .plots import plot_curves

    plot_curves(state.history, os.path.join(out, "curves.png"))
    print(format_record(metrics, cfg.epochs), flush=True)


# ----------------------------------------------------------------------------------------------------
# Summary and the whole run


def summarize(state: RunState, engine: Engine) -> dict:
    """The final metrics: the last epoch's record, the test set's (or the last validation's), the best val
    top-1; written to summary.json on rank 0 with reliability.png beside it."""
    history, bundle, out = state.history, state.bundle, state.out
    summary = dict(history[-1]) if history else {}
    if bundle.test is not None:
        test, bins = evaluate(engine.predict(eval_loader(bundle.test, state.cfg, state.dist)), state.dist,
                              "test")
        summary.update(test)
    else:  # the validation set is the test set: its last record, as the epoch reported it
        bins = state.val_bins
        if bins is None:  # no epoch ran in this process (a finished run resumed)
            bins = evaluate(engine.predict(state.val_loader), state.dist, "val")[1]
        if history:
            summary.update({k.replace("val_", "test_", 1): v for k, v in history[-1].items()
                            if k in ("val_loss", "val_top1", "val_top5", "val_nll", "val_ece")})
    summary["best_val_top1"] = state.best_top1 if history else None
    if state.cfg.data.skip_corrupt:  # also the files first met by the test evaluation above
        skipped = int(all_sum([float(len(count_unreadable(bundle)))], state.dist)[0])
        summary["skipped_images"] = skipped
    summary["output"] = out
    summary["engine"] = engine.name
    if state.dist.is_main:
        write_summary(os.path.join(out, "summary.json"), summary)
        write_reliability(os.path.join(out, "reliability.png"), bins, state.cfg)
        if "test_top1" in summary:
            ece = f", ECE {summary['test_ece']:.2f}%" if "test_ece" in summary else ""
            print(f"test top-1: {summary['test_top1']:.2f}%  (top-5 {summary['test_top5']:.2f}%, "
                  f"loss {summary['test_loss']:.4f}{ece}; outputs in {out})", flush=True)
    return summary


def _diverged(state: RunState, engine: Engine, stop: NonFiniteLoss) -> RunStopped:
    """A loss that is not finite: the event goes into metrics.jsonl and summary.json (rank 0), last.pt is
    left as it was (the diverged model is never saved), and the returned :class:`RunStopped` says where it
    happened and what usually helps (exit status :data:`EXIT_DIVERGED`)."""
    cfg, out = state.cfg, state.out
    event = {"event": "non_finite_loss", "epoch": stop.epoch + 1, "step": stop.step + 1,
             "steps": state.steps_per_epoch, "loss": str(stop.loss), "lr": stop.lr,
             "last_finite_loss": stop.last_finite}
    last = os.path.join(out, "last.pt")
    if state.dist.is_main:
        append_metrics(os.path.join(out, "metrics.jsonl"), event)
        summary = dict(state.history[-1]) if state.history else {}
        summary.update(stopped=event, best_val_top1=state.best_top1 if state.history else None, output=out,
                       engine=engine.name)
        write_summary(os.path.join(out, "summary.json"), summary)
    what = "nan" if math.isnan(stop.loss) else f"{stop.loss:g}"
    before = "none" if stop.last_finite is None else f"{stop.last_finite:.4g}"
    kept = (f"{last} is untouched (saved before the loss went bad)" if os.path.exists(last)
            else "no checkpoint was saved (no epoch had finished)")
    return RunStopped(
        f"the training loss is {what} at epoch {stop.epoch + 1}/{cfg.epochs}, step {stop.step + 1}/"
        f"{state.steps_per_epoch} (lr {stop.lr:.3g}, last finite loss {before}); the run stopped there and "
        f"{kept}. Usual fixes: a lower optim.lr, a warm-up (sched.warmup_epochs=1 or more), amp=false",
        EXIT_DIVERGED)


def _save_inside_epoch(state: RunState, engine: Engine, stop: StopRequested) -> RunStopped:
    """A stop asked for by a signal, between two steps: last.pt (atomically, rank 0) gets the model,
    optimizer and schedule, the position inside the epoch and, for every rank, its random streams and the
    epoch's partial sums; the returned :class:`RunStopped` says how to continue (exit 128 + signal)."""
    d, cfg = state.dist, state.cfg
    partial = gather_objects({"rng": _rng_state(state), **state.tally.snapshot()}, d)
    last = os.path.join(state.out, "last.pt")
    if d.is_main:
        checkpoint = _checkpoint(state, engine, stop.epoch)
        checkpoint.update(step=stop.steps_done, steps=state.steps_per_epoch, partial=partial)
        save_checkpoint(checkpoint, last)
    return RunStopped(
        f"stopped by {signal.Signals(stop.signum).name} at epoch {stop.epoch + 1}/{cfg.epochs}, step "
        f"{stop.steps_done}/{state.steps_per_epoch}: saved {last} with the position inside the epoch; rerun "
        "the same command with resume=true to continue from there", 128 + stop.signum, error=False)


def _stop_between_epochs(state: RunState, epoch: int) -> RunStopped | None:
    """A stop asked for (on any rank) while the epoch finished, evaluated or was recorded: its last.pt is
    written, so stop here."""
    signum = int(all_max_tensor(torch.tensor([float(state.stop_signal)], device=state.dist.device),
                                state.dist).item())
    if not signum:
        return None
    return RunStopped(
        f"stopped by {signal.Signals(signum).name} after epoch {epoch + 1}/{state.cfg.epochs}: saved "
        f"{os.path.join(state.out, 'last.pt')}; rerun the same command with resume=true to continue",
        128 + signum, error=False)


def _worker_died(exc: BaseException) -> bool:
    """Whether torch's DataLoader raised for a worker process that died (killed, out of memory...)."""
    return isinstance(exc, RuntimeError) and "DataLoader worker" in str(exc)


def _loader_died(state: RunState, phase: str, exc: BaseException) -> RunStopped:
    """One line for a dead loader worker: which loader, the likely cause, and the checkpoint left whole."""
    last = os.path.join(state.out, "last.pt")
    kept = (f"{last} is intact (not written since): fix the cause, then resume=true continues"
            if os.path.exists(last) else "no checkpoint had been saved yet")
    reason = str(exc).strip().splitlines()[0].rstrip(".")
    return RunStopped(
        f"a worker process of the {phase} data loader died ({reason}): most often the system killed it for "
        f"lack of memory (see dmesg); lower data.workers (now {state.cfg.data.workers}) or batch_size, or "
        f"give the job more memory. {kept}", EXIT_LOADER_DIED)


@contextlib.contextmanager
def _stop_on_signals(state: RunState):
    """While training: SIGTERM and SIGINT ask the run to stop at the next step boundary
    (``state.stop_signal``; the loader's worker processes inherit this and keep serving); a second one
    stops at once, without saving."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def ask(signum, frame):
        if state.stop_signal:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        state.stop_signal = signum

    previous = {s: signal.signal(s, ask) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _engine_class(name: str) -> type[Engine]:
    module, cls = ENGINES[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        raise RecipeError(f"engine={name} is not available here ({exc}); use engine=torch") from None


def _announce(state: RunState, engine: Engine) -> None:
    cfg, d, bundle = state.cfg, state.dist, state.bundle
    how = "" if engine.name == "torch" else f" with engine={engine.name}"
    mixing = "ERM" if state.mixup is None else f"mixup alpha={cfg.mixup.alpha:g}"
    print(f"training {cfg.model} on {cfg.data.name}{how}: {len(bundle.train)} images, "
          f"{state.steps_per_epoch} steps/epoch, global batch {state.global_batch}, lr {state.lr:g}, "
          f"{mixing}, {d.world} process(es) on {d.device.type} -> {state.out}", flush=True)


def _train(cfg: Config, d: DistContext, holder: list) -> dict:
    engine_cls = _engine_class(cfg.engine)
    state = prepare(cfg, d)
    engine = engine_cls(state)
    holder.append(engine)
    if d.is_main:
        write_metrics(os.path.join(state.out, "metrics.jsonl"), state.history)
        preview = os.path.join(state.out, "mixup_preview.png")
        if cfg.preview and (state.resume_from is None or not os.path.exists(preview)):
            write_preview(preview, state.bundle, cfg)
        _announce(state, engine)
    with _stop_on_signals(state):
        for epoch in range(state.start_epoch, cfg.epochs):
            _train_epoch(state, engine, epoch)
            if epoch + 1 < cfg.epochs and (stop := _stop_between_epochs(state, epoch)) is not None:
                raise stop
    try:
        return summarize(state, engine)
    except RuntimeError as exc:
        if _worker_died(exc):
            raise _loader_died(state, "test", exc) from None
        raise


def _train_epoch(state: RunState, engine: Engine, epoch: int) -> None:
    """One epoch: train (from where a stopped run left it), evaluate, record; each way of stopping early
    turned into its report."""
    cfg, d = state.cfg, state.dist
    t0 = time.perf_counter()
    begin_epoch(state, epoch)
    if state.resume_step:
        continue_epoch(state, epoch)
    metrics, phase = {"epoch": epoch + 1}, "training"
    try:
        metrics.update(engine.train_epoch(epoch))
        phase = "validation"
        metrics.update(evaluate_epoch(engine, state))
    except RecipeError as exc:  # bad data found mid-epoch: the last checkpoint is whole, say so
        if epoch == 0:
            raise
        raise RecipeError(f"{exc}; then resume=true continues after epoch {epoch}/{cfg.epochs} "
                          f"({os.path.join(state.out, 'last.pt')})") from None
    except NonFiniteLoss as stop:
        raise _diverged(state, engine, stop) from None
    except StopRequested as stop:
        raise _save_inside_epoch(state, engine, stop) from None
    except RuntimeError as exc:
        if _worker_died(exc):
            raise _loader_died(state, phase, exc) from None
        raise
    metrics["seconds"] = all_max(time.perf_counter() - t0, d)
    record(state, engine, metrics)


def run(cfg: Config) -> dict:
    """Train ``cfg`` with the engine it names (``cfg.engine``) and return the final metrics.

    Raises:
        RecipeError: bad settings, an unusable output directory or missing data (before any training step).
        RunStopped: the run stopped early (a loss that is not finite, ...); its message says why and how
            to go on.
    """
    check_values(cfg)  # a config built in code is checked as the command line's is
    d = setup_distributed(cfg)
    holder: list[Engine] = []
    try:
        return _train(cfg, d, holder)
    except BaseException as exc:
        traceback.clear_frames(exc.__traceback__)  # frames would keep the DDP module alive
        raise
    finally:
        # DDP must be gone before the process group, else gloo runs abort at exit now and then.
        for engine in holder:
            engine.close()
        holder.clear()
        gc.collect()
        shutdown_distributed(d)
