"""The interface between the run lifecycle (``mixrecipe.lifecycle``) and a training engine.

The lifecycle prepares a :class:`RunState` (data, model, optimizer, schedule, loaders, the Mixup policy,
the resumed history), then for every epoch reseeds every random stream, asks the engine to train one
epoch, evaluates through the engine's :meth:`Engine.predict`, and records the epoch. An engine only
loops: it owns how batches flow through forward, loss, backward and step.

To add an engine: subclass :class:`Engine` in its own module, implement :meth:`Engine.train_epoch`
(and :meth:`Engine.predict` if plain evaluation of ``state.model`` is not right for it), and name the
class in ``mixrecipe.lifecycle.ENGINES``. Engines import this module and the layers below it, never each
other nor the lifecycle.

Every engine reports each optimizer step to the epoch's :class:`EpochTally` (``state.tally``): it keeps
the epoch's running loss on the device and stops the epoch between two steps, by raising
:class:`TrainingStopped`, when a loss is not finite or the run was asked to stop (a signal); the
lifecycle then reports, or saves the position inside the epoch.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .config import Config
from .data import DataBundle, normalize_batch
from .distributed import DistContext, all_max, all_max_tensor, all_sum
from .policy import Mixup

__all__ = ["RunState", "Engine", "EpochTally", "TrainingStopped", "NonFiniteLoss", "StopRequested",
           "batch_to_device", "CHECK_EVERY_CUDA"]

# On CUDA the tally reads its device flags back (a host sync) every this many steps and at the epoch's
# end, not after every step; on CPU reading them costs nothing and happens after every step.
CHECK_EVERY_CUDA = 16


class TrainingStopped(Exception):
    """The training epoch stopped between two steps: ``steps_done`` steps of ``epoch`` (0-based) are done."""

    def __init__(self, epoch: int, steps_done: int):
        super().__init__(f"training stopped in epoch {epoch + 1} after {steps_done} steps")
        self.epoch, self.steps_done = epoch, steps_done


class NonFiniteLoss(TrainingStopped):
    """A training loss was NaN or infinite (on any rank).

    Attributes:
        step: 0-based index in the epoch of the first step whose loss was not finite.
        loss: that loss (nan, inf or -inf); lr: the learning rate of that step.
        last_finite: the last finite loss before it on this rank (None: the epoch's first step).
    """

    def __init__(self, epoch: int, steps_done: int, step: int, loss: float, lr: float,
                 last_finite: float | None):
        super().__init__(epoch, steps_done)
        self.step, self.loss, self.lr, self.last_finite = step, loss, lr, last_finite


class StopRequested(TrainingStopped):
    """The run was asked to stop (``signum``: SIGTERM, SIGINT) on some rank; every rank stops at the same
    step boundary."""

    def __init__(self, epoch: int, steps_done: int, signum: int):
        super().__init__(epoch, steps_done)
        self.signum = signum


@dataclass
class RunState:
    """Everything prepared for a run, shared by the lifecycle and the engine.

    Attributes:
        cfg: the resolved config.
        dist: this process's rank and device.
        out: the run directory.
        resume_from: the checkpoint the run continues from, or None.
        bundle: the data sets.
        model: the network (not wrapped: DDP or compile wrappers belong to the engine).
        optimizer: timm's optimizer; scheduler: timm's per-step scheduler, or None.
        lr: the base learning rate; global_batch: batch size times processes.
        train_loader, train_sampler, steps_per_epoch: the training loader and its sampler.
        val_loader: validation shard; mem_loader: the un-augmented training set with (given, true) labels
            when labels are noisy, else None.
        channels_last, amp: memory format and bf16 autocast (CUDA); in_dtype: the network's input dtype.
        mixup: the Mixup policy, or None for ERM; generator: its generator (reseeded every epoch).
        start_epoch, history, best_top1: the epochs done, their records and the best val top-1 so far.
        val_bins: the last validation's calibration sums, for reliability.png when there is no test set.
        tally: the training epoch in progress (:class:`EpochTally`), set by the lifecycle for each epoch.
        stop_signal: the number of a signal asking the run to stop (0: none), set by the lifecycle.
        resume_step, resume_partial: where a run stopped inside an epoch continues (0: at an epoch's
            start) and what each rank had summed there.
    """

    cfg: Config
    dist: DistContext
    out: str
    resume_from: str | None
    bundle: DataBundle
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object | None
    lr: float
    global_batch: int
    train_loader: torch.utils.data.DataLoader
    train_sampler: torch.utils.data.distributed.DistributedSampler
    steps_per_epoch: int
    val_loader: torch.utils.data.DataLoader
    mem_loader: torch.utils.data.DataLoader | None
    channels_last: bool
    amp: bool
    in_dtype: torch.dtype
    mixup: Mixup | None
    generator: torch.Generator
    start_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best_top1: float = float("-inf")
    val_bins: Tensor | None = None
    tally: EpochTally | None = None
    stop_signal: int = 0
    resume_step: int = 0
    resume_partial: list | None = None

    def autocast(self):
        """bf16 autocast on CUDA with amp, else a no-op context."""
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else nullcontext()


class EpochTally:
    """One training epoch on this rank: its running sums, and the checks made between two steps.

    Engines call :meth:`after_step` once per optimizer step, with the step's loss tensor as the loop already
    has it. The tally only keeps a reference to it (no device operation, nothing read back). At check
    points (every step on CPU; every :data:`CHECK_EVERY_CUDA` steps and the epoch's last step on CUDA,
    where a read is a sync) the losses kept since the last check are read in one go and added to the
    epoch's sums on the host, the first non-finite one (its step) and the stop signal are all-reduced over
    ranks in one small tensor so that every rank stops at the same step, and the epoch stops by raising
    :class:`NonFiniteLoss` (first) or :class:`StopRequested` (``state.stop_signal`` set on some rank, not
    at the epoch's last step: the epoch then finishes and the lifecycle stops after recording it).

    Args:
        state: the run (its device, ranks, steps per epoch and ``stop_signal``).
        epoch: the 0-based epoch.
        step, loss_sum, seen, seconds: where a resumed epoch starts (steps done, their summed
            ``loss * batch``, images, seconds of training).
    """

    def __init__(self, state: RunState, epoch: int, *, step: int = 0, loss_sum: float = 0.0, seen: int = 0,
                 seconds: float = 0.0):
        self.state, self.epoch, self.steps = state, epoch, state.steps_per_epoch
        self.step, self.seen, self.seconds_before = step, seen, seconds
        self.loss_sum = loss_sum
        self.lr = math.nan
        self.last_finite: float | None = None  # the last finite loss read so far
        self.every = CHECK_EVERY_CUDA if state.dist.device.type == "cuda" else 1
        self.pending: list[tuple[Tensor, int, float]] = []  # (loss, batch, lr) of the steps since the check
        self.start = time.perf_counter()

    def after_step(self, loss: Tensor, batch: int, lr: float) -> None:
        """Count one finished step: its (0-d) mean loss over ``batch`` images at learning rate ``lr``.

        Raises:
            NonFiniteLoss, StopRequested: at a check point (see the class docstring).
        """
        self.pending.append((loss.detach(), batch, lr))
        self.step += 1
        self.seen += batch
        self.lr = lr
        if len(self.pending) >= self.every or self.step == self.steps:
            self.check()

    def _read_pending(self) -> tuple[tuple[int, float] | None, dict[int, float]]:
        """Fold the kept losses into the sums. Returns (step, loss) of the first that is not finite (None
        if all are) and the learning rate of each step read."""
        first_step = self.step - len(self.pending)
        lrs = {first_step + k: lr for k, (_, _, lr) in enumerate(self.pending)}
        values = torch.stack([loss for loss, _, _ in self.pending]).double().tolist() if self.pending else []
        bad = None
        for k, (value, (_, batch, _)) in enumerate(zip(values, self.pending)):  # values: the one read
            if not math.isfinite(value):
                bad = (first_step + k, value)
                break
            self.loss_sum += value * batch
            self.last_finite = value
        self.pending.clear()
        return bad, lrs

    def check(self) -> None:
        """Read the kept losses (all ranks agreeing) and raise if the epoch must stop here."""
        bad, lrs = self._read_pending()
        shared = torch.tensor([-math.inf if bad is None else -float(bad[0]), float(self.state.stop_signal)],
                              dtype=torch.float64, device=self.state.dist.device)
        neg_bad, signum = all_max_tensor(shared, self.state.dist).tolist()  # max of -step: the earliest
        if math.isfinite(neg_bad):
            step = int(-neg_bad)
            # Another rank went first: this rank's loss at that step was finite (its lr is every rank's).
            loss = bad[1] if bad is not None and bad[0] == step else math.nan
            raise NonFiniteLoss(self.epoch, self.step, step, loss, lrs.get(step, self.lr), self.last_finite)
        if signum and self.step < self.steps:
            raise StopRequested(self.epoch, self.step, int(signum))

    def seconds(self) -> float:
        """Seconds of training in this epoch so far (before a resume included)."""
        return self.seconds_before + time.perf_counter() - self.start

    def result(self) -> dict:
        """The finished epoch's ``train_loss`` (mean over all ranks' images), ``lr`` and ``images_per_s``."""
        d = self.state.dist
        seconds = all_max(self.seconds(), d)
        self._read_pending()  # normally none left: the epoch's last step is a check point
        total_loss, total_seen = all_sum([self.loss_sum, float(self.seen)], d)
        return {"train_loss": total_loss / max(total_seen, 1), "lr": self.lr,
                "images_per_s": total_seen / max(seconds, 1e-9)}

    def snapshot(self) -> dict:
        """What a checkpoint keeps of an unfinished epoch on this rank (the arguments of a resumed tally)."""
        return {"step": self.step, "loss_sum": self.loss_sum, "seen": self.seen,
                "seconds": self.seconds()}


def batch_to_device(x: Tensor, y: Tensor, state: RunState) -> tuple[Tensor, Tensor]:
    """A loader batch on the run's device, channels_last when the run asks for it."""
    x = x.to(state.dist.device, non_blocking=True)
    y = y.to(state.dist.device, non_blocking=True)
    if state.channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


class Engine(ABC):
    """A training loop behind the run lifecycle.

    Args:
        state: the prepared run. The engine may wrap ``state.model`` for training (DDP, compile, a
            fastai Learner) but must train the parameters of ``state.model`` with ``state.optimizer``, step
            ``state.scheduler`` every batch (``step_update(epoch * steps_per_epoch + i)``) and use
            ``state.mixup`` (None: ERM) with ``mixup_cross_entropy``, so that runs are comparable across
            engines. It must report every step to ``state.tally`` (:meth:`EpochTally.after_step`) and
            start at step ``state.tally.step`` (not 0 in an epoch resumed inside: the loader then skips the
            batches already trained).
    """

    name: str = "engine"

    def __init__(self, state: RunState):
        self.state = state

    @abstractmethod
    def train_epoch(self, epoch: int) -> dict:
        """Train one epoch (0-based ``epoch``) over ``state.train_loader``.

        Returns:
            ``{"train_loss": mean loss over all ranks' samples, "lr": the last step's lr,
            "images_per_s": training throughput over all ranks}``: ``state.tally.result()``.

        Raises:
            TrainingStopped: from ``state.tally``, between two steps.
        """

    def eval_model(self) -> nn.Module:
        """The module evaluation runs (e.g. the compiled one); ``state.model`` by default."""
        return self.state.model

    @torch.no_grad()
    def predict(self, loader) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield (float32 logits, targets) over ``loader``, without augmentation or mixing."""
        state = self.state
        model = self.eval_model()
        model.eval()
        for x, y in loader:
            x, y = batch_to_device(x, y, state)
            with state.autocast():
                logits = model(normalize_batch(x, state.bundle.mean, state.bundle.std, state.in_dtype))
            yield logits.float(), y

    def close(self) -> None:
        """Drop what the engine holds (a DDP module must go before the process group does)."""
        self.state = None
