"""Mixup cross-entropy without the (B, K) soft-target matrix: one Triton launch forward, one backward.

Row i of the soft target is ``y_i = lam_i * s(t_i) + (1 - lam_i) * s(t_p)`` with ``p = perm[i]`` and ``s``
timm's smoothed one-hot (``off = smoothing / K``, ``on = 1 - smoothing + off``). Because ``sum_k y_ik = 1``:

    loss_i = lse(z_i) - (1 - smoothing) * (lam_i * z_i[t_i] + (1 - lam_i) * z_i[t_p]) - off * sum_k z_ik
    d loss_i / d z_ik = softmax(z_i)_k - y_ik

so a row needs its logsumexp (one online pass), two gathered logits and, with smoothing, the row sum.

Bytes moved for B rows of K logits of E bytes (E = 2 for fp16/bf16, 4 for fp32):
  forward:  read B*K*E            + write 8*B (fp32 loss and logsumexp per row)
  backward: read B*K*E + 8*B      + write B*K*E (the gradient, in the logits' dtype)
The dense route (timm's ``mixup_target`` + ``SoftTargetCrossEntropy``) also writes and reads a (B, K) fp32
target and a (B, K) log_softmax, in several launches.

Out-of-range indices: the caller does not read index values on a GPU (that would be a host-device sync), so
each program checks its own: the class index ``t_i`` and the partner's ``t_p`` must lie in [0, K), the
partner ``p`` in [0, B). A row that fails reads nothing outside the batch or the row, and writes NaN as its
loss and as every element of its gradient row; the other rows are unaffected.

Launch cost: a float ``lam`` (one weight for the batch) is a kernel scalar, so a call makes no tensor but its
outputs. Scalars that change from call to call (``lam_value``, the batch size, the gradient's scale) are
``do_not_specialize``: a last batch of another size or a new lam never compiles a new variant. Launches go
through ``_common.launch_planned``: after the first call of a specialization a GPU runs the compiled kernel
directly, keyed by what the arguments could specialize on (dtypes, pointer alignment, int values).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cast_to, interpreting, launch_planned, plan_for_interpreter

__all__ = ["mixup_ce_fwd", "mixup_ce_bwd"]

# One program walks its row in chunks of at most this many logits (fp32 registers per program).
MAX_BLOCK_K = 4096
# The interpreter runs a chunk as one numpy op: bigger chunks are simply faster there.
MAX_BLOCK_K_INTERPRETER = 1 << 16


@triton.jit
def _row_setup(target_ptr, perm_ptr, lam_ptr, lam_value, stride_lam, row, n_rows, n_cols,
               HAS_PERM: tl.constexpr, LAM_SCALAR: tl.constexpr):
    """The row's class, its partner's class, whether both indices are valid, and the row's lam."""
    if HAS_PERM:
        partner = tl.load(perm_ptr + row).to(tl.int64)
    else:
        partner = n_rows - 1 - row  # timm's flip pairing, no perm tensor to read
    partner_ok = (partner >= 0) & (partner < n_rows)
    t_own = tl.load(target_ptr + row).to(tl.int64)
    t_mix = tl.load(target_ptr + partner, mask=partner_ok, other=-1).to(tl.int64)
    valid = (t_own >= 0) & (t_own < n_cols) & (t_mix >= 0) & (t_mix < n_cols)
    if LAM_SCALAR:
        lam = lam_value
    else:
        lam = tl.load(lam_ptr + row * stride_lam).to(tl.float32)
    return t_own, t_mix, valid, lam


