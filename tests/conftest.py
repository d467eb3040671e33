"""Test set-up. TRITON_INTERPRET must be set before any @triton.jit runs, so it lives at the very top."""

import os

import torch

if not torch.cuda.is_available():
    # No GPU: run the Triton kernels through the interpreter, on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from mixrecipe.backend import cpu_backend  # noqa: E402  (after TRITON_INTERPRET is set)
from mixrecipe.kernels import interpreting  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(params=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def device(request):
    return request.param


HAS_CUDA = torch.cuda.is_available()
# "numba" is the compiled CPU kernel (the default for CPU tensors), "eager" the plain-PyTorch CPU path;
# "triton" is the Triton kernel: on the GPU where there is one, else through the interpreter on CPU.
BACKENDS = ["numba", "eager"] + (["triton"] if (interpreting() or HAS_CUDA) else [])


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each test runs on the compiled CPU kernel, the eager CPU path and the Triton kernel."""
    if request.param == "triton" and HAS_CUDA:
        yield request.param
    else:
        with cpu_backend(request.param):
            yield request.param
