"""How many device operations one call issues for a CUDA batch, counted on a machine without a GPU.

``bench/device_ops.py`` runs a call on FakeTensors placed on "cuda" under a dispatch mode that records
every aten op touching CUDA, every Triton launch (recorded, not run) and every read of a device value on the
host. Each case prints its count (``pytest -s``): a regression shows which op came back.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from device_ops import CASES, count_case, count_device_ops, fake_cuda  # noqa: E402


# --------------------------------------------------------------------------------------------------
# The counter itself.
# --------------------------------------------------------------------------------------------------
def _fake_batch():
    return fake_cuda(lambda: (torch.empty(4, 3, 8, 8, device="cuda"), torch.empty(4, device="cuda")))[0]


def test_counts_device_ops_and_leaves_out_views():
    x, lam = _fake_batch()

    def call(x, lam):
        y = x.view(4, -1).expand(4, 192)  # views: nothing launched
        z = y * 2.0 + 1.0  # two launches
        return z.sum(1) * lam  # two more

    ops = count_device_ops(call, x, lam, warmup=False)
    assert ops.launches == ["mul", "add", "sum", "mul"] and not ops.host_reads


def test_records_host_reads_of_device_values():
    x, lam = _fake_batch()

    def call(x, lam):
        if lam[0] > 0.5:  # bool() of a device value: a synchronization
            pass
        lam.max().item()
        x.cpu()

    ops = count_device_ops(call, x, lam, warmup=False)
    assert ops.host_reads == ["aten::_local_scalar_dense"] * 2 + ["aten::_to_copy (cuda -> cpu)"]


def test_host_work_runs_for_real():
    """CPU draws are made with their values (the generator advances): what the policy's host path needs."""
    x, lam = _fake_batch()
    g = torch.Generator().manual_seed(3)
    seen = []
    draw = lambda x, lam: seen.append(torch.rand(3, generator=g).tolist())  # noqa: E731
    ops = count_device_ops(draw, x, lam, warmup=False)
    assert seen == [torch.rand(3, generator=torch.Generator().manual_seed(3)).tolist()]
    assert ops.count == 0 and not ops.host_reads and "aten::rand" in ops.cpu_ops


# --------------------------------------------------------------------------------------------------
# The public API's calls on a CIFAR-sized CUDA batch.
# --------------------------------------------------------------------------------------------------
# A CPU generator draws the batch's CutMix box on the CPU, which the op then refuses for a CUDA batch.
_CPU_BOX = pytest.mark.xfail(raises=ValueError, strict=True, reason="the CPU box of a CPU generator")


@pytest.mark.parametrize("case", [pytest.param(c, marks=_CPU_BOX) if c == "Mixup+CutMix batch, CPU generator"
                                  else c for c in CASES])
def test_device_ops_per_call(case):
    ops = count_case(case)
    print(f"\n{case}: {ops}")
    fused = [op for op in ops.launches if op.startswith(("triton:", "mixrecipe::"))]
    assert fused and len(fused) <= 2, ops  # the mixing launch (and the loss's for mix_batch)
    assert not ops.host_reads, ops  # no call reads a device value on the host
