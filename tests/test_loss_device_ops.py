"""The loss on a CUDA batch, counted on a machine without a GPU: device ops, host reads, allocations, and the
Triton specializations that calls of changing batch size and lam compile.

The counter (``bench/device_ops.py``) runs the call on FakeTensors on "cuda"; Triton launches are recorded,
not run. Two things differ from a plain GPU call and are set up here:

- the loss's direct path (an ``autograd.Function``, no dispatcher) takes plain tensors only, so FakeTensors
  would take the registered op, which the counter sees as one op each way (hiding the reduction inside it):
  ``mixrecipe.loss._direct`` is told they are plain, as the counter does for the mixing ops;
- the autograd engine cannot run a backward on fake CUDA tensors without a GPU (it asks the CUDA driver for
  a context), so the backward is the loss node's own ``grad_fn.apply``: the same body, called in this
  thread. What the engine adds is the leaf's ``AccumulateGrad``, which takes a fresh gradient as it is.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mixrecipe import loss as loss_module
from mixrecipe.loss import mixup_cross_entropy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from device_ops import count_device_ops, fake_cuda  # noqa: E402

B, K = 128, 1000
_FACTORIES = ("aten::empty", "aten::full", "aten::zeros", "aten::ones", "aten::new_", "aten::scalar_tensor",
              "aten::arange", "aten::rand")


class _Allocations(TorchDispatchMode):
    """Names of the CUDA tensors a call makes (factories), seen before the counter's modes."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name
        if name.startswith(_FACTORIES) and isinstance(out, torch.Tensor) and out.device.type == "cuda":
            self.names.append(name.removeprefix("aten::"))
        return out


def _inputs(dtype):
    def make():
        return (torch.empty(B, K, dtype=dtype, device="cuda", requires_grad=True),
                torch.empty(B, dtype=torch.int64, device="cuda"), torch.empty(B, device="cuda"),
                torch.empty((), device="cuda"), torch.empty(B, dtype=torch.int64, device="cuda"),
                torch.empty((), device="cuda"), torch.empty(B, device="cuda"))
    return fake_cuda(make)[0]


CASES = {  # name -> (lam, perm?, reduction)
    "float lam, flip, mean": ("float", False, "mean"),
    "per-sample lam, perm, sum": ("per-sample", True, "sum"),
    "0-d lam, flip, none": ("0-d", False, "none"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_backward_are_two_launches_and_at_most_one_reduction(case, dtype):
    lam_kind, with_perm, reduction = CASES[case]
    allocations = []

    def call(logits, target, lam_rows, lam_0d, perm, grad_0d, grad_rows):
        lam = {"float": 0.7, "per-sample": lam_rows, "0-d": lam_0d}[lam_kind]
        with _Allocations() as seen:
            loss = mixup_cross_entropy(logits, target, lam, perm if with_perm else None, label_smoothing=0.1,
                                       reduction=reduction)
            grad, *_ = loss.grad_fn.apply(grad_rows if reduction == "none" else grad_0d, None)
        assert grad.shape == logits.shape and grad.dtype == logits.dtype
        allocations[:] = seen.names

    with mock.patch.object(loss_module, "_direct", lambda *tensors: True):
        ops = count_device_ops(call, *_inputs(dtype))
    print(f"\n{case} {dtype}: {ops}; allocations: {allocations}")
    assert not ops.host_reads, ops
    reduce = [] if reduction == "none" else [reduction]
    assert ops.launches == ["triton:_mixup_ce_fwd_kernel", *reduce, "triton:_mixup_ce_bwd_kernel"], ops
    # Only outputs are made: per-row losses and logsumexp forward, the gradient backward. No placeholder
    # tensor for a float lam or an absent perm, no lam or target converted.
    assert allocations == ["empty", "empty", "empty_like"], allocations


def test_registered_op_is_one_op_each_way():
    """Unpatched, the counter takes the registered op (FakeTensors are not plain): one op forward, one
    backward, no host read (the reduction runs inside the forward op)."""

    def call(logits, target, *rest):
        loss = mixup_cross_entropy(logits, target, 0.7, label_smoothing=0.1)
        loss.grad_fn.apply(rest[3], None)

    ops = count_device_ops(call, *_inputs(torch.float32))
    assert ops.launches == ["mixrecipe::mixup_cross_entropy", "mixrecipe::mixup_cross_entropy_backward"], ops
    assert not ops.host_reads, ops


def _record_calls() -> list:
    """Launch descriptions of loss calls whose batch size (16, 17, 1) and float lam change, as a GPU would
    compile them (recorded under the interpreter, nothing run)."""
    from mixrecipe.backend import cpu_backend
    from mixrecipe.kernels._common import record_launches
    from mixrecipe.kernels.aot import describe

    gen = torch.Generator().manual_seed(0)
    with cpu_backend("triton"), record_launches(as_gpu=True) as recorder:
        for batch, lam in ((16, 0.3), (17, 0.9), (1, 0.5), (16, 1.0)):
            logits = torch.randn(batch, K, generator=gen).requires_grad_()
            target = torch.randint(0, K, (batch,), generator=gen)
            mixup_cross_entropy(logits, target, lam, label_smoothing=0.1).backward(torch.tensor(1.0))
    return describe(recorder.launches)


def test_changing_batch_size_and_lam_compile_no_new_variant(tmp_path):
    """The batch size, lam and the mean's 1/B are do_not_specialize: four calls of three batch sizes and four
    lams give one forward and one backward specialization (Triton's own binder decides, no interpreter)."""
    code = ("import json, sys\n"
            f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
            "import test_loss_device_ops as t\n"
            "print(json.dumps(t._record_calls()))\n")
    rec = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRITON_INTERPRET": "1"},
                         capture_output=True, text=True, timeout=600)
    assert rec.returncode == 0, rec.stderr[-3000:]
    descs = json.loads(rec.stdout.strip().splitlines()[-1])
    assert len(descs) == 8
    (tmp_path / "launches.json").write_text(json.dumps(descs))
    code = ("import json, sys\n"
            "from mixrecipe.kernels.aot import unique_jobs\n"
            "jobs = unique_jobs(json.load(open(sys.argv[1])), archs=(90,))\n"
            "print(json.dumps(sorted(d['kernel'] for d, _ in jobs)))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "launches.json")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kernels = json.loads(proc.stdout.strip().splitlines()[-1])
    assert kernels == ["mixrecipe.kernels.cross_entropy:_mixup_ce_bwd_kernel",
                       "mixrecipe.kernels.cross_entropy:_mixup_ce_fwd_kernel"], kernels
