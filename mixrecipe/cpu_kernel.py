"""One-pass mixup on CPU: a numba kernel with the Triton kernel's semantics (``kernels/mixup.py``).

One call walks the batch once: it gathers each row's partner, normalizes (uint8 scaled by 1/255 first),
pastes the CutMix box, lerps, rounds to the output dtype and writes the soft targets. Under timm's flip
pairing a work unit owns rows i and B-1-i, loads both and writes both, so the pass can run in place.

Bytes moved for a batch of M elements of E bytes (flip pairing, in place, no uint8):
  read M*E + write M*E  -- what ``x.mul_(1.0)`` moves, the floor for any pass over the batch.
Explicit permutation: read 2*M*E + write M*E.  uint8 in, 2-byte out: read M + write 2*M.
Labels add B*K*4 bytes written (plus B*K*4 read for dense targets).

Why numba: it compiles on the user's machine without a C/C++ toolchain (LLVM ships in llvmlite) and its
``cache=True`` keeps the machine code on disk, so a later process loads it instead of compiling. fp16 and
bf16 travel as raw 16-bit integers (fp16 as int16, bf16 as uint16, so the array type alone tells the format
and each (input, output) pair is its own small compiled entry) and are converted by bit manipulation,
rounding to nearest even like PyTorch.

Launch: the launcher packs the tensors' addresses and sizes and the scalars into one argument block and
calls a C entry (``numba.cfunc``) with its address, through ctypes, which releases the GIL.

Threads: a parallel launch runs on PyTorch's own OpenMP thread team, handed to the runtime's
``GOMP_parallel`` like any ``#pragma omp parallel`` region. PyTorch's OpenMP threads spin for a while after
each parallel PyTorch op; a second pool (numba's workqueue or OpenMP layer) had to fight them for the
cores, so a pass started right after a ``copy_`` took 1.55-2.08x the in-place floor on a 2-core machine,
while PyTorch's own team picks the work up at once. Where no such runtime is found (``team_runtime()``),
Python threads run the entry side by side. Team members take chunks of work as they go, so one slowed
thread does not hold up the rest. Batches moving less than ``PARALLEL_MIN_BYTES`` run on the calling
thread: starting a team costs more than it saves there. The loss rows (``ce_rows``) run the same way,
in chunks of rows. ``beta_rows`` turns one call's Beta draws into per-sample weights for the policy's
"elem" and "pair" modes in one pass (a dozen tiny tensor ops took longer than mixing a CIFAR batch).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import math
import os
import struct
import tempfile
import threading
import warnings
from typing import NamedTuple

import numpy as np
import torch

from . import cpu_memory
from .checks import check_index_range, check_unit_range

try:
    import numba
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic, overload
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None

__all__ = ["available", "mix_cpu", "plan_mix", "MixPlan", "ce_rows", "ce_rows_backward", "beta_rows",
           "cache_stats", "team_runtime", "openmp_max_threads", "PARALLEL_MIN_BYTES",
           "LOSS_PARALLEL_MIN_ELEMS", "CHUNK_ELEMS", "USE_OPENMP_TEAM"]

PARALLEL_MIN_BYTES = 2 << 20  # below this many bytes moved, one thread: a team saves nothing at 1.5 MB
CHUNK_ELEMS = 8192  # elements of one row handled by a work unit (no CutMix box): a few pages per row
_MASKED_LINE_MAX = 64  # a CutMix line up to this long, written to one row, is one loop (see _mix_line)
LOSS_PARALLEL_MIN_ELEMS = 1 << 14  # loss rows: below this many logits, one thread
PARALLEL_CHUNKS = 4  # at least this many chunks of work per thread, to rebalance around a busy core,
CHUNK_BYTES = 8 << 20  # and chunks moving at most about this much: a small batch in few large pieces keeps
# each thread's rows together (dealt out in small pieces, a CIFAR batch took 1.9x as long)


class _Layout(NamedTuple):
    """Slots of a launch's argument block (int64; the float values stored as float64 bits). An array takes
    three slots: its address and two sizes (a vector uses the first)."""
    COUNTER: int = 0  # the next work unit, taken atomically by the team
    N_UNITS: int = 1
    CHUNK: int = 2
    INPLACE: int = 3
    PLANE: int = 4
    LINES_PER_PLANE: int = 5
    LINE: int = 6
    COL_MULT: int = 7
    LAM_X_VALUE: int = 8
    LAM_Y_VALUE: int = 9
    IN_SCALE: int = 10
    LABEL_OFF: int = 11
    LABEL_KEEP: int = 12
    X: int = 13
    OUT: int = 16
    PERM: int = 19
    LAM_X: int = 22
    BOX: int = 25
    MEAN: int = 28
    ISTD: int = 31
    MEAN_TAB: int = 34
    ISTD_TAB: int = 37
    TARGET: int = 40
    DENSE: int = 43
    SOFT: int = 46
    LAM_Y: int = 49
    REFUSED: int = 52  # set to 1 by the team when a class index lies outside [0, K) or a (B,) weight outside
    # [0, 1]: nothing was written
    SLOTS: int = 53


_BLOCK = _Layout()


class _LossLayout(NamedTuple):
    """Slots of a loss launch's argument block (int64; SMOOTHING holds float64 bits). OUT is the loss rows
    (forward) or the logits' gradient (backward)."""
    COUNTER: int = 0
    CHUNK: int = 1
    BATCH: int = 2
    CLASSES: int = 3
    Z: int = 4
    TARGET: int = 5
    LAM: int = 6
    PERM: int = 7
    LSE: int = 8
    GRAD: int = 9
    GRAD_STEP: int = 10
    OUT: int = 11
    CHECK: int = 12  # 1: check the values first (a one-thread launch), the verdict written to CHECK
    SMOOTHING: int = 13
    SLOTS: int = 14


_LOSS_BLOCK = _LossLayout()
_FIRST_REAL, _FIRST_ARRAY = _BLOCK.LAM_X_VALUE, _BLOCK.X


def available() -> bool:
    """Whether numba imported; without it the ops fall back to the eager path."""
    return numba is not None


