"""bench/gpu_check.py on a machine without a GPU: it refuses to run, and its parts work.

The command itself needs CUDA; here we check what can go wrong before anyone gets there: the exit status
and message without CUDA, the target table read from results files (met, missed, not measured), and that
its training runs are valid command lines of the real loop on data in the real CIFAR format.
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
    table = gpu_check.targets_table(list(got.values()))
    assert "MISSED" in table and "met" in table and "not measured" in table


def test_training_run_on_cifar_format_data(tmp_path):
    gpu_check.write_cifar_like(tmp_path / "data", 100, 20)
    (train_x, train_y), (test_x, _), classes = read_cifar10(str(tmp_path / "data"))
    assert train_x.shape == (100, 3, 32, 32) and test_x.shape[0] == 20 and len(classes) == 10
    rows = gpu_check.train_throughput(tmp_path, tmp_path, epochs=1, n_train=200, device="cpu",
                                      variants=("mixup+CutMix",), compile_modes=(False,),
                                      extra=["model=digits_cnn"])  # small: the command line is the point
    (row,) = rows
    assert row["exit"] == 0, (tmp_path / "train-0.log").read_text()[-2000:]
    assert row["images_per_s"] > 0 and row["vs_off"] is None  # no "mixup off" run to compare with
    config = (tmp_path / "run-0" / "config.yaml").read_text()
    assert "cutmix_alpha: 1.0" in config
    assert json.loads((tmp_path / "run-0" / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] == 1
