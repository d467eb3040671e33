"""Count the device operations one call issues for a CUDA batch, on a machine without a GPU.

The batch and labels are FakeTensors on "cuda" (shapes, dtypes and devices, no data), and every aten op the
call dispatches is seen by a ``TorchDispatchMode`` before it runs:

- an op with a CUDA tensor among its inputs, or a factory asked for a CUDA tensor, is a *device op*: it
  would launch work on the GPU (or copy to it). Pure metadata and view ops (``view``, ``expand``,
  ``as_strided``, ``detach``, ...) launch nothing and are left out. A Triton launch (``triton:<kernel>``) is
  one device op: the mixing ops run their eager body as on a GPU (``mixrecipe.ops`` is told the fake
  tensors are plain ones), and the launcher's call is recorded by ``record_launches`` without running.
  The loss's registered op (``mixrecipe::*``) counts as its one launch and runs its fake implementation;
- an op that reads a device value on the host (``aten._local_scalar_dense`` of a CUDA tensor: ``.item()``,
  ``bool(t)``, ``.tolist()``; a copy from CUDA to the CPU) is a *host read*: a synchronization. It is recorded
  and given a placeholder (0) so the count can go on;
- every other op (CPU work: the policy's host draws) runs for real, outside the fake mode, so the policy's
  CPU generator advances and its draws have their values.

The call runs as an eager CUDA call would: ``mixrecipe``'s ``tracing()`` (which a dispatch mode switches on)
is told it is off while counting, so the code takes the paths a plain call on a GPU takes.

``python bench/device_ops.py`` prints the counts of the cases in :data:`CASES`.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

import mixrecipe
from mixrecipe import ops as mix_ops
from mixrecipe import transforms
from mixrecipe.kernels._common import record_launches

__all__ = ["DeviceOps", "count_device_ops", "fake_cuda", "CASES", "count_case"]

# Ops that only compute metadata or views: nothing is launched on the device.
_NO_LAUNCH = {
    "aten::view", "aten::_unsafe_view", "aten::reshape", "aten::expand", "aten::as_strided", "aten::detach",
    "aten::alias", "aten::t", "aten::transpose", "aten::permute", "aten::unsqueeze", "aten::squeeze",
    "aten::select", "aten::slice", "aten::unbind", "aten::split", "aten::split_with_sizes", "aten::chunk",
    "aten::narrow", "aten::diagonal", "aten::_reshape_alias", "aten::empty", "aten::empty_like",
    "aten::empty_strided", "aten::lift_fresh", "aten::sym_size", "aten::sym_stride", "aten::sym_numel",
    "aten::sym_storage_offset", "aten::is_contiguous", "aten::stride", "aten::size", "aten::dim",
    "aten::is_same_size", "aten::prim_layout",
}
_TO_HOST = {"aten::_local_scalar_dense", "aten::item", "aten::equal", "aten::is_nonzero"}


def _is_cuda(v) -> bool:
    return isinstance(v, torch.Tensor) and v.device.type == "cuda"


@dataclass
class DeviceOps:
    """What one call issued: ``launches`` (device ops, by name, in order) and ``host_reads``."""

    launches: list[str] = field(default_factory=list)
    host_reads: list[str] = field(default_factory=list)
    cpu_ops: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.launches)

    def __str__(self) -> str:
        reads = f", host reads: {self.host_reads}" if self.host_reads else ""
        return f"{self.count} device ops {self.launches}{reads}"


class _Recorder(TorchDispatchMode):
    def __init__(self, result: DeviceOps):
        super().__init__()
        self.result = result

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        flat, _ = tree_flatten((args, kwargs))
        device = kwargs.get("device")
        on_cuda = any(_is_cuda(a) for a in flat) or (device is not None
                                                      and torch.device(device).type == "cuda")
        if not on_cuda:  # host work: run it for real (the fake mode would give data-less tensors)
            self.result.cpu_ops.append(name)
            with _disable_current_modes():
                return func(*args, **kwargs)
        if name in _TO_HOST:
            self.result.host_reads.append(name)
            return False if func._schema.returns[0].type.kind() == "BoolType" else 0
        out = func(*args, **kwargs)  # to the fake mode below: shapes and devices only
        if name in ("aten::_to_copy", "aten::copy_") and any(
                isinstance(o, torch.Tensor) and o.device.type == "cpu" for o in tree_flatten(out)[0]):
            self.result.host_reads.append(f"{name} (cuda -> cpu)")
        elif name not in _NO_LAUNCH and not name.startswith("prim::"):
            self.result.launches.append(name.removeprefix("aten::"))
        return out


def _tracing_modules():
    """The loaded mixrecipe modules whose ``tracing`` is consulted on a call's path (imported by name)."""
    return [m for n, m in sys.modules.items() if n.startswith("mixrecipe") and hasattr(m, "tracing")
            and m.tracing.__module__ == "mixrecipe.checks"]


