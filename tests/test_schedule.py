"""The learning-rate warm-up: it rises from a start that scales with the lr, at every batch size."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mixrecipe.config import DEFAULT_WORKERS, RecipeError, load_config
from mixrecipe.factories import create_optimizer, create_schedule

IMAGENET = Path(__file__).resolve().parent.parent / "recipes" / "imagenet.yaml"


def _schedule(cfg, steps_per_epoch: int = 10):
    """The lr the run would train at, step by step, built as lifecycle.prepare builds it (one process)."""
    lr = cfg.optim.lr
    if lr is None:  # the linear scaling rule, as prepare applies it
        lr = cfg.optim.lr_base * cfg.batch_size / cfg.optim.lr_base_size
    optimizer = create_optimizer(torch.nn.Linear(2, 2), cfg, lr)
    scheduler = create_schedule(optimizer, cfg, steps_per_epoch)

    def lr_at(step: int) -> float:
        scheduler.step_update(step)
        return optimizer.param_groups[0]["lr"]

    return lr, lr_at


@pytest.mark.parametrize("batch", [4, 1024])
def test_imagenet_warmup_rises_from_a_quarter_of_the_scaled_lr(batch):
    cfg = load_config(str(IMAGENET), [f"batch_size={batch}"])
    steps = 10
    lr, lr_at = _schedule(cfg, steps)
    warmup = [lr_at(step) for step in range(cfg.sched.warmup_epochs * steps + 1)]
    print(f"imagenet, global batch {batch}: lr {lr:g}, warm-up steps 0-4: "
          f"{', '.join(f'{v:.6g}' for v in warmup[:5])} ... step {len(warmup) - 1}: {warmup[-1]:.6g}")
    assert lr == pytest.approx(0.1 * batch / 256)
    assert warmup[0] == pytest.approx(0.25 * lr)  # the documented start: a quarter of the scaled lr
    assert all(b > a for a, b in zip(warmup, warmup[1:]))  # rising, never downwards
    assert warmup[-1] == pytest.approx(lr)  # the warm-up ends at the lr
    if batch == 1024:
        assert warmup[0] == pytest.approx(0.1)  # the paper's start at its 8 x 128 batch


def test_imagenet_workers_follow_the_documented_default():
    assert load_config(str(IMAGENET)).data.workers == DEFAULT_WORKERS == min(4, os.cpu_count() or 1)
    assert load_config(str(IMAGENET), ["data.workers=8"]).data.workers == 8


def test_absolute_warmup_start_still_works_below_the_lr():
    cfg = load_config(None, ["sched.name=multistep", "sched.warmup_epochs=1", "sched.warmup_lr=0.001",
                             "optim.lr=0.01", "epochs=3"])
    _, lr_at = _schedule(cfg)
    assert lr_at(0) == pytest.approx(0.001) and lr_at(10) == pytest.approx(0.01)


def test_a_downward_warmup_and_two_starts_are_refused_with_the_fix():
    # An older imagenet config (warmup_lr 0.1) at batch 4: lr 0.0015625, a warm-up that would fall.
    old = load_config(str(IMAGENET), ["batch_size=4", "sched.warmup_start_factor=null",
                                      "sched.warmup_lr=0.1"])
    with pytest.raises(RecipeError, match=r"warmup_lr=0.1 is above the learning rate 0.0015625.*"
                                          r"warmup_start_factor"):
        _schedule(old)
    both = load_config(str(IMAGENET), ["sched.warmup_lr=0.1"])
    with pytest.raises(RecipeError, match="both set the warm-up's start"):
        _schedule(both)
