"""``engine: torch`` (the default): a plain PyTorch loop, DistributedDataParallel under torchrun.

One step: uint8 batch to the device, one fused pass that normalizes and mixes it (``state.mixup``, or the
same op at λ = 1 for ERM), forward (bf16 autocast and channels_last on CUDA), ``mixup_cross_entropy``
against the two labels, backward, optimizer step; the schedule is updated before every step.
"""

from __future__ import annotations

import sys
import time

import torch
from torch import nn

from .data import normalize_batch
from .distributed import all_max, all_sum
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
        optimizer, scheduler, mixup = state.optimizer, state.scheduler, state.mixup
        steps = state.steps_per_epoch
        self.net.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=d.device)
        seen, lr = 0, optimizer.param_groups[0]["lr"]
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not self.show_progress,
                   leave=False, dynamic_ncols=True)
        start = time.perf_counter()
        for i, (x, y) in enumerate(state.train_loader):
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
            loss_sum += loss.detach().double() * y.shape[0]
            seen += y.shape[0]
            if self.show_progress and (i % 10 == 0 or i == steps - 1):
                rate = seen * d.world / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{rate:,.0f}", refresh=False)
            bar.update(1)
        bar.close()
        seconds = all_max(time.perf_counter() - start, d)
        total_loss, total_seen = all_sum([loss_sum.item(), float(seen)], d)
        return {"train_loss": total_loss / max(total_seen, 1), "lr": lr,
                "images_per_s": total_seen / max(seconds, 1e-9)}

    def close(self) -> None:
        self.net = self.fwd = None
