"""What more than one kernel needs: the interpreter flag, fp32 -> bf16 rounding, the launch point, and the
mixing rules both mixing kernels (``mixup.py``, ``augment.py``) apply: the partner, each row's λ and its
range check, the CutMix pixel weight, lerp, per-channel constants and the soft-label programs.

Every launch goes through ``launch`` so that ``mixrecipe.kernels.aot`` can record the exact arguments the
public API passes (and, while planning for a GPU, skip running them): the compile-for-GPU test derives its
specializations from real launches, never from a hand-kept list.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch
import triton
import triton.language as tl

__all__ = ["interpreting", "plan_for_interpreter", "launch", "Launch", "launch_planned", "record_launches",
           "to_bf16_rne", "cast_to", "lerp", "per_channel", "partner", "row_lam", "lam_ok", "pixel_weight",
           "mix_labels", "lam_kind", "box_kind", "image_block", "label_block"]

_launch_recorder = None  # the active LaunchRecorder, if any


class LaunchRecorder:
    """Collects ``(kernel, grid, args, kwargs)`` of every launch made while it is active."""

    def __init__(self, as_gpu: bool):
        self.as_gpu = as_gpu
        self.launches: list[tuple] = []

    def record(self, kernel, grid, args, kwargs) -> None:
        self.launches.append((kernel, grid, args, dict(kwargs)))


@contextlib.contextmanager
def record_launches(as_gpu: bool = True):
    """Record every kernel launch made inside the block.

    With ``as_gpu`` the launchers pick the block sizes, warps and switches they would pick on a GPU and the
    kernels do not run (their outputs stay unwritten): what is recorded is what a GPU would compile.
    """
    global _launch_recorder
    previous, _launch_recorder = _launch_recorder, LaunchRecorder(as_gpu)
    try:
        yield _launch_recorder
    finally:
        _launch_recorder = previous


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def plan_for_interpreter() -> bool:
    """Whether launchers pick the interpreter's configuration (few big programs, bf16 rounded by hand).

    False on a GPU, and also while ``aot.record_launches`` records launches for GPU compilation."""
    return interpreting() and not (_launch_recorder is not None and _launch_recorder.as_gpu)


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``, seen first by an active launch recorder. Returns Triton's compiled
    kernel when the launch compiled one (on a GPU), else None (the interpreter, a recorded-only launch)."""
    recorder = _launch_recorder
    if recorder is not None:
        recorder.record(kernel, grid, args, kwargs)
        if recorder.as_gpu:
            return None  # the configuration is a GPU's: record it, don't run it here
    return kernel[grid](*args, **kwargs)


# Calling the compiled kernel directly skips Triton's per-call binding and specialization (the JIT's
# dispatch); MIXRECIPE_DIRECT_LAUNCH=0 keeps every launch on the JIT path. From Triton 3.3 on, the JIT hands
# its compiled kernel every parameter, constexprs included, which is what Launch passes.
_DIRECT = (os.environ.get("MIXRECIPE_DIRECT_LAUNCH", "1") != "0"
           and tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 3))


def _warn_direct_off(exc: Exception) -> None:
    """Turn direct calls off for the process, once, saying why (every launch then goes through the JIT)."""
    global _DIRECT
    if _DIRECT:
        _DIRECT = False
        warnings.warn(f"mixrecipe: calling Triton's compiled kernel directly failed ({type(exc).__name__}: "
                      f"{exc}); every launch now goes through the JIT", RuntimeWarning, stacklevel=3)


class Launch:
    """One launch configuration of one kernel, made once per call signature and then called per call.

    ``constexprs`` (and ``num_warps``) are fixed here; a call passes the runtime arguments only, which must
    keep the signature's Triton specialization (dtypes, the 16-byte alignment of every pointer, integers
    that are 1 or multiples of 16): the caller's plan key holds what decides it. The first call goes through
    the JIT, which compiles (or finds) the kernel; on a GPU later calls run that compiled kernel directly
    with the same arguments the JIT would pass it (the runtime ones, then the constexprs, in the kernel's
    parameter order). Should the first direct call be refused (a Triton that takes them otherwise), that
    launch and every later one in the process go through the JIT, with a warning."""

    __slots__ = ("kernel", "grid", "constexprs", "_tail", "_runner", "_proven")

    def __init__(self, kernel, grid: tuple, constexprs: dict):
        self.kernel, self.grid, self.constexprs = kernel, grid, constexprs
        names = [n for n in kernel.arg_names if n in constexprs]
        if kernel.arg_names[len(kernel.arg_names) - len(names):] != names:
            raise ValueError("Launch needs every constexpr of the kernel given, as its last parameters")
        self._tail = tuple(constexprs[n] for n in names)
        self._runner = None
        self._proven = False  # whether a direct call has gone through

    @property
    def direct(self) -> bool:
        """Whether calls now run the compiled kernel directly (on a GPU, after the first)."""
        return self._runner is not None

    def __call__(self, *args) -> None:
        runner = self._runner
        if runner is not None and _launch_recorder is None:
            if self._proven:
                runner(*args, *self._tail)
                return
            try:  # the first direct call: a Triton whose compiled kernel takes its arguments otherwise
                runner(*args, *self._tail)  # refuses them here, before anything runs
            except (TypeError, ValueError, RuntimeError) as exc:
                self._runner = None
                _warn_direct_off(exc)
            else:
                self._proven = True
                return
        compiled = launch(self.kernel, self.grid, *args, **self.constexprs)
        if _DIRECT and compiled is not None and hasattr(compiled, "__getitem__") and not interpreting():
            self._runner = compiled[self.grid]


