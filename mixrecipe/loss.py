"""Losses for mixup training: timm's soft-target cross-entropy and a mixup cross-entropy without targets.

``mixup_cross_entropy(logits, target, lam, perm)`` gives the same loss and gradient as
``SoftTargetCrossEntropy()(logits, mixup_target(target, K, lam, smoothing))`` but never builds the (B, K)
soft-target matrix: each row needs its logsumexp, the logits of its own class and of its partner's class,
and (with smoothing) the sum of its logits.

- CUDA tensors (fp16/bf16/fp32 logits): the forward is one Triton launch (``mixrecipe.kernels.cross_entropy``)
  and, for "mean"/"sum", one reduction of its per-row losses; the backward is one launch, which takes the
  reduced loss's gradient and the mean's 1/B itself. Nothing is read on the host: a float ``lam`` reaches the
  kernels as a scalar, and the kernels check class and partner indices themselves (a row holding one out of
  range gets a NaN loss and a NaN gradient row, never a read outside the batch).
- CPU tensors (and fp64 logits anywhere): plain PyTorch, one log_softmax and two gathers forward, one
  softmax and two scatter-adds backward. Every call checks the values of ``target``, ``lam`` and ``perm``.

Math is fp32 for fp16/bf16/fp32 logits (fp64 stays fp64); the loss comes back in fp32 (fp64), the gradient
in the logits' dtype. The work is a ``torch.library.custom_op`` with a fake and an autograd formula, so
``torch.compile(fullgraph=True)`` traces through it; a plain eager call runs the same two bodies through a
``torch.autograd.Function``, without the dispatcher (about 0.1 ms per step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .backend import runs_kernel
from .checks import check_index_target, check_lam, check_perm, check_reduction, check_unit_interval, tracing
from .kernels.cross_entropy import mixup_ce_bwd, mixup_ce_fwd

__all__ = ["SoftTargetCrossEntropy", "mixup_cross_entropy", "reduce_loss"]

_LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def reduce_loss(loss: Tensor, reduction: str) -> Tensor:
    """Per-sample losses reduced as ``reduction`` says: "mean", "sum" or "none" (unchanged)."""
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _compute_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _on_kernel(logits: Tensor) -> bool:
    # fp64 is a checking dtype (gradcheck): it keeps fp64 math on the eager path everywhere.
    return logits.dtype != torch.float64 and runs_kernel(logits)


def _partner_targets(target: Tensor, perm: Tensor | None) -> Tensor:
    return target.flip(0) if perm is None else target[perm]


# ----------------------------------------------------------------------------------------------------------
# The two bodies: (loss, logsumexp per row) and the gradient. ``lam`` is a tensor, or None and ``lam_value``.
# ----------------------------------------------------------------------------------------------------------


def _forward(logits: Tensor, target: Tensor, lam: Tensor | None, lam_value: float, perm: Tensor | None,
             smoothing: float, reduction: str) -> tuple[Tensor, Tensor]:
    if _on_kernel(logits):
        rows, lse = mixup_ce_fwd(logits, target, lam_value if lam is None else lam, perm, smoothing)
        return reduce_loss(rows, reduction), lse
    logp = torch.log_softmax(logits, dim=1, dtype=_compute_dtype(logits))  # upcasts in its one pass
    lp_own = logp.gather(1, target[:, None]).squeeze(1)
    lp_mix = logp.gather(1, _partner_targets(target, perm)[:, None]).squeeze(1)
    rows = -(1.0 - smoothing) * torch.lerp(lp_mix, lp_own, lam_value if lam is None else lam.to(logp.dtype))
    if smoothing > 0:
        rows = rows - (smoothing / logp.shape[1]) * logp.sum(dim=1)
    lse = logits.gather(1, target[:, None]).squeeze(1).to(logp.dtype) - lp_own  # z - log_softmax(z)
    return reduce_loss(rows, reduction), lse


def _backward(grad_loss: Tensor, logits: Tensor, lse: Tensor, target: Tensor, lam: Tensor | None,
              lam_value: float, perm: Tensor | None, smoothing: float, reduction: str) -> Tensor:
    """d loss / d logits; ``grad_loss`` is the loss's upstream gradient, a scalar unless reduction="none"."""
    scale = 1.0 / logits.shape[0] if reduction == "mean" else 1.0
    if _on_kernel(logits):
        weight = lam_value if lam is None else lam
        return mixup_ce_bwd(grad_loss, logits, lse, target, weight, perm, smoothing, grad_scale=scale)
    dz = torch.softmax(logits, dim=1, dtype=_compute_dtype(logits))  # recomputed: nothing (B, K) saved
    batch, classes = dz.shape
    w = dz.new_full((batch,), lam_value) if lam is None else lam.to(dz.dtype).expand(batch)
    if smoothing > 0:
        dz.sub_(smoothing / classes)
    # Subtract the two on-class weights; scatter_add_ sums them when both classes coincide.
    dz.scatter_add_(1, target[:, None], (-(1.0 - smoothing) * w)[:, None])
    dz.scatter_add_(1, _partner_targets(target, perm)[:, None], (-(1.0 - smoothing) * (1.0 - w))[:, None])
    dz.mul_((grad_loss.to(dz.dtype) * scale).reshape(-1, 1))
    return dz.to(logits.dtype).contiguous()  # the layout the fake promises


