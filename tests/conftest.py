"""Test set-up. TRITON_INTERPRET must be set before any @triton.jit runs, so it lives at the very top.

"triton" in a test means the Triton kernel on every machine: CUDA tensors where a GPU is present, CPU tensors
through Triton's interpreter where none is. A CPU-only machine with ``TRITON_INTERPRET=0`` set stands in for
a GPU machine's harness (no interpreter in this process): the Triton cases then skip with a printed reason,
and tests that need the interpreter for something else run it in a subprocess.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # No GPU: run the Triton kernels through the interpreter, on CPU tensors (unless told not to).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402

from mixrecipe.backend import cpu_backend  # noqa: E402  (after TRITON_INTERPRET is set)
from mixrecipe.kernels import interpreting  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

NO_TRITON = "the Triton kernel needs a CUDA GPU or TRITON_INTERPRET=1, and this process has neither"


@dataclass(frozen=True)
class Backend:
    """One way the ops run: its name and the device its tensors must live on."""

    name: str    # "eager" (plain PyTorch on CPU) or "triton"
    device: str  # "cpu", or "cuda" for the Triton kernel on a GPU machine

    def __str__(self) -> str:
        return self.name


def triton_device() -> str:
    """Where the Triton kernel runs in this process: "cuda", or "cpu" through the interpreter; skips the
    calling test (with the reason printed) where it cannot run at all."""
    if HAS_CUDA:
        return "cuda"
    if interpreting():
        return "cpu"
    pytest.skip(NO_TRITON)


@pytest.fixture(params=["eager", "triton"])
def backend(request):
    """Each test runs on the eager CPU path and the Triton kernel; build the test's tensors on
    ``backend.device``."""
    if request.param == "triton" and triton_device() == "cuda":
        yield Backend("triton", "cuda")  # CUDA tensors always run the kernel
        return
    with cpu_backend(request.param):
        yield Backend(request.param, "cpu")


@pytest.fixture(name="triton_device")
def triton_device_fixture() -> str:
    """The device on which a test calls the Triton launchers directly (skips where none can run)."""
    return triton_device()


@pytest.fixture(params=["cpu"] + (["cuda"] if HAS_CUDA else []))
def device(request):
    """Every device of this machine (for tests of code that is not a backend choice: benchmarks, loops)."""
    return request.param
