"""The recipe runner end to end on CPU: every shipped recipe on small data in its real format, outputs,
kill and resume, torchrun with two gloo processes, and the error paths of the command line.

Runs that must compare bit for bit across processes are all subprocesses with the same environment.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_data import write_cifar10, write_fashion_mnist, write_imagefolder

from mixrecipe import train
from mixrecipe.config import Config, load_config
from mixrecipe.factories import create_schedule
from mixrecipe.outputs import load_checkpoint

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"
TIMING = ("images_per_s", "seconds")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ENV.pop("RANK", None)
ENV.pop("WORLD_SIZE", None)


def _cli(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "mixrecipe.train", *map(str, args)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


# The CLI in a process that SIGKILLs itself inside training step N: the loss of the torch loop is wrapped
# here, in the test, so no kill switch ships in the package.
KILL_AT_STEP = """
import os, signal, sys
import mixrecipe.torch_engine as engine
steps, loss = 0, engine.mixup_cross_entropy
def counting_loss(*args, **kwargs):
    global steps
    steps += 1
    if steps >= int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)
    return loss(*args, **kwargs)
engine.mixup_cross_entropy = counting_loss
from mixrecipe.cli import main
main(sys.argv[2:])
"""


def _cli_killed_at_step(step, *args, timeout=240):
    return subprocess.run([sys.executable, "-c", KILL_AT_STEP, str(step), *map(str, args)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _strip(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


QUICK = ["progress=false"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: the CI box has 2 shared cores, and spinning OpenMP threads on a loaded machine
    cost far more than they bring to these tiny models."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------------
# The embedded default and the outputs


def test_digits_default_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    result = train.main([f"output={out}", "epochs=2", *QUICK])
    printed = capsys.readouterr().out
    assert "test top-1:" in printed and "epoch 2/2" in printed
    assert result["test_top1"] > 50.0  # two epochs on 1437 digits: far above chance
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "mixup_preview.png", "last.pt", "best.pt",
                 "summary.json", "reliability.png"):
        assert (out / name).is_file(), name
    records = _metrics(out)
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert set(r) >= {"epoch", "train_loss", "val_loss", "val_top1", "val_top5", "lr", "images_per_s",
                          "seconds", "val_ece", "val_nll"}
        assert 0 <= r["val_top1"] <= r["val_top5"] <= 100 and r["images_per_s"] > 0
        assert 0 < r["val_ece"] < 100 and r["val_nll"] == pytest.approx(r["val_loss"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_ece"] == records[-1]["val_ece"] and summary["test_nll"] == records[-1]["val_nll"]
    # The resolved config is saved beside the run and reproduces it as a recipe.
    assert load_config(str(out / "config.yaml")).epochs == 2
    # Checkpoints load with weights_only=True.
    state = load_checkpoint(str(out / "last.pt"))
    assert state["epoch"] == 2 and state["history"] == records
    assert json.loads((out / "summary.json").read_text())["test_top1"] == result["test_top1"]
    # A finished run is only started over in the same place when asked to (test_run_safety.py: refusals).
    again = train.main([f"output={out}", "epochs=1", "overwrite=true", *QUICK])
    assert len(_metrics(out)) == 1 and again["epoch"] == 1
    # Resuming a finished run trains nothing and reports the same numbers.
    done = train.main([f"output={out}", "epochs=1", "resume=true", *QUICK])
    assert done["test_top1"] == again["test_top1"] and len(_metrics(out)) == 1


def test_erm_and_mixup_off_epoch(tmp_path, monkeypatch):
    from mixrecipe.policy import Mixup

    enabled = []
    original = Mixup.mix_batch

    def spy(self, x, target=None):
        enabled.append(self.mixup_enabled)
        return original(self, x, target)

    monkeypatch.setattr(Mixup, "mix_batch", spy)
    common = ["epochs=2", "data.train_subset=256", "preview=false", *QUICK]
    train.main([f"output={tmp_path / 'a'}", "mixup.off_epoch=1", *common])
    assert enabled[:4] == [True] * 4 and enabled[4:] == [False] * 4
    enabled.clear()
    result = train.main([f"output={tmp_path / 'b'}", "mixup.alpha=0", *common])
    assert enabled == [] and result["test_top1"] > 20.0


def test_label_noise_reports_memorization(tmp_path):
    result = train.main([f"output={tmp_path}", "epochs=1", "data.label_noise=0.5", "data.train_subset=400",
                         "preview=false", *QUICK])
    for key in ("train_fit_noisy", "train_true_noisy", "train_fit_clean"):
        assert 0.0 <= result[key] <= 100.0
    assert "train_fit_noisy" in _metrics(tmp_path)[0]


def test_multistep_schedule_decays_from_the_milestone_epoch():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.4)
    cfg = load_config(None, ["sched.name=multistep", "sched.milestones=[2,3]", "sched.warmup_epochs=1",
                             "sched.warmup_lr=0.1", "epochs=4"])
    sched = create_schedule(opt, cfg, steps_per_epoch=10)

    def lr_at(step):
        sched.step_update(step)
        return opt.param_groups[0]["lr"]

    assert lr_at(0) == pytest.approx(0.1) and lr_at(5) == pytest.approx(0.25)  # linear warm-up, per step
    assert lr_at(10) == pytest.approx(0.4) and lr_at(19) == pytest.approx(0.4)  # all of epoch 1 (0-based)
    assert lr_at(20) == pytest.approx(0.04) and lr_at(29) == pytest.approx(0.04)
    assert lr_at(30) == pytest.approx(0.004)


# ----------------------------------------------------------------------------------------------------
# Kill and resume


def test_resume_after_a_kill_mid_epoch_matches_an_uninterrupted_run(tmp_path, capsys):
    common = ["epochs=3", "data.train_subset=512", "preview=false", *QUICK]  # 8 steps per epoch
    # The killed run is a real process killed with SIGKILL; the others run here, also on one thread.
    train.main([f"output={tmp_path / 'ref'}", *common])
    killed = _cli_killed_at_step(20, f"output={tmp_path / 'cut'}", *common)  # dies in epoch 3
    assert killed.returncode == -9, killed.stderr
    assert len(_metrics(tmp_path / "cut")) == 2
    assert load_checkpoint(str(tmp_path / "cut" / "last.pt"))["epoch"] == 2
    assert not list((tmp_path / "cut").glob("*.tmp"))
    # Without resume=true the unfinished run is not clobbered.
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        train.main([f"output={tmp_path / 'cut'}", *common])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "resume=true" in err and "2/3" in err
    train.main([f"output={tmp_path / 'cut'}", "resume=true", *common])
    assert "resuming" in capsys.readouterr().err
    assert _strip(_metrics(tmp_path / "cut")) == _strip(_metrics(tmp_path / "ref"))
    a = json.loads((tmp_path / "ref" / "summary.json").read_text())
    b = json.loads((tmp_path / "cut" / "summary.json").read_text())
    for key in ("train_loss", "val_loss", "val_top1", "test_top1", "test_loss"):
        assert a[key] == b[key], key
    ref_state = load_checkpoint(str(tmp_path / "ref" / "last.pt"))["model"]
    cut_state = load_checkpoint(str(tmp_path / "cut" / "last.pt"))["model"]
    assert all(torch.equal(ref_state[k], cut_state[k]) for k in ref_state)


class NotATensor:
    """Anything a weights_only load must refuse."""


def test_checkpoints_refuse_pickled_code(tmp_path):
    torch.save({"epoch": 1, "payload": NotATensor()}, tmp_path / "last.pt")
    with pytest.raises(Exception, match="(?i)weights.only|unsupported|not an allowed"):
        load_checkpoint(str(tmp_path / "last.pt"))


# ----------------------------------------------------------------------------------------------------
# The shipped recipes on small data in their real formats


def test_imagenet_recipe_on_a_tiny_image_folder(tmp_path, capsys):
    root = write_imagefolder(str(tmp_path / "inet"), n_train=6, n_val=2)
    result = train.main([str(RECIPES / "imagenet.yaml"), f"data.root={root}", f"output={tmp_path / 'run'}",
                         "model=resnet10t", "data.img_size=32", "batch_size=4", "epochs=2", "data.workers=1",
                         *QUICK])
    assert "resnet10t on imagefolder" in capsys.readouterr().out
    assert len(_metrics(tmp_path / "run")) == 2 and 0 <= result["test_top1"] <= 100
    assert result["lr"] > 0
    saved = load_config(str(tmp_path / "run" / "config.yaml"))
    assert saved.sched.milestones == [30, 60, 80] and saved.mixup.alpha == 0.2


def test_cifar10_recipe_on_tiny_pickles(tmp_path):
    root = write_cifar10(str(tmp_path / "data"), per_batch=8, n_test=16)
    result = train.main([str(RECIPES / "cifar10.yaml"), f"data.root={root}", f"output={tmp_path / 'run'}",
                         "batch_size=8", "epochs=1", *QUICK])
    assert result["epoch"] == 1 and 0 <= result["test_top1"] <= 100
    assert (tmp_path / "run" / "mixup_preview.png").is_file()


def test_fashion_mnist_recipe_on_tiny_idx_files(tmp_path):
    root = write_fashion_mnist(str(tmp_path / "fm"), n_train=200, n_test=60)
    result = train.main([str(RECIPES / "fashion_mnist.yaml"), f"data.root={root}", "data.val_size=40",
                         f"output={tmp_path / 'run'}", "epochs=2", *QUICK])
    records = _metrics(tmp_path / "run")
    assert len(records) == 2 and records[0]["lr"] == pytest.approx(1e-3)  # constant Adam lr
    assert 0 <= result["test_top1"] <= 100


def test_recipe_by_bare_name(tmp_path):
    root = write_cifar10(str(tmp_path / "data"), per_batch=4, n_test=8)
    result = train.main(["cifar10", f"data.root={root}", f"output={tmp_path / 'run'}", "batch_size=8",
                         "epochs=1", "model=digits_cnn", "preview=false", *QUICK])
    assert result["epoch"] == 1


# ----------------------------------------------------------------------------------------------------
# Scale-out


def test_torchrun_two_gloo_processes(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "mixrecipe.train", f"output={out}", "epochs=2", "data.train_subset=256", "batch_size=32",
           *QUICK]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("test top-1:") == 1  # only rank 0 reports
    assert "global batch 64" in proc.stdout and "2 process(es)" in proc.stdout
    records = _metrics(out)
    assert [r["epoch"] for r in records] == [1, 2]
    # 256 images / (2 ranks x 32) = 4 steps per epoch; the reported loss and accuracy cover both ranks:
    # re-evaluating the saved model on the whole validation set in one process gives the same numbers.
    cfg = load_config(None, [f"output={out}", "data.train_subset=256"])
    state = load_checkpoint(str(out / "last.pt"))
    from mixrecipe.data import build_data
    from mixrecipe.models import create_model

    bundle = build_data(cfg.data)
    model = create_model(cfg.model, bundle.num_classes, bundle.in_chans)
    model.load_state_dict(state["model"])
    from mixrecipe.data import normalize_batch
    from mixrecipe.distributed import DistContext
    from mixrecipe.factories import eval_loader
    from mixrecipe.scoring import evaluate

    d = DistContext(0, 1, 0, torch.device("cpu"), False)
    model.eval()
    with torch.no_grad():
        batches = [(model(normalize_batch(x, bundle.mean, bundle.std)), y)
                   for x, y in eval_loader(bundle.val, cfg, d)]
    check, _ = evaluate(batches, d, "val")
    assert check["val_top1"] == pytest.approx(records[-1]["val_top1"])
    assert check["val_loss"] == pytest.approx(records[-1]["val_loss"], rel=1e-5)


# ----------------------------------------------------------------------------------------------------
# Error paths: exit status 2 and a message naming the problem


def test_cli_exit_status_two_on_a_bad_key():
    proc = _cli("mixup.alpah=0.3")
    assert proc.returncode == 2
    assert "mixup.alpah" in proc.stderr and "mixup.alpha" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "argv, words",
    [
        (["epochs=many"], ["epochs", "integer"]),
        (["optim.lr=fast"], ["optim.lr", "number"]),
        (["lr=0.1"], ["'lr'", "optim.lr"]),
        (["data.name=cifar"], ["cifar10"]),
        (["no_such_recipe.yaml"], ["recipe file not found", "cifar10"]),
        (["a.yaml", "b.yaml"], ["one recipe"]),
        (["--epochs", "2"], ["key=value", "--epochs"]),
        (["model=resnet5O", "epochs=1"], ["resnet5O", "resnet50"]),
        (["optim.opt=adamm", "epochs=1"], ["optim.opt"]),
        (["device=cuda"] if not torch.cuda.is_available() else ["data.val_size=99999"], ["device=cuda"]
         if not torch.cuda.is_available() else ["val_size"]),
        (["batch_size=4096", "drop_last=true", "epochs=1"], ["smaller than one batch"]),
    ],
)
def test_errors_exit_two_with_a_message(tmp_path, capsys, argv, words):
    argv = [a if "=" in a or not a.endswith(".yaml") else str(tmp_path / a) for a in argv]
    with pytest.raises(SystemExit) as info:
        train.main([*argv, f"output={tmp_path / 'run'}", *QUICK])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    for w in words:
        assert w in err


@pytest.mark.parametrize("recipe, data_words", [
    ("fashion_mnist", ["Fashion-MNIST", "apt-get install dataset-fashion-mnist"]),
    ("cifar10", ["CIFAR-10", "cifar-10-python.tar.gz"]),
    ("imagenet", ["train", "val", "image-net.org"]),
])
def test_missing_data_exits_two_and_says_where_and_how(tmp_path, capsys, recipe, data_words):
    with pytest.raises(SystemExit) as info:
        train.main([recipe, f"data.root={tmp_path / 'nowhere'}", f"output={tmp_path / 'run'}"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nowhere") in err
    for w in data_words:
        assert w in err
    assert not (tmp_path / "run").exists()  # nothing written for a run that cannot start


def test_help(capsys):
    assert train.main(["--help"]) is None
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m mixrecipe.train") and "mixup.alpha=" in out


def test_run_is_programmatic(tmp_path):
    cfg = Config()
    cfg.output, cfg.epochs, cfg.preview, cfg.progress = str(tmp_path), 1, False, False
    cfg.data.train_subset = 128
    result = train.run(cfg)
    assert result["epoch"] == 1 and "test_top1" in result and result["output"] == str(tmp_path)


# ----------------------------------------------------------------------------------------------------
# Bad destinations and bad data: exit 2, one line naming the path and the fix


@pytest.mark.parametrize("where", ["/proc/forbidden/run", "a_file/run"])
def test_an_output_that_cannot_be_written_exits_two_before_training(tmp_path, capsys, where):
    (tmp_path / "a_file").write_text("not a directory")
    out = where if where.startswith("/") else str(tmp_path / where)
    with pytest.raises(SystemExit) as info:
        train.main([f"output={out}", "epochs=1", *QUICK])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert out in err and "output=DIR" in err


def test_the_writability_check_leaves_no_empty_folders(tmp_path, capsys):
    out = tmp_path / "new" / "run"
    with pytest.raises(SystemExit):  # no such data: the run stops after the output check
        train.main(["imagenet", f"data.root={tmp_path / 'nowhere'}", f"output={out}"])
    assert "image folder" in capsys.readouterr().err and not (tmp_path / "new").exists()


IMAGENET_TINY = ["model=digits_cnn", "data.img_size=16", "batch_size=4", "data.workers=1", "preview=false",
                 *QUICK]


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def test_image_folder_runs_do_not_depend_on_the_number_of_workers(tmp_path):
    """Each item's crop and flip come from (epoch seed, item): no workers or two give the same run."""
    root = write_imagefolder(str(tmp_path / "inet"), n_train=6, n_val=2, size=(30, 40))
    common = ["imagenet", f"data.root={root}", "epochs=2", *IMAGENET_TINY]
    a = train.main([*common, f"output={tmp_path / 'w0'}", "data.workers=0"])
    b = train.main([*common, f"output={tmp_path / 'w2'}", "data.workers=2"])
    assert (a["train_loss"], a["test_loss"]) == (b["train_loss"], b["test_loss"])