@triton.jit
def to_bf16_rne(v):
    # fp32 -> bf16 rounded to nearest even by hand: the interpreter truncates, the GPU rounds. Rounding
    # the fp32 bits to a multiple of 2**16 first makes the final cast exact on both.
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    rounded = bits.to(tl.float32, bitcast=True)
    return tl.where(v != v, v, rounded).to(tl.bfloat16)  # a NaN stays NaN (its bits could carry)


@triton.jit
def cast_to(v, dtype: tl.constexpr, ROUND_BF16: tl.constexpr):
    # One return for both branches: the compiler (unlike the interpreter) rejects a function whose
    # constexpr branches return different types.
    if ROUND_BF16:
        r = to_bf16_rne(v)
    else:
        r = v.to(dtype)
    return r


@triton.jit
def lerp(start, end, w):
    # torch.lerp's two-sided formula: exact at w == 0 (start) and w == 1 (end), so lam=1 returns x bitwise.
    diff = end - start
    return tl.where(w < 0.5, start + w * diff, end - diff * (1.0 - w))


@triton.jit
def per_channel(ptr, ch, C, mask, other, SELECT: tl.constexpr):
    # Up to 4 channels: 4 uniform scalar loads and 3 selects per element. A gather would issue one load
    # instruction per element per table (mean and std), more than the image itself needs.
    if SELECT:
        v0 = tl.load(ptr)
        v1 = tl.load(ptr + 1, mask=C > 1, other=other)
        v2 = tl.load(ptr + 2, mask=C > 2, other=other)
        v3 = tl.load(ptr + 3, mask=C > 3, other=other)
        v = tl.where(ch == 0, v0, tl.where(ch == 1, v1, tl.where(ch == 2, v2, v3)))
    else:
        v = tl.load(ptr + ch, mask=mask, other=other)
    return v


def image_block(n: int) -> tuple[int, int]:
    """(BLOCK_SIZE, num_warps) of a mixing kernel's image programs for samples of ``n`` elements. The
    interpreter runs programs one by one, so it gets few, big ones."""
    if plan_for_interpreter():
        return min(triton.next_power_of_2(max(n, 1)), 1 << 14), 1
    if n >= 8192:
        return 4096, 8
    return max(128, min(triton.next_power_of_2(n), 2048)), 4


def label_block(num_classes: int) -> int:
    """BLOCK_K of a mixing kernel's soft-label programs: the classes a program writes per step."""
    return min(triton.next_power_of_2(num_classes), 1 << 14 if plan_for_interpreter() else 2048)


def _specialization(value, exact: bool):
    """What of one runtime argument can change Triton's specialization, a little finer than Triton's own
    binder (finer only costs another look-up through the JIT): a tensor's dtype and 16-byte alignment; an
    int's value (``exact``) or, for a do_not_specialize one, whether it fits int32; a float nothing."""
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    if isinstance(value, bool) or not isinstance(value, int):
        return type(value)
    return value if exact else -2**31 <= value < 2**31


_LAUNCHES: dict = {}


def launch_planned(kernel, grid: tuple, args: tuple, constexprs: dict) -> None:
    """``kernel[grid](*args, **constexprs)`` through a :class:`Launch` kept per specialization: after the
    first call of one, a GPU runs the compiled kernel directly. The key is derived from the arguments
    themselves (:func:`_specialization`), so it cannot miss what Triton specializes on."""
    loose = getattr(kernel, "do_not_specialize", None) or ()
    key = (kernel, grid, tuple(sorted(constexprs.items())), plan_for_interpreter(),
           tuple(_specialization(v, i not in loose and kernel.arg_names[i] not in loose)
                 for i, v in enumerate(args)))
    run = _LAUNCHES.get(key)
    if run is None:
        if len(_LAUNCHES) >= 256:
            _LAUNCHES.clear()
        run = _LAUNCHES[key] = Launch(kernel, grid, constexprs)
    run(*args)


# Helpers below assign in both branches of a constexpr `if` and return once: `triton.compile` rejects a
# function whose branches return different types (a block vs a scalar), which the interpreter accepts.
@triton.jit
def partner(perm_ptr, row_i, B, PAIRED: tl.constexpr):
    """(row_j, valid): flip pairing (B-1-i) or perm[row_i] (int32 or int64). Bad indices can't be checked
    on the host without a sync, so an out-of-range partner is replaced by the row itself, reported invalid
    (the caller writes NaN), never read."""
    if PAIRED:
        row_j = B - 1 - row_i
    else:
        row_j = tl.load(perm_ptr + row_i).to(tl.int64)
    valid = (row_j >= 0) & (row_j < B)
    return tl.where(valid, row_j, row_i), valid


