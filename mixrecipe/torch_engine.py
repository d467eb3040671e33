"""``engine: torch`` (the default): a plain PyTorch loop, DistributedDataParallel under torchrun.

One step: uint8 batch to the device, one fused pass that normalizes and mixes it (``state.mixup``, or the
same op at λ = 1 for ERM), forward (bf16 autocast and channels_last on CUDA), ``mixup_cross_entropy``
against the two labels, backward, optimizer step; the schedule is updated before every step.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from .data import normalize_batch
from .engine import Engine, RunState, batch_to_device
from .loss import mixup_cross_entropy

__all__ = ["TorchEngine"]


class TorchEngine(Engine):
    """The torch loop. ``compile=true`` compiles the model; with several processes it trains through DDP
    and evaluates the (compiled, unwrapped) model on each rank's shard."""

    name = "torch"

    def __init__(self, state: RunState):
        super().__init__(state)
        d = state.dist
        self.fwd = torch.compile(state.model) if state.cfg.compile else state.model
        self.net = self.fwd
        if d.enabled:
            ids = [d.local_rank] if d.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.fwd, device_ids=ids)
        self.show_progress = state.cfg.progress and d.is_main and sys.stderr.isatty()

    def eval_model(self) -> nn.Module:
        return self.fwd  # not DDP-wrapped: ranks evaluate shards of unequal length

    def train_epoch(self, epoch: int) -> dict:
        from tqdm import tqdm

        state, cfg, d = self.state, self.state.cfg, self.state.dist
        optimizer, scheduler, mixup, tally = state.optimizer, state.scheduler, state.mixup, state.tally
        steps = state.steps_per_epoch
        self.net.train()
        bar = tqdm(total=steps, initial=tally.step, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not self.show_progress, leave=False, dynamic_ncols=True)
        for i, (x, y) in enumerate(state.train_loader, start=tally.step):
            if scheduler is not None:
                scheduler.step_update(epoch * steps + i)
            lr = optimizer.param_groups[0]["lr"]
            x, y = batch_to_device(x, y, state)
            if mixup is not None:
                mb = mixup.mix_batch(x, y)
                inputs, lam, perm, smoothing = mb.x, mb.lam, mb.perm, mb.label_smoothing
            else:  # ERM: the same fused op, at lam = 1
                inputs = normalize_batch(x, state.bundle.mean, state.bundle.std, state.in_dtype)
                lam, perm, smoothing = 1.0, None, cfg.mixup.label_smoothing
            with state.autocast():
                logits = self.net(inputs)
            loss = mixup_cross_entropy(logits.float(), y, lam, perm, label_smoothing=smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if self.show_progress and (i % 10 == 0 or i == steps - 1):
                rate = tally.seen * d.world / max(tally.seconds(), 1e-9)
                bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{rate:,.0f}", refresh=False)
            bar.update(1)
            tally.after_step(loss, y.shape[0], lr)  # may stop the epoch here (NaN loss, a signal)
        bar.close()
        return tally.result()

    def close(self) -> None:
        self.net = self.fwd = None
