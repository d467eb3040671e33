"""``Launch`` and ``launch_planned`` (kernels/_common.py): from Triton's JIT to the compiled kernel.

On a GPU the first launch of a specialization goes through the JIT, which compiles (or finds) the kernel and
returns it; later launches call that compiled kernel directly with every parameter in the kernel's order,
constexprs last, as the JIT itself passes them. The interpreter returns no compiled kernel, so on this
machine the real kernels never take the direct path: stand-ins for the JIT and its compiled kernel check the
contract here, and the GPU tests (``test_kernel_launch_plans_are_made_once_per_signature``) check it on
CUDA.
"""

import pytest
import torch

from mixrecipe.kernels import _common


class _Compiled:
    """What Triton's JIT returns: indexed by the grid, a runner taking every parameter."""

    def __init__(self, calls):
        self.calls = calls

    def __getitem__(self, grid):
        return lambda *args: self.calls.append(("direct", grid, args))


class _Kernel:
    """A JIT function's stand-in: parameters ``x, n`` then the constexprs ``A, B``."""

    arg_names = ["x", "n", "A", "B"]
    do_not_specialize = ["n"]

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        def jit(*args, **kwargs):
            self.calls.append(("jit", grid, args, kwargs))
            return _Compiled(self.calls)
        return jit


@pytest.fixture
def on_a_gpu(monkeypatch):
    """The launch path a GPU process takes: no interpreter, direct calls on."""
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    monkeypatch.setattr(_common, "_DIRECT", True)


def test_the_first_launch_compiles_through_the_jit_and_later_ones_call_the_kernel(on_a_gpu):
    kernel = _Kernel()
    run = _common.Launch(kernel, (3,), dict(A=7, B=True, num_warps=4))
    assert not run.direct
    run("x0", 5)
    assert run.direct
    run("x1", 6)
    assert kernel.calls == [("jit", (3,), ("x0", 5), dict(A=7, B=True, num_warps=4)),
                            ("direct", (3,), ("x1", 6, 7, True))]  # constexprs last, in parameter order


def test_no_direct_call_without_a_compiled_kernel_or_when_switched_off(monkeypatch):
    kernel = _Kernel()
    monkeypatch.setattr(_common, "_DIRECT", False)
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    run = _common.Launch(kernel, (1,), dict(A=1, B=False))
    run("a", 1)
    run("b", 2)
    assert [c[0] for c in kernel.calls] == ["jit", "jit"] and not run.direct


class _Refusing(_Compiled):
    """A compiled kernel that takes its arguments otherwise (another Triton's calling convention)."""

    def __getitem__(self, grid):
        def runner(*args):
            raise TypeError("function takes 11 arguments (13 given)")
        return runner


class _KernelRefusingDirectCalls(_Kernel):
    def __getitem__(self, grid):
        def jit(*args, **kwargs):
            self.calls.append(("jit", grid, args, kwargs))
            return _Refusing(self.calls)
        return jit


def test_a_refused_direct_call_falls_back_to_the_jit_with_a_warning(on_a_gpu):
    """A refused direct call costs a warning, never a launch: the call goes through the JIT, and so does
    every later one in the process."""
    kernel = _KernelRefusingDirectCalls()
    run = _common.Launch(kernel, (1,), dict(A=1, B=False))
    run("a", 1)
    with pytest.warns(RuntimeWarning, match="every launch now goes through the JIT"):
        run("b", 2)
    run("c", 3)
    assert [c[0] for c in kernel.calls] == ["jit", "jit", "jit"] and not run.direct
    assert not _common._DIRECT


def test_a_launch_needs_every_constexpr_as_the_last_parameters():
    with pytest.raises(ValueError, match="every constexpr"):
        _common.Launch(_Kernel(), (1,), dict(A=1))  # B missing


def test_a_recorder_sees_every_launch_even_after_the_kernel_is_called_directly(on_a_gpu):
    kernel = _Kernel()
    run = _common.Launch(kernel, (2,), dict(A=1, B=False))
    run("a", 1)  # compiled: later calls would go direct
    with _common.record_launches(as_gpu=True) as recorder:
        run("b", 2)
    assert len(recorder.launches) == 1 and kernel.calls[-1][0] == "jit"


def test_planned_launches_are_kept_per_specialization(on_a_gpu):
    """launch_planned keys a Launch by what the arguments could specialize on: another value of a
    do_not_specialize int reuses it, another value of a specialized int or a pointer off a 16-byte
    boundary does not."""
    _common._LAUNCHES.clear()
    kernel = _Kernel()
    x = torch.zeros(8)
    consts = dict(A=1, B=True)
    _common.launch_planned(kernel, (1,), (x, 5), consts)
    _common.launch_planned(kernel, (1,), (torch.zeros(8), 9), consts)  # n is do_not_specialize
    assert len(_common._LAUNCHES) == 1 and kernel.calls[-1][0] == "direct"
    _common.launch_planned(kernel, (1,), (x[1:], 5), consts)  # 4 bytes in: another alignment
    _common.launch_planned(kernel, (1,), (x, 2**40), consts)  # beyond int32: another type
    assert len(_common._LAUNCHES) == 3
    _common._LAUNCHES.clear()
