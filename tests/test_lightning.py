"""mixrecipe.lightning.MixupCallback in real Lightning fits on CPU: dict, list and tuple batches, a plain
``F.cross_entropy`` training_step, TensorBoard image logging, bf16-mixed, gradient accumulation, odd and
size-1 last batches, resume from a checkpoint (the same mixing stream), 2-process DDP, bad input.

Every mixed training batch is checked against the float64 reference with the λ and partners the callback
drew for it; every validation batch must be the dataset's own samples.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning_helpers import NUM_CLASSES, DictData, module_class, trainer_kwargs
from torch.utils.data import DataLoader, default_collate

from mixrecipe.reference import mix_reference, mixup_target_reference

pl = pytest.importorskip("lightning.pytorch", reason="Lightning is not installed: pip install lightning")
from mixrecipe import Mixup  # noqa: E402
from mixrecipe.lightning import MixupCallback  # noqa: E402

HERE = Path(__file__).resolve().parent
Tiny = module_class(pl)


def _check_train(seen, data: DictData, *, alpha_path: bool):
    """Each training batch recorded equals the reference mix of its samples; -> whether any changed."""
    mixed_any = False
    for rec in seen:
        x0, y0 = data.x[rec["index"]], data.y[rec["index"]]
        b = x0.shape[0]
        assert rec["y"].shape == (b, NUM_CLASSES) and rec["y"].dtype == torch.float32
        ref_x, ref_soft = mix_reference(x0, y0, rec["lam"], perm=rec["perm"], num_classes=NUM_CLASSES,
                                        out_dtype=torch.float32)
        torch.testing.assert_close(rec["x"], ref_x, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rec["y"], ref_soft, rtol=1e-5, atol=1e-6)
        if alpha_path:
            assert bool((rec["lam"] >= 0.5).all())  # max(λ, 1 - λ)
            if b > 1:  # a partner other than itself
                assert not bool((rec["perm"] == torch.arange(b)).any())
        mixed_any |= not torch.equal(rec["x"], x0)
    return mixed_any


def _check_val(seen, data: DictData):
    assert seen, "no validation batch"
    for rec in seen:
        assert rec["y"].dtype == torch.int64 and rec["y"].ndim == 1
        assert torch.equal(rec["y"], data.y[rec["index"]]) and torch.equal(rec["x"], data.x[rec["index"]])


def test_fit_dict_batches_with_tensorboard_grid(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train, val = DictData(11), DictData(5, seed=1)  # batch 4: 4, 4 and an odd last batch of 3
    model = Tiny()
    cb = MixupCallback(num_classes=NUM_CLASSES, log_every_n_steps=2)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, callbacks=[cb], logger=logger))
    trainer.fit(model, DataLoader(train, batch_size=4), DataLoader(val, batch_size=4))

    assert [r["x"].shape[0] for r in model.train_seen] == [4, 4, 3] * 2
    _check_train(model.train_seen, train, alpha_path=True)
    assert all(not torch.equal(r["x"], train.x[r["index"]]) for r in model.train_seen)  # every one mixed
    _check_val(model.val_seen, val)
    assert cb.state_dict()["batches_mixed"] == 6
    assert "training_step" not in model.__dict__  # dict batches are changed in place: nothing wrapped

    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert "mixup/train_batch" in events.Tags()["images"]
    steps = [e.step for e in events.Images("mixup/train_batch")]
    assert steps == [0, 2, 4]
    assert events.Images("mixup/train_batch")[0].width > 100


def _tuple_collate(samples):
    b = default_collate(samples)
    return b["image"], b["label"], b["index"]


def test_fit_tuple_batches_policy_bf16_accumulation(tmp_path):
    """A tuple batch (immutable) with a CutMix/Mixup policy, bf16-mixed, 2-batch accumulation, B=1 last."""
    train = DictData(5)
    model = Tiny()
    policy = Mixup(mixup_alpha=0.4, cutmix_alpha=1.0, mode="elem", num_classes=NUM_CLASSES,
                   label_smoothing=0.1)
    cb = MixupCallback(policy)
    assert policy.generator is cb.generator
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, callbacks=[cb], precision="bf16-mixed",
                                          accumulate_grad_batches=2, limit_val_batches=0))
    trainer.fit(model, DataLoader(train, batch_size=2, collate_fn=_tuple_collate))
    assert [r["x"].shape[0] for r in model.train_seen] == [2, 2, 1] * 2
    assert trainer.global_step == 4  # 3 batches per epoch, accumulation of 2: steps after batch 2 and 3
    for rec in model.train_seen:
        y0 = train.y[rec["index"]]
        assert rec["y"].shape == (y0.shape[0], NUM_CLASSES)
        want = mixup_target_reference(y0, NUM_CLASSES, rec["lam"], rec["perm"], label_smoothing=0.1)
        torch.testing.assert_close(rec["y"], want, rtol=1e-5, atol=1e-6)
    last = model.train_seen[2]  # B = 1: mixed with itself, its own smoothed one-hot
    assert torch.equal(last["x"], train.x[last["index"]])
    assert torch.isclose(last["y"][0, train.y[last["index"]][0]], torch.tensor(1 - 0.1 + 0.1 / 3))
    assert "training_step" not in model.__dict__  # the wrapper for tuple batches is gone after fit


def _fit_record(tmp_path, max_epochs, ckpt_path=None):
    pl.seed_everything(7, verbose=False)
    model, cb = Tiny(), MixupCallback(num_classes=NUM_CLASSES)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=max_epochs, callbacks=[cb],
                                          limit_val_batches=0))
    loader = DataLoader(DictData(6), batch_size=4)  # 2 batches per epoch: 4 and 2
    trainer.fit(model, loader, ckpt_path=ckpt_path)
    return trainer, model, cb


def test_resume_from_checkpoint_continues_the_mixing_stream(tmp_path):
    _, full, _ = _fit_record(tmp_path / "a", 3)
    trainer, first, cb = _fit_record(tmp_path / "b", 1)
    ckpt = str(tmp_path / "epoch1.ckpt")
    trainer.save_checkpoint(ckpt)
    assert torch.load(ckpt, weights_only=False)["callbacks"]["MixupCallback"] == cb.state_dict()
    torch.manual_seed(12345)  # a different global RNG: the stream must come from the checkpoint
    _, resumed, cb2 = _fit_record(tmp_path / "c", 3, ckpt_path=ckpt)
    assert cb2.batches_mixed == 6
    assert len(resumed.train_seen) == 4
    for a, b in zip(full.train_seen[2:], resumed.train_seen):
        assert torch.equal(a["index"], b["index"])
        assert torch.equal(a["lam"], b["lam"]) and torch.equal(a["perm"], b["perm"])
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"])
    # Without the checkpoint the stream starts over: the third epoch would not repeat the first's draws.
    assert not torch.equal(full.train_seen[4]["lam"], full.train_seen[0]["lam"])


def test_ddp_two_processes_each_rank_mixes_its_own_batch(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(HERE / "lightning_ddp_script.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=240, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    data = DictData(14)
    for rec in ranks:
        assert rec["world_size"] == 2
        assert [t["x"].shape[0] for t in rec["train"]] == [3, 3, 1]
        assert _check_train(rec["train"], data, alpha_path=True), "no training batch was mixed"
        _check_val(rec["val"], DictData(4, seed=1))
    seen = torch.cat([t["index"] for rec in ranks for t in rec["train"]])
    assert sorted(seen.tolist()) == list(range(14))  # each rank its own half of the data
    assert ranks[0]["state"] == ranks[1]["state"]  # one seed (rank 0's) and one count everywhere
    lam0 = torch.cat([t["lam"] for t in ranks[0]["train"]])
    lam1 = torch.cat([t["lam"] for t in ranks[1]["train"]])
    assert not torch.equal(lam0, lam1)  # but each rank draws its own λ


def test_pytorch_lightning_trainer_takes_the_callback(tmp_path):
    ptl = pytest.importorskip("pytorch_lightning", reason="pytorch_lightning (the standalone package) is "
                              "not installed")
    assert isinstance(MixupCallback(num_classes=3), (pl.Callback, ptl.Callback))
    assert isinstance(MixupCallback(num_classes=3), ptl.Callback)
    model = module_class(ptl)()
    trainer = ptl.Trainer(**trainer_kwargs(tmp_path, max_steps=2, callbacks=[MixupCallback(num_classes=3)],
                                           limit_val_batches=0))
    trainer.fit(model, DataLoader(DictData(8), batch_size=4))
    assert _check_train(model.train_seen, DictData(8), alpha_path=True)


# --------------------------------------------------------------------------------------------------
# Bad input: errors that name what is wrong.
# --------------------------------------------------------------------------------------------------
TRAINER = SimpleNamespace(global_rank=0, global_step=0, precision="32-true", is_global_zero=True, loggers=[])


def _batch_start(cb, batch):
    cb.on_train_batch_start(TRAINER, None, batch, 0)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(alpha=0.0), "alpha"), (dict(alpha=float("nan")), "alpha"), (dict(num_classes=0), "num_classes"),
    (dict(log_every_n_steps=-1), "log_every_n_steps"), (dict(input_key=1.5), "input_key"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MixupCallback(**kwargs)


def test_bad_policy_and_conflicting_num_classes():
    with pytest.raises(TypeError, match="mixup"):
        MixupCallback("mixup")
    with pytest.raises(ValueError, match="num_classes"):
        MixupCallback(Mixup(num_classes=10), num_classes=5)


def test_bad_batches_are_named():
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match="input_key='img'.*keys are \\['image', 'label'\\]"):
        _batch_start(MixupCallback(num_classes=3, input_key="img"), {"image": x, "label": y})
    with pytest.raises(ValueError, match="target_key='y'"):
        _batch_start(MixupCallback(num_classes=3, target_key="y"), {"image": x, "label": y})
    with pytest.raises(ValueError, match="input_key"):
        _batch_start(MixupCallback(num_classes=3), {"pix": x, "label": y})
    with pytest.raises(ValueError, match="num_classes"):
        _batch_start(MixupCallback(), [x, y])
    with pytest.raises(ValueError, match="num_classes"):
        _batch_start(MixupCallback(), [x, y.float()])  # float targets of shape (B,)
    with pytest.raises(ValueError, match="whole numbers"):
        _batch_start(MixupCallback(num_classes=3), [x, y.float() + 0.5])
    with pytest.raises(ValueError, match="columns"):
        _batch_start(MixupCallback(num_classes=4), [x, torch.rand(4, 3)])
    with pytest.raises(ValueError, match="shape \\(3,\\)"):
        _batch_start(MixupCallback(num_classes=3), [x, y[:3]])
    with pytest.raises(TypeError, match="floating point"):
        _batch_start(MixupCallback(num_classes=3), [(x * 255).to(torch.uint8), y])
    with pytest.raises(TypeError, match="got a Tensor"):
        _batch_start(MixupCallback(num_classes=3), x)
    with pytest.raises(ValueError, match="target_key=5"):
        _batch_start(MixupCallback(num_classes=3, target_key=5), [x, y])


def test_float_whole_number_and_dense_targets_are_mixed():
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    batch = [x.clone(), y.float()]
    cb = MixupCallback(num_classes=3)
    _batch_start(cb, batch)
    _, ref = mix_reference(x, y, cb.lam, perm=cb.perm, num_classes=3)
    torch.testing.assert_close(batch[1], ref)
    dense = torch.nn.functional.one_hot(y, 3).float()
    batch = {"img": x.clone(), "target": dense}
    cb = MixupCallback()  # K from the dense targets
    _batch_start(cb, batch)
    torch.testing.assert_close(batch["target"], mix_reference(x, dense, cb.lam, perm=cb.perm)[1])


def test_import_mixrecipe_imports_neither_lightning_nor_tensorboard():
    code = ("import sys, mixrecipe, mixrecipe.transforms\n"
            "bad = [m for m in ('lightning', 'pytorch_lightning', 'tensorboard') if m in sys.modules]\n"
            "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_readme_lightning_snippet_runs(tmp_path, monkeypatch):
    from readme_snippets import snippet

    monkeypatch.chdir(tmp_path)  # the default logger writes lightning_logs/ here
    scope: dict = {"__name__": "readme_lightning"}
    exec(compile(snippet("Lightning"), "README.md:Lightning", "exec"), scope)
    trainer, cb = scope["trainer"], scope["mixup"]
    assert trainer.state.finished and cb.batches_mixed == 8  # 2 epochs of 4 batches (16, 16, 16, 2)
    events = list(tmp_path.glob("lightning_logs/version_0/events.out.tfevents.*"))
    assert events and max(e.stat().st_size for e in events) > 10_000  # the image grids are in there


def test_num_classes_from_the_module_and_float64_images():
    cb = MixupCallback()
    module = SimpleNamespace(hparams={"num_classes": 3})
    cb.setup(SimpleNamespace(strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj)), module, "fit")
    assert cb.num_classes == 3 and cb.seed == torch.initial_seed()
    x, y = torch.rand(5, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    batch = {"x": x.clone(), "y": y}
    _batch_start(cb, batch)
    ref_x, ref_y = mix_reference(x, y, cb.lam, perm=cb.perm, num_classes=3)
    torch.testing.assert_close(batch["x"], ref_x)
    torch.testing.assert_close(batch["y"], ref_y)


def test_grid_goes_to_a_loggers_log_image():
    logged = []
    logger = SimpleNamespace(log_image=lambda key, images, step: logged.append((key, images, step)))
    trainer = SimpleNamespace(global_rank=0, global_step=4, precision="32-true", is_global_zero=True,
                              loggers=[logger])
    cb = MixupCallback(num_classes=3, log_every_n_steps=2)
    batch = [torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])]
    cb.on_train_batch_start(trainer, None, batch, 0)
    cb.on_train_batch_start(trainer, None, [torch.rand(6, 3, 8, 8), batch[1].clone()], 1)  # same step
    assert len(logged) == 1  # once per optimizer step (gradient accumulation)
    key, images, step = logged[0]
    assert key == "mixup/train_batch" and step == 4
    assert images[0].ndim == 3 and images[0].shape[2] == 3 and images[0].dtype.name == "uint8"


def test_random_partners_are_never_the_sample_itself():
    from mixrecipe.lightning import _random_partners

    g = torch.Generator().manual_seed(0)
    assert _random_partners(1, g).tolist() == [0]
    for n in (2, 3, 7):
        counts = torch.zeros(n, n)
        for _ in range(700):
            perm = _random_partners(n, g)
            assert sorted(perm.tolist()) == list(range(n))
            counts[torch.arange(n), perm] += 1
        assert bool((counts.diagonal() == 0).all())
        off = counts[~torch.eye(n, dtype=torch.bool)]
        assert float(off.min()) > 0.6 * 700 / (n - 1)  # each other sample is a partner about as often