@pytest.mark.parametrize("decoder", ["torchvision", "device"])
def test_a_corrupt_image_is_named_or_skipped_and_counted(tmp_path, capsys, decoder):
    root = Path(write_imagefolder(str(tmp_path / "inet"), n_train=4, n_val=2))
    bad = root / "train" / "bee" / "bee_1.JPEG"
    _truncate(bad)
    common = ["imagenet", f"data.root={root}", "epochs=1", f"data.decoder={decoder}", *IMAGENET_TINY]
    with pytest.raises(SystemExit) as info:  # decoded in a loader worker process, or by the device decoder
        train.main([*common, f"output={tmp_path / 'stop'}"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert str(bad) in err and "data.skip_corrupt=true" in err
    result = train.main([*common, f"output={tmp_path / 'skip'}", "data.skip_corrupt=true"])
    assert result["skipped_images"] == 1 and _metrics(tmp_path / "skip")[0]["skipped_images"] == 1
    assert str(bad) in capsys.readouterr().err


@pytest.mark.parametrize("decoder", ["torchvision", "device"])
def test_a_data_error_mid_run_leaves_a_resumable_checkpoint(tmp_path, capsys, monkeypatch, decoder):
    from mixrecipe import lifecycle

    root = Path(write_imagefolder(str(tmp_path / "inet"), n_train=4, n_val=2))
    bad = root / "train" / "ant" / "ant_0.JPEG"
    good_bytes = bad.read_bytes()
    record = lifecycle.record

    def record_then_break_a_file(state, engine, metrics):  # the file goes bad after epoch 1 is saved
        record(state, engine, metrics)
        _truncate(bad)

    monkeypatch.setattr(lifecycle, "record", record_then_break_a_file)
    common = ["imagenet", f"data.root={root}", f"output={tmp_path / 'run'}", "epochs=2",
              f"data.decoder={decoder}", *IMAGENET_TINY]
    with pytest.raises(SystemExit) as info:
        train.main(common)
    err = capsys.readouterr().err
    assert info.value.code == 2 and str(bad) in err and "resume=true" in err and "1/2" in err
    assert load_checkpoint(str(tmp_path / "run" / "last.pt"))["epoch"] == 1
    monkeypatch.undo()
    bad.write_bytes(good_bytes)
    result = train.main([*common, "resume=true"])
    assert result["epoch"] == 2 and [r["epoch"] for r in _metrics(tmp_path / "run")] == [1, 2]
