"""Losses for mixup training: timm's soft-target cross-entropy and a mixup cross-entropy without targets.

``mixup_cross_entropy(logits, target, lam, perm)`` gives the same loss and gradient as
``SoftTargetCrossEntropy()(logits, mixup_target(target, K, lam, smoothing))`` but never builds the (B, K)
soft-target matrix: each row needs its logsumexp, the logits of its own class and of its partner's class,
and (with smoothing) the sum of its logits. CUDA tensors run a Triton forward/backward pair
(``mixrecipe.kernels.cross_entropy``). CPU tensors run the numba rows of ``mixrecipe.cpu_kernel`` (a
vectorized exp; from 16K logits on PyTorch's OpenMP team) for float32 logits of up to
``CPU_KERNEL_MAX_ELEMS`` elements, where they beat both the eager path and timm's dense loss; other dtypes
take an eager path (one log_softmax, two gathers). The op is a ``torch.library.custom_op`` with a fake and an
autograd formula, so ``torch.compile(fullgraph=True)`` traces through it; a plain eager call runs the same
bodies and formula as a ``torch.autograd.Function`` (``_DirectRows``), without the dispatcher's ~0.1 ms.
Math is fp32 for fp16/bf16/fp32 logits (fp64 logits stay fp64 and take the eager path); the loss comes back
in fp32, the gradient in the logits' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from . import cpu_kernel
from .backend import current_cpu_backend, runs_kernel
from .checks import check_index_target, check_lam, check_perm, check_reduction, check_unit_interval, tracing
from .kernels.cross_entropy import mixup_ce_bwd, mixup_ce_fwd

__all__ = ["SoftTargetCrossEntropy", "mixup_cross_entropy", "reduce_loss", "CPU_KERNEL_MAX_ELEMS"]

_LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CPU_KERNEL_MAX_ELEMS = 1 << 26  # B*K up to which the numba rows run on CPU: they beat the eager path at every
# size measured, up to (1024, 21843) (61.6 against 68.3 ms, forward and backward)


def _use_triton(logits: torch.Tensor) -> bool:
    # fp64 is a checking dtype (gradcheck): it keeps fp64 math on the eager path everywhere.
    if logits.dtype == torch.float64:
        return False
    return runs_kernel(logits)


def _use_cpu_kernel(logits: torch.Tensor) -> bool:
    """Small float32 CPU logits under the "numba" backend run ``cpu_kernel.ce_rows``."""
    return (logits.device.type == "cpu" and logits.dtype == torch.float32
            and logits.numel() <= CPU_KERNEL_MAX_ELEMS and current_cpu_backend() == "numba"
            and cpu_kernel.available())


# ----------------------------------------------------------------------------------------------------------
# Eager path (CPU): the kernels' formula with torch ops, never a (B, K) target matrix
# ----------------------------------------------------------------------------------------------------------


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _partner_targets(target: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    return target.flip(0) if perm is None else target[perm]


def _eager_fwd(logits, target, lam, perm, smoothing):
    # log_softmax is one fused pass on CPU (torch.logsumexp takes about twice as long); it upcasts itself.
    logp = torch.log_softmax(logits, dim=1, dtype=_compute_dtype(logits))
    lp_own = logp.gather(1, target.unsqueeze(1)).squeeze(1)
    lp_mix = logp.gather(1, _partner_targets(target, perm).unsqueeze(1)).squeeze(1)
    loss = -(1.0 - smoothing) * torch.lerp(lp_mix, lp_own, lam.to(logp.dtype))
    if smoothing > 0:
        loss = loss - (smoothing / logp.shape[1]) * logp.sum(dim=1)
    # The kernels' saved logsumexp, for a backward that takes the Triton path: z - log_softmax(z).
    lse = logits.gather(1, target.unsqueeze(1)).squeeze(1).to(logp.dtype) - lp_own
    return loss, lse


def _eager_bwd(grad_loss, logits, target, lam, perm, smoothing):
    dz = torch.softmax(logits, dim=1, dtype=_compute_dtype(logits))  # recomputed: nothing (B, K) saved
    lam = lam.to(dz.dtype)
    if smoothing > 0:
        dz.sub_(smoothing / dz.shape[1])
    # Subtract the two on-class weights; scatter_add_ sums them when both classes coincide.
    dz.scatter_add_(1, target.unsqueeze(1), (-(1.0 - smoothing) * lam).unsqueeze(1))
    mix = _partner_targets(target, perm).unsqueeze(1)
    dz.scatter_add_(1, mix, (-(1.0 - smoothing) * (1.0 - lam)).unsqueeze(1))
    dz.mul_(grad_loss.to(dz.dtype).unsqueeze(1))
    return dz.to(logits.dtype).contiguous()  # the layout the fake promises


# ----------------------------------------------------------------------------------------------------------
# The custom ops: per-row loss (+ logsumexp saved for backward), and its gradient
# ----------------------------------------------------------------------------------------------------------


def _rows_body(
    logits: torch.Tensor,
    target: torch.Tensor,
    lam: torch.Tensor,
    perm: torch.Tensor | None,
    smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    if _use_triton(logits):
        return mixup_ce_fwd(logits, target, lam, perm, smoothing)
    if _use_cpu_kernel(logits):
        return cpu_kernel.ce_rows(logits, target, lam, perm, smoothing)
    return _eager_fwd(logits, target, lam, perm, smoothing)


_mixup_ce_rows = torch.library.custom_op("mixrecipe::mixup_cross_entropy_rows", _rows_body, mutates_args=())


@_mixup_ce_rows.register_fake
def _(logits, target, lam, perm, smoothing):
    rows = logits.new_empty(logits.shape[0], dtype=_compute_dtype(logits))
    return rows, torch.empty_like(rows)


def _rows_backward_body(
    grad_loss: torch.Tensor,
    logits: torch.Tensor,
    lse: torch.Tensor,
    target: torch.Tensor,
    lam: torch.Tensor,
    perm: torch.Tensor | None,
    smoothing: float,
) -> torch.Tensor:
    if _use_triton(logits):
        # Autograd hands the gradient of a mean over an expanded scalar: make it a plain fp32 vector.
        grad_loss = grad_loss.to(torch.float32).contiguous()
        return mixup_ce_bwd(grad_loss, logits, lse, target, lam, perm, smoothing)
    if _use_cpu_kernel(logits):
        return cpu_kernel.ce_rows_backward(grad_loss, logits, lse, target, lam, perm, smoothing)
    return _eager_bwd(grad_loss, logits, target, lam, perm, smoothing)


_mixup_ce_rows_backward = torch.library.custom_op("mixrecipe::mixup_cross_entropy_rows_backward",
                                                  _rows_backward_body, mutates_args=())


@_mixup_ce_rows_backward.register_fake
def _(grad_loss, logits, lse, target, lam, perm, smoothing):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, target, lam, perm, smoothing = inputs
    ctx.save_for_backward(logits, output[1], target, lam, perm)
    ctx.smoothing = smoothing


def _backward(ctx, grad_loss, grad_lse):
    # The logsumexp output is an implementation detail: only the loss carries a gradient.
    logits, lse, target, lam, perm = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = _mixup_ce_rows_backward(grad_loss, logits, lse, target, lam, perm, ctx.smoothing)
    return grad, None, None, None, None


_mixup_ce_rows.register_autograd(_backward, setup_context=_setup_context)


class _DirectRows(torch.autograd.Function):
    """The registered op's bodies and autograd formula without torch's dispatcher, for plain eager calls:
    the two custom-op dispatches cost about 0.1 ms per step, more than the whole loss on a CIFAR batch.
    Under a tracer (torch.compile, make_fx, FakeTensor) the registered op runs instead (:func:`_rows`)."""

    @staticmethod
    def forward(ctx, logits, target, lam, perm, smoothing):
        loss, lse = _rows_body(logits, target, lam, perm, smoothing)
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # no zeros made for lse's (unused) gradient
        _setup_context(ctx, (logits, target, lam, perm, smoothing), (loss, lse))
        return loss, lse

    @staticmethod
    @once_differentiable  # the registered op has no double backward either
    def backward(ctx, grad_loss, grad_lse):
        logits, lse, target, lam, perm = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0] and grad_loss is not None:  # None: only lse was used downstream
            grad = _rows_backward_body(grad_loss, logits, lse, target, lam, perm, ctx.smoothing)
        return grad, None, None, None, None


def _rows(logits, target, lam, perm, smoothing):
    """(loss rows, logsumexp): :class:`_DirectRows` for plain tensors outside any tracer, else the op."""
    plain = all(t is None or type(t) is torch.Tensor for t in (logits, target, lam, perm))
    if plain and not tracing():
        return _DirectRows.apply(logits, target, lam, perm, smoothing)
    return _mixup_ce_rows(logits, target, lam, perm, smoothing)


# ----------------------------------------------------------------------------------------------------------
# Validation: shapes always; values only for CPU tensors (no host-device sync) and outside torch.compile
# ----------------------------------------------------------------------------------------------------------


def _check_logits(logits) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D (B, K), got shape {tuple(logits.shape)}")
    if logits.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"logits must have at least one row and one class, got shape {tuple(logits.shape)}")


def _check_class_target(target, logits: torch.Tensor, cpu_kernel_checks: bool) -> torch.Tensor:
    if isinstance(target, torch.Tensor) and target.is_floating_point():
        raise TypeError(
            "target must hold integer class indices (B,); for dense (B, K) soft targets use "
            "mixrecipe.loss.SoftTargetCrossEntropy"
        )
    batch, classes = logits.shape
    # The CPU kernel range-checks the indices in its own pass (cheaper than a torch reduction per step).
    return check_index_target(target, batch, classes, logits.device, values=not cpu_kernel_checks)


def _lam_rows(lam, logits: torch.Tensor, cpu_kernel_checks: bool) -> torch.Tensor:
    """A checked lam as a (B,) tensor in the loss's compute dtype on the logits' device."""
    batch = logits.shape[0]
    lam = check_lam("lam", lam, batch, logits.device, values=not cpu_kernel_checks)
    if not isinstance(lam, torch.Tensor):  # one op for a number
        return torch.full((batch,), lam, dtype=_compute_dtype(logits), device=logits.device)
    lam_t = lam.detach() if lam.requires_grad else lam  # each skipped no-op is a dispatch
    dtype = _compute_dtype(logits)
    if lam_t.device != logits.device or lam_t.dtype != dtype:
        lam_t = lam_t.to(device=logits.device, dtype=dtype)
    return lam_t.expand(batch) if lam_t.ndim == 0 else lam_t.contiguous()


# Signatures of calls on the numba rows whose checks passed: a later call of the same signature skips them
# (the rows range-check class indices and weights on every call, before they write). With cold caches the
# checks took about a fifth of a CIFAR-sized loss's forward and backward.
_CHECKED_CALLS: set = set()


def _checked_signature(logits, target, lam, perm, label_smoothing, reduction):
    """What the checks of a call depend on, when it may skip them once they passed (else None): plain
    tensors, the flip pairing, a float or (B,) weight and a float smoothing, outside any tracer."""
    if perm is not None or type(logits) is not torch.Tensor or type(target) is not torch.Tensor:
        return None
    if type(lam) is float:
        if not 0.0 <= lam <= 1.0:
            return None
        weights = None
    elif type(lam) is torch.Tensor and lam.ndim == 1 and not lam.requires_grad:
        weights = lam.dtype, lam.shape, lam.stride(), lam.is_cpu
    else:
        return None
    if type(label_smoothing) is not float or type(reduction) is not str or tracing():
        return None
    return (logits.dtype, logits.shape, logits.stride(), logits.is_cpu, target.dtype, target.shape,
            target.stride(), target.is_cpu, weights, label_smoothing, reduction, current_cpu_backend())


def reduce_loss(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-sample losses reduced as ``reduction`` says: "mean", "sum" or "none" (unchanged)."""
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------


