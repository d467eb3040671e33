"""Smoke test of the accuracy benchmark: ``bench/accuracy.py --quick`` on a tiny Fashion-MNIST in the real
IDX format trains every kind of cell through ``python -m mixrecipe.train``, writes the report, the CSV and
the plots where it is told to, and a second invocation resumes: it finds every cell finished and trains
nothing. Running one experiment alone (``--only``) rewrites only its own section and rows.
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
    assert "6 to run" in first.stdout and "ETA" in first.stdout
    for name in ("accuracy.md", "accuracy.csv", "accuracy_keras.png", "accuracy_noise.png",
                 "accuracy_calib.csv", "accuracy_calib.png"):
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
    # Calibration and robustness: every calib cell was trained, then measured by mixrecipe.evaluate.
    calib = list(csv.DictReader((out / "accuracy_calib.csv").open(encoding="utf-8")))
    assert sorted(r["method"] for r in calib) == ["ERM", "mixup α=1"]
    for r in calib:
        assert 0.0 <= float(r["ece"]) <= 100.0 and float(r["nll"]) > 0 and 0 <= float(r["ood_auroc"]) <= 1
        assert float(r["fgsm_top1_eps0"]) == float(r["test_top1"])
        assert float(r["fgsm_top1_eps8"]) <= float(r["test_top1"])
        assert r["evaluate"].startswith("python -m mixrecipe.evaluate RUN_DIR eps=0,1/255")
    assert "## 3. Beyond top-1" in report and "| wide MLP | mixup α=1 | 1 |" in report

    second = _bench(*args)  # every cell is finished: nothing is trained again
    assert second.returncode == 0, second.stdout + second.stderr
    assert "6 already finished, 0 to run" in second.stdout
    assert list(csv.DictReader((out / "accuracy.csv").open(encoding="utf-8"))) == rows


def test_quick_refuses_the_committed_results_folder():
    result = _bench("--quick", timeout=60)
    assert result.returncode == 2 and "--out" in result.stderr


def test_only_one_experiment_keeps_the_other_sections_and_rows(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import accuracy
    finally:
        sys.path.pop(0)
    old = "# title\n\nmade by X\n\n## 1. keras\n\nk table\n\n## 2. noise\n\nn table\n"
    new = "# title\n\nmade by Y\n\n## 3. calib\n\nc table\n"
    merged = accuracy.merge_report(old, new, {"calib"})
    assert merged == "# title\n\nmade by X\n\n## 1. keras\n\nk table\n\n## 2. noise\n\nn table\n" \
                     "## 3. calib\n\nc table\n"
    again = accuracy.merge_report(merged, "# t\n\nmade by Z\n\n## 2. noise\n\nn2\n", {"noise"})
    assert "made by Z" in again and "k table" in again and "n2" in again and "n table" not in again
    assert "c table" in again
