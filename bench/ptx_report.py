"""Static speed evidence from the compiled kernels, without a GPU: writes bench/results/ptx-sm90.md.

For the launches a training loop makes (bench/launches.py ``main_paths``), compiled for sm_90 with the
16-byte alignment the JIT sees for freshly allocated tensors: the width of every global load and store in
the PTX (128-bit ``ld/st.global.v4`` is what reaches memory bandwidth), local memory use, registers per
thread and spills from ``ptxas -v``, and the bytes each path moves per image element. Then the
public-API sweep (bench/launches.py ``record_public_api``) is compiled for sm_80 and sm_90 and counted.

    python bench/ptx_report.py            # main paths + the sweep used by the tests (~1-2 min on 2 cores)
    python bench/ptx_report.py --full     # + the full product of dtypes, shapes and layouts (~10 min)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "uint8": 1, "float64": 8}


def _record(full: bool) -> tuple[dict, list[dict]]:
    """Recording routes CPU tensors through the launchers, which needs the interpreter's flag."""
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, str(ROOT / "bench"))
    from launches import main_paths, record_public_api

    return main_paths(), record_public_api(full=full)


def _bytes_per_element(desc: dict) -> str:
    """Global memory traffic per element of the batch, by the minimum-bytes model of each kernel."""
    kernel = desc["kernel"].split(":")[1]
    args = desc["args"]
    if kernel == "_mix_fwd_kernel":
        e_in, e_out = _ITEMSIZE[args[0]["tensor"]], _ITEMSIZE[args[1]["tensor"]]
        paired = desc["kwargs"]["PAIRED"]["const"]
        reads = e_in if paired else 2 * e_in  # flip: a program reads each row once; perm: row + partner
        return f"{reads} read + {e_out} written"
    e = _ITEMSIZE[args[0]["tensor"]]
    return f"{e} read" if kernel == "_mixup_ce_fwd_kernel" else f"{e} read + {e} written"


def _compile_report(main: dict, sweep: list[dict], workers: int | None) -> dict:
    """Compile in a child process without TRITON_INTERPRET (the compiler needs the real JIT functions)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "in.json", Path(tmp) / "out.json"
        src.write_text(json.dumps({"main": main, "sweep": sweep}))
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, __file__, "--compile-from", str(src), "--compile-to", str(out)]
        if workers:
            cmd += ["--workers", str(workers)]
        subprocess.run(cmd, env=env, check=True)
        return json.loads(out.read_text())


def _compile_child(src: str, dst: str, workers: int | None) -> None:
    from mixrecipe.kernels.aot import compile_all, ptx_stats, ptxas_usage

    data = json.loads(Path(src).read_text())
    rows = []
    for name, descs in data["main"].items():
        for r in compile_all(descs, archs=(90,), workers=1, want_asm=True):
            row = {"path": name, "kernel": r["label"], "ok": r["ok"]}
            if r["ok"]:
                row.update(ptx_stats(r["ptx"]), **ptxas_usage(r["ptx"], 90))
                row["bytes_per_element"] = _bytes_per_element(r["desc"])
            else:
                row["error"] = r["error"]
            rows.append(row)
    start = time.perf_counter()
    sweep = compile_all(data["sweep"], workers=workers)
    summary = {"launches": len(data["sweep"]), "compiled": sum(r["ok"] for r in sweep),
               "specializations": len(sweep), "seconds": time.perf_counter() - start,
               "failures": [f"sm_{r['arch']} {r['label']}: {r['error']}" for r in sweep if not r["ok"]]}
    Path(dst).write_text(json.dumps({"rows": rows, "sweep": summary}))


def _widths(d: dict) -> str:
    return " ".join(f"{count}x{width}" for width, count in sorted(((int(w), c) for w, c in d.items()),
                                                                  reverse=True)) or "-"


def _markdown(result: dict, full: bool) -> str:
    import torch
    import triton

    sys.path.insert(0, str(ROOT / "bench"))
    from common import git_commit

    lines = [
        "# Compiled kernels for sm_90 (H100/H200): static speed evidence",
        "",
        "Compiled ahead of time on a machine without a GPU "
        f"(`python bench/ptx_report.py{' --full' if full else ''}`), triton {triton.__version__}, "
        f"torch {torch.__version__}, commit {git_commit()}. Tensors 16-byte "
        "aligned, as the JIT sees fresh allocations; ImageNet-sized batch (4, 3, 224, 224), 1000 classes.",
        "Global loads/stores are counted per thread in the PTX by width in bits (`4x128` = four 128-bit "
        "`ld/st.global.v4`); registers, spills and stack from `ptxas -v`. Bytes per element: the kernel's "
        "minimum traffic per image element (per logit for the loss); an in-place flip moves what "
        "`dst.copy_(x)` moves.",
        "",
        "| path | kernel specialization | global loads | global stores | local mem | regs/thread | spills "
        "(st/ld bytes) | bytes per element |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if not r["ok"]:
            lines.append(f"| {r['path']} | {r['kernel']} | compile error: {r['error'][:200]} |||||")
            continue
        lines.append(
            f"| {r['path']} | `{r['kernel']}` | {_widths(r['loads'])} | {_widths(r['stores'])} | "
            f"{'yes' if r['local_memory'] else 'no'} | {r['registers']} | "
            f"{r['spill_stores']}/{r['spill_loads']} | {r['bytes_per_element']} |")
    s = result["sweep"]
    lines += [
        "",
        f"## Every launch the public API makes{' (full product)' if full else ''}",
        "",
        f"{s['launches']} launches recorded from `mix`, `mixup`, `cutmix`, `mixup_target`, `Mixup` and "
        "`mixup_cross_entropy` forward+backward over dtypes, pairings, λ kinds, boxes, normalization, "
        f"targets and layouts; {s['compiled']} of {s['specializations']} distinct specializations compiled "
        f"for sm_80 and sm_90 in {s['seconds']:.0f} s.",
    ]
    lines += [f"- FAILED {f}" for f in s["failures"]]
    lines += ["", "Runtime figures (GB/s, ratios to a copy) need a GPU: `python bench/gpu_check.py`.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="compile the full product of the sweep")
    parser.add_argument("--workers", type=int, default=None, help="compile processes (default: CPU count)")
    parser.add_argument("--out", type=Path, default=RESULTS / "ptx-sm90.md")
    parser.add_argument("--compile-from", help=argparse.SUPPRESS)
    parser.add_argument("--compile-to", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.compile_from:
        _compile_child(args.compile_from, args.compile_to, args.workers)
        return 0
    main_descs, sweep = _record(args.full)
    result = _compile_report(main_descs, sweep, args.workers)
    text = _markdown(result, args.full)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 1 if result["sweep"]["failures"] or not all(r["ok"] for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
