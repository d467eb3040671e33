"""Argument checks shared by every public entry point: the ops, the losses, the policy, the callbacks.

One rule per argument, wherever it is passed:

- a value of the wrong kind (a bool, a string, a list, a tensor of the wrong dtype where a number or a
  tensor of another dtype is expected) raises ``TypeError``; a value of the right kind that is out of
  range, of the wrong shape or on the wrong device raises ``ValueError``. Every message names the argument;
- ``lam`` (``lam_x``, ``lam_y``): a real number in [0, 1] (bools rejected, NaN rejected), or a
  floating-point tensor of shape () or (B,) with values in [0, 1]. A 0-d CPU tensor counts as a number;
  any other tensor must be on the batch's device;
- ``perm``: None or an int32/int64 tensor of shape (B,) on the batch's device holding a permutation of
  range(B) (a repeated or out-of-range index is refused, also by the loss);
- ``target`` as class indices: an integer (not bool) tensor of shape (B,) with values in
  [0, num_classes);
- ``num_classes``: an int >= 1 (None too where it is optional: the callbacks and transforms take it
  from the targets or the model); ``label_smoothing``, probabilities: a real number in [0, 1];
  ``alpha``: a finite real number, > 0 (or >= 0 where 0 switches a method off); ``reduction``: one of
  "mean", "sum", "none"; a named choice (``mode``, ``pairing``): one of its documented values (ValueError
  for anything else, as for ``reduction``); a count such as ``log_every_n_steps``: an int (not bool) >= its
  minimum.

The integrations (``fastai``, ``lightning``, ``transforms``) check their arguments with these same rules,
before a parent class (torchvision's ``MixUp``/``CutMix``) sees them, so their errors are these errors.

Checks that read tensor values (ranges, permutations) run on every call with CPU tensors outside
``torch.compile``: on a GPU they would force a host-device synchronization, so the kernels check those
values as they read them instead (``mixrecipe.ops``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "FLOAT_DTYPES",
    "REDUCTIONS",
    "can_inspect",
    "check_device",
    "check_real",
    "check_unit_interval",
    "check_alpha",
    "check_num_classes",
    "check_count",
    "check_choice",
    "check_reduction",
    "check_generator",
    "check_out_dtype",
    "check_unit_range",
    "check_lam",
    "check_perm",
    "check_index_range",
    "check_index_target",
    "check_target",
    "check_minmax",
    "check_images",
    "channel_vector",
    "check_box",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REDUCTIONS = ("mean", "sum", "none")


# tracing()'s three questions, looked up once: on the hot path each lookup in torch's large module
# dictionaries is a cache miss or two (tracing() took ~4 µs per call in a CIFAR-sized call).
_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_mode_on = torch._C._is_torch_function_mode_enabled


def tracing() -> bool:
    """Whether a tracer is watching: torch.compile, or a dispatch or function mode (make_fx, export,
    FakeTensor, FlopCounterMode, a default-device context)."""
    return _is_compiling() or _dispatch_modes() > 0 or _function_mode_on()


def can_inspect(t: Tensor) -> bool:
    """Whether reading tensor values is free: a plain CPU tensor, with no tracer watching."""
    return t.device.type == "cpu" and type(t) is Tensor and not tracing()


def check_device(name: str, t: Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the batch is on {device}: devices must match")


# --------------------------------------------------------------------------------------------------
# Numbers and settings.
# --------------------------------------------------------------------------------------------------
def check_real(name: str, value) -> float:
    """A real number (not a bool) as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def check_unit_interval(name: str, value) -> float:
    """A real number in [0, 1] (label smoothing, probabilities); NaN is refused."""
    value = check_real(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


def check_alpha(name: str, alpha, allow_zero: bool = False) -> float:
    """A Beta concentration: finite, > 0 (>= 0 with ``allow_zero``, where 0 switches the method off)."""
    alpha = check_real(name, alpha)
    if not math.isfinite(alpha) or alpha < 0 or (alpha == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {alpha}")
    return alpha


def check_num_classes(num_classes, allow_none: bool = False) -> int | None:
    """K, an int >= 1; None passes through with ``allow_none`` (K then comes from elsewhere)."""
    if num_classes is None and allow_none:
        return None
    return check_count("num_classes", num_classes, minimum=1)


def check_count(name: str, value, minimum: int = 0) -> int:
    """A whole number (an int, not a bool: True is no count) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_choice(name: str, value, choices: tuple):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_reduction(reduction) -> str:
    return check_choice("reduction", reduction, REDUCTIONS)


def check_generator(generator):
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def check_out_dtype(out_dtype, allow_none: bool = True):
    if (out_dtype is None and allow_none) or out_dtype in FLOAT_DTYPES:
        return out_dtype
    raise TypeError(f"out_dtype must be float32, float16 or bfloat16{' or None' if allow_none else ''}, "
                    f"got {out_dtype!r}")


def check_minmax(minmax):
    """CutMix box side bounds: None or (min, max) with 0 <= min <= max <= 1."""
    if minmax is None:
        return None
    if isinstance(minmax, (str, bytes)) or not isinstance(minmax, Sequence):
        raise TypeError(f"cutmix_minmax must be a pair (min, max) of image fractions, got {minmax!r}")
    if len(minmax) != 2:
        raise ValueError(f"cutmix_minmax must be a pair (min, max) of image fractions, got {minmax!r}")
    lo, hi = (check_real("cutmix_minmax", v) for v in minmax)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"cutmix_minmax must satisfy 0 <= min <= max <= 1, got {minmax!r}")
    return (lo, hi)


# --------------------------------------------------------------------------------------------------
# Tensors of a batch.
# --------------------------------------------------------------------------------------------------
def check_unit_range(name: str, lo: float, hi: float) -> None:
    """The smallest and largest value of a weight tensor must lie in [0, 1] (a NaN bound is refused)."""
    if not (0.0 <= lo and hi <= 1.0):
        raise ValueError(f"{name} must lie in [0, 1]; got values from {lo} to {hi}")


def check_lam(name: str, lam, batch: int, device: torch.device):
    """-> a float, or a floating tensor of shape () or (batch,) on ``device`` (as given, not converted)."""
    if isinstance(lam, Tensor):
        if not lam.is_floating_point():
            raise TypeError(f"{name} must be a float or a floating-point tensor, got {lam.dtype}")
        if lam.ndim == 0 and can_inspect(lam):
            return check_unit_interval(name, float(lam))
        if lam.shape not in ((), (batch,)):
            raise ValueError(f"{name} must be a scalar or have shape ({batch},), got {tuple(lam.shape)}")
        check_device(name, lam, device)
        if can_inspect(lam) and lam.numel():
            lo, hi = lam.aminmax()  # NaN propagates into both bounds
            check_unit_range(name, float(lo), float(hi))
        return lam
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real):
        raise TypeError(f"{name} must be a float or a tensor, got {type(lam).__name__}")
    return check_unit_interval(name, lam)


def check_perm(perm, batch: int, device: torch.device) -> Tensor | None:
    """-> None or the permutation as a contiguous tensor of its own dtype (int32 or int64: the kernels read
    either, so nothing is converted on the device)."""
    if perm is None:
        return None
    if not isinstance(perm, Tensor) or perm.dtype not in (torch.int64, torch.int32):
        got = perm.dtype if isinstance(perm, Tensor) else type(perm).__name__
        raise TypeError(f"perm must be None or an int64/int32 tensor, got {got}")
    if perm.shape != (batch,):
        raise ValueError(f"perm must have shape ({batch},), got {tuple(perm.shape)}")
    check_device("perm", perm, device)
    if can_inspect(perm) and not torch.equal(torch.sort(perm.long()).values, torch.arange(batch)):
        raise ValueError(f"perm must be a permutation of range({batch}) (each index once)")
    return perm if perm.is_contiguous() else perm.contiguous()


def check_index_range(lo: int, hi: int, num_classes: int) -> None:
    """The smallest and largest class index of a target must lie in [0, num_classes)."""
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"target holds class indices from {lo} to {hi}, outside "
                         f"[0, num_classes={num_classes})")


def check_index_target(target, batch: int, num_classes: int, device: torch.device) -> Tensor:
    """Class indices (B,) -> a contiguous int32 or int64 tensor (other integer dtypes become int64)."""
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a tensor, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target of shape (B,) must hold integer class indices, got {target.dtype}")
    if target.shape != (batch,):
        raise ValueError(f"target must have shape ({batch},), got {tuple(target.shape)}")
    check_device("target", target, device)
    if can_inspect(target) and target.numel():
        lo, hi = target.aminmax()
        check_index_range(int(lo), int(hi), num_classes)
    if target.dtype not in (torch.int64, torch.int32):
        target = target.long()
    return target if target.is_contiguous() else target.contiguous()


def check_target(target, batch: int, num_classes, device: torch.device):
    """Class indices (B,) or dense float targets (B, K) -> (target, num_classes)."""
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a tensor, got {type(target).__name__}")
    if target.ndim == 1:
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(f"target of shape (B,) must hold integer class indices, got {target.dtype}")
        if num_classes is None:
            raise ValueError("num_classes is required when target holds class indices")
        num_classes = check_num_classes(num_classes)
        return check_index_target(target, batch, num_classes, device), num_classes
    if target.ndim == 2:
        if not target.is_floating_point():
            raise TypeError(f"target of shape (B, K) must be floating point, got {target.dtype}")
        if target.shape[0] != batch:
            raise ValueError(f"target has {target.shape[0]} rows but the batch has {batch}")
        check_device("target", target, device)
        if num_classes is not None and check_num_classes(num_classes) != target.shape[1]:
            raise ValueError(f"num_classes={num_classes} but target has {target.shape[1]} columns")
        return target.contiguous(), target.shape[1]
    raise ValueError(f"target must have shape (B,) or (B, K), got {tuple(target.shape)}")


_CONSTANTS: dict = {}


def channel_vector(name: str, values, channels: int, device: torch.device) -> Tensor:
    """Per-channel constants (mean, std) as a float32 (C,) tensor on ``device``; a sequence of numbers is
    made on the device once per (values, device) and kept."""
    if isinstance(values, Tensor):
        check_device(name, values, device)
        t = values.float().reshape(-1)
    else:
        if not isinstance(values, Sequence) or not all(isinstance(v, (int, float)) for v in values):
            raise TypeError(f"{name} must be a sequence of numbers or a tensor, got {values!r}")
        key = (name, tuple(float(v) for v in values), str(device))
        t = _CONSTANTS.get(key)
        if t is None:  # cached: building it on a GPU is a host-to-device copy, once per (values, device)
            t = _CONSTANTS[key] = torch.tensor(key[1], dtype=torch.float32, device=device)
    if t.numel() != channels:
        raise ValueError(f"{name} has {t.numel()} values but the batch has {channels} channels (dim 1)")
    return t


def check_images(x, mean, std, out_dtype, inplace):
    """The image batch and its normalization -> (x, mean, std, out_dtype) ready for the kernels."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.ndim < 1:
        raise ValueError("x must have a batch dimension: shape (B, ...)")
    if x.dtype not in FLOAT_DTYPES + (torch.uint8,):
        raise TypeError(f"x must be float32, float16, bfloat16 or uint8, got {x.dtype}")
    if out_dtype is None:
        if x.dtype == torch.uint8:
            raise TypeError("x is uint8: pass a floating out_dtype (e.g. torch.bfloat16) for the result")
        out_dtype = x.dtype
    check_out_dtype(out_dtype, allow_none=False)
    if (mean is None) != (std is None):
        raise ValueError("mean and std go together: pass both or neither")
    sample = math.prod(x.shape[1:])
    if x.shape[0] and sample >= 2**31:
        raise ValueError(f"one sample of x has {sample} elements; at most 2**31 - 1 are supported")
    if mean is not None:
        if x.ndim < 2:
            raise ValueError("mean/std normalize dim 1 (channels): x must have at least 2 dimensions")
        channels = x.shape[1]
        mean = channel_vector("mean", mean, channels, x.device)
        std = channel_vector("std", std, channels, x.device)
        if can_inspect(std) and not bool((std > 0).all()):
            raise ValueError("std must be positive")
    dense = x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
    if inplace:
        if out_dtype != x.dtype:
            raise ValueError(f"inplace=True writes into x ({x.dtype}); out_dtype={out_dtype} needs a new "
                             "tensor: use inplace=False")
        if not dense:
            raise ValueError("inplace=True needs x contiguous or channels_last")
    elif not dense:
        x = x.contiguous()
    return x, mean, std, out_dtype


def check_out(out, x: Tensor, out_dtype: torch.dtype, inplace: bool) -> Tensor | None:
    """A caller's output buffer: x's shape and strides, the output dtype, x's device, no memory shared
    with x (in-place mixing is ``inplace=True``)."""
    if out is None:
        return None
    if not isinstance(out, Tensor):
        raise TypeError(f"out must be a tensor, got {type(out).__name__}")
    if inplace:
        raise ValueError("out and inplace=True exclude each other: inplace writes into x")
    if out.dtype != out_dtype:
        raise TypeError(f"out has dtype {out.dtype} but the result is {out_dtype} (out_dtype)")
    check_device("out", out, x.device)
    if out.shape != x.shape or out.stride() != x.stride():
        raise ValueError(f"out must have x's shape and memory layout: shape {tuple(x.shape)}, strides "
                         f"{x.stride()}; got {tuple(out.shape)}, {out.stride()}")
    if out.numel() and not tracing() and out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        raise ValueError("out shares memory with x: pass a separate buffer, or inplace=True to mix x itself")
    return out


def check_box(box, x: Tensor, device):
    """CutMix boxes -> int32 (B, 4) (y0, y1, x0, x1), or None. One box given as four Python ints stays four
    ints (or a (4,) CPU tensor) becomes a tuple: the fused kernel takes it as scalars, with no tensor made or
    copied to the device."""
    if box is None:
        return None
    if x.ndim != 4:
        raise ValueError(f"box needs x of shape (B, C, H, W), got {tuple(x.shape)}")
    if isinstance(box, Tensor) and box.shape == (4,) and can_inspect(box) and not box.is_floating_point():
        box = box.tolist()  # one box on the host: four numbers for the kernel, no copy to the device
    if (isinstance(box, (tuple, list)) and len(box) == 4
            and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in box)):
        return tuple(int(v) for v in box)
    if not isinstance(box, Tensor):
        box = torch.tensor(box, dtype=torch.int32, device=device)
    if box.is_floating_point() or box.shape not in ((4,), (x.shape[0], 4)):
        raise ValueError(f"box must be integer (y0, y1, x0, x1) of shape (4,) or ({x.shape[0]}, 4), "
                         f"got {box.dtype} {tuple(box.shape)}")
    check_device("box", box, device)
    return box.to(torch.int32).expand(x.shape[0], 4).contiguous()
