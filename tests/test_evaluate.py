"""python -m mixrecipe.evaluate: a finished run's evaluation.json and table, and exit status 2 (with one
line saying why) for a missing, empty, checkpoint-less or unfinished run directory and for bad keys."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixrecipe import evaluate, outputs, train

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("evaluate") / "run"
    summary = train.main([f"output={out}", "epochs=2", "data.train_subset=512", "progress=false",
                          "preview=false"])
    torch.set_num_threads(before)
    return out, summary


def _exit_message(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        evaluate.main(argv)
    err = capsys.readouterr().err.strip()
    return exc.value.code, err


def test_evaluation_of_a_finished_run(finished_run, capsys):
    out, summary = finished_run
    result = evaluate.main([str(out), "checkpoint=last", "eps=0,2/255,0.1", "ood=noise"])
    captured = capsys.readouterr()
    printed = captured.out
    assert "clean top-1" in printed and "FGSM ε=2/255" in printed and "OOD AUROC" in printed
    # Progress on stderr, one line as each measurement starts.
    stages = [line for line in captured.err.splitlines() if line.startswith("[")]
    assert len(stages) == 1 + 3 + 1 and "FGSM at ε=2/255" in stages[2] and "noise" in stages[-1]
    assert "noise" in printed  # says what the out-of-distribution images are
    saved = json.loads((out / "evaluation.json").read_text())
    assert saved == json.loads(json.dumps(result))
    # The final model on the same images as the run's own last evaluation (float vs fused normalization).
    assert result["checkpoint"] == "last.pt" and result["split"] == "test"
    assert result["top1"] == pytest.approx(summary["test_top1"], abs=1e-9)
    assert result["nll"] == pytest.approx(summary["test_nll"], rel=1e-4)
    assert result["ece"] == pytest.approx(summary["test_ece"], abs=1e-3)
    fg = [f["top1"] for f in result["fgsm"]]
    assert [f["eps"] for f in result["fgsm"]] == pytest.approx([0.0, 2 / 255, 0.1])
    assert fg[0] == pytest.approx(result["top1"]) and fg[2] < fg[0] - 10  # a 0.1 step hurts a lot
    assert 0.0 <= result["ood"]["auroc"] <= 1.0 and result["ood"]["images"] > 0


def test_progress_false_is_quiet(finished_run, capsys):
    out, _ = finished_run
    evaluate.main([str(out), "eps=0", "ood=none", "progress=false"])
    assert capsys.readouterr().err == ""


def test_best_checkpoint_is_the_default(finished_run, capsys):
    out, _ = finished_run
    result = evaluate.main([str(out), "eps=0", "ood=none"])
    capsys.readouterr()
    assert result["checkpoint"] == "best.pt" and "ood" not in result


def test_ood_falls_back_to_noise_and_says_so(monkeypatch, tmp_path):
    from mixrecipe import data

    monkeypatch.setitem(data.DEFAULT_ROOTS, "fashion_mnist", str(tmp_path))  # no Fashion-MNIST there
    images, what = evaluate.ood_images("digits", (1, 8, 8))
    assert images.shape[1:] == (1, 8, 8) and images.dtype == torch.uint8
    assert "noise" in what and "not installed" in what
    digits, what = evaluate.ood_images("fashion_mnist", (1, 28, 28))
    assert digits.shape == (1797, 1, 28, 28) and "digits" in what and digits.max() > 200


def test_missing_and_unfinished_run_directories_exit_two(tmp_path, capsys, finished_run):
    code, err = _exit_message(capsys, [str(tmp_path / "nope")])
    assert code == 2 and "not a directory" in err and "\n" not in err
    code, err = _exit_message(capsys, [str(tmp_path)])
    assert code == 2 and "no config.yaml" in err
    done, _ = finished_run
    (tmp_path / "config.yaml").write_bytes((done / "config.yaml").read_bytes())
    code, err = _exit_message(capsys, [str(tmp_path)])
    assert code == 2 and "no checkpoint" in err
    state = outputs.load_checkpoint(str(done / "last.pt"))
    state["epochs"] = state["epoch"] + 3  # as a run killed before its last epochs leaves it
    torch.save(state, tmp_path / "last.pt")
    code, err = _exit_message(capsys, [str(tmp_path)])
    assert code == 2 and "unfinished" in err and "resume=true" in err
    assert not (tmp_path / "evaluation.json").exists()


@pytest.mark.parametrize("argv, words", [
    (["eps=2"], "[0, 1]"), (["eps=a"], "eps"), (["ood=mnist"], "ood"), (["checkpoint=first"], "checkpoint"),
    (["n_bins=0"], "n_bins"), (["mixup.alpah=1"], "mixup.alpha"), (["other_dir"], "one run directory"),
    (["progress=maybe"], "progress"),
])
def test_bad_keys_exit_two(finished_run, capsys, argv, words):
    out, _ = finished_run
    code, err = _exit_message(capsys, [str(out), *argv])
    assert code == 2 and words in err


def test_command_line_exit_status():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "mixrecipe.evaluate", "/nonexistent/run"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: /nonexistent/run is not a directory")
