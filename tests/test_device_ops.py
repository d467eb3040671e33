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
# Batch modes draw λ, the switch, the coin and the box on the host: the fused launch is the whole call.
ONE_LAUNCH = [c for c in CASES if (" batch" in c or c.startswith(("cutmix", "transforms")))
              and "random pairing" not in c and "mix_batch" not in c and "per sample" not in c
              and not c.startswith("device data")]


@pytest.mark.parametrize("case", list(CASES))
def test_device_ops_per_call(case):
    ops = count_case(case)
    print(f"\n{case}: {ops}")
    fused = [op for op in ops.launches if op.startswith(("triton:", "mixrecipe::"))]
    assert fused and len(fused) <= 3, ops  # the mixing launch (and the loss's for mix_batch)
    assert not ops.host_reads, ops  # no call reads a device value on the host
    if case.startswith("device data"):  # indices, labels, crop/flip draws: one copy; then the fused pass
        assert ops.launches == ["_to_copy", "triton:_augment_mix_kernel"], ops
    elif case in ONE_LAUNCH:
        assert ops.launches == ["triton:_mix_fwd_kernel"], ops
    elif "mix_batch" not in case:  # per-sample values or a permutation: one copy to the device, the launch
        assert ops.count <= 3, ops
        assert ops.launches[-1] == "triton:_mix_fwd_kernel", ops


def _launch_args(x, policy):
    """The fused kernel's scalar λ and box of one ``policy(x, y)`` call, recorded as a GPU would launch it."""
    from mixrecipe.kernels._common import record_launches

    with record_launches(as_gpu=True) as rec:
        policy(x, None)
    ((kernel, _grid, args, kwargs),) = rec.launches
    names = list(kernel.arg_names)
    lam = args[names.index("lamx_value")], args[names.index("lamy_value")]
    if kwargs["BOX_KIND"] == 0:
        return lam, None
    if kwargs["BOX_KIND"] == 1:
        return lam, tuple(args[names.index(n)] for n in ("box_y0", "box_y1", "box_x0", "box_x1"))
    box = args[names.index("box_ptr")]
    assert (box == box[0]).all()
    return lam, tuple(box[0].tolist())


@pytest.mark.parametrize("kwargs", [dict(mixup_alpha=0.2), dict(mixup_alpha=0.0, cutmix_alpha=1.0),
                                   dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.7),
                                   dict(mixup_alpha=0.0, cutmix_minmax=(0.2, 0.8))])
def test_cuda_batch_gets_the_cpu_batchs_draws(kwargs):
    """A CUDA batch's call passes the kernel the λ and box a CPU batch gets from the same CPU generator."""
    from mixrecipe import Mixup
    from mixrecipe.backend import cpu_backend
    from mixrecipe.kernels import interpreting

    if not interpreting():
        pytest.skip("routing a CPU batch to the Triton launcher needs TRITON_INTERPRET=1 in this process")
    cpu = Mixup(**kwargs, generator=torch.Generator().manual_seed(5))
    cuda = Mixup(**kwargs, generator=torch.Generator().manual_seed(5))
    x = torch.rand(6, 3, 16, 16)
    (x_cuda,) = fake_cuda(lambda: (torch.empty(6, 3, 16, 16, device="cuda"),))[0]
    seen_box = False
    for _ in range(6):
        with cpu_backend("triton"):
            want = _launch_args(x.clone(), cpu)
        got = []
        count_device_ops(lambda xc, got=got: got.append(_launch_args(xc, cuda)), x_cuda, warmup=False)
        assert got == [want]
        seen_box |= want[1] is not None
    assert seen_box or "cutmix_alpha" not in kwargs
