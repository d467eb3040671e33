"""Smoke tests for the speed benchmarks: each script runs in --quick mode on tiny shapes and writes results.

They prove the scripts run end to end (including their own checks of every provider against
mixrecipe.reference) and that the results files hold the columns bench/common.py writes; they measure nothing.
CPU runs use one thread (--threads 1): on a loaded 2-core CI machine, two OpenMP threads can stall a
parallel region for a whole scheduler slice per op, which only makes the smoke test slow. On a machine
with a GPU the CUDA paths (do_bench, CUDA graphs, kernel counts) run too.
"""

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import common  # noqa: E402  (bench/common.py)

ROOT = Path(__file__).resolve().parent.parent
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _run(script: str, out: Path, device: str, *extra: str) -> list[dict]:
    cmd = [sys.executable, str(ROOT / "bench" / script), "--quick", "--device", device, "--threads", "1",
           "--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    name = {"bench_mixup.py": "mixup", "bench_loss.py": "loss", "bench_step.py": "step",
            "bench_input.py": "input"}[script]
    prefix = common.results_prefix(torch.device(device))
    with open(out / f"{prefix}-{name}.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows, "no rows written"
    assert (out / f"{prefix}-{name}.md").read_text().count("\n|") > len(rows)  # the table made it
    for r in rows:
        assert r["device"], "every row names its device"
    return rows


def _positive(value: str) -> bool:
    return math.isfinite(float(value)) and float(value) > 0


@pytest.mark.parametrize("device", DEVICES)
def test_bench_mixup_quick(tmp_path, device):
    extra = ["--no-compile"] if device == "cuda" else []  # compiling each tiny case would dominate
    rows = _run("bench_mixup.py", tmp_path, device, *extra)
    prefix = common.results_prefix(torch.device(device))
    assert (tmp_path / f"{prefix}-mixup.png").stat().st_size > 10_000
    assert not (tmp_path / f"{prefix}-mixup.partial.csv").exists()  # a finished run leaves no partial rows
    cases = {r["case"] for r in rows}
    assert len(cases) == 3 and any("u8->bf16" in c for c in cases)
    for case in cases:
        provs = {r["provider"] for r in rows if r["case"] == case and r["mode"] == "eager"}
        assert {"copy", "ours-op-flip", "ours-op-perm", "eager-lerp", "timm-batch", "timm-elem"} <= provs
    for r in rows:
        for col in ("median_ms", "p20_ms", "p80_ms", "gbps", "x_copy"):
            assert _positive(r[col]), (r["case"], r["provider"], col, r[col])
        assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
        if r["provider"] == "copy":
            assert float(r["x_copy"]) == 1.0
        if r["provider"].startswith("ours") and r["mode"] == "eager":
            assert _positive(r["vs_timm-batch"]) and _positive(r["vs_eager-lerp"])
        elif r["provider"].startswith("ours"):  # CUDA-graph rows: only peers that could be captured
            assert all(r[c] == "" or _positive(r[c]) for c in ("vs_timm-batch", "vs_eager-lerp"))
        else:
            assert r["vs_timm-batch"] == ""
    if device == "cuda":  # the CIFAR-size batches are also timed captured in CUDA graphs
        assert any(r["mode"] == "graph" and r["provider"] == "ours-op-flip" for r in rows)
    # The bytes model: a float case moves 2 * B*N*e (+ labels); the loader case 3 bytes per element.
    r = next(r for r in rows if r["provider"] == "copy" and "u8->bf16" in r["case"])
    assert int(r["min_bytes"]) == 8 * 3 * 16 * 16 * 3
    r = next(r for r in rows if r["provider"] == "ours-op-flip" and "fp32" in r["case"])
    assert int(r["min_bytes"]) == 8 * 3 * 16 * 16 * 8 + 8 * 8 + 8 * 10 * 4


def test_bench_mixup_refuses_cases_that_match_nothing_and_writes_nothing(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "bench_mixup.py"), "--quick", "--cases", "no-such-case",
           "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "matches no case" in proc.stderr and "tiny-8" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device", DEVICES)
def test_bench_loss_quick(tmp_path, device):
    rows = _run("bench_loss.py", tmp_path, device)
    provs = {r["provider"] for r in rows}
    assert provs == {"ours-mixup-ce", "ours-dense", "timm-dense", "eager-two-ce", "ce-no-mixup"}
    for r in rows:
        assert _positive(r["median_ms"]) and float(r["peak_mib"]) > 0
    # The gradient alone is B*K elements of the logits' dtype: every provider's peak holds at least that.
    for r in rows:
        element = {"fp32": 4, "bf16": 2, "fp16": 2}[r["dtype"]]
        assert float(r["peak_mib"]) * 2**20 >= int(r["B"]) * int(r["K"]) * element, r


@pytest.mark.parametrize("device", DEVICES)
def test_bench_step_quick(tmp_path, device):
    rows = _run("bench_step.py", tmp_path, device)
    by = {r["variant"]: r for r in rows}
    assert "off" in by and "timm-Mixup" in by and any(v.startswith("ours") for v in by)
    assert by["off"]["mix_share_pct"] == ""
    for name, r in by.items():
        assert _positive(r["step_median_ms"])
        if name != "off":
            assert 0 < float(r["mix_share_pct"]) < 100


@pytest.mark.parametrize("device", DEVICES)
def test_bench_input_quick(tmp_path, device):
    """Both image-folder decoders and, in memory, the workers path and the device path (data.on_device)
    against the model-only step."""
    rows = _run("bench_input.py", tmp_path, device)
    providers = {(r["part"].split(" (")[0], r["provider"]) for r in rows}
    assert {("image folder", "pil"), ("image folder", "torchvision"), ("in memory", "workers path"),
            ("in memory", "device path")} <= providers, providers
    assert all(_positive(r["images_per_s"]) for r in rows)


def test_interleaved_timing_shuffles_the_order_every_round():
    """Every round calls each callable once, before_round first, in an order that changes between rounds
    (a fixed order would charge PyTorch's spinning OpenMP threads to whoever comes first)."""
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abcde"}
    timings = common.time_cpu_interleaved(fns, warmup=0, min_rounds=20, max_rounds=20, target_s=0.0,
                                          before_round=lambda: calls.append("|"))
    rounds = "".join(calls).split("|")[1:]
    assert len(rounds) == 20 and all(sorted(r) == list("abcde") for r in rounds)
    assert len(set(rounds)) > 5  # orders differ
    assert {r[0] for r in rounds} == set("abcde")  # everyone goes first sometimes
    assert set(timings) == set(fns) and all(t.n == 20 and t.median >= 0 for t in timings.values())
