"""A run never lies and never loses data: values checked before the run directory is touched, a run already
there never replaced unasked, a loss that is not finite stopping the run at that step (exit status 3, the
event recorded, last.pt untouched), and metrics and plots that take NaN without crashing.

Everything runs the digits recipe on small subsets; the command lines that must print one clean line run
as real processes.
"""

import hashlib
import json
import os
import signal
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


def _tally(steps, every):
    from types import SimpleNamespace

    from mixrecipe.distributed import DistContext
    from mixrecipe.engine import EpochTally

    state = SimpleNamespace(dist=DistContext(0, 1, 0, torch.device("cpu"), False), steps_per_epoch=steps,
                            stop_signal=0)
    tally = EpochTally(state, epoch=4)
    tally.every = every  # what a CUDA run does: read the device flags back only every `every` steps
    return tally, state


def test_a_deferred_check_still_names_the_first_non_finite_step():
    from mixrecipe.engine import NonFiniteLoss, StopRequested

    tally, state = _tally(steps=40, every=16)
    losses = [2.0 - 0.01 * i for i in range(21)] + [float("inf"), 1.0, float("nan")] + [1.0] * 16
    with pytest.raises(NonFiniteLoss) as info:
        for i, loss in enumerate(losses):
            tally.after_step(torch.tensor(loss), 8, lr=0.1 * i)
    stop = info.value
    assert tally.step == 32 and stop.steps_done == 32  # found at the check point after step 32...
    assert (stop.epoch, stop.step, stop.loss) == (4, 21, float("inf"))  # ...named where it happened
    assert stop.lr == pytest.approx(2.1) and stop.last_finite == pytest.approx(1.8)
    # A signal stops at the next check point, but never at the epoch's last step (the epoch then finishes).
    tally, state = _tally(steps=20, every=16)
    state.stop_signal = signal.SIGTERM
    with pytest.raises(StopRequested) as info:
        for _ in range(20):
            tally.after_step(torch.tensor(1.0), 8, lr=0.1)
    assert info.value.steps_done == 16 and info.value.signum == signal.SIGTERM
    tally, state = _tally(steps=16, every=16)
    state.stop_signal = signal.SIGTERM
    for _ in range(16):
        tally.after_step(torch.tensor(1.5), 4, lr=0.1)
    assert tally.result()["train_loss"] == 1.5


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


# ----------------------------------------------------------------------------------------------------
# 3. SIGTERM / SIGINT: the step finishes, the position inside the epoch is saved, resume=true is exact

# The CLI in a process whose training loss, at step N (on rank SIGNAL_RANK), either waits for a signal
# from outside ("wait": prints READY and reads a line the parent writes once it has sent the signal) or
# sends one to itself. The loss functions of both engines are wrapped here, in the test: nothing of this
# ships in the package.
SIGNAL_AT_STEP = """
import os, signal, sys
import mixrecipe.fastai as fastai_callbacks
import mixrecipe.torch_engine as torch_engine
step, how = int(sys.argv[1]), sys.argv[2]
calls = []
def at_step(loss):
    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) == step and os.environ.get("RANK", "0") == os.environ.get("SIGNAL_RANK", "0"):
            if how == "wait":
                print("READY", flush=True)
                sys.stdin.readline()  # the parent writes it after its signal: the signal came first
            else:
                os.kill(os.getpid(), getattr(signal, how))
        return loss(*args, **kwargs)
    return counted
torch_engine.mixup_cross_entropy = at_step(torch_engine.mixup_cross_entropy)
fastai_callbacks.mixup_cross_entropy = at_step(fastai_callbacks.mixup_cross_entropy)
from mixrecipe.cli import main
main(sys.argv[3:])
"""
TIMING = ("images_per_s", "seconds")
# Augmentation (the data set's generator), per-element mixup and CutMix (the policy's generator): every
# random stream of a step is in play.
RANDOM = ["epochs=2", "data.augment=crop_flip", "mixup.mode=elem", "mixup.cutmix_alpha=1.0", *SMALL]


