"""Compile recorded kernel launches for NVIDIA GPUs ahead of time, on a machine that has no GPU.

The Triton interpreter runs kernels as Python and accepts code that ``triton.compile`` rejects, so a
green CPU test suite says nothing about the GPU. This module closes that gap in two steps:

1. ``describe`` turns launches recorded by ``record_launches(as_gpu=True)`` (the launchers' GPU block sizes,
   warps and switches) into plain JSON-able descriptions: dtypes and alignment of tensors, scalar values,
   constexprs, warps. Recording works under the interpreter.
2. ``compile_all`` (or ``python -m mixrecipe.kernels.aot LAUNCHES.json``) runs in a process WITHOUT
   ``TRITON_INTERPRET``: it specializes each description with Triton's own binder (the same ``i32``/``i64``,
   ``== 1`` and 16-byte-divisibility rules the JIT applies on a GPU), drops duplicates, and compiles each
   specialization to PTX and a cubin for every target (``ptxas`` ships inside Triton).

``ptx_stats`` and ``ptxas_usage`` read the static facts that matter for speed off the result: the width of
global loads and stores, local memory, registers and spills.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from ._common import interpreting

__all__ = ["describe", "specialize", "compile_all", "ptx_stats", "ptxas_usage", "ARCHS"]

ARCHS = (80, 90)  # A100, H100/H200


# ------------------------------------------------------------------------------------------------
# 1. Describe recorded launches (any process, interpreter or not).
# ------------------------------------------------------------------------------------------------
def _describe_value(v):
    if isinstance(v, torch.Tensor):
        return {"tensor": str(v.dtype).removeprefix("torch."), "aligned": v.data_ptr() % 16 == 0}
    if isinstance(v, bool) or v is None:
        return {"const": v}
    if isinstance(v, int):
        return {"int": v}
    if isinstance(v, float):
        return {"float": v}
    raise TypeError(f"cannot describe a kernel argument of type {type(v).__name__}")


def describe(recorded) -> list[dict]:
    """JSON-able descriptions of launches from ``record_launches``: what a GPU would specialize on."""
    out = []
    for kernel, _grid, args, kwargs in recorded:
        fn = kernel.fn
        out.append({
            "kernel": f"{fn.__module__}:{fn.__name__}",
            "args": [_describe_value(a) for a in args],
            "kwargs": {k: (v if k == "num_warps" else _describe_value(v)) for k, v in kwargs.items()},
        })
    return out


# ------------------------------------------------------------------------------------------------
# 2. Specialize and compile (a process without TRITON_INTERPRET).
# ------------------------------------------------------------------------------------------------
def _rebuild_value(d):
    """A stand-in argument with the same specialization: a CPU tensor of that dtype and alignment."""
    if "tensor" in d:
        t = torch.empty(64, dtype=getattr(torch, d["tensor"]))
        return t if d["aligned"] else t[1:]  # one element in: off a 16-byte boundary for 1/2/4/8-byte dtypes
    return next(iter(d.values()))


def _kernel(name: str):
    module, attr = name.split(":")
    fn = getattr(importlib.import_module(module), attr)
    if not hasattr(fn, "params"):
        raise RuntimeError(f"{name} is not a JIT function: unset TRITON_INTERPRET to compile for a GPU")
    return fn


def specialize(desc: dict, arch: int):
    """(kernel, signature, constexprs, attrs, options) as Triton's JIT would build them on sm_<arch>."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = _kernel(desc["kernel"])
    backend = make_backend(GPUTarget("cuda", arch, 32))
    args = [_rebuild_value(a) for a in desc["args"]]
    kwargs = {k: (v if k == "num_warps" else _rebuild_value(v)) for k, v in desc["kwargs"].items()}
    kwargs["debug"] = False
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization,
                                                          options)
    return fn, signature, constexprs, attrs, options


def _key(desc: dict, arch: int) -> str:
    fn, signature, constexprs, attrs, options = specialize(desc, arch)
    return json.dumps([desc["kernel"], arch, signature, {str(k): str(v) for k, v in constexprs.items()},
                       {str(k): str(v) for k, v in attrs.items()}, options.num_warps], sort_keys=True)


def _label(desc: dict) -> str:
    """A short readable name for a specialization: kernel, switches that are on, other constexprs, dtypes."""
    consts = []
    for k, v in desc["kwargs"].items():
        value = v if k == "num_warps" else _rebuild_value(v)
        if value is True:
            consts.append(k)
        elif value is not False:
            consts.append(f"{k}={value}")
    dtypes = ",".join(a["tensor"] + ("" if a["aligned"] else "@unaligned")
                      for a in desc["args"] if "tensor" in a)
    return f"{desc['kernel'].split(':')[1]}[{' '.join(consts)}]({dtypes})"


