"""Smoke test of the accuracy benchmark: ``bench/accuracy.py --quick`` on a tiny Fashion-MNIST in the real
IDX format trains every kind of cell through ``python -m mixrecipe.train``, writes the report, the CSV and
the plots where it is told to, and a second invocation resumes: it finds every cell finished and trains
nothing.
"""

import csv
import os
import subprocess
import sys
from pathlib import Path

from test_data import write_fashion_mnist

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
for _key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
    ENV.pop(_key, None)


def _bench(*args, timeout=150):
    return subprocess.run([sys.executable, str(REPO / "bench" / "accuracy.py"), *map(str, args)], cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=timeout)


def test_quick_grid_end_to_end_and_resume(tmp_path):
    root = write_fashion_mnist(tmp_path / "fm", n_train=256, n_test=64)
    out, runs = tmp_path / "results", tmp_path / "runs"
    args = ["--quick", "--out", out, "--runs", runs, "--data-root", root]
    first = _bench(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "4 to run" in first.stdout and "ETA" in first.stdout
    for name in ("accuracy.md", "accuracy.csv", "accuracy_keras.png", "accuracy_noise.png"):
        assert (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader((out / "accuracy.csv").open(encoding="utf-8")))
    assert sorted((r["group"], r["method"]) for r in rows) == [
        ("keras", "ERM"), ("keras", "mixup α=0.2"), ("noise", "ERM"), ("noise", "mixup α=8")]
    for r in rows:
        assert 0.0 <= float(r["test_top1"]) <= 100.0
        assert r["command"].startswith("python -m mixrecipe.train recipes/")
        if r["group"] == "noise":  # the memorization metrics exist and are percentages
            assert 0.0 <= float(r["train_fit_noisy"]) <= 100.0
            assert float(r["last_test_err"]) >= float(r["best_test_err"])
    report = (out / "accuracy.md").read_text(encoding="utf-8")
    assert "Quick mode" in report and "86.92" in report and "| 50% | mixup α=8 |" in report
    assert "python bench/accuracy.py --quick" in report

    second = _bench(*args)  # every cell is finished: nothing is trained again
    assert second.returncode == 0, second.stdout + second.stderr
    assert "4 already finished, 0 to run" in second.stdout
    assert list(csv.DictReader((out / "accuracy.csv").open(encoding="utf-8"))) == rows


def test_quick_refuses_the_committed_results_folder():
    result = _bench("--quick", timeout=60)
    assert result.returncode == 2 and "--out" in result.stderr