@triton.jit(do_not_specialize=["lam_value", "n_rows"])
def _mixup_ce_fwd_kernel(
    logits_ptr, stride_row_div, target_ptr, perm_ptr, lam_ptr, lam_value, stride_lam, loss_ptr, lse_ptr,
    n_rows, n_cols_div, smoothing,
    HAS_PERM: tl.constexpr, LAM_SCALAR: tl.constexpr, HAS_SMOOTHING: tl.constexpr, BLOCK_K: tl.constexpr,
    ALIGN: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride_row overflows int32 for big B*K
    # Row stride and K come divided by ALIGN (the largest power of 2 <= 16 dividing both): multiplied back
    # by the constexpr, the compiler knows that rows start on ALIGN-element boundaries and that the mask is
    # constant over ALIGN lanes, so K = 1000 gets 128-bit loads as K = 1024 does.
    n_cols = n_cols_div * ALIGN
    row_ptr = logits_ptr + row * (stride_row_div * ALIGN)

    # Online logsumexp (running max m, running sum d of exp(z - m)): the row is read once.
    m = float("-inf")
    d = 0.0
    z_sum = 0.0
    for start in range(0, n_cols, BLOCK_K):
        offs = start + tl.arange(0, BLOCK_K)
        mask = offs < n_cols
        z = tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
        if HAS_SMOOTHING:
            z_sum += tl.sum(tl.where(mask, z, 0.0), axis=0)
    lse = m + tl.log(d)

    t_own, t_mix, valid, lam = _row_setup(target_ptr, perm_ptr, lam_ptr, lam_value, stride_lam, row, n_rows,
                                          n_cols, HAS_PERM, LAM_SCALAR)
    z_own = tl.load(row_ptr + t_own, mask=valid, other=float("nan")).to(tl.float32)
    z_mix = tl.load(row_ptr + t_mix, mask=valid, other=float("nan")).to(tl.float32)
    loss = lse - (1.0 - smoothing) * (lam * z_own + (1.0 - lam) * z_mix)
    if HAS_SMOOTHING:
        loss -= (smoothing / n_cols) * z_sum
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)