def mixup_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    lam,
    perm: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy against mixed, smoothed one-hot targets, without building them.

    Equals ``SoftTargetCrossEntropy()(logits, y)`` with ``y_i = lam_i * s(t_i) + (1 - lam_i) * s(t_perm[i])``
    and ``s`` timm's smoothed one-hot, in value and in gradient.

    Args:
        logits: (B, K) float16, bfloat16, float32 or float64 logits.
        target: (B,) integer class indices of the unmixed samples (dense targets: use
            ``SoftTargetCrossEntropy``).
        lam: weight of each sample's own label: a float, a 0-d tensor or a (B,) tensor, in [0, 1].
        perm: (B,) partner indices; None is timm's flip pairing ``perm[i] = B - 1 - i``.
        label_smoothing: timm's smoothing: off-class value ``label_smoothing / K``.
        reduction: "mean" (over the batch), "sum" or "none" (per-sample losses).

    Returns:
        The loss in float32 (float64 for float64 logits): a scalar, or (B,) for ``reduction="none"``.
    """
    signature = _checked_signature(logits, target, lam, perm, label_smoothing, reduction)
    if signature in _CHECKED_CALLS:  # checked before: on to the numba rows, which check the values
        if type(lam) is float:
            lam = torch.full((logits.shape[0],), lam, dtype=torch.float32)
        return reduce_loss(_DirectRows.apply(logits, target, lam, None, label_smoothing)[0], reduction)
    given = target, lam
    _check_logits(logits)
    on_cpu_kernel = _use_cpu_kernel(logits)  # it checks the values itself, in its own pass
    target = _check_class_target(target, logits, on_cpu_kernel)
    lam_t = _lam_rows(lam, logits, on_cpu_kernel)
    perm = check_perm(perm, logits.shape[0], logits.device)
    smoothing = check_unit_interval("label_smoothing", label_smoothing)
    reduction = check_reduction(reduction)
    loss, _ = _rows(logits, target, lam_t, perm, smoothing)
    as_given = target is given[0] and (type(given[1]) is float or lam_t is given[1])
    if signature is not None and on_cpu_kernel and as_given:
        if len(_CHECKED_CALLS) >= 64:
            _CHECKED_CALLS.clear()
        _CHECKED_CALLS.add(signature)
    return reduce_loss(loss, reduction)


class SoftTargetCrossEntropy(nn.Module):
    """timm's ``SoftTargetCrossEntropy``: ``mean_i sum_k -y_ik * log_softmax(x_i)_k``.

    fp32 and fp64 inputs give timm's result bitwise; fp16/bf16 logits take their log_softmax in fp32.
    Integer class targets (B,) are plain cross-entropy and go through ``mixup_cross_entropy`` with lam=1.

    Args:
        reduction: "mean" (timm's), "sum" or "none".
    """

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = check_reduction(reduction)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Args:
        x: (..., K) logits.
        target: (..., K) soft targets (rows summing to 1), or (B,) integer class indices for 2-D x.
        """
        if not target.is_floating_point():
            return mixup_cross_entropy(x, target, 1.0, reduction=self.reduction)
        if target.shape != x.shape:
            raise ValueError(f"target must have the shape of x {tuple(x.shape)}, got {tuple(target.shape)}")
        dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else None
        loss = torch.sum(-target * F.log_softmax(x, dim=-1, dtype=dtype), dim=-1)
        return reduce_loss(loss, self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"
