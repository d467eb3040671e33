"""The interface between the run lifecycle (``mixrecipe.lifecycle``) and a training engine.

The lifecycle prepares a :class:`RunState` (data, model, optimizer, schedule, loaders, the Mixup policy,
the resumed history), then for every epoch reseeds every random stream, asks the engine to train one
epoch, evaluates through the engine's :meth:`Engine.predict`, and records the epoch. An engine only
loops: it owns how batches flow through forward, loss, backward and step.

To add an engine: subclass :class:`Engine` in its own module, implement :meth:`Engine.train_epoch`
(and :meth:`Engine.predict` if plain evaluation of ``state.model`` is not right for it), and name the
class in ``mixrecipe.lifecycle.ENGINES``. Engines import this module and the layers below it, never each
other nor the lifecycle.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .config import Config
from .data import DataBundle, normalize_batch
from .distributed import DistContext
from .policy import Mixup

__all__ = ["RunState", "Engine", "batch_to_device"]


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

    def autocast(self):
        """bf16 autocast on CUDA with amp, else a no-op context."""
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else nullcontext()


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
            engines.
    """

    name: str = "engine"

    def __init__(self, state: RunState):
        self.state = state

    @abstractmethod
    def train_epoch(self, epoch: int) -> dict:
        """Train one epoch (0-based ``epoch``) over ``state.train_loader``.

        Returns:
            ``{"train_loss": mean loss over all ranks' samples, "lr": the last step's lr,
            "images_per_s": training throughput over all ranks}``.
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
