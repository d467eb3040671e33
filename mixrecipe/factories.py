"""What a recipe's sections build: the Mixup policy, the optimizer, the schedule and the data loaders."""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader
from torch.utils.data.distributed import DistributedSampler

from .config import Config, RecipeError
from .data import ImageTensors, loader_collate
from .distributed import DistContext

__all__ = ["build_mixup", "create_optimizer", "create_schedule", "warmup_start", "train_loader",
           "eval_loader", "SkippingBatchSampler"]


def build_mixup(cfg: Config, num_classes: int, *, mean=None, std=None, out_dtype=None, generator=None):
    """The ``mixrecipe.Mixup`` of a config, or None for ERM (mixup.alpha = cutmix_alpha = 0)."""
    from .policy import Mixup

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
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"mixup: {exc}") from None


def warmup_start(cfg: Config, lr: float) -> float:
    """The learning rate the warm-up starts from, for a run whose (batch-scaled) learning rate is ``lr``.

    ``sched.warmup_start_factor`` f gives f * lr, so the warm-up rises from the same fraction of the lr at
    every batch size; without it ``sched.warmup_lr`` is the start as an absolute value, which must not exceed
    ``lr`` (a warm-up running downwards is refused, naming the key that scales).

    Raises:
        RecipeError: both keys set, or an absolute start above ``lr``.
    """
    s = cfg.sched
    if s.warmup_start_factor is not None:
        if s.warmup_lr != 0:
            raise RecipeError(f"sched.warmup_start_factor={s.warmup_start_factor:g} and sched.warmup_lr="
                              f"{s.warmup_lr:g} both set the warm-up's start: keep one (warmup_lr=0 to use "
                              "the factor)")
        return s.warmup_start_factor * lr
    if s.warmup_epochs > 0 and s.warmup_lr > lr:
        scaled = " (optim.lr: null scales it to the global batch)" if cfg.optim.lr is None else ""
        raise RecipeError(f"sched.warmup_lr={s.warmup_lr:g} is above the learning rate {lr:g}{scaled}: the "
                          "warm-up would run downwards; set sched.warmup_start_factor (the start as a "
                          "fraction of the lr, e.g. 0.25) and sched.warmup_lr=0, or a lower sched.warmup_lr")
    return s.warmup_lr


def create_schedule(optimizer, cfg: Config, steps_per_epoch: int):
    """A timm scheduler updated every step (``step_update(step)``), or None for a constant lr.

    The warm-up starts from :func:`warmup_start` of the optimizer's learning rate. ``multistep`` milestones
    are epochs from which the lr is decayed (the paper's "divide by 10 at 30, 60, 80"); timm's
    MultiStepLRScheduler applies milestone m at index m - 1, hence the +1 below.
    """
    from timm.scheduler import MultiStepLRScheduler, create_scheduler_v2

    s = cfg.sched
    if s.name == "none":
        return None
    group = optimizer.param_groups[0]
    start = warmup_start(cfg, group.get("initial_lr", group["lr"]))
    if s.name == "multistep":
        return MultiStepLRScheduler(
            optimizer, decay_t=[m * steps_per_epoch + 1 for m in s.milestones], decay_rate=s.decay_rate,
            warmup_t=s.warmup_epochs * steps_per_epoch, warmup_lr_init=start, warmup_prefix=False,
            t_in_epochs=False,
        )
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=s.name, num_epochs=cfg.epochs, decay_epochs=s.decay_epochs, decay_rate=s.decay_rate,
        min_lr=s.min_lr, warmup_lr=start, warmup_epochs=s.warmup_epochs, step_on_epochs=False,
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


def _loader(ds, cfg: Config, d: DistContext, **kwargs) -> DataLoader:
    tensors = isinstance(ds, ImageTensors)  # in memory: batches are slices, workers would only add copies
    return DataLoader(ds, collate_fn=loader_collate(ds), num_workers=0 if tensors else cfg.data.workers,
                      pin_memory=d.device.type == "cuda", **kwargs)


class SkippingBatchSampler(BatchSampler):
    """A BatchSampler whose passes start at batch ``skip`` (0: all of them): an epoch resumed after its
    first ``skip`` steps gets the rest of the same batches, in the same order, without loading the others.

    ``len()`` counts the batches a pass yields, ``skip`` excluded.
    """

    def __init__(self, sampler, batch_size: int, drop_last: bool):
        super().__init__(sampler, batch_size, drop_last)
        self.skip = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return super().__len__() - self.skip


def train_loader(ds, cfg: Config, d: DistContext) -> tuple[DataLoader, DistributedSampler]:
    """Shuffled by a seeded DistributedSampler (also with one process, so the order is the same anywhere),
    batched by a :class:`SkippingBatchSampler` (``loader.batch_sampler.skip``). The loader draws its worker
    seeds from its own ``generator`` (reseeded each epoch by the lifecycle), not from torch's global one,
    so that where the global stream stands inside an epoch does not depend on when the loader started."""
    sampler = DistributedSampler(ds, num_replicas=d.world, rank=d.rank, shuffle=True, seed=cfg.seed)
    batches = SkippingBatchSampler(sampler, cfg.batch_size, cfg.drop_last)
    return _loader(ds, cfg, d, batch_sampler=batches, generator=torch.Generator()), sampler


def eval_loader(ds, cfg: Config, d: DistContext) -> DataLoader:
    """This rank's shard in order, without padding: every image is counted exactly once."""
    shard = list(range(d.rank, len(ds), d.world))
    return _loader(ds, cfg, d, batch_size=cfg.batch_size * 2, sampler=shard)