def fake_cuda(make):
    """``make()`` run under a fake mode: its tensors become FakeTensors (no data), e.g.
    ``fake_cuda(lambda: torch.empty(128, 3, 32, 32, device="cuda"))``. Returns (result, the fake mode)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        return make(), mode


def count_device_ops(call, *fake_inputs, warmup: bool = True) -> DeviceOps:
    """The device ops and host reads of ``call(*fake_inputs)``; the inputs are FakeTensors (see
    :func:`fake_cuda`), all from one fake mode. ``warmup``: count a second call, after one uncounted."""
    fakes = [t for t in fake_inputs if isinstance(t, torch.Tensor)]
    mode = fakes[0].fake_mode if fakes else FakeTensorMode(allow_non_fake_inputs=True)
    patches = [mock.patch.object(m, "tracing", lambda: False) for m in _tracing_modules()]
    # The op's direct (eager) call takes plain tensors only: fake CUDA tensors stand in for them here.
    patches.append(mock.patch.object(mix_ops, "_direct_call", _direct_call_on_fakes))
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        stack.enter_context(mode)
        launches = stack.enter_context(record_launches(as_gpu=True))  # recorded, never run
        recorder = stack.enter_context(_Recorder(DeviceOps()))
        launches.record = lambda kernel, grid, args, kwargs: recorder.result.launches.append(
            f"triton:{kernel.fn.__name__}")
        if warmup:  # a loop's steady state: first-call caches (constants on the device) are filled
            call(*fake_inputs)
        recorder.result = DeviceOps()
        call(*fake_inputs)
    return recorder.result


def _direct_call_on_fakes(*tensors) -> bool:
    return all(t is None or (isinstance(t, torch.Tensor) and not t.requires_grad) for t in tensors)


# --------------------------------------------------------------------------------------------------
# The cases the tests and the report count: CIFAR-sized batches.
# --------------------------------------------------------------------------------------------------
def _batch(dtype=torch.float32, shape=(128, 3, 32, 32), num_classes=10):
    def make():
        x = torch.empty(shape, dtype=dtype, device="cuda")
        return x, torch.empty(shape[0], dtype=torch.int64, device="cuda")
    return fake_cuda(make)[0]


def _policy(**kwargs):
    kwargs.setdefault("num_classes", 10)
    if kwargs.get("generator") == "cpu":
        kwargs["generator"] = torch.Generator().manual_seed(0)
    return mixrecipe.Mixup(**kwargs)


def _mixup_case(**kwargs):
    def run(x, y):
        _policy(**kwargs)(x, y)
    return run


def _mix_batch_case(x, y):
    mb = _policy(mixup_alpha=0.2).mix_batch(x, y)
    logits = torch.empty(x.shape[0], 10, device=x.device)  # a fake one: the fake mode is active
    mixrecipe.mixup_cross_entropy(logits, mb.target, mb.lam, mb.perm, label_smoothing=mb.label_smoothing)


def _cutmix_case(x, y):
    mixrecipe.cutmix(x, y, num_classes=10)


def _transform_case(name):
    made = {}

    def run(x, y):  # one transform for every call: its partner indices are made once, as in a loader
        made.setdefault(name, getattr(transforms, name)(num_classes=10))(x, y)
    return run


def _device_data_case(**kwargs):
    """One training step's batch from a device-resident CIFAR-sized set (``data.on_device``): the batch's
    indices, labels and crop/flip draws in one copy, then the fused gather/crop/flip/normalize/mix launch."""
    made = {}

    def run(x, y):
        if "data" not in made:  # the set is copied to the device once, before training
            from mixrecipe.data import ImageTensors
            from mixrecipe.gpu_data import DeviceImages

            images = torch.zeros(1024, 3, 32, 32, dtype=torch.uint8)
            ds = ImageTensors(images, torch.zeros(1024, dtype=torch.int64), "crop_flip", 4)
            made["data"] = DeviceImages(ds, torch.device("cuda"))
            made["mixup"] = _policy(**kwargs) if kwargs else None
        made["data"].batch(list(range(x.shape[0])), mixup=made["mixup"], mean=MEAN, std=STD,
                           out_dtype=torch.bfloat16)
    return run


MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
_CPU = {"generator": "cpu"}  # a seeded CPU torch.Generator (built per call); else the default generators
# name -> (call(x, y), batch dtype). Batch modes, then per-sample modes, then the other entry points.
CASES = {
    "Mixup batch": (_mixup_case(mixup_alpha=1.0), torch.float32),
    "Mixup batch alpha=0.2": (_mixup_case(mixup_alpha=0.2), torch.float32),
    "CutMix batch": (_mixup_case(mixup_alpha=0.0, cutmix_alpha=1.0), torch.float32),
    "Mixup+CutMix batch": (_mixup_case(mixup_alpha=0.8, cutmix_alpha=1.0), torch.float32),
    "Mixup+CutMix batch prob=0.5": (_mixup_case(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.5), torch.float32),
    "CutMix batch minmax": (_mixup_case(mixup_alpha=0.0, cutmix_minmax=(0.2, 0.8)), torch.float32),
    "Mixup batch, CPU generator": (_mixup_case(mixup_alpha=0.2, **_CPU), torch.float32),
    "Mixup+CutMix batch, CPU generator": (_mixup_case(mixup_alpha=0.8, cutmix_alpha=1.0, **_CPU),
                                          torch.float32),
    "Mixup batch uint8 mean/std": (_mixup_case(mixup_alpha=1.0, mean=MEAN, std=STD), torch.uint8),
    "Mixup batch random pairing": (_mixup_case(mixup_alpha=1.0, pairing="random"), torch.float32),
    "Mixup pair": (_mixup_case(mixup_alpha=1.0, mode="pair"), torch.float32),
    "Mixup elem": (_mixup_case(mixup_alpha=1.0, mode="elem"), torch.float32),
    "Mixup elem alpha=0.2": (_mixup_case(mixup_alpha=0.2, mode="elem"), torch.float32),
    "Mixup+CutMix elem": (_mixup_case(mixup_alpha=0.8, cutmix_alpha=1.0, mode="elem"), torch.float32),
    "Mixup+CutMix pair": (_mixup_case(mixup_alpha=0.8, cutmix_alpha=1.0, mode="pair"), torch.float32),
    "Mixup elem random pairing": (_mixup_case(mixup_alpha=1.0, mode="elem", pairing="random"),
                                  torch.float32),
    "mix_batch + mixup_cross_entropy": (_mix_batch_case, torch.float32),
    "cutmix": (_cutmix_case, torch.float32),
    "cutmix per sample": (lambda x, y: mixrecipe.cutmix(x, y, num_classes=10, per_sample=True),
                          torch.float32),
    "transforms.MixUp": (_transform_case("MixUp"), torch.float32),
    "transforms.CutMix": (_transform_case("CutMix"), torch.float32),
    "device data ERM": (_device_data_case(), torch.uint8),
    "device data Mixup batch": (_device_data_case(mixup_alpha=1.0), torch.uint8),
    "device data Mixup+CutMix batch": (_device_data_case(mixup_alpha=0.8, cutmix_alpha=1.0), torch.uint8),
}


def count_case(name: str) -> DeviceOps:
    """The device ops of one of :data:`CASES` on a fake CUDA CIFAR batch (128, 3, 32, 32)."""
    call, dtype = CASES[name]
    return count_device_ops(call, *_batch(dtype))


if __name__ == "__main__":
    for case in CASES:
        try:
            ops = count_case(case)
        except Exception as e:  # a call that fails on a CUDA batch is reported, not hidden
            print(f"{case:34s} fails: {type(e).__name__}: {e}")
            continue
        print(f"{case:34s} {ops.count:3d}  host reads: {len(ops.host_reads)}  {' '.join(ops.launches)}")
