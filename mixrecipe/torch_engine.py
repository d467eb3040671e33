"""``engine: torch`` (the default): a plain PyTorch loop, DistributedDataParallel under torchrun.

One step: uint8 batch to the device, one fused pass that normalizes and mixes it (``state.mixup``, or the
same op at λ = 1 for ERM), forward (bf16 autocast and channels_last on CUDA), ``mixup_cross_entropy``
against the two labels, backward, optimizer step; the schedule is updated before every step.

With ``data.on_device`` (null: on for CUDA when an in-memory training set fits) the training set lives on the
device (:class:`mixrecipe.gpu_data.DeviceImages`) and the loader's workers are skipped: each step takes the
batch's indices from the loader's batch sampler (so shuffling, sharding and resuming inside an epoch are
the loader's), draws the crop offsets and flip bits on the host from the data set's generator (the loader's
stream), copies them with the indices and labels in one pinned copy and makes the batch in one kernel:
gather + crop/flip + normalize + mix. On CPU the same path runs its twin (crop/flip by indexing, then the
mixing op): the batches the loader would give, bit for bit.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from .config import RecipeError
from .data import ImageTensors, normalize_batch
from .engine import Engine, RunState, batch_to_device
from .gpu_data import DeviceImages, fits_on_device
from .gpu_decode import DeviceDecoder
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
        self.device_data = _device_data(state)
        self.device_decoder = _device_decoder(state)

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
        batches = state.train_loader if self.device_data is None else state.train_loader.batch_sampler
        smoothing = cfg.mixup.label_smoothing  # the recipe's, with mixup and without: one source
        for i, batch in enumerate(batches, start=tally.step):
            if scheduler is not None:
                scheduler.step_update(epoch * steps + i)
            lr = optimizer.param_groups[0]["lr"]
            if self.device_data is not None:  # indices -> the mixed batch, on the device
                inputs, y, lam, perm, _ = self.device_data.batch(
                    batch, mixup=mixup, mean=state.bundle.mean, std=state.bundle.std,
                    out_dtype=state.in_dtype, label_smoothing=smoothing)
            else:  # a loader batch; with data.decoder=device, JPEG bytes decoded and cropped on the device
                x, y = (self.device_decoder.batch(*batch) if self.device_decoder is not None
                        else batch_to_device(*batch, state))
                if mixup is not None:
                    mb = mixup.mix_batch(x, y)
                    inputs, lam, perm = mb.x, mb.lam, mb.perm
                else:  # ERM: the same fused op, at lam = 1
                    inputs = normalize_batch(x, state.bundle.mean, state.bundle.std, state.in_dtype)
                    lam, perm = 1.0, None
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
        self.net = self.fwd = self.device_data = self.device_decoder = None


def _device_data(state: RunState) -> DeviceImages | None:
    """The device-resident training set ``data.on_device`` asks for (None: batches come from the loader)."""
    want, d, ds = state.cfg.data.on_device, state.dist, state.bundle.train
    in_memory = isinstance(ds, ImageTensors)
    if want is None:
        want = in_memory and fits_on_device(ds.images.nbytes + ds.targets.nbytes, d.device)
    if not want:
        return None
    if not in_memory:
        raise RecipeError("data.on_device=true needs an in-memory data set (digits, fashion_mnist, "
                          f"cifar10); {state.cfg.data.name} is read from files: set data.on_device=false")
    fmt = torch.channels_last if state.channels_last else torch.contiguous_format
    return DeviceImages(ds, d.device, fmt)


def _device_decoder(state: RunState) -> DeviceDecoder | None:
    """The batch decoder ``data.decoder=device`` asks for (None: the workers decode)."""
    ds = state.bundle.train
    if not getattr(ds, "encoded", False):
        return None
    fmt = torch.channels_last if state.channels_last else torch.contiguous_format
    return DeviceDecoder(ds, state.dist.device, fmt)
