"""Shared helpers for the speed benchmarks: arguments, device names, timing, peak memory, tables, plots.

Timing:
- CUDA: ``triton.testing.do_bench`` (it flushes L2 before every call and reports quantiles of CUDA-event
  times); ``time_cuda_graph`` captures ``n_inner`` calls in one ``torch.cuda.CUDAGraph`` and times its
  replay, so small batches are measured without the launch overhead of eager mode.
- CPU: the providers of one case are timed *interleaved* (round r calls every provider once, in the same
  order) with ``time.perf_counter`` after warm-up calls, garbage collection off. A burst of load from a
  neighbour then slows every provider of that round alike, so the ratios between providers, which are
  the figures we quote, stay meaningful on a shared machine even when absolute times wander.

Every result row names its device (``device_name``); CPU rows also carry the 1-minute load average seen
before and after the case (``os.getloadavg``), so a reader can tell a quiet run from a noisy one.
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import platform
import random
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUANTILES = (0.5, 0.2, 0.8)


# --------------------------------------------------------------------------------------------------
# Arguments and device.
# --------------------------------------------------------------------------------------------------
def parser(description: str) -> argparse.ArgumentParser:
    """The arguments every benchmark takes: --device, --quick, --out, --threads."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default: cpu)")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes and few repeats: proves the script runs (CI), measures nothing")
    p.add_argument("--out", type=Path, default=RESULTS_DIR,
                   help=f"folder for the CSV/Markdown/PNG results (default: {RESULTS_DIR})")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU (default: 2)")
    p.add_argument("--tag", default="", help="appended to the device in the file names: <device>-<tag>-...")
    return p


def results_prefix(device: torch.device) -> str:
    """``cpu``, or the GPU's name as a slug (``nvidia-h100-80gb-hbm3``): results files name their device."""
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def stem(args, device: torch.device, name: str) -> Path:
    """``<out>/<device>[-<tag>]-<name>``: the results files' common path, without suffix."""
    tag = f"-{args.tag}" if args.tag else ""
    return args.out / f"{results_prefix(device)}{tag}-{name}"


def setup(args) -> torch.device:
    """Check the device, pin CPU threads, seed, and return the torch.device."""
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device is visible to torch")
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    np.random.seed(0)
    return torch.device(args.device)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model (from /proc/cpuinfo) with the thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    n = torch.get_num_threads()
    return f"{model} ({n} thread{'s' if n != 1 else ''})"


def load1() -> float:
    """The 1-minute load average (NaN where the platform has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device) -> str:
    """One line for the head of a results file: device, versions, commit, load."""
    import triton

    omp = ", ".join(f"{k}={os.environ[k]}" for k in OPENMP_SETTINGS if k in os.environ) or "libgomp defaults"
    return (f"device: {device_name(device)}; torch {torch.__version__}; triton {triton.__version__}; "
            f"python {platform.python_version()}; commit {git_commit()}; "
            f"load average at start: {load1()}; {time.strftime('%Y-%m-%d %H:%M %Z')}; OpenMP: {omp}")


# How long PyTorch's OpenMP threads spin after a parallel region: it decides how much a CPU pass started
# right after one is slowed, so every results file records them.
OPENMP_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")


def load_note(rows: list[dict]) -> str:
    """'1-minute load average during the run: a to b' from the rows' load_before/load_after (CPU runs)."""
    loads = [r[k] for r in rows for k in ("load_before", "load_after") if r.get(k) is not None]
    if not loads:
        return ""
    return (f"1-minute load average during the run: {min(loads):.1f} to {max(loads):.1f} "
            f"(on {os.cpu_count()} logical CPUs).")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------
# Timing.
# --------------------------------------------------------------------------------------------------
@dataclass
class Timing:
    """Milliseconds per call: median and the 20th/80th percentiles; n samples behind them."""

    median: float
    p20: float
    p80: float
    n: int


def summarize(samples_ms: Sequence[float]) -> Timing:
    a = np.asarray(samples_ms, dtype=np.float64)
    med, p20, p80 = (float(np.percentile(a, 100 * q)) for q in QUANTILES)
    return Timing(med, p20, p80, len(a))


def time_cpu_interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    warmup: int = 2,
    min_rounds: int = 10,
    max_rounds: int = 2000,
    target_s: float = 2.0,
    before_round: Callable[[], object] | None = None,
) -> dict[str, Timing]:
    """Time CPU callables round-robin: every round calls each once; at least ``min_rounds`` rounds and
    until ``target_s`` seconds of timed calls have passed (at most ``max_rounds``); ``before_round`` runs
    untimed before every round.

    The order is shuffled every round (seeded): a call that follows a parallel PyTorch op runs while
    PyTorch's OpenMP threads still spin, so a fixed order would charge that
    to whichever callables come first.
    """
    rng = random.Random(0)
    order = list(fns.items())
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        spent = 0.0
        rounds = 0
        while rounds < max_rounds and (rounds < min_rounds or spent < target_s):
            if before_round is not None:
                before_round()
            rng.shuffle(order)
            t_round = time.perf_counter()
            for name, fn in order:
                t0 = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - t0) * 1e3)
            spent += time.perf_counter() - t_round
            rounds += 1
    finally:
        if gc_was_enabled:
            gc.enable()
    return {k: summarize(v) for k, v in samples.items()}


