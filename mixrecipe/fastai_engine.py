"""``engine: fastai``: the training epochs run by a fastai ``Learner`` with :class:`MixupCallback`.

The same recipe keys mean the same things as with the torch engine: the lifecycle hands this engine the
same loaders (uint8 batches, a seeded ``DistributedSampler`` order), model and initialization, timm's
optimizer (wrapped by fastai's ``OptimWrapper``) and per-step schedule, and the same ``mixrecipe.Mixup``
policy; the lifecycle evaluates, records and checkpoints. On CPU the two engines give the same numbers.

fastai does the looping of each training epoch: forward, loss (``MixupCallback`` turns it into
``mixup_cross_entropy``), backward, step, its callbacks. fastai's own validation pass is skipped: the
lifecycle evaluates every engine the same way. Single process only (use the torch engine with torchrun).
"""

from __future__ import annotations

import sys

import fastai.callback.progress  # noqa: F401  (Learner.no_bar, the progress bar)
import torch
from fastai.callback.core import Callback, CancelValidException
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.optimizer import OptimWrapper

from .config import RecipeError
from .data import normalize_batch
from .engine import Engine, RunState
from .fastai import MixupCallback
from .outputs import load_checkpoint
from .policy import Mixup

__all__ = ["FastaiEngine"]


class _ChannelsLast(Callback):
    """channels_last batches, before the mixing callback (order 0)."""

    order = -5

    def before_batch(self):
        x = self.xb[0]
        if x.ndim == 4:
            self.learn.xb = (x.contiguous(memory_format=torch.channels_last),) + tuple(self.xb[1:])


class _Normalize(Callback):
    """Normalize batches still uint8 after the mixing callback (ERM's policy mixes nothing): λ = 1."""

    order = 5

    def __init__(self, mean, std, in_dtype):
        self.mean, self.std, self.in_dtype = mean, std, in_dtype

    def before_batch(self):
        x = self.xb[0]
        if x.dtype == torch.uint8:
            self.learn.xb = (normalize_batch(x, self.mean, self.std, self.in_dtype),) + tuple(self.xb[1:])


class _EpochDriver(Callback):
    """The run's epoch inside fastai: timm's per-step schedule, every step reported to the run's tally,
    no validation pass."""

    order = -10

    def __init__(self, state: RunState):
        self.state = state
        self.run_epoch = 0  # the run's epoch (fastai's own counts from 0 in every fit(1))

    def before_batch(self):
        scheduler = self.state.scheduler
        if self.training and scheduler is not None:  # the tally's step: fastai's iter restarts at a resume
            scheduler.step_update(self.run_epoch * self.state.steps_per_epoch + self.state.tally.step)

    def after_batch(self):
        if self.training:  # may stop the epoch here (NaN loss, a signal): the exception leaves fit()
            self.state.tally.after_step(self.loss, self.yb[0].shape[0], self.opt.opt.param_groups[0]["lr"])

    def before_validate(self):
        raise CancelValidException  # the lifecycle evaluates, the same way for every engine


def _erm_policy(state: RunState) -> Mixup:
    """ERM is the same policy with mixing off: normalization and the recipe's label smoothing still go
    through it, as the torch loop's ERM step does."""
    mixup = Mixup(mixup_alpha=1.0, label_smoothing=state.cfg.mixup.label_smoothing,
                  num_classes=state.bundle.num_classes, generator=state.generator,
                  mean=list(state.bundle.mean), std=list(state.bundle.std), out_dtype=state.in_dtype)
    mixup.mixup_enabled = False
    return mixup


class FastaiEngine(Engine):
    """Train each epoch with ``learn.fit(1)`` on the run's loaders, model and optimizer."""

    name = "fastai"

    def __init__(self, state: RunState):
        super().__init__(state)
        if state.dist.world > 1:
            raise RecipeError("engine=fastai trains in one process; use engine=torch with torchrun for "
                              "several")
        if state.cfg.compile:
            raise RecipeError("compile=true is supported by engine=torch only")
        policy = state.mixup if state.mixup is not None else _erm_policy(state)
        self.driver = _EpochDriver(state)
        cbs = [MixupCallback(policy), _Normalize(state.bundle.mean, state.bundle.std, state.in_dtype),
               self.driver]
        if state.channels_last:
            cbs.append(_ChannelsLast())
        dls = DataLoaders(state.train_loader, state.val_loader)
        self.learn = Learner(dls, state.model, loss_func=CrossEntropyLossFlat(),
                             opt_func=OptimWrapper(opt=state.optimizer), lr=state.lr, cbs=cbs)
        if state.amp:
            self.learn.to_bf16()
        self.learn.create_opt()  # fastai clears the optimizer state when it creates its own: reload it
        if state.resume_from is not None:
            self.learn.opt.opt.load_state_dict(load_checkpoint(state.resume_from)["optimizer"])
        self.show_progress = state.cfg.progress and sys.stderr.isatty()

    def train_epoch(self, epoch: int) -> dict:
        self.driver.run_epoch = epoch
        learn = self.learn
        with learn.no_logging():
            if self.show_progress:
                learn.fit(1, self.state.lr)
            else:
                with learn.no_bar():
                    learn.fit(1, self.state.lr)
        return self.state.tally.result()

    def eval_model(self):
        return self.learn.model
