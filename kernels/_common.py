"""What more than one kernel needs: the interpreter flag, fp32 -> bf16 rounding, lerp, per-channel
constants and the launch point.

Every launch goes through ``launch`` so that ``mixrecipe.kernels.aot`` can record the exact arguments the
public API passes (and, while planning for a GPU, skip running them): the compile-for-GPU test derives its
specializations from real launches, never from a hand-kept list.
"""

from __future__ import annotations

import contextlib
import os

import triton
import triton.language as tl

__all__ = ["interpreting", "plan_for_interpreter", "launch", "Launch", "record_launches", "to_bf16_rne",
           "cast_to", "lerp", "per_channel"]

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


class Launch:
    """One launch configuration of one kernel, made once per call signature and then called per call.

    ``constexprs`` (and ``num_warps``) are fixed here; a call passes the runtime arguments only, which must
    keep the signature's Triton specialization (dtypes, the 16-byte alignment of every pointer, integers
    that are 1 or multiples of 16): the caller's plan key holds what decides it. The first call goes through
    the JIT, which compiles (or finds) the kernel; on a GPU later calls run that compiled kernel directly
    with the same arguments the JIT would pass it (the runtime ones, then the constexprs, in the kernel's
    parameter order)."""

    __slots__ = ("kernel", "grid", "constexprs", "_tail", "_runner")

    def __init__(self, kernel, grid: tuple, constexprs: dict):
        self.kernel, self.grid, self.constexprs = kernel, grid, constexprs
        names = [n for n in kernel.arg_names if n in constexprs]
        if kernel.arg_names[len(kernel.arg_names) - len(names):] != names:
            raise ValueError("Launch needs every constexpr of the kernel given, as its last parameters")
        self._tail = tuple(constexprs[n] for n in names)
        self._runner = None

    @property
    def direct(self) -> bool:
        """Whether calls now run the compiled kernel directly (on a GPU, after the first)."""
        return self._runner is not None

    def __call__(self, *args) -> None:
        runner = self._runner
        if runner is not None and _launch_recorder is None:
            runner(*args, *self._tail)
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
    # instruction per element per table (mean and inv_std), more than the image itself needs.
    if SELECT:
        v0 = tl.load(ptr)
        v1 = tl.load(ptr + 1, mask=C > 1, other=other)
        v2 = tl.load(ptr + 2, mask=C > 2, other=other)
        v3 = tl.load(ptr + 3, mask=C > 3, other=other)
        v = tl.where(ch == 0, v0, tl.where(ch == 1, v1, tl.where(ch == 2, v2, v3)))
    else:
        v = tl.load(ptr + ch, mask=mask, other=other)
    return v