def _compile_one(job) -> dict:
    desc, arch, want_asm = job
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    result = {"label": _label(desc), "arch": arch, "desc": desc}
    start = time.perf_counter()
    try:
        fn, signature, constexprs, attrs, options = specialize(desc, arch)
        compiled = compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                           options=options.__dict__)
        if want_asm:
            result["ptx"] = compiled.asm["ptx"]
        result["ok"] = True
    except Exception as e:  # report every failure, keep compiling the rest
        result["ok"] = False
        # Triton nests errors (kernel -> helper -> helper): the innermost cause says what is wrong.
        causes = [e]
        while causes[-1].__cause__ is not None:
            causes.append(causes[-1].__cause__)
        where = [str(c).strip().splitlines()[0] for c in causes if type(c).__name__ == "CompilationError"]
        root = causes[-1]
        result["error"] = f"{type(root).__name__}: {str(root).strip()[:500]}" + (
            f"  [{' -> '.join(where)}]" if where else "")
    result["seconds"] = time.perf_counter() - start
    return result


def unique_jobs(descs: list[dict], archs=ARCHS) -> list[tuple[dict, int]]:
    """One (description, arch) per distinct specialization."""
    seen, jobs = set(), []
    for arch in archs:
        for desc in descs:
            key = _key(desc, arch)
            if key not in seen:
                seen.add(key)
                jobs.append((desc, arch))
    return jobs


def compile_all(descs: list[dict], archs=ARCHS, workers: int | None = None,
                want_asm: bool = False) -> list[dict]:
    """Compile every distinct specialization of ``descs`` for every arch; one result dict per compile."""
    if interpreting():
        raise RuntimeError("compile_all needs a process without TRITON_INTERPRET (the interpreter replaces "
                           "@triton.jit functions by Python ones)")
    jobs = [(d, a, want_asm) for d, a in unique_jobs(descs, archs)]
    workers = workers or max(1, min(len(jobs), os.cpu_count() or 1))
    if workers == 1:
        return [_compile_one(j) for j in jobs]
    import multiprocessing as mp

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        return list(pool.map(_compile_one, jobs))


# ------------------------------------------------------------------------------------------------
# Static facts from the compiled code.
# ------------------------------------------------------------------------------------------------
_GLOBAL_MEM = re.compile(r"\b(ld|st)\.global(?:\.[a-z0-9_]+)*?(?:\.v(\d))?\.(b|u|s|f)(\d+)\b")


def ptx_stats(ptx: str) -> dict:
    """Global load/store instructions by width in bits (``ld.global.v4.b32`` is 128), and local memory use."""
    widths: dict[str, dict[int, int]] = {"ld": {}, "st": {}}
    for line in ptx.splitlines():
        m = _GLOBAL_MEM.search(line)
        if m:
            op, vec, _kind, bits = m.groups()
            width = int(bits) * int(vec or 1)
            widths[op][width] = widths[op].get(width, 0) + 1
    local = bool(re.search(r"\.local\b|\b(ld|st)\.local\b", ptx))
    return {"loads": widths["ld"], "stores": widths["st"], "local_memory": local}


def ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers per thread, spill bytes and stack frame from ``ptxas -v`` (the ptxas inside Triton)."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", src, "-o", os.path.join(tmp, "k.o")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {text[-800:]}")

    def grab(pattern):
        m = re.search(pattern, text)
        return int(m.group(1)) if m else None

    return {"registers": grab(r"Used (\d+) registers"), "spill_stores": grab(r"(\d+) bytes spill stores"),
            "spill_loads": grab(r"(\d+) bytes spill loads"), "stack_frame": grab(r"(\d+) bytes stack frame")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mixrecipe.kernels.aot",
                                     description="Compile recorded launches for NVIDIA GPUs (no GPU needed).")
    parser.add_argument("launches", help="JSON list written by describe()")
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--out", help="write the results (JSON) here")
    args = parser.parse_args(argv)
    with open(args.launches) as f:
        descs = json.load(f)
    results = compile_all(descs, args.arch, args.workers)
    failed = [r for r in results if not r["ok"]]
    for r in failed:
        print(f"FAIL sm_{r['arch']} {r['label']}\n    {r['error']}")
    print(f"{len(results) - len(failed)}/{len(results)} specializations compiled for "
          f"{', '.join(f'sm_{a}' for a in args.arch)} from {len(descs)} launches")
    if args.out:
        with open(args.out, "w") as f:
            json.dump([{k: v for k, v in r.items() if k != "ptx"} for r in results], f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
