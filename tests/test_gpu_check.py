"""bench/gpu_check.py on a machine without a GPU: it refuses to run, and its parts work.

The command itself needs CUDA; here we check what can go wrong before anyone gets there: the exit status
and message without CUDA, the target table read from results files (met, missed, not measured), the time
budget and its phases, that its training runs are valid command lines of the real loop on learnable data in
the real CIFAR format, and that a run whose loss is not finite is reported as a failure, never a throughput.
"""

import csv
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402

from mixrecipe.data import read_cifar10  # noqa: E402


def test_without_cuda_exits_2_and_says_why():
    if torch.cuda.is_available():
        print("CUDA is visible: the no-GPU refusal cannot be observed here")
        return
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and proc.stdout == ""


def _write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_targets_read_from_results(tmp_path):
    _write(tmp_path / "gpu-mixup.csv", [
        {"case": "imagenet-256 fp32 NCHW", "provider": "ours-op-flip", "mode": "eager", "x_copy": "1.05",
         "vs_timm-batch": "", "vs_compile-lerp": ""},
        {"case": "imagenet-256 fp32 NCHW", "provider": "ours-op-flip", "mode": "graph", "x_copy": "9.0",
         "vs_timm-batch": "", "vs_compile-lerp": ""},
        {"case": "imagenet-256 bf16 NCHW", "provider": "ours-op-flip", "mode": "eager", "x_copy": "1.4",
         "vs_timm-batch": "", "vs_compile-lerp": ""},
        {"case": "imagenet-256 fp32 NCHW", "provider": "ours-Mixup-batch", "mode": "eager", "x_copy": "1.1",
         "vs_timm-batch": "3.5", "vs_compile-lerp": ""},
    ])
    _write(tmp_path / "gpu-loss.csv", [
        {"B": "256", "K": "1000", "dtype": "fp32", "provider": "ours-mixup-ce", "vs_timm-dense": "1.5",
         "peak_mib": "1.0"},
        {"B": "256", "K": "1000", "dtype": "fp32", "provider": "timm-dense", "vs_timm-dense": "",
         "peak_mib": "5.0"},
    ])
    got = {e["target"]: e for e in gpu_check.evaluate_targets(tmp_path, "gpu")}
    assert len(got) == len(gpu_check.TARGETS)
    fp32 = got["in-place flip pass vs dst.copy_ (ImageNet 256, fp32)"]
    assert fp32["measured"] == 1.05 and fp32["ok"] is True  # the eager row, not the graph row
    assert got["in-place flip pass vs dst.copy_ (ImageNet 256, bf16)"]["ok"] is False
    assert got["Mixup policy vs timm's Mixup (ImageNet 256, fp32)"]["ok"] is True
    assert got["mixup_cross_entropy fwd+bwd vs timm's dense path (256, 1000, fp32)"]["ok"] is False
    mem = got["mixup_cross_entropy peak memory: timm dense / ours (256, 1000, fp32)"]
    assert mem["measured"] == 5.0 and mem["ok"] is True
    step = got["Mixup share of a ResNet-50 bf16 training step (batch 256)"]
    assert step["measured"] is None and step["ok"] is None  # no step results: not measured, not failed
    loop = got["cifar10 loop, device-resident data + mixup, vs the model-only step"]
    assert loop["measured"] is None
    _write(tmp_path / "gpu-input.csv", [
        {"part": "in memory (cifar10 recipe)", "case": "whole loop (preact_resnet18, mixup on)",
         "provider": "workers path", "vs_model_only": "0.6"},
        {"part": "in memory (cifar10 recipe)", "case": "whole loop (preact_resnet18, mixup on)",
         "provider": "device path", "vs_model_only": "0.93"},
    ])
    loop = {e["target"]: e for e in gpu_check.evaluate_targets(tmp_path, "gpu")}[loop["target"]]
    assert loop["measured"] == 0.93 and loop["ok"] is True  # the device path's row
    table = gpu_check.targets_table(list(got.values()))
    assert "MISSED" in table and "met" in table and "not measured" in table
    # A benchmark stopped early leaves its rows in a .partial.csv beside the earlier finished file: the
    # targets of this check read the partial rows.
    _write(tmp_path / "gpu-mixup.partial.csv", [
        {"case": "imagenet-256 fp32 NCHW", "provider": "ours-op-flip", "mode": "eager", "x_copy": "1.3",
         "vs_timm-batch": "", "vs_compile-lerp": ""},
    ])
    got = {e["target"]: e for e in gpu_check.evaluate_targets(tmp_path, "gpu")}
    fp32 = got["in-place flip pass vs dst.copy_ (ImageNet 256, fp32)"]
    assert fp32["measured"] == 1.3 and fp32["ok"] is False
    assert got["Mixup policy vs timm's Mixup (ImageNet 256, fp32)"]["measured"] is None