if numba is not None:
    def _ensure_cache_dir() -> None:
        """Give numba a writable cache folder when neither the package folder nor the user's is writable."""
        if os.environ.get("NUMBA_CACHE_DIR"):
            return
        here = os.path.dirname(os.path.abspath(__file__))
        user = os.path.join(os.path.expanduser("~"), ".cache")
        if os.access(here, os.W_OK) or os.access(user, os.W_OK):
            return
        numba.config.CACHE_DIR = os.path.join(tempfile.gettempdir(), "mixrecipe-numba-cache")

    _ensure_cache_dir()

    def _jit(**options):
        return numba.njit(cache=True, nogil=True, **options)

    # ----------------------------------------------------------------------------------------------
    # Bit casts and 16-bit float conversions (round to nearest even, as torch's .to()).
    # ----------------------------------------------------------------------------------------------
    @intrinsic
    def _bits_of(typingctx, value):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.IntType(32))

        return types.uint32(types.float32), codegen

    @intrinsic
    def _float_of(typingctx, bits):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.FloatType())

        return types.float32(types.uint32), codegen

    @intrinsic
    def _borrowed(typingctx, arr):
        """The same array without its reference count (a NULL meminfo).

        numba wraps every array variable and every slice in atomic NRT_incref/NRT_decref calls; on lines
        of a few dozen elements (a CutMix row, a small image) they cost more than the arithmetic (about
        0.2 µs per line). Views of a borrowed array skip them. Safe here: the caller (``mix_cpu``)
        holds every array for the whole call and the kernel keeps none.
        """
        def codegen(context, builder, signature, args):
            view = context.make_array(arr)(context, builder, value=args[0])
            view.meminfo = cgutils.get_null_value(view.meminfo.type)
            view.parent = cgutils.get_null_value(view.parent.type)
            return view._getvalue()

        return arr(arr), codegen

    @intrinsic
    def _fetch_add(typingctx, counter, value):
        """Atomically add ``value`` to ``counter[0]`` (int64) and return the old value."""
        def codegen(context, builder, signature, args):
            ary = context.make_array(counter)(context, builder, value=args[0])
            return builder.atomic_rmw("add", ary.data, args[1], "seq_cst")

        return types.int64(counter, types.int64), codegen

    _U32 = np.uint32

    @_jit(inline="always")
    def _bf16_to_f32(h):
        return _float_of(_U32(h) << _U32(16))

    @_jit(inline="always")
    def _f32_to_bf16(v):
        bits = _bits_of(v)
        rounded = (bits + _U32(0x7FFF) + ((bits >> _U32(16)) & _U32(1))) >> _U32(16)
        return np.uint16(_U32(0x7FC0) if v != v else rounded)

    @_jit(inline="always")
    def _f16_to_f32(h):
        # fp16 bits -> fp32, exact (the FP16 library's fp16_ieee_to_fp32_value, which torch uses).
        w = _U32(np.uint16(h)) << _U32(16)
        sign = w & _U32(0x80000000)
        two_w = (w + w) & _U32(0xFFFFFFFF)
        exp_scale = np.float32(1.925929944387236e-34)  # 2**-112
        normalized = _float_of(_U32((two_w >> _U32(4)) + _U32(0x70000000))) * exp_scale
        denormalized = _float_of(_U32((two_w >> _U32(17)) | _U32(0x3F000000))) - np.float32(0.5)
        body = _bits_of(denormalized) if two_w < _U32(0x08000000) else _bits_of(normalized)
        return _float_of(_U32(sign | body))

    @_jit(inline="always")
    def _f32_to_f16(v):
        # fp32 -> fp16 bits, nearest even, subnormals, inf and NaN (fp16_ieee_from_fp32_value, as torch).
        base = (abs(v) * np.float32(5.192296858534828e33)) * np.float32(7.703719777548943e-34)
        w = _bits_of(v)
        shl1_w = (w + w) & _U32(0xFFFFFFFF)
        sign = w & _U32(0x80000000)
        bias = shl1_w & _U32(0xFF000000)
        if bias < _U32(0x71000000):
            bias = _U32(0x71000000)
        base = _float_of(_U32((bias >> _U32(1)) + _U32(0x07800000))) + base
        bits = _bits_of(base)
        nonsign = ((bits >> _U32(13)) & _U32(0x00007C00)) + (bits & _U32(0x00000FFF))
        out = (sign >> _U32(16)) | (_U32(0x7E00) if shl1_w > _U32(0xFF000000) else nonsign)
        return np.int16(np.uint16(out))

    # The array's dtype tells the format: float32, uint8, int16 = fp16 bits, uint16 = bf16 bits.
    def _load(row, k):
        raise NotImplementedError  # replaced by the overload inside numba code

    @overload(_load)
    def _load_impl(row, k):
        dt = row.dtype
        if dt == types.float32:
            return lambda row, k: row[k]
        if dt == types.uint8:
            return lambda row, k: np.float32(row[k])
        if dt == types.int16:
            return lambda row, k: _f16_to_f32(row[k])
        if dt == types.uint16:
            return lambda row, k: _bf16_to_f32(row[k])
        return None

    def _store(row, k, v):
        raise NotImplementedError

    @overload(_store)
    def _store_impl(row, k, v):
        dt = row.dtype
        if dt == types.float32:
            def store_f32(row, k, v):
                row[k] = v
            return store_f32
        if dt == types.uint8:  # typing only: uint8 is never an output (in place keeps x's dtype)
            def store_u8(row, k, v):
                row[k] = np.uint8(0)
            return store_u8
        if dt == types.int16:
            def store_f16(row, k, v):
                row[k] = _f32_to_f16(v)
            return store_f16
        if dt == types.uint16:
            def store_bf16(row, k, v):
                row[k] = _f32_to_bf16(v)
            return store_bf16
        return None

    @_jit(inline="always")
    def _lerp(start, end, w):
        # torch.lerp's two-sided formula: exact at w == 0 (start) and w == 1 (end).
        diff = end - start
        return start + w * diff if w < np.float32(0.5) else end - diff * (np.float32(1.0) - w)

    # ----------------------------------------------------------------------------------------------
    # Kernels: one line (a run of one row pair's memory), then a range of work units, then the entries.
    # ----------------------------------------------------------------------------------------------
    @_jit(inline="always")
    def _mix_span(xi, xj, oi, oj, n, mean, istd, mean_tab, istd_tab, use_tab, in_scale, w_i, w_j, store_j):
        """n columns of rows i and j with one weight per row: normalize, lerp, round, store.

        Loops start at 0 (callers slice): with a start the compiler cannot prove non-negative, numba's
        negative-index wraparound stays in the loop and blocks vectorization.
        """
        if use_tab:  # channels_last with mean/std: the channel cycles along the line
            for col in range(n):
                a = (_load(xi, col) * in_scale - mean_tab[col]) * istd_tab[col]
                b = (_load(xj, col) * in_scale - mean_tab[col]) * istd_tab[col]
                _store(oi, col, _lerp(b, a, w_i))
                if store_j:
                    _store(oj, col, _lerp(a, b, w_j))
        elif in_scale == 1 and mean == 0 and istd == 1:  # float input, no normalization: fewer flops
            for col in range(n):
                a = _load(xi, col)
                b = _load(xj, col)
                _store(oi, col, _lerp(b, a, w_i))
                if store_j:
                    _store(oj, col, _lerp(a, b, w_j))
        else:  # one channel along the line
            for col in range(n):
                a = (_load(xi, col) * in_scale - mean) * istd
                b = (_load(xj, col) * in_scale - mean) * istd
                _store(oi, col, _lerp(b, a, w_i))
                if store_j:
                    _store(oj, col, _lerp(a, b, w_j))

    @_jit(inline="always")
    def _mix_masked(xi, xj, oi, n, mean, istd, mean_tab, istd_tab, use_tab, in_scale, w_i, c0_i, c1_i):
        """:func:`_mix_span` for row i alone, each column's weight chosen by its box: one loop for a short
        line."""
        for col in range(n):
            if use_tab:
                a = (_load(xi, col) * in_scale - mean_tab[col]) * istd_tab[col]
                b = (_load(xj, col) * in_scale - mean_tab[col]) * istd_tab[col]
            else:
                a = (_load(xi, col) * in_scale - mean) * istd
                b = (_load(xj, col) * in_scale - mean) * istd
            _store(oi, col, _lerp(b, a, np.float32(0.0) if c0_i <= col < c1_i else w_i))

    @_jit(inline="always")
    def _mix_line(xi, xj, oi, oj, n, mean, istd, mean_tab, istd_tab, use_tab, in_scale,
                  w_i, w_j, c0_i, c1_i, c0_j, c1_j, store_j, inplace):
        """One line of rows i and j; a row's pixels in [c0, c1) (its CutMix box) take weight 0.

        The line is cut where either box starts or ends, so every span has constant weights: with a weight
        chosen per element, a loop that writes both rows (or writes in place) stays scalar (2.7x slower
        here). A short line written to one output row (an out-of-place pass: a CIFAR row is 32 columns)
        takes per-element weights in one loop instead: three short spans cost more (139 against 217 µs
        for a 128x3x32x32 CutMix on one thread).
        """
        if n <= _MASKED_LINE_MAX and not store_j:
            _mix_masked(xi, xj, oi, n, mean, istd, mean_tab, istd_tab, use_tab, in_scale, w_i, c0_i, c1_i)
            return
        lo = 0
        while lo < n:
            hi = n
            for edge in (c0_i, c1_i, c0_j, c1_j):
                if lo < edge < hi:
                    hi = edge
            wi = np.float32(0.0) if c0_i <= lo < c1_i else w_i
            wj = np.float32(0.0) if c0_j <= lo < c1_j else w_j
            ti = mean_tab[lo:hi] if use_tab else mean_tab
            si = istd_tab[lo:hi] if use_tab else istd_tab
            a, b = xi[lo:hi], xj[lo:hi]
            if inplace:  # the very arrays read are written: the vectorizer needs no overlap check
                _mix_span(a, b, a, b, hi - lo, mean, istd, ti, si, use_tab, in_scale, wi, wj, store_j)
            else:
                _mix_span(a, b, oi[lo:hi], oj[lo:hi], hi - lo, mean, istd, ti, si, use_tab, in_scale, wi, wj,
                          store_j)
            lo = hi

    @_jit(inline="always")
    def _lam(lam, lam_value, row):
        return lam[row] if lam.shape[0] else lam_value

    @_jit(inline="always")
    def _partner(perm, row, batch):
        """(partner, valid): flip pairing or perm[row]; a bad index pairs the row with itself, invalid."""
        if perm.shape[0] == 0:
            return batch - 1 - row, True
        j = perm[row]
        if 0 <= j < batch:
            return j, True
        return row, False

    @_jit(inline="always")
    def _lines_per_unit(box, lines_per_plane):
        """A CutMix box makes every image row a line, too short to be a unit alone: one unit takes the
        plane's rows. Without one, lines are long (CHUNK_ELEMS) and each is a unit."""
        return lines_per_plane if box.shape[0] else 1

    @_jit(inline="always")
    def _image_unit(u, x, out, inplace, perm, lam, lam_value, box, mean, istd, mean_tab, istd_tab,
                    in_scale, plane, lines_per_plane, line, col_mult):
        batch = x.shape[0]
        span = _lines_per_unit(box, lines_per_plane)
        units_per_plane = lines_per_plane // span
        units_per_row = (x.shape[1] // plane) * units_per_plane
        i = u // units_per_row
        rest = u % units_per_row
        p = rest // units_per_plane
        r0 = (rest % units_per_plane) * span
        j, valid = _partner(perm, i, batch)
        paired = perm.shape[0] == 0
        use_tab = mean_tab.shape[0] > 0
        m = mean[p % mean.shape[0]]
        s = istd[p % istd.shape[0]]
        w_i = _lam(lam, lam_value, i)
        w_j = _lam(lam, lam_value, j)
        end = r0 + span
        bi, bj = (i, j) if box.shape[0] > 1 else (0, 0)  # one box row: the whole batch's box
        r = r0
        while r < end:
            rows = 1
            c0_i = c1_i = c0_j = c1_j = 0
            if box.shape[0]:  # lines are image rows here: r is the row index h
                if box[bi, 0] <= r < box[bi, 1]:
                    c0_i, c1_i = box[bi, 2] * col_mult, box[bi, 3] * col_mult
                if paired and box[bj, 0] <= r < box[bj, 1]:  # row j is written here too
                    c0_j, c1_j = box[bj, 2] * col_mult, box[bj, 3] * col_mult
                if c0_i == c1_i and c0_j == c1_j and not use_tab:
                    # No box on this row: the rows up to the next one a box covers are one span (rows are
                    # contiguous), mixed in one go instead of a short span per row.
                    while (r + rows < end and not box[bi, 0] <= r + rows < box[bi, 1]
                           and not (paired and box[bj, 0] <= r + rows < box[bj, 1])):
                        rows += 1
            start = p * plane + r * line
            n = min(line * rows, plane - r * line)
            r += rows
            xi, xj = x[i, start:start + n], x[j, start:start + n]
            if not valid:  # never read out of bounds: the row says it has no partner
                oi = out[i, start:start + n]
                for col in range(n):
                    _store(oi, col, np.float32(np.nan))
            elif inplace and not box.shape[0]:
                _mix_span(xi, xj, xi, xj, n, m, s, mean_tab, istd_tab, use_tab, in_scale, w_i, w_j, True)
            elif inplace:
                _mix_line(xi, xj, xi, xj, n, m, s, mean_tab, istd_tab, use_tab, in_scale, w_i, w_j,
                          c0_i, c1_i, c0_j, c1_j, True, True)
            elif paired:
                _mix_line(xi, xj, out[i, start:start + n], out[j, start:start + n], n, m, s, mean_tab,
                          istd_tab, use_tab, in_scale, w_i, w_j, c0_i, c1_i, c0_j, c1_j, True, False)
            else:
                _mix_line(xi, xj, out[i, start:start + n], out[i, start:start + n], n, m, s, mean_tab,
                          istd_tab, use_tab, in_scale, w_i, w_j, c0_i, c1_i, c0_j, c1_j, False, False)

    @_jit(inline="always")
    def _label_unit(i, batch, perm, target, dense, soft, lam, lam_value, off, keep):
        j, valid = _partner(perm, i, batch)
        store_j = perm.shape[0] == 0 and j != i
        k_classes = soft.shape[1]
        ti = tj = -1
        if target.shape[0]:
            ti, tj = target[i], target[j]
            valid = valid and 0 <= ti < k_classes and 0 <= tj < k_classes
        w_i = _lam(lam, lam_value, i)
        w_j = _lam(lam, lam_value, j)
        nan = np.float32(np.nan)
        for k in range(k_classes):
            if target.shape[0]:
                s_i = (np.float32(1.0) if k == ti else np.float32(0.0)) * keep + off
                s_j = (np.float32(1.0) if k == tj else np.float32(0.0)) * keep + off
            else:
                s_i = dense[i, k] * keep + off
                s_j = dense[j, k] * keep + off
            soft[i, k] = _lerp(s_j, s_i, w_i) if valid else nan
            if store_j:
                soft[j, k] = _lerp(s_i, s_j, w_j) if valid else nan

    @_jit()
    def _mix_units(u0, u1, x, out, inplace, perm, lam_x, lam_x_value, box, mean, istd, mean_tab, istd_tab,
                   in_scale, plane, lines_per_plane, line, col_mult, target, dense, soft, lam_y, lam_y_value,
                   off, keep):
        """Work units [u0, u1): image units (row group x line) first, then one label unit per row group."""
        x, out, perm, lam_x, box = _borrowed(x), _borrowed(out), _borrowed(perm), _borrowed(lam_x), \
            _borrowed(box)
        mean, istd, mean_tab, istd_tab = _borrowed(mean), _borrowed(istd), _borrowed(mean_tab), \
            _borrowed(istd_tab)
        target, dense, soft, lam_y = _borrowed(target), _borrowed(dense), _borrowed(soft), _borrowed(lam_y)
        batch = max(x.shape[0], soft.shape[0])
        groups = (batch + 1) // 2 if perm.shape[0] == 0 else batch
        n_lines = (x.shape[1] // plane) * lines_per_plane if x.shape[1] else 0
        n_image = groups * (n_lines // _lines_per_unit(box, lines_per_plane)) if x.shape[0] else 0
        for u in range(u0, u1):
            if u < n_image:
                _image_unit(u, x, out, inplace, perm, lam_x, lam_x_value, box, mean, istd, mean_tab, istd_tab,
                            in_scale, plane, lines_per_plane, line, col_mult)
            else:
                _label_unit(u - n_image, batch, perm, target, dense, soft, lam_y, lam_y_value, off, keep)

    # ----------------------------------------------------------------------------------------------
    # Mixup cross-entropy rows (``mixrecipe.loss``): the Triton loss kernels' formula, one row at a time.
    # ----------------------------------------------------------------------------------------------
    @_jit(inline="always")
    def _exp(x):
        """exp for x <= 88 in float32, within 2 ulp: Cody-Waite reduction, a degree-6 polynomial, the
        exponent set by bits. Branch-free, so loops of it vectorize (numba's exp is a scalar libm call,
        3x slower here); results below float32's normal range flush to 0."""
        tiny = x < np.float32(-87.33654)
        x = min(max(x, np.float32(-87.33654)), np.float32(88.0))
        n = np.float32(np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5)))
        r = x - n * np.float32(0.693359375)
        r = r + n * np.float32(2.12194440e-4)
        p = np.float32(1.9875691500e-4)
        p = p * r + np.float32(1.3981999507e-3)
        p = p * r + np.float32(8.3334519073e-3)
        p = p * r + np.float32(4.1665795894e-2)
        p = p * r + np.float32(1.6666665459e-1)
        p = p * r + np.float32(5.0000001201e-1)
        y = (p * r * r + r + np.float32(1.0)) * _float_of(_U32(np.int32(n) + np.int32(127)) << _U32(23))
        return np.float32(0.0) if tiny else y

    @_jit(inline="always")
    def _row_max(row):
        """max of a non-empty row with four running maxima: one chain waits ~4 cycles per element (a float
        max's latency), and the compiler may not reorder it without giving up NaN semantics."""
        m0 = m1 = m2 = m3 = row[0]
        n = row.shape[0]
        k = 0
        while k + 4 <= n:
            m0 = max(m0, row[k])
            m1 = max(m1, row[k + 1])
            m2 = max(m2, row[k + 2])
            m3 = max(m3, row[k + 3])
            k += 4
        for r in range(k, n):
            m0 = max(m0, row[r])
        return max(max(m0, m1), max(m2, m3))

    @_jit(fastmath={"reassoc", "nsz"})  # lets the row's sums vectorize (NaN and inf keep their meaning)
    def _ce_rows(r0, r1, z, target, lam, perm, smoothing, loss, lse):
        """Rows [r0, r1): lse = logsumexp(z), loss = -(1-s) lerp(lp[t_partner], lp[t], lam) - s/K sum(lp)."""
        z, target, lam, perm = _borrowed(z), _borrowed(target), _borrowed(lam), _borrowed(perm)
        loss, lse = _borrowed(loss), _borrowed(lse)
        batch, classes = z.shape
        for i in range(r0, r1):
            row = z[i]
            top = _row_max(row)
            total = np.float32(0.0)
            mass = np.float32(0.0)
            for k in range(classes):
                total += row[k]
                mass += _exp(row[k] - top)
            log_z = top + np.log(mass)
            j = batch - 1 - i if perm.shape[0] == 0 else perm[i]
            own, other = row[target[i]] - log_z, row[target[j]] - log_z
            value = -(np.float32(1.0) - smoothing) * _lerp(other, own, lam[i])
            if smoothing > 0:  # as the eager path: no 0 * inf when a logit is -inf
                value -= (smoothing / classes) * (total - classes * log_z)
            loss[i] = value
            lse[i] = log_z

    @_jit()
    def _ce_rows_backward(r0, r1, grad, grad_step, z, lse, target, lam, perm, smoothing, dz):
        """Rows [r0, r1) of dz = grad * (softmax(z) - s/K - (1-s) (lam onehot(t) + (1-lam) onehot(t_perm)));
        row i's gradient is grad[i * grad_step] (0: the one value a mean's backward expands)."""
        grad, z, lse, target, lam, perm = _borrowed(grad), _borrowed(z), _borrowed(lse), _borrowed(target), \
            _borrowed(lam), _borrowed(perm)
        dz = _borrowed(dz)
        batch, classes = z.shape
        off = smoothing / classes
        keep = np.float32(1.0) - smoothing
        for i in range(r0, r1):
            g, log_z, row, out = grad[i * grad_step], lse[i], z[i], dz[i]
            for k in range(classes):
                out[k] = g * (_exp(row[k] - log_z) - off)
            j = batch - 1 - i if perm.shape[0] == 0 else perm[i]
            out[target[i]] -= g * keep * lam[i]
            out[target[j]] -= g * keep * (np.float32(1.0) - lam[i])

    @_jit()
    def _bounds(values):
        """(smallest, largest) of a non-empty (B,) array (class indices, per-sample weights) in one pass;
        (NaN, NaN) as soon as a NaN shows up, so a range check refuses it."""
        lo = hi = values[0]
        for v in values:
            if v != v:
                return v, v
            lo = min(lo, v)
            hi = max(hi, v)
        return lo, hi

    @intrinsic
    def _pointer(typingctx, address):
        """An int64 address as a void pointer, for ``numba.carray``."""
        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], ir.IntType(8).as_pointer())

        return types.voidptr(types.int64), codegen

    @_jit(inline="always")
    def _at(address, shape, dtype):
        """The array of ``shape`` at ``address`` (no reference count: the caller holds the tensor)."""
        return numba.carray(_pointer(address), shape, dtype)

    @_jit(inline="always")
    def _vector(slots, k, dtype):
        return _at(slots[k], slots[k + 1], dtype)

    @_jit(inline="always")
    def _matrix(slots, k, dtype):
        return _at(slots[k], (slots[k + 1], slots[k + 2]), dtype)

    @_jit(inline="always")
    def _indices_inside(target, classes):
        inside = True
        for i in range(target.shape[0]):
            inside &= 0 <= target[i] < classes
        return inside

    @_jit(inline="always")
    def _weights_inside(weights):
        """Every (B,) weight within [0, 1] (a NaN is not): an empty array (a float weight) passes."""
        inside = True
        for i in range(weights.shape[0]):
            inside &= np.float32(0.0) <= weights[i] <= np.float32(1.0)
        return inside

    @_jit()
    def _team_work(block, x_type, out_type):
        """One team member's share of a launch: take the next ``chunk`` work units until none are left.

        ``block`` is the launch's argument block (``_BLOCK``): int64 slots, the float ones holding float64
        bits. Taking chunks as they go (not a fixed share each) keeps one slowed thread from holding up
        the rest. Nothing here allocates, raises or touches Python: it runs on threads that hold no GIL.
        """
        slots = numba.carray(block, _BLOCK.SLOTS, np.int64)
        reals = numba.carray(block, _BLOCK.SLOTS, np.float64)
        counter = slots[_BLOCK.COUNTER:_BLOCK.COUNTER + 1]
        x = _matrix(slots, _BLOCK.X, x_type)
        out = _matrix(slots, _BLOCK.OUT, out_type)
        perm = _vector(slots, _BLOCK.PERM, np.int64)
        lam_x = _vector(slots, _BLOCK.LAM_X, np.float32)
        box = _matrix(slots, _BLOCK.BOX, np.int32)
        mean = _vector(slots, _BLOCK.MEAN, np.float32)
        istd = _vector(slots, _BLOCK.ISTD, np.float32)
        mean_tab = _vector(slots, _BLOCK.MEAN_TAB, np.float32)
        istd_tab = _vector(slots, _BLOCK.ISTD_TAB, np.float32)
        target = _vector(slots, _BLOCK.TARGET, np.int64)
        dense = _matrix(slots, _BLOCK.DENSE, np.float32)
        soft = _matrix(slots, _BLOCK.SOFT, np.float32)
        lam_y = _vector(slots, _BLOCK.LAM_Y, np.float32)
        n_units, chunk = slots[_BLOCK.N_UNITS], slots[_BLOCK.CHUNK]
        inside = _weights_inside(lam_x) and _weights_inside(lam_y)
        if target.shape[0]:
            inside = inside and _indices_inside(target, soft.shape[1])
        if not inside:
            # Every member checks the same values before it writes, so all refuse or none: no barrier.
            slots[_BLOCK.REFUSED] = 1
            return
        inplace = slots[_BLOCK.INPLACE] != 0
        plane, lines_per_plane = slots[_BLOCK.PLANE], slots[_BLOCK.LINES_PER_PLANE]
        line, col_mult = slots[_BLOCK.LINE], slots[_BLOCK.COL_MULT]
        lam_x_value = np.float32(reals[_BLOCK.LAM_X_VALUE])
        lam_y_value = np.float32(reals[_BLOCK.LAM_Y_VALUE])
        in_scale = np.float32(reals[_BLOCK.IN_SCALE])
        off, keep = np.float32(reals[_BLOCK.LABEL_OFF]), np.float32(reals[_BLOCK.LABEL_KEEP])
        start = _fetch_add(counter, chunk)
        while start < n_units:
            _mix_units(start, min(n_units, start + chunk), x, out, inplace, perm, lam_x, lam_x_value, box,
                       mean, istd, mean_tab, istd_tab, in_scale, plane, lines_per_plane, line, col_mult,
                       target, dense, soft, lam_y, lam_y_value, off, keep)
            start = _fetch_add(counter, chunk)

    @_jit()
    def _bounds_at(address, n, value_type, out_address):
        lo, hi = _bounds(_at(address, n, value_type))
        out = _at(out_address, 2, value_type)
        out[0], out[1] = lo, hi

    def _compile_bounds(value_type):
        """A C entry ``void(values, n, out)``: :func:`_bounds` of n values into out[0:2], cached on disk."""
        def entry(address, n, out_address):
            _bounds_at(address, n, value_type, out_address)

        return numba.cfunc(types.void(types.int64, types.int64, types.int64), cache=True)(entry)

    @_jit()
    def _ce_check(target, lam, batch, classes):
        """0, or 1 for a class index outside [0, K), 2 for a weight outside [0, 1] (or NaN)."""
        indices, weights = _at(target, batch, np.int64), _at(lam, batch, np.float32)
        for i in range(batch):
            if not 0 <= indices[i] < classes:
                return 1
            if not np.float32(0.0) <= weights[i] <= np.float32(1.0):
                return 2
        return 0

    @_jit()
    def _ce_work(block, backward):
        """One team member's share of a loss launch (``_LOSS_BLOCK``): chunks of rows until none are
        left."""
        slots = numba.carray(block, _LOSS_BLOCK.SLOTS, np.int64)
        reals = numba.carray(block, _LOSS_BLOCK.SLOTS, np.float64)
        counter = slots[_LOSS_BLOCK.COUNTER:_LOSS_BLOCK.COUNTER + 1]
        chunk, batch, classes = slots[_LOSS_BLOCK.CHUNK], slots[_LOSS_BLOCK.BATCH], slots[_LOSS_BLOCK.CLASSES]
        z = _at(slots[_LOSS_BLOCK.Z], (batch, classes), np.float32)
        target = _at(slots[_LOSS_BLOCK.TARGET], batch, np.int64)
        lam = _at(slots[_LOSS_BLOCK.LAM], batch, np.float32)
        perm_address = slots[_LOSS_BLOCK.PERM]
        perm = _at(perm_address, batch if perm_address else 0, np.int64)  # address 0: the flip pairing
        lse = _at(slots[_LOSS_BLOCK.LSE], batch, np.float32)
        smoothing = np.float32(reals[_LOSS_BLOCK.SMOOTHING])
        grad_step = slots[_LOSS_BLOCK.GRAD_STEP]
        grad = _at(slots[_LOSS_BLOCK.GRAD], (batch - 1) * grad_step + 1 if backward else 0, np.float32)
        loss = _at(slots[_LOSS_BLOCK.OUT], 0 if backward else batch, np.float32)
        dz = _at(slots[_LOSS_BLOCK.OUT], (batch if backward else 0, classes), np.float32)
        if slots[_LOSS_BLOCK.CHECK]:  # the verdict goes back in the same slot
            verdict = _ce_check(slots[_LOSS_BLOCK.TARGET], slots[_LOSS_BLOCK.LAM], batch, classes)
            slots[_LOSS_BLOCK.CHECK] = verdict
            if verdict:
                return
        start = _fetch_add(counter, chunk)
        while start < batch:
            stop = min(batch, start + chunk)
            if backward:
                _ce_rows_backward(start, stop, grad, grad_step, z, lse, target, lam, perm, smoothing, dz)
            else:
                _ce_rows(start, stop, z, target, lam, perm, smoothing, loss, lse)
            start = _fetch_add(counter, chunk)

    def _compile_ce_check():
        """A C entry ``int(target, lam, B, K)``: :func:`_ce_check`, cached on disk."""
        def check(target, lam, batch, classes):
            return _ce_check(target, lam, batch, classes)

        return numba.cfunc(types.int32(*[types.int64] * 4), cache=True)(check)

    def _compile_ce_team(backward):
        """A C entry ``void(void *block)`` for the loss rows (forward) or their gradient, cached on disk."""
        def entry(block):
            _ce_work(block, backward)

        return numba.cfunc(types.void(types.voidptr), cache=True)(entry)

    @_jit()
    def _beta_rows(gamma, coin, alpha, prob, pair, out):
        """λ per row from ``sample_beta``'s draws, its formula in float64: column d of ``gamma`` holds
        U ~ U[0, 1) (one row, alpha = 1) and λ_d = U, or G1, G2 ~ Gamma(alpha) (two rows, alpha > 1) and
        λ_d = G1 / (G1 + G2), or G1, G2 ~ Gamma(alpha + 1) and E1, E2 ~ Exp(1) (four rows) and
        λ_d = sigmoid((log G1 - E1 / alpha) - (log G2 - E2 / alpha)); 1.0 where a coin is given and not
        below ``prob``. ``pair``: λ_d goes to rows d and B-1-d, and the middle row of an odd batch stays
        unmixed (1.0). Rounded to float32 as ``.float()`` rounds."""
        batch = out.shape[0]
        for d in range(gamma.shape[1]):
            if gamma.shape[0] == 1:
                lam = gamma[0, d]
            elif gamma.shape[0] == 2:
                lam = gamma[0, d] / (gamma[0, d] + gamma[1, d])
            else:
                own = np.log(gamma[0, d]) - gamma[2, d] / alpha
                diff = own - (np.log(gamma[1, d]) - gamma[3, d] / alpha)
                if diff >= 0.0:  # the logistic function without overflow
                    lam = 1.0 / (1.0 + np.exp(-diff))
                else:
                    e = np.exp(diff)
                    lam = e / (1.0 + e)
            if coin.shape[0] and not coin[d] < prob:
                lam = 1.0
            out[d] = np.float32(lam)
            if pair:
                out[batch - 1 - d] = np.float32(lam)
        if pair and batch % 2:
            out[batch // 2] = np.float32(1.0)

    def _compile_beta_rows():
        """A C entry ``void(void *block)`` on a :data:`_BETA_FORMAT` block (gamma, rows, coin, n, pair, out,
        B as int64, then alpha, prob as float64): :func:`_beta_rows`, cached on disk."""
        def entry(block):
            slots = numba.carray(block, 9, np.int64)
            reals = numba.carray(block, 9, np.float64)
            gamma, rows, coin, n, pair, out, batch = (slots[0], slots[1], slots[2], slots[3], slots[4],
                                                       slots[5], slots[6])
            _beta_rows(_at(gamma, (rows, n), np.float64), _at(coin, n if coin else 0, np.float64), reals[7],
                       reals[8], pair != 0, _at(out, batch, np.float32))

        return numba.cfunc(types.void(types.voidptr), cache=True)(entry)

    def _compile_entry(x_type, out_type):
        """A C entry ``void(void *block)`` for one (input, output) element type, cached on disk."""
        def entry(block):
            _team_work(block, x_type, out_type)

        return numba.cfunc(types.void(types.voidptr), cache=True)(entry)


# --------------------------------------------------------------------------------------------------
# Launcher: torch tensors -> the argument block and line geometry the kernel walks, then a team runs it.
# --------------------------------------------------------------------------------------------------
_NO_MEAN, _NO_ISTD = torch.zeros(1), torch.ones(1)  # the identity normalization
# The kernel's element types: fp16 and bf16 travel as their bits (int16, uint16), so each is its own type.
_ELEMENT_TYPE = {torch.float32: np.float32, torch.float16: np.int16, torch.bfloat16: np.uint16,
                 torch.uint8: np.uint8}
_C_ENTRIES: dict = {}  # key -> _CEntry, made on first use
_ENTRY_LOCK = threading.Lock()
_TEAM_CALL = ctypes.CFUNCTYPE(None, ctypes.c_void_p)  # void(void *block)


class _CEntry(NamedTuple):
    compiled: object  # numba's compiled C callback (kept alive: it owns the machine code)
    call: object  # its ctypes function
    address: int  # its address, for an OpenMP team


def _c_entry(key, compile_entry, c_type):
    """The C entry under ``key``: compiled (or loaded from the disk cache) by ``compile_entry()`` once."""
    found = _C_ENTRIES.get(key)
    if found is None:
        with _ENTRY_LOCK:
            found = _C_ENTRIES.get(key)
            if found is None:
                compiled = compile_entry()
                found = _C_ENTRIES[key] = _CEntry(compiled, c_type(compiled.address), compiled.address)
    return found


def _entry(x_dtype: torch.dtype, out_dtype: torch.dtype):
    return _c_entry(("mix", x_dtype, out_dtype),
                    lambda: _compile_entry(_ELEMENT_TYPE[x_dtype], _ELEMENT_TYPE[out_dtype]), _TEAM_CALL)


USE_OPENMP_TEAM = True  # False: parallel launches run on Python threads even where PyTorch's OpenMP is found
_BOUNDS_TYPES = {torch.int64: (np.int64, ctypes.c_int64), torch.float32: (np.float32, ctypes.c_float)}
_BOUNDS_CALL = ctypes.CFUNCTYPE(None, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64)


def _value_bounds(values: torch.Tensor) -> tuple:
    """(smallest, largest) of a non-empty contiguous (B,) int64 or float32 tensor in one compiled pass,
    (NaN, NaN) where a NaN shows up: no torch op (each costs tens of µs with cold caches)."""
    value_type, c_type = _BOUNDS_TYPES[values.dtype]
    call = _c_entry(("bounds", values.dtype), lambda: _compile_bounds(value_type), _BOUNDS_CALL).call
    out = (c_type * 2)()
    call(values.data_ptr(), values.shape[0], ctypes.addressof(out))
    return out[0], out[1]


# beta_rows' arguments, packed into the thread's block: one pointer crosses ctypes instead of nine values.
_BETA_FORMAT = struct.Struct("<7q2d")


def beta_rows(gamma: torch.Tensor, coin: torch.Tensor | None, alpha: float, prob: float, batch: int,
              pair: bool) -> torch.Tensor:
    """Per-sample weights from one call's draws, in one compiled pass instead of a dozen tensor ops.

    Args:
        gamma: contiguous float64 draws, ``sample_beta``'s for n values of λ ~ Beta(alpha, alpha): (1, n)
            ``torch.rand`` uniforms for alpha = 1, (2, n) ``torch._standard_gamma`` draws of concentration
            alpha for alpha > 1, else (4, n) of concentrations (alpha + 1, alpha + 1, 1, 1) per column.
        coin: None, or (n,) contiguous float64 uniforms: λ is 1.0 where the coin is not below ``prob``.
        alpha: the Beta concentration (> 0). prob: the mixing probability.
        batch: B. pair: n = (B + 1) // 2 draws shared by rows i and B-1-i (the middle row of an odd batch
            unmixed), else n = B, one per row.

    Returns:
        (B,) float32 weights, ``sample_beta``'s values to within float64 rounding, then rounded to float32.
    """
    n = (batch + 1) // 2 if pair else batch
    rows = 1 if alpha == 1.0 else 2 if alpha > 1.0 else 4
    if (gamma.dtype != torch.float64 or gamma.shape != (rows, n) or not gamma.is_contiguous()
            or (coin is not None and (coin.dtype != torch.float64 or coin.shape != (n,)
                                      or not coin.is_contiguous()))):
        raise ValueError(f"beta_rows needs ({rows}, {n}) float64 draws and a ({n},) float64 coin or None")
    out = torch.empty(batch, dtype=torch.float32)
    block, address = _thread_block()
    _BETA_FORMAT.pack_into(block, 0, gamma.data_ptr(), rows, 0 if coin is None else coin.data_ptr(), n,
                           int(pair), out.data_ptr(), batch, alpha, prob)
    _c_entry("beta-rows", _compile_beta_rows, _TEAM_CALL).call(address)
    return out


_UNRESOLVED = object()
_OPENMP = _UNRESOLVED


def _torch_openmp():
    """(``GOMP_parallel``, ``omp_get_max_threads``) of the OpenMP runtime PyTorch itself runs on, or None.

    A launch handed to it runs on PyTorch's own thread team: the threads that spin for a while after
    each parallel PyTorch op pick the work up at once instead of fighting a second pool for the cores.
    Found among the libraries already loaded from torch's folder (GNU libgomp, or an LLVM/Intel runtime,
    which export the same entry), else in the process's global scope; None where PyTorch is not built
    on OpenMP or no loaded runtime reports PyTorch's thread count.
    """
    global _OPENMP
    if _OPENMP is not _UNRESOLVED:
        return _OPENMP
    found = None
    no_load = getattr(os, "RTLD_NOLOAD", None)
    if no_load is not None and "parallel backend: OpenMP" in torch.__config__.parallel_info():
        folder = os.path.join(os.path.dirname(torch.__file__), "lib")
        names = sorted(n for n in os.listdir(folder) if "omp" in n) if os.path.isdir(folder) else []
        for path in [os.path.join(folder, n) for n in names] + [None]:
            try:
                lib = ctypes.CDLL(path, mode=no_load | os.RTLD_LAZY) if path else ctypes.CDLL(None)
                parallel, max_threads = lib.GOMP_parallel, lib.omp_get_max_threads
            except (OSError, AttributeError):
                continue
            if max_threads() == torch.get_num_threads():
                parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
                parallel.restype = None
                found = parallel, max_threads
                break
    _OPENMP = found
    return found


def team_runtime() -> str:
    """Which threads run a parallel launch: ``"openmp"`` (PyTorch's own OpenMP team) or ``"python"``."""
    return "openmp" if USE_OPENMP_TEAM and _torch_openmp() is not None else "python"


def openmp_max_threads() -> int | None:
    """``omp_get_max_threads()`` of the OpenMP runtime launches use (None without one): it follows
    ``torch.set_num_threads`` when that runtime is PyTorch's."""
    found = _torch_openmp()
    return None if found is None else found[1]()


_POOL = None
_POOL_LOCK = threading.Lock()


def _run_on_python_threads(call, address: int, workers: int) -> None:
    """The team without OpenMP: ctypes releases the GIL, so pool threads run the entry side by side."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = concurrent.futures.ThreadPoolExecutor(max(1, (os.cpu_count() or 2) - 1), "mixrecipe-cpu")
    helpers = [_POOL.submit(call, address) for _ in range(workers - 1)]
    call(address)
    for helper in helpers:
        helper.result()


_BLOCK_FORMAT = struct.Struct(f"<{_FIRST_REAL}q{_FIRST_ARRAY - _FIRST_REAL}d{_BLOCK.SLOTS - _FIRST_ARRAY}q")
_REFUSED_FORMAT = _SLOT = struct.Struct("<q")  # one int64 slot
_TWO_REALS = struct.Struct("<2d")
# Byte offsets of the slots a launch re-points (LAM_Y_VALUE follows LAM_X_VALUE).
_X_AT, _OUT_AT, _SOFT_AT, _TARGET_AT = 8 * _BLOCK.X, 8 * _BLOCK.OUT, 8 * _BLOCK.SOFT, 8 * _BLOCK.TARGET
_LAM_X_AT, _LAM_Y_AT, _LAM_VALUES_AT = 8 * _BLOCK.LAM_X, 8 * _BLOCK.LAM_Y, 8 * _BLOCK.LAM_X_VALUE
_BOX_AT, _CHUNK_AT = 8 * _BLOCK.BOX, 8 * _BLOCK.CHUNK
assert _BLOCK.LAM_Y_VALUE == _BLOCK.LAM_X_VALUE + 1
_THREAD = threading.local()


def _thread_block():
    """This thread's argument block (a bytearray, never resized) and its address: a launch returns before
    its thread runs another."""
    try:
        return _THREAD.block
    except AttributeError:
        block = bytearray(_BLOCK_FORMAT.size)  # the loss's and beta_rows' blocks are smaller
        view = (ctypes.c_char * len(block)).from_buffer(block)  # pins the buffer: it cannot move
        _THREAD.block = block, ctypes.addressof(view)
        _THREAD.view = view
        return _THREAD.block


def _run(entry: _CEntry, address: int, workers: int) -> None:
    """Run a C entry on a packed block with ``workers`` threads (PyTorch's OpenMP team where found)."""
    if workers <= 1:
        entry.call(address)
        return
    openmp = (_OPENMP if _OPENMP is not _UNRESOLVED else _torch_openmp()) if USE_OPENMP_TEAM else None
    if openmp is not None:
        openmp[0](entry.address, address, workers, 0)
    else:
        _run_on_python_threads(entry.call, address, workers)


def _array(t) -> tuple:
    """A vector's or matrix's three block slots: address and sizes (None: an empty array)."""
    if t is None:
        return 0, 0, 0
    return (t.data_ptr(), t.shape[0], t.shape[1]) if t.ndim == 2 else (t.data_ptr(), t.shape[0], 0)


def _lam_slots(lam):
    """(tensor or None, value) for the block; a launch range-checks a (B,) weight before it writes."""
    if not isinstance(lam, torch.Tensor):
        return None, float(lam)
    return lam.contiguous(), 0.0


def _geometry(x: torch.Tensor, planar: bool, has_norm: bool, has_box: bool):
    """(plane, lines_per_plane, line, col_mult): how one sample's memory is cut into lines.

    A plane is a run of one channel (NCHW) or the whole sample (channels_last); a line is an image row
    when there is a CutMix box (so the box is one column interval per line), else a chunk of a plane.
    """
    n = math.prod(x.shape[1:])
    if planar:
        channels = x.shape[1] if x.ndim >= 2 and (has_norm or has_box) else 1
        plane = n // channels
        if has_box:
            return plane, x.shape[2], x.shape[3], 1
        line = max(1, min(plane, CHUNK_ELEMS))
        return plane, -(-plane // line), line, 1
    channels, height, width = x.shape[1], x.shape[2], x.shape[3]
    if has_box:
        return n, height, width * channels, channels
    line = max(channels, CHUNK_ELEMS // channels * channels)  # lines start on a pixel: col % C = channel
    return n, -(-n // line), line, channels


class MixPlan:
    """One launch's packed arguments, which later calls of the same signature re-point (:meth:`launch`).

    A plan holds its argument block packed once and the tensors it made for its slots (contiguous copies,
    the channels_last normalization tables); the caller holds the tensors it passed while a launch runs.
    """

    __slots__ = ("_packed", "_entry", "_n_units", "_moved", "_classes", "_made")

    def __init__(self, values: list, dtypes: tuple, n_units: int, moved: int, classes: int, made: tuple):
        # Packed once: a launch copies these bytes and packs only what changes (scattered Python objects,
        # one per slot, cost a cache miss each on a cold call).
        self._packed = _BLOCK_FORMAT.pack(*values)
        self._entry, self._n_units, self._moved = _entry(*dtypes), n_units, moved
        self._classes, self._made = classes, made

    def launch(self, x=None, out=None, index=None, soft=None, lam=None, lam_y=None, box=None) -> None:
        """Run the plan, re-pointed at ``x``, ``out``, the class indices ``index``, ``soft`` and the CutMix
        ``box`` (each None: as planned) with the weight ``lam`` for pixels and ``lam_y`` for labels (None:
        ``lam``; both None: as planned).

        The new tensors must have the planned tensors' dtypes, shapes and strides (a (4,) box stands for a
        planned (1, 4) one). ``lam`` is a float for a plan made with float weights, then ``lam_y`` may be
        another float; or a contiguous (B,) float32 tensor for a plan made with one such tensor for pixels
        and labels. The kernel checks the class indices and (B,) weights before it writes anything; a
        refusal raises ``check_index_range``'s or ``check_unit_range``'s error.
        """
        try:  # _thread_block() without its call on every launch
            block, address = _THREAD.block
        except AttributeError:
            block, address = _thread_block()
        block[:_BLOCK_FORMAT.size] = self._packed  # this thread's block: threads may launch one plan at once
        if x is not None:
            _SLOT.pack_into(block, _X_AT, x.data_ptr())
        if out is not None:
            _SLOT.pack_into(block, _OUT_AT, out.data_ptr())
        if soft is not None:
            _SLOT.pack_into(block, _SOFT_AT, soft.data_ptr())
        if index is not None:
            _SLOT.pack_into(block, _TARGET_AT, index.data_ptr())
        if isinstance(lam, torch.Tensor):
            address_of_lam = lam.data_ptr()
            _SLOT.pack_into(block, _LAM_X_AT, address_of_lam)
            _SLOT.pack_into(block, _LAM_Y_AT, address_of_lam)
        elif lam is not None:
            _TWO_REALS.pack_into(block, _LAM_VALUES_AT, lam, lam if lam_y is None else lam_y)
        if box is not None:
            _SLOT.pack_into(block, _BOX_AT, box.data_ptr())
        n_units, moved = self._n_units, self._moved
        workers = 1 if moved < PARALLEL_MIN_BYTES else min(torch.get_num_threads(), n_units)
        chunks = max(workers * PARALLEL_CHUNKS, moved // CHUNK_BYTES)
        _SLOT.pack_into(block, _CHUNK_AT, n_units if workers <= 1 else max(1, n_units // chunks))
        _run(self._entry, address, workers)
        if _REFUSED_FORMAT.unpack_from(block, 8 * _BLOCK.REFUSED)[0]:
            self._refused(index, lam)

    def _refused(self, index, lam) -> None:
        """Raise the checks module's error for what the launch refused (indices first, then weights)."""
        made_index, lam_x, lam_y = self._made[0], self._made[4], self._made[5]
        index = index if index is not None else made_index
        if index is not None:
            check_index_range(*_value_bounds(index), self._classes)
        if isinstance(lam, torch.Tensor):
            lam_x = lam_y = lam
        for name, weights in (("lam_x", lam_x), ("lam_y", lam_y)):
            if weights is not None:
                check_unit_range(name, *_value_bounds(weights))
        raise AssertionError("the kernel refused values that pass the checks")  # pragma: no cover


def plan_mix(x, out, target, soft, *, perm, lam_x, lam_y, box, mean, inv_std, in_scale, label_off,
             label_keep) -> MixPlan | None:
    """The launch of :func:`mix_cpu` on these tensors, not run (None for an empty batch)."""
    batch = (x if x is not None else target).shape[0]
    if batch == 0:
        return None
    sample = math.prod(x.shape[1:]) if x is not None else 0
    has_x = sample > 0
    inplace = has_x and out.data_ptr() == x.data_ptr()
    mean_tab = istd_tab = None
    if has_x:
        planar = x.is_contiguous()
        has_norm = mean is not None
        plane, lines_per_plane, line, col_mult = _geometry(x, planar, has_norm, box is not None)
        if not has_norm:
            mean, inv_std = _NO_MEAN, _NO_ISTD
        elif not planar:  # per column of a line: channel = col % C
            mean_tab, istd_tab = mean.repeat(line // col_mult), inv_std.repeat(line // col_mult)
        units_per_plane = 1 if box is not None else lines_per_plane  # see _lines_per_unit
        n_units = ((batch + 1) // 2 if perm is None else batch) * (sample // plane) * units_per_plane
        moved = x.numel() * (x.element_size() + out.element_size())
        x_slots, out_slots = (x.data_ptr(), batch, sample), (out.data_ptr(), batch, sample)
        dtypes = x.dtype, out.dtype
    else:
        plane = lines_per_plane = line = col_mult = 1
        n_units = moved = 0
        x_slots = out_slots = (0, 0, 0)
        dtypes = torch.float32, torch.float32
    index = dense = None
    classes = 0
    if target is not None:
        n_units += (batch + 1) // 2 if perm is None else batch
        moved += soft.numel() * 4
        classes = soft.shape[1]
        if target.ndim == 1:
            index = target.contiguous()
        else:
            dense = target.float().contiguous()
    lam_x, lam_x_value = _lam_slots(lam_x)
    lam_y, lam_y_value = (lam_x, lam_x_value) if lam_y is lam_x else _lam_slots(lam_y)
    if has_x and not inplace and out.numel() * out.element_size() >= PARALLEL_MIN_BYTES:
        cpu_memory.advise_huge_pages(out.data_ptr(), out.numel() * out.element_size())
    perm = None if perm is None else perm.contiguous()
    box = None if box is None else box.contiguous()
    values = [0, n_units, 0, inplace, plane, lines_per_plane, line, col_mult, lam_x_value, lam_y_value,
              in_scale, label_off, label_keep, *x_slots, *out_slots, *_array(perm), *_array(lam_x),
              *_array(box), *_array(mean), *_array(inv_std), *_array(mean_tab), *_array(istd_tab),
              *_array(index), *_array(dense), *_array(soft), *_array(lam_y), 0]
    return MixPlan(values, dtypes, n_units, moved, classes,
                   (index, dense, perm, box, lam_x, lam_y, mean, inv_std, mean_tab, istd_tab))


def mix_cpu(x, out, target, soft, *, perm, lam_x, lam_y, box, mean, inv_std, in_scale, label_off,
            label_keep) -> MixPlan | None:
    """Run the kernel on validated CPU tensors (the ``mix_launch`` contract of ``kernels/mixup.py``).

    Args:
        x: (B, ...) batch, contiguous or channels_last, or None. out: x's layout and shape (may be x).
        target: (B,) int64 or (B, K) float targets, or None; class indices are range-checked by the launch
            (``check_index_range``) before anything is written. soft: (B, K) float32 contiguous, or None.
        perm: (B,) int64 partners, or None for the flip pairing.
        lam_x, lam_y: floats or (B,) float32 tensors; tensors are range-checked by the launch
            (``check_unit_range``) before anything is written.
        box: (B, 4) int32 CutMix boxes, (1, 4) for one box for the whole batch, or None. mean, inv_std:
            (C,) float32 or None.
        in_scale: multiplies raw inputs before normalization. label_off, label_keep: timm smoothing.

    Returns:
        The :class:`MixPlan` it ran (None for an empty batch): a later call on tensors of the same dtypes,
        shapes and strides, with a float weight, may re-point and launch it instead of planning again.
    """
    plan = plan_mix(x, out, target, soft, perm=perm, lam_x=lam_x, lam_y=lam_y, box=box, mean=mean,
                    inv_std=inv_std, in_scale=in_scale, label_off=label_off, label_keep=label_keep)
    if plan is not None:
        plan.launch()
    return plan


_LOSS_FORMAT = struct.Struct(f"<{_LOSS_BLOCK.SMOOTHING}qd")
assert max(_LOSS_FORMAT.size, _BETA_FORMAT.size) <= _BLOCK_FORMAT.size  # all pack into a thread's block
_CHECK_FORMAT = struct.Struct("<q")
_CE_CHECK_CALL = ctypes.CFUNCTYPE(ctypes.c_int32, *[ctypes.c_int64] * 4)


def _address(t) -> int:
    return 0 if t is None else t.data_ptr()


def _run_loss(backward: bool, batch: int, classes: int, z, target, lam, perm, lse, grad, grad_step, out,
              smoothing: float) -> None:
    """Pack a loss launch and run it: chunks of rows on a team from ``LOSS_PARALLEL_MIN_ELEMS`` logits.
    A forward launch refuses class indices outside [0, K) and weights outside [0, 1] before it writes."""
    workers = 1 if batch * classes < LOSS_PARALLEL_MIN_ELEMS else min(torch.get_num_threads(), batch)
    chunk = batch if workers <= 1 else max(1, batch // (workers * PARALLEL_CHUNKS))
    check_inside = not backward and workers <= 1  # one call instead of two
    refused = False
    if not backward and not check_inside:
        check = _c_entry("ce-check", _compile_ce_check, _CE_CHECK_CALL).call
        refused = check(target.data_ptr(), lam.data_ptr(), batch, classes)
    if not refused:
        block, address = _thread_block()
        _LOSS_FORMAT.pack_into(block, 0, 0, chunk, batch, classes, z.data_ptr(), target.data_ptr(),
                               lam.data_ptr(), _address(perm), lse.data_ptr(), _address(grad), grad_step,
                               out.data_ptr(), int(check_inside), smoothing)
        _run(_c_entry(("ce", backward), lambda: _compile_ce_team(backward), _TEAM_CALL), address, workers)
        refused = check_inside and _CHECK_FORMAT.unpack_from(block, 8 * _LOSS_BLOCK.CHECK)[0]
    if refused:  # the checks module words the error
        check_index_range(*_value_bounds(target), classes)
        check_unit_range("lam", *_value_bounds(lam))
        raise AssertionError("the loss rows refused values that pass the checks")  # pragma: no cover


def ce_rows(logits, target, lam, perm, smoothing: float):
    """The mixup cross-entropy rows on CPU: (loss (B,), logsumexp (B,)) in float32.

    Args:
        logits: (B, K) float32 (made contiguous here). target: (B,) int64 class indices and lam: (B,)
            float32, any strides, both range-checked before anything is written (the messages of
            ``check_index_range`` and ``check_unit_range``). perm: (B,) int64 partners or None (flip).
        smoothing: timm's label smoothing.

    Like the mixing launcher, it reads the tensors by address (no ``.numpy()``: each is a few dispatches).
    """
    batch, classes = logits.shape
    logits, target, lam = logits.contiguous(), target.contiguous(), lam.contiguous()
    perm = None if perm is None else perm.contiguous()
    # Outputs come from torch's allocator, so torch's memory accounting sees them.
    loss, lse = torch.empty(batch), torch.empty(batch)
    _run_loss(False, batch, classes, logits, target, lam, perm, lse, None, 0, loss, smoothing)
    return loss, lse


def ce_rows_backward(grad, logits, lse, target, lam, perm, smoothing: float):
    """The gradient of :func:`ce_rows`' loss with respect to the logits: (B, K) float32, contiguous.

    softmax is recomputed as exp(z - lse) from the saved logsumexp, as the Triton kernels do: the absolute
    error is bounded by lse's float32 rounding, about |lse| * 2**-24 (5e-6 for logits near +-90). ``grad``
    may be the stride-0 expansion a mean's backward hands over (read as one value)."""
    batch, classes = logits.shape
    if grad.dtype != torch.float32:
        grad = grad.float()
    grad_step = 0 if grad.stride(0) == 0 else 1
    if grad_step and not grad.is_contiguous():
        grad = grad.contiguous()
    logits, lse, target, lam = logits.contiguous(), lse.contiguous(), target.contiguous(), lam.contiguous()
    perm = None if perm is None else perm.contiguous()
    dz = torch.empty(batch, classes)
    _run_loss(True, batch, classes, logits, target, lam, perm, lse, grad, grad_step, dz, smoothing)
    return dz


def cache_stats() -> tuple[int, int]:
    """(signatures loaded from the disk cache, signatures compiled) by this process so far."""
    hits = misses = 0
    for kernel in (_mix_units, _team_work, _bounds_at, _ce_check, _ce_work, _ce_rows, _ce_rows_backward,
                   _bounds):
        hits += sum(kernel.stats.cache_hits.values())
        misses += sum(kernel.stats.cache_misses.values())
    for entry in list(_C_ENTRIES.values()):  # a C entry is loaded (a hit) or compiled (a miss)
        hits += entry.compiled.cache_hits
        misses += 1 - entry.compiled.cache_hits
    return hits, misses


def warn_unavailable() -> None:
    warnings.warn("numba is not installed: mixrecipe's CPU mixup runs its slower eager path "
                  "(pip install numba for the one-pass CPU kernel)", RuntimeWarning, stacklevel=3)
