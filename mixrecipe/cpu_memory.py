"""Large CPU outputs on pages the process keeps: a new output without the OS faulting in and zeroing pages.

A new tensor of tens of MB comes from fresh pages (malloc hands sizes above 32 MB to mmap and gives them back
to the OS when freed), and the OS faults them in and zeroes them on the first write: as much work as
writing the output once more, so a fused pass into a fresh 77 MB output took 1.7x to 2.1x the time of the
same pass into a warm buffer. The ops take their large CPU outputs from here instead: buffers mapped once
and handed out again as soon as nothing references them. "Nothing" is Python's reference count of the
buffer: every tensor, view, storage or NumPy array over it keeps its storage alive, and the storage holds
one reference to the buffer. Like PyTorch's CUDA caching allocator, the memory stays with the process:
:func:`release` returns the free buffers, ``POOL_MAX_BUFFERS = 0`` turns the reuse off.

Tensors made here cannot be resized (``resize_`` raises), as any tensor over an outside buffer.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading

import torch

__all__ = ["empty_like", "release", "pooled_bytes", "advise_huge_pages", "POOL_MIN_BYTES", "POOL_MAX_BUFFERS"]

POOL_MIN_BYTES = 16 << 20  # smaller outputs come from torch's allocator (malloc keeps and reuses them)
POOL_MAX_BUFFERS = 4  # buffers kept at most; a loader holds one batch while the next is mixed

_BUFFERS: list = []  # mmap objects, least recently handed out first
_LOCK = threading.Lock()


def _references(buffers: list, i: int) -> int:
    """Python's count of references to ``buffers[i]``, seen the same way wherever the pool asks."""
    return sys.getrefcount(buffers[i])


_FREE_REFS = _references([bytearray(1)], 0)  # a buffer only its list holds: measured, not assumed


def _free(i: int) -> bool:
    """Whether nothing but the pool references buffer i (a storage over it holds one more reference)."""
    return _references(_BUFFERS, i) == _FREE_REFS


def _after_fork_in_child() -> None:
    global _LOCK
    _LOCK = threading.Lock()  # a fork while another thread held the lock must not leave it held


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14
_LIBC = None


def advise_huge_pages(address: int, nbytes: int) -> None:
    """Ask Linux for 2 MiB pages behind fresh memory before its first write.

    A new 77 MB output costs ~19k page faults at 4 KiB; with transparent huge pages on "madvise" (a common
    default) this one call cuts them to ~40. Advice only: a refusal changes nothing.
    """
    global _LIBC
    if not sys.platform.startswith("linux"):
        return
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    lo = -(-address // _HUGE_PAGE) * _HUGE_PAGE
    hi = (address + nbytes) // _HUGE_PAGE * _HUGE_PAGE
    if hi > lo:
        _LIBC.madvise(lo, hi - lo, _MADV_HUGEPAGE)


def _take(nbytes: int):
    """(buffer, whether it is new): a free buffer of exactly ``nbytes``, else a new one; None when the pool
    is full of buffers in use."""
    with _LOCK:
        for i in range(len(_BUFFERS)):
            if len(_BUFFERS[i]) == nbytes and _free(i):
                buffer = _BUFFERS.pop(i)
                _BUFFERS.append(buffer)  # the most recently handed out goes last
                return buffer, False
        while len(_BUFFERS) >= POOL_MAX_BUFFERS:
            free = [i for i in range(len(_BUFFERS)) if _free(i)]
            if not free:
                return None
            del _BUFFERS[free[0]]  # the least recently handed out free one, of another size
        buffer = mmap.mmap(-1, nbytes)
        _BUFFERS.append(buffer)
        return buffer, True


def empty_like(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty_like(x, dtype=dtype)``: on a reused buffer for a contiguous or channels_last CPU ``x``
    whose output takes at least ``POOL_MIN_BYTES``, else from torch's allocator."""
    nbytes = x.numel() * dtype.itemsize
    if (nbytes < POOL_MIN_BYTES or x.device.type != "cpu" or POOL_MAX_BUFFERS < 1
            or not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))):
        return torch.empty_like(x, dtype=dtype)
    taken = _take(nbytes)
    if taken is None:
        return torch.empty_like(x, dtype=dtype)
    out = torch.frombuffer(taken[0], dtype=dtype, count=x.numel()).as_strided(x.shape, x.stride())
    if taken[1]:
        advise_huge_pages(out.data_ptr(), nbytes)
    return out


def release() -> int:
    """Unmap the buffers nothing references any more; returns the bytes given back."""
    with _LOCK:
        free = [i for i in range(len(_BUFFERS)) if _free(i)]
        freed = sum(len(_BUFFERS[i]) for i in free)
        for i in reversed(free):
            del _BUFFERS[i]
    return freed


def pooled_bytes() -> int:
    """Bytes the pool holds now, in use or free."""
    with _LOCK:
        return sum(len(buffer) for buffer in _BUFFERS)
