"""Lightning callback: ``Trainer(callbacks=[MixupCallback(num_classes=K)])`` and training runs with mixup.

The callback mixes every *training* batch in ``on_train_batch_start``, on the batch's device, with
mixrecipe's fused op, and puts the mixed images and the (B, K) soft targets back in place of the batch's
images and class indices. A ``training_step`` that computes ``F.cross_entropy(logits, y)`` then trains on
mixed targets with nothing else changed (``F.cross_entropy`` takes class probabilities). Validation, test
and predict batches are never touched.

- Batches: a dict (``input_key`` / ``target_key``; by default the first of the usual names such as
  ``"image"``/``"img"`` and ``"label"``/``"target"``) or a list/tuple (the first two items, or the
  indices ``input_key`` / ``target_key``). Dicts and lists are updated in place; a tuple is immutable, so
  the mixed tuple is handed to ``training_step`` instead of the original one (the module's
  ``training_step`` is wrapped while fitting, signature unchanged).
- Mixing: a :class:`mixrecipe.Mixup` policy (any mode, CutMix included), or without one, the recipe of
  fastai and of the paper's Lightning port: per-sample λ ~ Beta(alpha, alpha) folded to max(λ, 1 - λ)
  and a random partner other than the sample itself (the seed's random permutation lets a sample draw
  itself, a wasted mix: here the partners are a shuffled cycle, so every sample of a batch of 2 or more
  gets another one).
- Randomness: every batch draws from a ``torch.Generator`` seeded from (seed, global rank, number of
  batches mixed so far). The seed comes from ``torch.initial_seed()`` on rank 0 (so ``seed_everything``
  fixes it), and the seed and the count are the callback's checkpoint state: a fit resumed from a
  checkpoint continues the same mixing stream, and under DDP each rank mixes its own batch with its own
  draws. A policy without a generator is given the callback's.
- Logging: every ``log_every_n_steps`` optimizer steps (0: never), rank 0 logs a grid of mixed images
  titled with both labels and their weights, with TensorBoard's ``add_image`` or a logger's
  ``log_image`` (W&B and others).

Importing this module imports Lightning (``lightning.pytorch``, and ``pytorch_lightning`` too where it is
installed: the callback is a Callback of both); ``import mixrecipe`` imports neither.
"""

from __future__ import annotations

import importlib
import inspect
import numbers
import warnings
from collections.abc import Mapping, MutableMapping

import torch
from torch import Tensor

from . import draws, ops
from .checks import check_alpha, check_count, check_num_classes
from .policy import Mixup, sample_beta

__all__ = ["MixupCallback"]

INPUT_KEYS = ("image", "images", "img", "imgs", "input", "inputs", "x", "pixel_values", "pixels", "data")
TARGET_KEYS = ("label", "labels", "target", "targets", "y")
GRID_MAX = 16  # images in a logged grid
_OP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MASK64 = (1 << 64) - 1


def _callback_bases() -> tuple[type, ...]:
    bases = []
    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            bases.append(importlib.import_module(name).Callback)
        except ImportError:
            continue
    if not bases:
        raise ImportError('mixrecipe.lightning needs Lightning, an optional dependency: '
                          'pip install lightning  (from a mixrecipe checkout: pip install ".[lightning]")')
    return tuple(bases)


# --------------------------------------------------------------------------------------------------
# Argument checks: the generic rules (alpha, num_classes, counts) are mixrecipe.checks'; only what is
# the callback's own (a policy to reconcile with, batch keys) is here, built on them.
# --------------------------------------------------------------------------------------------------
def _check_policy(mixup):
    if mixup is not None and not isinstance(mixup, Mixup):
        raise TypeError(f"mixup must be a mixrecipe.Mixup or None, got {type(mixup).__name__}")
    return mixup


