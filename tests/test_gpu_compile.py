"""Every kernel launch the public API can make compiles for real GPUs (sm_80, sm_90), on a CPU-only machine.

The Triton interpreter runs kernels as Python: it once accepted a CutMix helper whose two constexpr branches
returned a block and a scalar, which ``triton.compile`` rejects, so every CutMix call crashed on a GPU while
this suite was green. Here the public API (``mix``, ``mixup``, ``cutmix``, ``mixup_target``, ``Mixup``,
``mixup_cross_entropy`` forward and backward) is driven over dtypes, pairings, λ kinds, boxes,
normalization, targets and layouts with ``record_launches(as_gpu=True)``: the launchers pick the block sizes,
warps and switches of a GPU and nothing runs. Each distinct specialization is then compiled for both targets
in a subprocess without TRITON_INTERPRET (``python -m mixrecipe.kernels.aot``). A failure names the
specialization and the compiler's message.

The static speed facts of the main paths (128-bit global accesses, no local memory) are checked here too;
``bench/ptx_report.py`` writes them out in full.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from launches import IMAGE_PATHS, compile_failures, compile_in_subprocess, main_paths, record_public_api  # noqa: E402


def test_every_public_launch_compiles_for_sm80_and_sm90(tmp_path):
    descs = record_public_api()
    kernels = {d["kernel"].split(":")[1] for d in descs}
    assert kernels == {"_mix_fwd_kernel", "_mixup_ce_fwd_kernel", "_mixup_ce_bwd_kernel"}, kernels
    switches = {k for d in descs for k, v in d["kwargs"].items() if v == {"const": True}}
    # The recording really spans the option space: every switch of the fused kernel was on somewhere.
    for name in ("PAIRED", "HAS_NORM", "TARGET_DENSE", "HAS_PERM", "HAS_SMOOTHING"):
        assert name in switches, name
    # ... and every kind of weight (a number, one device value, one per row) and of box (none, four
    # numbers, one per row).
    kinds = {(k, v["int"]) for d in descs for k, v in d["kwargs"].items() if k.endswith("_KIND")}
    for name in ("LAMX_KIND", "LAMY_KIND", "BOX_KIND"):
        assert {(name, 0), (name, 1), (name, 2)} <= kinds, (name, kinds)
    # Planned for a GPU: no hand rounding of bf16 (the GPU rounds), GPU block sizes.
    assert not any(d["kwargs"].get("ROUND_BF16") == {"const": True} for d in descs)
    blocks = {d["kwargs"]["BLOCK_SIZE"]["int"] for d in descs if "BLOCK_SIZE" in d["kwargs"]}
    assert blocks >= {128, 2048, 4096}, blocks

    proc, results = compile_in_subprocess(descs, tmp_path)
    assert not compile_failures(proc, results), compile_failures(proc, results)
    assert {r["arch"] for r in results} == {80, 90}
    print(f"\n{len(results)} specializations from {len(descs)} launches compiled for sm_80 and sm_90")


def test_compile_failure_names_specialization_and_cause(tmp_path):
    """The checker itself: a launch that cannot compile is reported, not hidden (a constexpr value the
    kernel's code cannot take: a BLOCK_SIZE that is not a power of 2)."""
    (desc,) = main_paths()["fp32 in-place flip"]
    desc["kwargs"]["BLOCK_SIZE"] = {"int": 96}
    proc, results = compile_in_subprocess([desc], tmp_path, "--arch", "90")
    assert proc.returncode == 1
    (result,) = results
    assert not result["ok"] and "BLOCK_SIZE=96" in result["label"] and "power of 2" in result["error"]
    assert "FAIL sm_90 _mix_fwd_kernel" in proc.stdout


# ------------------------------------------------------------------------------------------------
# Static speed facts of the main image paths on sm_90 (16-byte aligned tensors, as the JIT sees them).
# ------------------------------------------------------------------------------------------------
def _sm90_ptx_stats(descs: list[dict], tmp_path) -> list:
    """ptx_stats of each description compiled for sm_90 (or its compile error), in a child process."""
    script = (
        "import json, sys\n"
        "from mixrecipe.kernels.aot import compile_all, ptx_stats\n"
        "res = compile_all(json.load(open(sys.argv[1])), archs=(90,), workers=1, want_asm=True)\n"
        "print(json.dumps([ptx_stats(r['ptx']) if r['ok'] else r['error'] for r in res]))\n"
    )
    launches = tmp_path / "main.json"
    launches.write_text(json.dumps(descs))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script, str(launches)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for s in out:
        if isinstance(s, dict):  # JSON made the widths strings
            s["loads"], s["stores"] = ({int(k): v for k, v in s[key].items()} for key in ("loads", "stores"))
    return out


def test_main_paths_use_128_bit_accesses_and_no_local_memory(tmp_path):
    paths = main_paths()
    loss_fwd, loss_bwd = paths["mixup_cross_entropy bf16 (256, 1000)"]
    names = [*IMAGE_PATHS, "loss forward", "loss backward"]
    stats = dict(zip(names, _sm90_ptx_stats([paths[n][0] for n in IMAGE_PATHS] + [loss_fwd, loss_bwd],
                                            tmp_path)))
    for name, s in stats.items():
        assert isinstance(s, dict), f"{name} does not compile: {s}"
        assert not s["local_memory"], f"{name}: uses local memory (spills)"
    for name in IMAGE_PATHS:
        # A program reads its row and its partner row and writes both: at least two 128-bit accesses each.
        loads, stores = stats[name]["loads"], stats[name]["stores"]
        assert loads.get(128, 0) >= 2, f"{name}: global loads by width {loads}"
        assert stores.get(128, 0) >= 2, f"{name}: global stores by width {stores}"
    # Normalization reads its 3 channel values as uniform scalars, not one gather per element per table.
    assert stats["uint8 -> bf16 normalized"]["loads"].get(32, 0) <= 8, stats["uint8 -> bf16 normalized"]
    # K = 1000 is not a multiple of 16, yet the logits are read (and the gradient written) 128 bits at a time.
    assert stats["loss forward"]["loads"].get(128, 0) >= 1, stats["loss forward"]
    assert stats["loss backward"]["loads"].get(128, 0) >= 1, stats["loss backward"]
    assert stats["loss backward"]["stores"].get(128, 0) >= 1, stats["loss backward"]


def test_ptx_stats_reads_vector_width():
    from mixrecipe.kernels.aot import ptx_stats

    ptx = ("ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];\n"
           "@%p1 st.global.v2.b16 [%rd2], {%rs1, %rs2};\n"
           "ld.global.b64 %rd3, [%rd4];\n")
    assert ptx_stats(ptx) == {"loads": {128: 1, 64: 1}, "stores": {32: 1}, "local_memory": False}
    assert ptx_stats(ptx + "st.local.b32 [%rd5], %r1;\n")["local_memory"]