def _strip(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def _same_run(ref: Path, cut: Path):
    assert _strip(_lines(cut / "metrics.jsonl")) == _strip(_lines(ref / "metrics.jsonl"))
    a, b = (json.loads((p / "summary.json").read_text()) for p in (ref, cut))
    assert {k: a[k] for k in ("test_top1", "test_loss", "train_loss")} == \
        {k: b[k] for k in ("test_top1", "test_loss", "train_loss")}
    ref_model, cut_model = (load_checkpoint(str(p / "last.pt"))["model"] for p in (ref, cut))
    assert all(torch.equal(ref_model[k], cut_model[k]) for k in ref_model)


def test_sigterm_mid_epoch_saves_the_position_and_resume_matches_an_uninterrupted_run(tmp_path, capsys):
    train.main([f"output={tmp_path / 'ref'}", *RANDOM])
    cut = tmp_path / "cut"
    child = subprocess.Popen([sys.executable, "-c", SIGNAL_AT_STEP, "11", "wait", f"output={cut}", *RANDOM],
                             cwd=REPO, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        for line in child.stdout:  # the parent sends the signal while step 11 (epoch 2, step 3) runs
            if line.strip() == "READY":
                child.send_signal(signal.SIGTERM)
                child.stdin.write("sent\n")
                child.stdin.flush()
                break
        _, err = child.communicate(timeout=240)
    finally:
        child.kill()
    assert child.returncode == 143, err
    assert "Traceback" not in err and "error" not in err
    assert "stopped by SIGTERM at epoch 2/2, step 3/8" in err and "resume=true" in err
    state = load_checkpoint(str(cut / "last.pt"))
    assert (state["epoch"], state["step"], len(state["partial"])) == (1, 3, 1)
    assert state["partial"][0]["seen"] == 3 * 32 and not list(cut.glob("*.tmp"))
    assert [r["epoch"] for r in _lines(cut / "metrics.jsonl")] == [1]
    with pytest.raises(SystemExit) as info:  # not replaced unasked
        train.main([f"output={cut}", *RANDOM])
    assert info.value.code == 2 and "step 3/8 of epoch 2" in capsys.readouterr().err
    train.main([f"output={cut}", "resume=true", *RANDOM])
    assert "at step 3/8 of epoch 2" in capsys.readouterr().err
    _same_run(tmp_path / "ref", cut)


def test_sigint_mid_epoch_with_the_fastai_engine_resumes_exactly(tmp_path, capsys):
    args = ["engine=fastai", *RANDOM]
    train.main([f"output={tmp_path / 'ref'}", *args])
    cut = tmp_path / "cut"
    proc = subprocess.run([sys.executable, "-c", SIGNAL_AT_STEP, "5", "SIGINT", f"output={cut}", *args],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr
    assert "stopped by SIGINT at epoch 1/2, step 5/8" in proc.stderr  # no epoch finished yet
    assert load_checkpoint(str(cut / "last.pt"))["step"] == 5
    train.main([f"output={cut}", "resume=true", *args])
    _same_run(tmp_path / "ref", cut)


@pytest.mark.parametrize("decoder", ["torchvision", "device"])
def test_sigterm_mid_epoch_with_image_files_resumes_exactly(tmp_path, capsys, decoder):
    """Image folders: the workers' crops are drawn from (epoch seed, item) alone, and the device decoder's
    stream (data.decoder=device) is saved with the run: either way a resumed epoch gets the same crops."""
    from test_data import write_imagefolder

    root = write_imagefolder(str(tmp_path / "inet"), n_train=6, n_val=2, size=(30, 40))
    args = ["imagenet", f"data.root={root}", f"data.decoder={decoder}", "epochs=2", "model=digits_cnn",
            "data.img_size=16", "batch_size=4", "data.workers=1", *QUICK, "preview=false"]
    train.main([f"output={tmp_path / 'ref'}", *args])
    cut = tmp_path / "cut"
    proc = subprocess.run([sys.executable, "-c", SIGNAL_AT_STEP, "6", "SIGTERM", f"output={cut}", *args],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 143 and "Traceback" not in proc.stderr, proc.stderr
    assert "stopped by SIGTERM at epoch 2/2" in proc.stderr
    train.main([f"output={cut}", "resume=true", *args])
    _same_run(tmp_path / "ref", cut)


def test_a_signal_on_one_torchrun_rank_stops_both_at_the_same_step_and_resumes_exactly(tmp_path):
    def torchrun(out, *script, resume=()):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               *(script or ["-m", "mixrecipe.train"]), f"output={out}", *SMALL, "epochs=2", *resume]
        env = {**ENV, "SIGNAL_RANK": "1"}
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)

    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert torchrun(ref).returncode == 0
    script = tmp_path / "signal_at_step.py"
    script.write_text(SIGNAL_AT_STEP)
    proc = torchrun(cut, str(script), "2", "SIGTERM")  # only rank 1 gets it, at its step 2 (4 per epoch)
    assert proc.returncode != 0
    assert proc.stderr.count("stopped by SIGTERM at epoch 1/2, step 2/4") == 1, proc.stderr  # rank 0 says it
    assert "mixrecipe/" not in proc.stderr  # no rank's traceback (torchrun's agent prints its own)
    state = load_checkpoint(str(cut / "last.pt"))
    assert state["step"] == 2 and [p["step"] for p in state["partial"]] == [2, 2]  # both ranks stopped there
    assert torchrun(cut, resume=["resume=true"]).returncode == 0
    _same_run(ref, cut)


# ----------------------------------------------------------------------------------------------------
# 4. A data loader worker that dies

# The CLI in a process whose image folder reader SIGKILLs the loader worker process reading the N-th image
# read in any worker (counted in a file shared by the workers).
KILL_WORKER = """
import os, signal, sys
import torch.utils.data
import mixrecipe.data as data
counter, n = sys.argv[1], int(sys.argv[2])
read = data.ImageFiles.__getitem__
def dies_at_read_n(self, i):
    if torch.utils.data.get_worker_info() is not None:
        with open(counter, "a") as fh:
            fh.write(".")
        if os.path.getsize(counter) >= n:
            os.kill(os.getpid(), signal.SIGKILL)
    return read(self, i)
data.ImageFiles.__getitem__ = dies_at_read_n
from mixrecipe.cli import main
main(sys.argv[3:])
"""


def test_a_killed_loader_worker_ends_the_run_with_one_line_and_the_checkpoint_intact(tmp_path):
    from test_data import write_imagefolder

    root = write_imagefolder(str(tmp_path / "inet"), n_train=4, n_val=2)  # 12 + 6 images, 3 steps/epoch
    out = tmp_path / "run"
    args = ["imagenet", f"data.root={root}", f"output={out}", "model=digits_cnn", "data.img_size=16",
            "batch_size=4", "data.workers=1", "epochs=2", *QUICK]
    # Epoch 1 reads 12 + 6 images in workers; the 20th read is in epoch 2's training.
    proc = subprocess.run([sys.executable, "-c", KILL_WORKER, str(tmp_path / "reads"), "20", *args],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)
    err = proc.stderr
    assert proc.returncode == lifecycle.EXIT_LOADER_DIED == 4, err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("error: "), err
    for w in ("training data loader", "exited unexpectedly", "memory", "data.workers", "is intact",
              "resume=true"):
        assert w in err, w
    state = load_checkpoint(str(out / "last.pt"))
    assert state["epoch"] == 1 and state.get("step", 0) == 0 and not list(out.glob("*.tmp"))
    assert [r["epoch"] for r in _lines(out / "metrics.jsonl")] == [1]