def _reconcile_num_classes(num_classes, mixup):
    """K from the argument or the policy; both given, they must agree."""
    num_classes = check_num_classes(num_classes, allow_none=True)
    if mixup is None or num_classes is None:
        return num_classes if mixup is None else mixup.num_classes
    if num_classes != mixup.num_classes:
        raise ValueError(f"num_classes={num_classes} but the mixup policy has num_classes="
                         f"{mixup.num_classes}: pass one of them")
    return num_classes


def _check_key(name: str, key):
    if key is None or isinstance(key, (str, int)) and not isinstance(key, bool):
        return key
    raise TypeError(f"{name} must be a dict key (str), a list/tuple index (int) or None, got {key!r}")


# --------------------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------------------
def _mix_seed(seed: int, rank: int, count: int) -> int:
    """A 63-bit seed from (seed, rank, count): splitmix64 steps, so nearby inputs give unrelated seeds."""
    z = seed & _MASK64
    for v in (rank, count):
        z = (z + 0x9E3779B97F4A7C15 + v) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
    return z >> 1


def _module_num_classes(pl_module):
    """``num_classes`` from the LightningModule (an attribute or a hyperparameter), or None."""
    k = getattr(pl_module, "num_classes", None)
    if k is None:
        hparams = getattr(pl_module, "hparams", None)
        k = hparams.get("num_classes") if isinstance(hparams, Mapping) else None
    if isinstance(k, numbers.Integral) and not isinstance(k, bool) and k >= 1:
        return int(k)
    return None


def _random_partners(n: int, generator) -> Tensor:
    """A random permutation without fixed points (n >= 2): a shuffled order, each sample paired with the
    one ``shift`` places further in it (shift uniform in [1, n-1]); every sample's partner is uniform
    over the others."""
    sigma = torch.randperm(n, generator=generator)
    if n < 2:
        return sigma
    shift = int(torch.randint(1, n, (), generator=generator))
    perm = torch.empty_like(sigma)
    perm[sigma] = sigma.roll(-shift)
    return perm


def _find_key(batch: Mapping, key, candidates, name: str):
    if key is not None:
        if key not in batch:
            raise ValueError(f"{name}={key!r} is not in the batch; its keys are {list(batch)}")
        return key
    for k in candidates:
        if k in batch:
            return k
    raise ValueError(f"no {name.split('_')[0]} found in the batch (keys {list(batch)}): pass "
                     f"MixupCallback({name}=...)")


def _seq_index(batch, key, default: int, name: str) -> int:
    key = default if key is None else key
    if not isinstance(key, int):
        raise ValueError(f"{name}={key!r} but the batch is a {type(batch).__name__}: use an int index "
                         "or None")
    if not -len(batch) <= key < len(batch):
        raise ValueError(f"{name}={key} is out of range for a batch of {len(batch)} items")
    return key