def test_training_run_on_cifar_format_data(tmp_path):
    gpu_check.write_cifar_like(tmp_path / "data", 100, 20)
    (train_x, train_y), (test_x, _), classes = read_cifar10(str(tmp_path / "data"))
    assert train_x.shape == (100, 3, 32, 32) and test_x.shape[0] == 20 and len(classes) == 10
    # Learnable: an image's mean colour names its class (what lets a throughput run's loss fall).
    means = train_x.float().mean((2, 3))
    for c in train_y.unique():
        spread = means[train_y == c].std(0) if (train_y == c).sum() > 1 else torch.zeros(3)
        assert float(spread.max()) < 5.0
    rows = gpu_check.train_throughput(tmp_path, tmp_path, epochs=2, n_train=400, device="cpu",
                                      variants=("mixup+CutMix",), extra=["model=digits_cnn"])
    (row,) = rows
    assert row["exit"] == 0, (tmp_path / "train-0.log").read_text()[-2000:]
    assert row["verdict"] == "ok", row
    assert row["images_per_s"] > 0 and row["vs_off"] is None  # no "mixup off" run to compare with
    config = (tmp_path / "run-0" / "config.yaml").read_text()
    assert "cutmix_alpha: 1.0" in config and "lr: 0.01" in config
    assert json.loads((tmp_path / "run-0" / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] == 2


def test_a_diverging_run_is_a_failure_not_a_throughput(tmp_path):
    rows = gpu_check.train_throughput(tmp_path, tmp_path, epochs=1, n_train=200, device="cpu",
                                      variants=("mixup off",),
                                      extra=["model=digits_cnn", "optim.lr=1e6", "batch_size=16"])
    (row,) = rows
    assert row["verdict"].startswith("failed") and row["images_per_s"] is None, row
    gpu_check.plot_train(rows, tmp_path / "train.png", "a failed run")  # draws, marked "failed"
    assert (tmp_path / "train.png").stat().st_size > 5000


def _metrics(path: Path, losses) -> Path:
    path.write_text("".join(json.dumps({"epoch": i + 1, "train_loss": v, "images_per_s": 100.0 * (i + 1)})
                            + "\n" for i, v in enumerate(losses)))
    return path


def test_judge_run_counts_only_finite_falling_losses(tmp_path):
    m = tmp_path / "metrics.jsonl"
    assert gpu_check.judge_run(0, _metrics(m, [2.3, 1.9])) == ("ok", 200.0, [2.3, 1.9])
    assert gpu_check.judge_run(0, _metrics(m, [2.3, float("nan")]))[:2] == ("failed: loss not finite", None)
    assert gpu_check.judge_run(0, _metrics(m, [2.3, float("inf")]))[0] == "failed: loss not finite"
    assert gpu_check.judge_run(0, _metrics(m, [2.3, 2.4]))[:2] == ("failed: loss did not fall", None)
    assert gpu_check.judge_run(3, _metrics(m, [2.3, 1.0]))[0] == "failed: exit 3"
    assert gpu_check.judge_run(124, _metrics(m, [2.3]))[0] == "failed: ran out of time"
    assert gpu_check.judge_run(0, tmp_path / "missing.jsonl")[0] == "failed: exit 0"


def test_budget_gives_each_phase_its_share_and_passes_unused_time_on():
    now = [100.0]
    clock = gpu_check.Clock(540, now=lambda: now[0])
    shares = dict(gpu_check.PHASES)
    assert abs(sum(shares.values()) - 1) < 1e-9
    assert clock.left("tests") == 540 * shares["tests"]
    now[0] += 30  # the tests finished early: the benchmarks get their share and what the tests left
    assert clock.left("benchmarks") == 540 * (shares["tests"] + shares["benchmarks"]) - 30
    now[0] += 1000  # far past the end: nothing left for anyone
    assert clock.left("throughput") == 0.0


def test_a_step_past_its_time_is_stopped_and_says_so(tmp_path):
    code, text = gpu_check._run([sys.executable, "-c", "import time; print('started', flush=True); "
                                 "time.sleep(30)"], tmp_path / "slow.log", timeout=2)
    assert code == 124 and "timed out after 2 s" in (tmp_path / "slow.log").read_text()
    code, _ = gpu_check._run([sys.executable, "-c", "pass"], tmp_path / "none.log", timeout=0.5)
    assert code == 124 and "not started" in (tmp_path / "none.log").read_text()
    assert gpu_check.test_summary(124, "") == "ran out of time"
    assert gpu_check.test_summary(1, "== 3 failed, 40 passed in 9.1s ==") == "3 failed, 40 passed in 9.1s"


def test_the_test_phase_selects_existing_files_and_kernel_tests():
    cmd = gpu_check.test_command(workers=4)
    assert cmd[-2:] == ["-n", "4"] and gpu_check.TEST_SELECTION in cmd
    for path in gpu_check.TEST_FILES:
        assert (ROOT / path).exists(), path
    proc = subprocess.run([*gpu_check.test_command(workers=0), "--collect-only"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:]
    collected = [line for line in proc.stdout.splitlines() if "::" in line]
    assert any("[triton" in t or "-triton" in t for t in collected)  # the fixture's Triton cases
    assert any("test_kernel_" in t for t in collected)  # the direct launches
