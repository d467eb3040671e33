"""A run never lies and never loses data: values checked before the run directory is touched, a run already
there never replaced unasked, a loss that is not finite stopping the run at that step (exit status 3, the
event recorded, last.pt untouched), and metrics and plots that take NaN without crashing.

Everything runs the digits recipe on small subsets; the command lines that must print one clean line run
as real processes.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixrecipe import lifecycle, train
from mixrecipe.config import Config, ConfigError
from mixrecipe.outputs import load_checkpoint

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
for _key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
    ENV.pop(_key, None)
QUICK = ["preview=false", "progress=false"]
SMALL = ["data.train_subset=256", "batch_size=32", *QUICK]  # 8 steps per epoch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread (2 shared cores in CI), as test_train.py runs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cli(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "mixrecipe.train", *map(str, args)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def _hashes(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------
# 1. No command deletes or replaces a run


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    train.main([f"output={out}", "epochs=2", "preview=true", *SMALL])
    return out


@pytest.mark.parametrize("argv, words", [
    (["mixup.alpha=-1"], ["mixup.alpha", ">= 0", "-1"]),
    (["batch_size=0"], ["batch_size", ">= 1", "0"]),
    (["optim.lr=-0.1"], ["optim.lr", ">= 0"]),
    (["optim.momentum=1.5"], ["optim.momentum", "< 1"]),
    (["data.workers=-1"], ["data.workers", ">= 0"]),
    (["epochs=0"], ["epochs", ">= 1"]),
    (["optim.lr=nan"], ["optim.lr", "finite"]),
    (["mixup.prob=1.5"], ["mixup.prob", "<= 1"]),
    (["data.scale=[0.9,0.1]"], ["data.scale", "min <= max"]),
    (["epochs=1"], ["holds a finished run (2/2 epochs)", "resume=true", "overwrite=true", "output=DIR"]),
    (["epochs=5", "engine=fastai"], ["holds a finished run", "overwrite=true"]),
])
def test_a_refused_command_leaves_the_run_in_its_folder_byte_for_byte(finished_run, capsys, argv, words):
    before = _hashes(finished_run)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        train.main([f"output={finished_run}", *SMALL, *argv])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, (w, err)
    assert _hashes(finished_run) == before


def test_an_unfinished_run_is_refused_and_overwrite_replaces_a_run_only_when_asked(tmp_path, capsys):
    out = tmp_path / "run"
    train.main([f"output={out}", "epochs=1", *SMALL])
    state = load_checkpoint(str(out / "last.pt"))
    state["epochs"] = 3  # as if stopped after epoch 1 of 3
    torch.save(state, out / "last.pt")
    before = _hashes(out)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        train.main([f"output={out}", "epochs=3", *SMALL])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "unfinished run (1/3 epochs)" in err and "resume=true" in err
    assert _hashes(out) == before
    again = train.main([f"output={out}", "epochs=2", "overwrite=true", *SMALL])
    assert again["epoch"] == 2 and [r["epoch"] for r in _lines(out / "metrics.jsonl")] == [1, 2]


def test_a_config_built_in_code_is_checked_like_the_command_line(tmp_path):
    cfg = Config()
    cfg.output, cfg.batch_size = str(tmp_path / "run"), 0
    with pytest.raises(ConfigError, match="batch_size: must be >= 1"):
        lifecycle.run(cfg)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------
# 2. A loss that is not finite stops the run at that step


def test_a_diverging_run_stops_at_its_first_non_finite_step_with_exit_status_3(tmp_path):
    out = tmp_path / "div"
    proc = _cli("digits", "epochs=3", "optim.lr=1e6", f"output={out}", *QUICK)
    assert proc.returncode == lifecycle.EXIT_DIVERGED == 3, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    err = proc.stderr
    assert err.startswith("error: the training loss is nan at epoch 1/3, step ") and "/22 (lr " in err
    for w in ("last finite loss", "optim.lr", "warm-up", "amp=false", "no checkpoint was saved"):
        assert w in err, w
    (event,) = _lines(out / "metrics.jsonl")
    assert event["event"] == "non_finite_loss" and event["epoch"] == 1 and event["loss"] == "nan"
    assert f"step {event['step']}/22" in err and event["lr"] > 1e5 and event["last_finite_loss"] > 0
    assert json.loads((out / "summary.json").read_text())["stopped"] == event
    assert not (out / "last.pt").exists()


def _nan_at_call(module, name, n, monkeypatch):
    """Make the n-th call of ``module.name`` (a loss function) return NaN."""
    calls, loss = [], getattr(module, name)

    def poisoned(*args, **kwargs):
        calls.append(1)
        value = loss(*args, **kwargs)
        return value * float("nan") if len(calls) == n else value

    monkeypatch.setattr(module, name, poisoned)


@pytest.mark.parametrize("engine", ["torch", "fastai"])
def test_a_nan_loss_leaves_the_last_good_checkpoint_untouched(tmp_path, capsys, monkeypatch, engine):
    import mixrecipe.fastai as fastai_callbacks
    import mixrecipe.torch_engine as torch_engine

    module = torch_engine if engine == "torch" else fastai_callbacks
    _nan_at_call(module, "mixup_cross_entropy", 8 + 3, monkeypatch)  # epoch 2, step 3
    saved, record = [], lifecycle.record

    def record_and_hash(state, eng, metrics):
        record(state, eng, metrics)
        saved.append(hashlib.sha256((Path(state.out) / "last.pt").read_bytes()).hexdigest())

    monkeypatch.setattr(lifecycle, "record", record_and_hash)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        train.main([f"output={out}", "epochs=3", f"engine={engine}", *SMALL])
    err = capsys.readouterr().err
    assert info.value.code == 3 and "epoch 2/3, step 3/8" in err and "is untouched" in err, err
    assert len(saved) == 1 and hashlib.sha256((out / "last.pt").read_bytes()).hexdigest() == saved[0]
    state = load_checkpoint(str(out / "last.pt"))
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())
    records = _lines(out / "metrics.jsonl")
    assert [r.get("epoch") for r in records] == [1, 2] and records[1]["event"] == "non_finite_loss"
    assert records[1]["step"] == 3 and records[1]["last_finite_loss"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] == records[1] and summary["epoch"] == 1 and summary["engine"] == engine


def test_metrics_and_plots_take_nan_and_inf(tmp_path):
    from mixrecipe.distributed import DistContext
    from mixrecipe.metrics import calibration_bins, ece_from_bins, expected_calibration_error
    from mixrecipe.plots import plot_curves, plot_reliability
    from mixrecipe.scoring import evaluate

    nan = float("nan")
    probs = torch.tensor([[nan, nan], [float("inf"), 0.0], [0.3, 0.7]])
    target = torch.tensor([0, 0, 1])
    bins = calibration_bins(probs, target, n_bins=5)
    assert bins[0].sum() == 3  # every row counted, none dropped
    assert torch.isnan(torch.tensor(expected_calibration_error(probs, target)))  # not a fine-looking number
    d = DistContext(0, 1, 0, torch.device("cpu"), False)
    metrics, val_bins = evaluate([(torch.full((4, 10), nan), torch.arange(4))], d)
    assert torch.isnan(torch.tensor(metrics["val_loss"])) and 0 <= metrics["val_top1"] <= 100
    plot_reliability(val_bins, str(tmp_path / "reliability.png"))
    assert ece_from_bins(val_bins) != ece_from_bins(val_bins)  # NaN
    history = [{"epoch": 1, "train_loss": nan, "val_loss": float("inf"), "val_top1": 10.0, "val_top5": nan}]
    plot_curves(history, str(tmp_path / "curves.png"))
    assert (tmp_path / "curves.png").stat().st_size > 0 and (tmp_path / "reliability.png").stat().st_size > 0