@triton.jit(do_not_specialize=["lam_value", "n_rows", "grad_scale"])
def _mixup_ce_bwd_kernel(
    logits_ptr, stride_row_div, grad_ptr, stride_grad_row_div, grad_loss_ptr, stride_grad_loss, grad_scale,
    lse_ptr, target_ptr, perm_ptr, lam_ptr, lam_value, stride_lam, n_rows, n_cols_div, smoothing,
    HAS_PERM: tl.constexpr, LAM_SCALAR: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_K: tl.constexpr,
    ALIGN: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    n_cols = n_cols_div * ALIGN  # strides and K come divided by ALIGN, as in the forward kernel
    row_ptr = logits_ptr + row * (stride_row_div * ALIGN)
    out_ptr = grad_ptr + row * (stride_grad_row_div * ALIGN)

    t_own, t_mix, valid, lam = _row_setup(target_ptr, perm_ptr, lam_ptr, lam_value, stride_lam, row, n_rows,
                                          n_cols, HAS_PERM, LAM_SCALAR)
    # The upstream gradient of this row's loss: a (B,) vector, or a reduced loss's scalar (stride 0) times
    # grad_scale (1/B for a mean).
    g = tl.load(grad_loss_ptr + row * stride_grad_loss).to(tl.float32) * grad_scale
    lse = tl.load(lse_ptr + row)
    off = smoothing / n_cols
    w_own = (1.0 - smoothing) * lam
    w_mix = (1.0 - smoothing) * (1.0 - lam)

    for start in range(0, n_cols, BLOCK_K):
        offs = start + tl.arange(0, BLOCK_K)
        mask = offs < n_cols
        z = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        # y = off + w_own at t_own + w_mix at t_mix (both when the two classes coincide).
        y = off + tl.where(offs == t_own, w_own, 0.0) + tl.where(offs == t_mix, w_mix, 0.0)
        dz = tl.where(valid, g * (tl.exp(z - lse) - y), float("nan"))
        tl.store(out_ptr + offs, cast_to(dz, out_ptr.dtype.element_ty, ROUND_BF16), mask=mask)


def _block_k(n_cols: int, block_k: int | None) -> int:
    if block_k is not None:
        return triton.next_power_of_2(block_k)
    cap = MAX_BLOCK_K_INTERPRETER if plan_for_interpreter() else MAX_BLOCK_K
    return min(cap, triton.next_power_of_2(n_cols))


def _align(*values: int) -> int:
    """The largest power of two up to 16 dividing every value: element alignment of rows and of K."""
    align = 16
    while align > 1 and any(v % align for v in values):
        align //= 2
    return align


def _num_warps(block_k: int) -> int:
    return 4 if block_k <= 1024 else (8 if block_k <= 2048 else 16)


def _prepare(logits: torch.Tensor, lam: torch.Tensor | float):
    """(logits with unit column stride, lam's pointer, value and stride, LAM_SCALAR). A float lam needs no
    tensor: the logits stand in for its pointer, never read."""
    if not logits.is_cuda and not interpreting():
        raise RuntimeError(
            "the Triton mixup cross-entropy needs CUDA tensors, or TRITON_INTERPRET=1 set before triton "
            f"is imported to run on {logits.device.type} tensors"
        )
    if logits.stride(1) != 1 and logits.shape[1] != 1:  # the kernels walk a row with unit stride
        logits = logits.contiguous()
    if isinstance(lam, torch.Tensor):
        return logits, lam, 0.0, lam.stride(0) if lam.ndim else 0, False
    return logits, logits, float(lam), 0, True


def mixup_ce_fwd(
    logits: torch.Tensor,
    target: torch.Tensor,
    lam: torch.Tensor | float,
    perm: torch.Tensor | None,
    smoothing: float,
    block_k: int | None = None,
    loss: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mixup cross-entropy and logsumexp, both fp32 (B,). Inputs are assumed validated.

    Args:
        logits: (B, K) fp16, bf16 or fp32 logits.
        target: (B,) contiguous integer class indices.
        lam: weight of each row's own class: a float, or a 0-d or (B,) float tensor of any stride.
        perm: (B,) contiguous partner indices, or None for the flip pairing ``B - 1 - i``.
        smoothing: timm's label smoothing in [0, 1].
        block_k: logits per chunk (rounded up to a power of 2); None picks one from K.
        loss: optional preallocated fp32 (B,) output.
        lse: optional preallocated fp32 (B,) output.

    Returns:
        ``(loss, lse)``; ``lse`` is what ``mixup_ce_bwd`` needs.
    """
    logits, lam_ptr, lam_value, stride_lam, lam_scalar = _prepare(logits, lam)
    n_rows, n_cols = logits.shape
    if loss is None:
        loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if lse is None:
        lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    block = _block_k(n_cols, block_k)
    align = _align(logits.stride(0), n_cols)
    launch_planned(
        _mixup_ce_fwd_kernel, (n_rows,),
        (logits, logits.stride(0) // align, target, target if perm is None else perm,  # target: unread
         lam_ptr, lam_value, stride_lam, loss, lse, n_rows, n_cols // align, float(smoothing)),
        dict(HAS_PERM=perm is not None, LAM_SCALAR=lam_scalar, HAS_SMOOTHING=smoothing > 0, BLOCK_K=block,
             ALIGN=align, num_warps=_num_warps(block)),
    )
    return loss, lse


def mixup_ce_bwd(
    grad_loss: torch.Tensor,
    logits: torch.Tensor,
    lse: torch.Tensor,
    target: torch.Tensor,
    lam: torch.Tensor | float,
    perm: torch.Tensor | None,
    smoothing: float,
    grad_scale: float = 1.0,
    block_k: int | None = None,
    grad: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient of the per-row losses: ``grad_scale * grad_loss[i] * (softmax(z_i) - y_i)`` in the logits'
    dtype.

    Args:
        grad_loss: upstream gradient: (B,) of any stride, or a 0-d tensor for every row (a reduced loss's).
        logits: the (B, K) logits given to ``mixup_ce_fwd``.
        lse: the (B,) logsumexp returned by ``mixup_ce_fwd``.
        target, lam, perm, smoothing: as given to ``mixup_ce_fwd``.
        grad_scale: multiplies ``grad_loss`` (1/B when the loss was a mean).
        block_k: logits per chunk; None picks one from K.
        grad: optional preallocated (B, K) output with unit column stride.

    Returns:
        The (B, K) gradient with respect to ``logits``.
    """
    logits, lam_ptr, lam_value, stride_lam, lam_scalar = _prepare(logits, lam)
    n_rows, n_cols = logits.shape
    if grad is None:
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    block = _block_k(n_cols, block_k)
    align = _align(logits.stride(0), grad.stride(0), n_cols)
    launch_planned(
        _mixup_ce_bwd_kernel, (n_rows,),
        (logits, logits.stride(0) // align, grad, grad.stride(0) // align,
         grad_loss, grad_loss.stride(0) if grad_loss.ndim else 0, float(grad_scale), lse, target,
         target if perm is None else perm, lam_ptr, lam_value, stride_lam, n_rows, n_cols // align,
         float(smoothing)),
        dict(HAS_PERM=perm is not None, LAM_SCALAR=lam_scalar,
             ROUND_BF16=grad.dtype == torch.bfloat16 and plan_for_interpreter(), BLOCK_K=block, ALIGN=align,
             num_warps=_num_warps(block)),
    )
    return grad