def _grid_array(x: Tensor, labels_a: Tensor, labels_b: Tensor, lam: Tensor, num_classes: int):
    """The logged picture: (H, W, 3) uint8, the first images of the batch titled with labels and λ."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from .plots import mixup_preview_figure

    n = min(GRID_MAX, x.shape[0])
    imgs = x[:n].detach().float().cpu()
    if imgs.shape[1] not in (1, 3):
        imgs = imgs[:, :1]
    lo, hi = imgs.amin(), imgs.amax()
    imgs = (imgs - lo) / (hi - lo).clamp(min=1e-12)  # the batch's range to [0, 1]: normalized inputs show
    fig = mixup_preview_figure(imgs, labels_a[:n].cpu(), labels_b[:n].cpu(), lam[:n].float().cpu(),
                               [str(k) for k in range(num_classes)], title="mixed training batch")
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


class _Swap:
    """A tuple batch cannot be changed in place: ``training_step`` gets the mixed one instead."""

    def __init__(self):
        self.pending = None  # (original batch, mixed batch) for the current step
        self.module = None
        self.wrapper = None
        self.previous = None

    def install(self, pl_module) -> None:
        if self.module is pl_module and pl_module.__dict__.get("training_step") is self.wrapper:
            return
        original = pl_module.training_step
        swap = self

        def training_step(*args, **kwargs):
            pending = swap.pending
            if pending is not None:
                if args and args[0] is pending[0]:
                    args = (pending[1],) + args[1:]
                elif kwargs.get("batch") is pending[0]:
                    kwargs["batch"] = pending[1]
            return original(*args, **kwargs)

        # Lightning inspects training_step's parameters (does it take batch_idx?): show the original's.
        func = getattr(original, "__func__", None)
        if func is not None:
            training_step.__signature__ = inspect.signature(func)
        self.previous = pl_module.__dict__.get("training_step")
        self.module, self.wrapper = pl_module, training_step
        pl_module.training_step = training_step

    def uninstall(self) -> None:
        module, self.pending = self.module, None
        if module is not None and module.__dict__.get("training_step") is self.wrapper:
            if self.previous is None:
                del module.__dict__["training_step"]
            else:
                module.__dict__["training_step"] = self.previous
        self.module = self.wrapper = self.previous = None


class _MixupCallbackMixin:
    """The callback's behaviour; :class:`MixupCallback` adds Lightning's ``Callback`` base class(es)."""

    def __init__(self, mixup: Mixup | None = None, *, alpha: float = 0.4, num_classes: int | None = None,
                 input_key=None, target_key=None, log_every_n_steps: int = 0) -> None:
        super().__init__()
        self.mixup = _check_policy(mixup)
        self.alpha = check_alpha("alpha", alpha)
        self.num_classes = _reconcile_num_classes(num_classes, self.mixup)
        self.input_key = _check_key("input_key", input_key)
        self.target_key = _check_key("target_key", target_key)
        self.log_every_n_steps = check_count("log_every_n_steps", log_every_n_steps)  # 0: never
        self.generator = torch.Generator()
        if self.mixup is not None and self.mixup.generator is None:
            self.mixup.generator = self.generator
        self.seed: int | None = None
        self.batches_mixed = 0
        self.lam = self.perm = None  # the last batch's label weights (B,) and partners (None: flip)
        self._logged_step = -1
        self._swap = _Swap()
        self._warned_grid = False

    def __repr__(self) -> str:
        how = repr(self.mixup) if self.mixup is not None else f"alpha={self.alpha}"
        return f"{type(self).__name__}({how}, num_classes={self.num_classes})"

    # Lightning hooks -----------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        if self.num_classes is None:
            self.num_classes = _module_num_classes(pl_module)
        if self.seed is not None:
            return
        g = self.mixup.generator if self.mixup is not None else self.generator
        seed = g.initial_seed() if g is not self.generator else torch.initial_seed()
        self.seed = int(trainer.strategy.broadcast(int(seed), src=0))  # rank 0's seed everywhere

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        x, y, put = self._locate(batch)
        if self.seed is None:  # a fit that skipped setup (should not happen): seed as setup would
            self.seed = int(torch.initial_seed())
        g = self.mixup.generator if self.mixup is not None else self.generator
        g.manual_seed(_mix_seed(self.seed, trainer.global_rank, self.batches_mixed))
        x_out, soft, target, num_classes = self._mix(x, y)
        self.batches_mixed += 1
        if str(trainer.precision).endswith("-true") and x_out.dtype in (torch.float16, torch.bfloat16):
            soft = soft.to(x_out.dtype)  # a half-precision model's logits: same dtype for the loss
        mixed = put(x_out, soft)
        if mixed is not batch:
            self._swap.install(pl_module)
            self._swap.pending = (batch, mixed)
        self._maybe_log(trainer, x_out, target, num_classes)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._swap.pending = None

    def on_fit_end(self, trainer, pl_module) -> None:
        self._swap.uninstall()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._swap.uninstall()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._swap.uninstall()

    def state_dict(self) -> dict:
        return {"seed": self.seed, "batches_mixed": self.batches_mixed}

    def load_state_dict(self, state_dict: dict) -> None:
        self.seed = state_dict["seed"]
        self.batches_mixed = int(state_dict["batches_mixed"])

    # The batch ------------------------------------------------------------------------------------------
    def _locate(self, batch):
        """-> (images, targets, put) where ``put(x, soft)`` returns the batch holding them."""
        if isinstance(batch, Mapping):
            if not isinstance(batch, MutableMapping):
                raise TypeError(f"MixupCallback writes the mixed batch back; a {type(batch).__name__} "
                                "cannot be changed: use a dict")
            ik = _find_key(batch, self.input_key, INPUT_KEYS, "input_key")
            tk = _find_key(batch, self.target_key, TARGET_KEYS, "target_key")

            def put(x, soft):
                batch[ik], batch[tk] = x, soft
                return batch

            return batch[ik], batch[tk], put
        if isinstance(batch, (list, tuple)):
            ik = _seq_index(batch, self.input_key, 0, "input_key")
            tk = _seq_index(batch, self.target_key, 1, "target_key")

            def put(x, soft):
                items = list(batch)
                items[ik], items[tk] = x, soft
                if isinstance(batch, list):
                    batch[:] = items
                    return batch
                return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)

            return batch[ik], batch[tk], put
        raise TypeError(f"MixupCallback needs (images, targets, ...) lists/tuples or dict batches, got a "
                        f"{type(batch).__name__}")

    def _targets(self, y, batch: int):
        """-> (targets for the op: int64 (B,) or float (B, K), K)."""
        name = f"the targets ({self.target_key or 'target_key'})"
        if not isinstance(y, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(y).__name__}")
        if y.ndim == 0 or y.shape[0] != batch:
            raise ValueError(f"{name} have shape {tuple(y.shape)} but the batch holds {batch} images")
        if y.ndim == 1:
            if y.dtype == torch.bool or y.is_complex():
                raise TypeError(f"{name} must hold class indices or (B, K) floats, got {y.dtype}")
            if self.num_classes is None:
                kind = "floats of shape (B,)" if y.is_floating_point() else "class indices"
                raise ValueError(f"{name} hold {kind}: pass num_classes (MixupCallback(num_classes=K), or "
                                 "a num_classes attribute or hyperparameter of the LightningModule) to mix "
                                 "them into (B, K) soft targets")
            if y.is_floating_point():
                if y.device.type == "cpu" and not torch.equal(y, y.round()):
                    raise ValueError(f"{name} are floats of shape (B,) that are not whole numbers: pass "
                                     "class indices or (B, K) targets")
                y = y.long()
            return y, self.num_classes
        if y.ndim == 2 and y.is_floating_point():
            if self.num_classes is not None and y.shape[1] != self.num_classes:
                raise ValueError(f"{name} have {y.shape[1]} columns but num_classes={self.num_classes}")
            return y, y.shape[1]
        raise ValueError(f"{name} must be (B,) class indices or (B, K) floats, got {y.dtype} "
                         f"{tuple(y.shape)}")

    def _mix(self, x, y):
        """-> (mixed images, soft targets, targets, K); sets ``self.lam`` and ``self.perm``."""
        if not isinstance(x, Tensor) or x.ndim < 1 or x.shape[0] < 1:
            raise TypeError(f"the images ({self.input_key or 'input_key'}) must be a (B, ...) tensor, got "
                            f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        batch = x.shape[0]
        target, k = self._targets(y, batch)
        if self.mixup is not None:
            mb = self.mixup.mix_batch(x, target)
            soft = ops.mixup_target(mb.target, k if mb.target.ndim == 1 else None, mb.lam, mb.perm,
                                    mb.label_smoothing)
            self.lam, self.perm = mb.lam, mb.perm
            return mb.x, soft, target, k
        if not x.is_floating_point():
            raise TypeError(f"the images must be floating point to be mixed, got {x.dtype}: convert them "
                            "(or pass a mixrecipe.Mixup with mean/std, which normalizes uint8 batches)")
        lam = sample_beta(self.alpha, (batch,), generator=self.generator)
        lam = torch.maximum(lam, 1.0 - lam)  # the sample itself keeps the larger weight
        perm = _random_partners(batch, self.generator)
        lam, perm = draws.to_device(x.device, lam, perm)  # one asynchronous copy
        if x.dtype in _OP_DTYPES:
            x_out, soft = ops.mixup(x, target, lam, perm, num_classes=k)
        else:  # float64: the op's formula in plain torch
            x_out = torch.lerp(x[perm], x, lam.to(x.dtype).view([-1] + [1] * (x.ndim - 1)))
            soft = ops.mixup_target(target, k if target.ndim == 1 else None, lam, perm)
        self.lam, self.perm = lam, perm
        return x_out, soft, target, k

    # Logging ----------------------------------------------------------------------------------------
    def _maybe_log(self, trainer, x: Tensor, target: Tensor, num_classes: int) -> None:
        n = self.log_every_n_steps
        step = trainer.global_step
        if n <= 0 or step % n or step == self._logged_step or not trainer.is_global_zero:
            return
        self._logged_step = step  # with gradient accumulation: once per optimizer step
        loggers = list(trainer.loggers)
        if not loggers:
            return
        if x.ndim != 4:
            if not self._warned_grid:
                self._warned_grid = True
                warnings.warn(f"MixupCallback logs image grids of (B, C, H, W) batches; this batch is "
                              f"{tuple(x.shape)}: nothing logged", stacklevel=2)
            return
        labels = target if target.ndim == 1 else target.argmax(1)
        perm = self.perm if self.perm is not None else torch.arange(x.shape[0] - 1, -1, -1, device=x.device)
        picture = _grid_array(x, labels, labels[perm], self.lam, num_classes)
        tag = "mixup/train_batch"
        for logger in loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key=tag, images=[picture], step=step)
                continue
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image(tag, picture, step, dataformats="HWC")


class MixupCallback(_MixupCallbackMixin, *_callback_bases()):
    """Mixup for Lightning: mixes each training batch in ``on_train_batch_start`` with the fused op.

    Args:
        mixup: a :class:`mixrecipe.Mixup` policy (timm semantics: Mixup/CutMix, per batch/pair/sample λ,
            label smoothing). None: per-sample λ ~ Beta(alpha, alpha), max(λ, 1 - λ), and a random
            partner other than the sample itself.
        alpha: Beta concentration when ``mixup`` is None (default 0.4, fastai's and the seed's).
        num_classes: K, needed for class-index targets (default: ``mixup.num_classes``, else the
            LightningModule's ``num_classes`` attribute or hyperparameter).
        input_key: where the images are: a dict key, or a list/tuple index (default: a usual name such as
            ``"image"``/``"img"``/``"x"``, or item 0).
        target_key: where the targets are: (B,) class indices or (B, K) floats (default: ``"label"``,
            ``"target"``, ... or item 1). They are replaced by (B, K) float32 soft targets.
        log_every_n_steps: log a grid of mixed images with both labels and λ every N optimizer steps
            (0: never), on rank 0, to every logger with ``log_image`` or a TensorBoard ``add_image``.

    Raises:
        TypeError, ValueError: ``alpha``, ``num_classes`` and ``log_every_n_steps`` (an int >= 0) follow
            the rules of every mixrecipe entry point (``mixrecipe.checks``): a value of the wrong kind is a
            TypeError, one out of range a ValueError. ``num_classes`` that disagrees with the policy's, or
            a key missing from a batch, is a ValueError.

    Attributes:
        lam: (B,) label weights of the last mixed batch; perm: its partners (None: the flip pairing).
        seed, batches_mixed: the mixing stream's position, saved in checkpoints.
    """