# ----------------------------------------------------------------------------------------------------------
# The registered ops (torch.compile, other tracers) and the same bodies as an autograd.Function (eager)
# ----------------------------------------------------------------------------------------------------------

_op = torch.library.custom_op("mixrecipe::mixup_cross_entropy", _forward, mutates_args=())
_op_backward = torch.library.custom_op("mixrecipe::mixup_cross_entropy_backward", _backward, mutates_args=())


@_op.register_fake
def _(logits, target, lam, lam_value, perm, smoothing, reduction):
    lse = logits.new_empty(logits.shape[0], dtype=_compute_dtype(logits))
    return (torch.empty_like(lse) if reduction == "none" else lse.new_empty(())), lse


@_op_backward.register_fake
def _(grad_loss, logits, *args):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, target, lam, lam_value, perm, smoothing, reduction = inputs
    ctx.save_for_backward(logits, output[1], target, lam, perm)
    ctx.settings = lam_value, smoothing, reduction


def _gradients(ctx, grad_loss, grad_lse, backward=_op_backward):
    # The logsumexp output is saved for the backward only: the loss alone carries a gradient.
    logits, lse, target, lam, perm = ctx.saved_tensors
    lam_value, smoothing, reduction = ctx.settings
    grad = None
    if ctx.needs_input_grad[0] and grad_loss is not None:  # None: an undefined gradient (gradcheck tries it)
        grad = backward(grad_loss, logits, lse, target, lam, lam_value, perm, smoothing, reduction)
    return grad, None, None, None, None, None, None


_op.register_autograd(_gradients, setup_context=_setup_context)


class _Direct(torch.autograd.Function):
    """The registered op without torch's dispatcher, for plain tensors in eager mode (:func:`_direct`)."""

    @staticmethod
    def forward(ctx, *inputs):
        loss, lse = _forward(*inputs)
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # no zeros made for lse's (absent) gradient
        _setup_context(ctx, inputs, (loss, lse))
        return loss, lse

    @staticmethod
    @once_differentiable  # the registered op has no double backward either
    def backward(ctx, grad_loss, grad_lse):
        return _gradients(ctx, grad_loss, grad_lse, backward=_backward)


def _direct(*tensors) -> bool:
    """Whether a call may skip the dispatcher: plain tensors (or None), no tracer watching."""
    return not tracing() and all(t is None or type(t) is Tensor for t in tensors)


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------


def _check_logits(logits) -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D (B, K), got shape {tuple(logits.shape)}")
    if logits.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"logits must have at least one row and one class, got shape {tuple(logits.shape)}")


def mixup_cross_entropy(
    logits: Tensor,
    target: Tensor,
    lam,
    perm: Tensor | None = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
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

    Values of ``target``, ``lam`` and ``perm`` are checked on CPU (ValueError). On CUDA that would cost a
    synchronization: a row whose class index or partner is out of range gets a NaN loss and gradient instead.

    Returns:
        The loss in float32 (float64 for float64 logits): a scalar, or (B,) for ``reduction="none"``.
    """
    _check_logits(logits)
    if isinstance(target, Tensor) and target.is_floating_point():
        raise TypeError("target must hold integer class indices (B,); for dense (B, K) soft targets use "
                        "mixrecipe.loss.SoftTargetCrossEntropy")
    batch, classes = logits.shape
    target = check_index_target(target, batch, classes, logits.device)
    lam = check_lam("lam", lam, batch, logits.device)
    lam, lam_value = (lam, 0.0) if isinstance(lam, Tensor) else (None, lam)
    perm = check_perm(perm, batch, logits.device)
    args = (logits, target, lam, lam_value, perm, check_unit_interval("label_smoothing", label_smoothing),
            check_reduction(reduction))
    if _direct(logits, target, lam, perm):
        return _Direct.apply(*args)[0]
    return _op(*args)[0]


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

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
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