def time_cuda(fn: Callable[[], object], *, warmup_ms: int = 25, rep_ms: int = 100) -> Timing:
    """``triton.testing.do_bench`` (L2 flushed before each call), median and p20/p80 in ms."""
    import triton.testing

    fn()  # first call outside the measurement (autotuning, torch.compile, lazy init)
    torch.cuda.synchronize()
    med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES))
    return Timing(med, p20, p80, 0)


def time_cuda_graph(fn: Callable[[], object], *, n_inner: int = 20, warmup_ms: int = 25,
                    rep_ms: int = 100) -> Timing:
    """Capture ``n_inner`` back-to-back calls into one CUDA graph, time its replay, divide by n_inner.

    The calls inside one replay run on a warm L2 (do_bench flushes it before each replay only): the
    training-loop situation of a batch that was just written by the loader.
    """
    import triton.testing

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graphs asks
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n_inner):
            fn()
    torch.cuda.synchronize()
    med, p20, p80 = triton.testing.do_bench(graph.replay, warmup=warmup_ms, rep=rep_ms,
                                            quantiles=list(QUANTILES))
    return Timing(med / n_inner, p20 / n_inner, p80 / n_inner, 0)


def time_providers(fns: dict[str, Callable[[], object]], device: torch.device, *, quick: bool = False,
                   target_s: float = 2.0,
                   before_round: Callable[[], object] | None = None) -> dict[str, Timing]:
    """Time each provider: interleaved on CPU (``before_round`` runs untimed before every round), ``do_bench``
    one after another on CUDA."""
    if device.type == "cuda":
        rep = 20 if quick else 100
        return {k: time_cuda(fn, warmup_ms=5 if quick else 25, rep_ms=rep) for k, fn in fns.items()}
    if quick:
        return time_cpu_interleaved(fns, warmup=1, min_rounds=3, max_rounds=3, target_s=0.0,
                                    before_round=before_round)
    return time_cpu_interleaved(fns, target_s=target_s, before_round=before_round)


def count_cuda_kernels(fn: Callable[[], object]) -> int | None:
    """GPU operations (kernels, memsets, copies) one call launches, from torch.profiler; None on failure."""
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)
    except Exception as exc:  # the count is informative only: never lose a benchmark over it
        print(f"  (kernel count unavailable: {exc})", file=sys.stderr)
        return None


def count_aten_ops(fn: Callable[[], object]) -> int | None:
    """Top-level ATen operators one call dispatches (views included; ops nested inside another ATen op
    are not counted), from torch.profiler: the CPU analogue of a kernel-launch count. None on failure."""
    try:
        from torch.profiler import ProfilerActivity, profile

        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        count = 0
        for e in prof.events():
            if not e.name.startswith("aten::"):
                continue
            parent = e.cpu_parent
            while parent is not None and not parent.name.startswith("aten::"):
                parent = parent.cpu_parent
            count += parent is None
        return count
    except Exception as exc:  # informative only
        print(f"  (op count unavailable: {exc})", file=sys.stderr)
        return None


# --------------------------------------------------------------------------------------------------
# Peak memory of one call, above what was allocated before it.
# --------------------------------------------------------------------------------------------------
def peak_memory_bytes(fn: Callable[[], object], device: torch.device,
                      before: Callable[[], object] | None = None) -> int:
    """Peak bytes allocated during one call of ``fn`` above the allocation before it.

    CUDA: the caching allocator's ``max_memory_allocated``. CPU: the allocation and free events that
    torch.profiler records (``profile_memory=True``), summed in time order.

    Args:
        before: called after the warm-up call and before the measured one, e.g. to drop what the warm-up
            left behind (a gradient) so that the measured call's own copy counts.
    """
    fn()  # warm: lazy initialization is not the call's footprint
    if before is not None:
        before()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()  # negative for a free
        peak = max(peak, current)
    return int(peak)


# --------------------------------------------------------------------------------------------------
# Output: CSV, Markdown tables, plots.
# --------------------------------------------------------------------------------------------------
def fmt(value, digits: int = 3) -> str:
    """A number for a table: blank for None/NaN, ``digits`` significant figures otherwise."""
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        if value != value:
            return ""
        if value == 0:
            return "0"
        if abs(value) >= 10 ** digits:
            return f"{value:.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    os.replace(tmp, path)  # whole or not at all: a run stopped mid-write keeps the previous file


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """rows -> a Markdown table; columns are (key, header) pairs; floats go through ``fmt``."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def write_text(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def command_line() -> str:
    """The command that produced a results file, for its header."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(Path(__file__).resolve().parent.parent)
    except ValueError:
        pass
    return " ".join(["python", str(script), *sys.argv[1:]])
