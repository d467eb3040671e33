"""Test set-up. TRITON_INTERPRET must be set before any @triton.jit runs, so it lives at the very top."""

import os

import torch

if not torch.cuda.is_available():
    # No GPU: run the Triton kernels through the interpreter, on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(params=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def device(request):
    return request.param
