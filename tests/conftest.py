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
# "triton" is the Triton kernel: on the GPU where there is one, else through the interpreter on CPU.
BACKENDS = ["eager", "triton"] if (interpreting() or HAS_CUDA) else ["eager"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each test runs on the eager CPU path and on the Triton kernel."""
    if request.param == "triton" and not HAS_CUDA:
        with cpu_backend("triton"):
            yield request.param
    else:
        yield request.param