@triton.jit
def row_lam(lam_ptr, lam_value, row, stride, LAM_KIND: tl.constexpr):
    # LAM_KIND 0: one host number for the batch; 1: one value in a device tensor; 2: one value per row.
    if LAM_KIND == 0:
        lam = lam_value
    elif LAM_KIND == 1:
        lam = tl.load(lam_ptr).to(tl.float32)
    else:
        lam = tl.load(lam_ptr + row * stride).to(tl.float32)
    return lam


@triton.jit
def lam_ok(lam, LAM_KIND: tl.constexpr):
    # A host number was range-checked on the host; a device value is checked here (reading it on the host
    # would cost a synchronization): a weight outside [0, 1], or NaN, makes its row NaN.
    if LAM_KIND == 0:
        ok = True
    else:
        ok = (lam >= 0.0) & (lam <= 1.0)
    return ok


@triton.jit
def pixel_weight(lam, box_ptr, box_stride, box_y0, box_y1, box_x0, box_x1, row, hh, ww,
                 BOX_KIND: tl.constexpr):
    # Inside the CutMix box the pixel comes from the partner (weight 0); outside it is lam. BOX_KIND 0: no
    # box; 1: one box for the batch as four scalars (y0, y1, x0, x1), no tensor; 2: int32 boxes in a
    # tensor, row r's at box_ptr + r * box_stride.
    if BOX_KIND == 0:
        w = lam
    else:
        if BOX_KIND == 1:
            y0, y1, x0, x1 = box_y0, box_y1, box_x0, box_x1
        else:
            y0 = tl.load(box_ptr + row * box_stride + 0)
            y1 = tl.load(box_ptr + row * box_stride + 1)
            x0 = tl.load(box_ptr + row * box_stride + 2)
            x1 = tl.load(box_ptr + row * box_stride + 3)
        inside = (hh >= y0) & (hh < y1) & (ww >= x0) & (ww < x1)
        w = tl.where(inside, 0.0, lam)
    return w


@triton.jit
def _smoothed(target_ptr, stride_tb, row, ks, kmask, off, keep, TARGET_DENSE: tl.constexpr):
    # s(t) = t * (1 - smoothing) + smoothing / K; for class indices t is one-hot.
    if TARGET_DENSE:
        t = tl.load(target_ptr + row * stride_tb + ks, mask=kmask, other=0.0).to(tl.float32)
    else:
        t = (ks == tl.load(target_ptr + row)).to(tl.float32)
    return t * keep + off


@triton.jit
def mix_labels(
    target_ptr, soft_ptr, perm_ptr, lam_ptr, lam_value, lam_stride, group, B, K, stride_tb, stride_sb, off,
    keep, PAIRED: tl.constexpr, LAM_KIND: tl.constexpr, TARGET_DENSE: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The soft labels of one row group (a flip pair, or one row with a permutation): timm's smoothed
    targets, lerped with the rows' label λ."""
    row_i = group
    row_j, valid = partner(perm_ptr, row_i, B, PAIRED)
    if not TARGET_DENSE:
        # A class index outside [0, K) poisons its own row (and its partner's) with NaN: never silent.
        ci = tl.load(target_ptr + row_i)
        cj = tl.load(target_ptr + row_j)
        valid = valid & (ci >= 0) & (ci < K) & (cj >= 0) & (cj < K)
    lam_i = row_lam(lam_ptr, lam_value, row_i, lam_stride, LAM_KIND)
    lam_j = row_lam(lam_ptr, lam_value, row_j, lam_stride, LAM_KIND)
    valid_i = valid & lam_ok(lam_i, LAM_KIND)
    valid_j = valid & lam_ok(lam_j, LAM_KIND)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        s_i = _smoothed(target_ptr, stride_tb, row_i, ks, kmask, off, keep, TARGET_DENSE)
        s_j = _smoothed(target_ptr, stride_tb, row_j, ks, kmask, off, keep, TARGET_DENSE)
        y_i = tl.where(valid_i, lerp(s_j, s_i, lam_i), float("nan"))
        tl.store(soft_ptr + row_i * stride_sb + ks, y_i, mask=kmask)
        if PAIRED:
            y_j = tl.where(valid_j, lerp(s_i, s_j, lam_j), float("nan"))
            tl.store(soft_ptr + row_j * stride_sb + ks, y_j, mask=kmask)


def box_kind(box) -> int:
    """BOX_KIND of a CutMix box as the kernels take it: 0 none, 1 four numbers (the kernel's scalars),
    2 a tensor."""
    return 0 if box is None else 2 if isinstance(box, torch.Tensor) else 1


def lam_kind(lam) -> tuple[int, int]:
    """(LAM_KIND, stride) of a weight as the kernels take it: a number, a 0-d or a (B,) tensor."""
    if not hasattr(lam, "ndim"):
        return 0, 0
    return (1, 0) if lam.ndim == 0 else (2, lam.stride(0))
