"""Where the ops run CPU tensors: the one switch for every op (mixing and the loss alike).

CUDA tensors always run the Triton kernels. CPU tensors run the plain-PyTorch path (``"eager"``, the
default), or the Triton kernels through Triton's interpreter inside ``with cpu_backend("triton"):`` (how
the tests check the kernels on a machine without a GPU; needs ``TRITON_INTERPRET=1`` before triton is
imported). The environment variable ``MIXRECIPE_CPU_BACKEND`` sets
the starting value.
"""

from __future__ import annotations

import contextlib
import os

from torch import Tensor

from .kernels import interpreting

__all__ = ["CPU_BACKENDS", "cpu_backend", "current_cpu_backend", "runs_kernel"]

CPU_BACKENDS = ("eager", "triton")
_current = os.environ.get("MIXRECIPE_CPU_BACKEND", "eager")


def _check(name) -> str:
    if name not in CPU_BACKENDS:
        raise ValueError(f"cpu_backend must be one of {CPU_BACKENDS}, got {name!r}")
    if name == "triton" and not interpreting():
        raise RuntimeError("cpu_backend('triton') needs TRITON_INTERPRET=1 set before triton is imported")
    return name


@contextlib.contextmanager
def cpu_backend(name: str):
    """Run CPU tensors through ``"eager"`` PyTorch (the default) or the ``"triton"`` kernels (through the
    interpreter) inside the block.

    Args:
        name: one of :data:`CPU_BACKENDS`.
    """
    global _current
    previous, _current = _current, _check(name)
    try:
        yield
    finally:
        _current = previous


def current_cpu_backend() -> str:
    """The backend CPU tensors run on now."""
    return _current


def runs_kernel(t: Tensor) -> bool:
    """Whether an op on ``t`` runs the Triton kernel: on CUDA always, on CPU under cpu_backend("triton")."""
    return t.device.type == "cuda" or (t.device.type == "cpu" and _current == "triton")
