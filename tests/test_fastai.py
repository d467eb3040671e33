"""fastai callbacks: Learners on scikit-learn's digits, losses compared with fastai's own MixUp/CutMix.

The runs are tiny (a few hundred 8x8 images, one epoch) to keep this file well under a minute on 2 cores.
"""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("fastai", reason="fastai is an optional dependency (pip install fastai)")
sklearn_datasets = pytest.importorskip("sklearn.datasets")

import fastai.callback.progress  # noqa: E402,F401  (patches Learner.no_bar)
import fastai.callback.schedule  # noqa: E402,F401  (patches fit_one_cycle, lr_find)
from fastai.callback.core import Callback, CancelFitException  # noqa: E402
from fastai.callback.mixup import CutMix as FastaiCutMix  # noqa: E402
from fastai.callback.mixup import MixUp as FastaiMixUp  # noqa: E402
from fastai.data.core import DataLoaders  # noqa: E402
from fastai.learner import Learner  # noqa: E402
from fastai.losses import (  # noqa: E402
    BCEWithLogitsLossFlat,
    CrossEntropyLossFlat,
    FocalLossFlat,
    LabelSmoothingCrossEntropyFlat,
)
from fastai.metrics import accuracy  # noqa: E402

from mixrecipe import mixup_target  # noqa: E402
from mixrecipe.fastai import CutMix, MixUp, MixupCallback, loss_kind  # noqa: E402
from mixrecipe.loss import SoftTargetCrossEntropy, mixup_cross_entropy  # noqa: E402
from mixrecipe.policy import Mixup  # noqa: E402

warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
warnings.filterwarnings("ignore", message=".*torch.cuda.amp.*")


# --------------------------------------------------------------------------------------------------
# Data, model and helpers.
# --------------------------------------------------------------------------------------------------
_DIGITS = sklearn_datasets.load_digits()
_X = torch.tensor(_DIGITS.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
_Y = torch.tensor(_DIGITS.target, dtype=torch.long)


def digits_dls(n_train=320, n_valid=64, bs=32, *, shuffle=True, drop_last=False, onehot=False,
               dtype=torch.float32):
    x, y = _X.to(dtype), _Y
    if onehot:
        y = torch.nn.functional.one_hot(y, 10).float()
    train = list(zip(x[:n_train], y[:n_train]))
    valid = list(zip(x[1400:1400 + n_valid], y[1400:1400 + n_valid]))
    return DataLoaders.from_dsets(train, valid, bs=bs, shuffle=(shuffle, False), drop_last=(drop_last, False),
                                  device="cpu")


def digits_model(seed=0, in_chans=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(in_chans, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(512, 10))


def fit_quietly(learn, epochs=1, lr=1e-2, one_cycle=True):
    with learn.no_bar(), learn.no_logging():
        if one_cycle:
            learn.fit_one_cycle(epochs, lr)
        else:
            learn.fit(epochs, lr)


class Reseed(Callback):
    """Seeds the global RNG before every training batch, before the mixing callbacks (order 0) draw."""

    order = -5
    run_valid = False

    def before_batch(self):
        torch.manual_seed(1000 + self.iter)


class Record(Callback):
    """Records, per training batch, the model input and the loss."""

    order = 50

    def __init__(self):
        self.xs, self.losses, self.valid_xs = [], [], []

    def after_loss(self):
        if self.training:
            self.xs.append(self.xb[0].detach().clone())
            self.losses.append(self.loss.detach().clone())
        else:
            self.valid_xs.append(self.xb[0].detach().clone())


class StopAfter(Callback):
    order = 60

    def __init__(self, n, exc=CancelFitException):
        self.n, self.exc = n, exc

    def after_batch(self):
        if self.training and self.iter + 1 >= self.n:
            raise self.exc()


def run_batches(cb, loss_func, n_batches=3, dls=None, lr=1e-3, extra_cbs=()):
    """A few training batches with per-batch reseeding; returns (recorder, learner)."""
    rec = Record()
    learn = Learner(dls or digits_dls(shuffle=False), digits_model(), loss_func=loss_func,
                    cbs=[cb, Reseed(), rec, StopAfter(n_batches), *extra_cbs])
    fit_quietly(learn, 1, lr, one_cycle=False)
    return rec, learn


# --------------------------------------------------------------------------------------------------
# Optional dependency.
# --------------------------------------------------------------------------------------------------
def test_missing_fastai_says_how_to_install():
    code = (
        "import sys; sys.modules['fastai'] = None\n"
        "try:\n"
        "    import mixrecipe.fastai\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"}).stdout
    assert 'pip install ".[fastai]"' in out and "pip install fastai" in out


# --------------------------------------------------------------------------------------------------
# Training on real data with each callback.
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make_cb", [
    lambda: MixUp(),
    lambda: CutMix(),
    lambda: MixupCallback(Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)),
], ids=["MixUp", "CutMix", "MixupCallback"])
def test_fit_one_cycle_learns_digits_and_restores_the_loss(make_cb):
    loss_func = CrossEntropyLossFlat()
    learn = Learner(digits_dls(n_train=512, bs=32), digits_model(), loss_func=loss_func, metrics=accuracy,
                    cbs=make_cb())
    fit_quietly(learn, epochs=2, lr=2e-2)
    train_loss, valid_loss, acc = learn.recorder.values[-1]
    assert learn.loss_func is loss_func
    assert acc > 0.75, f"validation accuracy {acc:.3f} after 2 epochs"
    assert torch.isfinite(torch.tensor([train_loss, valid_loss])).all()


@pytest.mark.parametrize("loss_func", [nn.CrossEntropyLoss(), CrossEntropyLossFlat(),
                                       LabelSmoothingCrossEntropyFlat(), nn.functional.cross_entropy],
                         ids=["nn.CrossEntropyLoss", "CrossEntropyLossFlat", "LabelSmoothingCEFlat",
                              "F.cross_entropy"])
@pytest.mark.parametrize("make_cb", [MixUp, CutMix,
                                     lambda: MixupCallback(Mixup(cutmix_alpha=1.0, num_classes=10))],
                         ids=["MixUp", "CutMix", "MixupCallback"])
def test_integer_label_losses_train(make_cb, loss_func):
    # fastai's own MixUp fails on nn.CrossEntropyLoss / F.cross_entropy (it lerps the integer targets).
    learn = Learner(digits_dls(n_train=64, n_valid=16, bs=32), digits_model(), loss_func=loss_func,
                    cbs=make_cb())
    fit_quietly(learn)
    assert learn.loss_func is loss_func
    assert all(torch.isfinite(torch.tensor(learn.recorder.values[-1])))


def test_validation_is_not_mixed_and_uses_the_original_loss():
    loss_func = CrossEntropyLossFlat()
    rec = Record()
    dls = digits_dls(n_train=64, n_valid=40, bs=16)
    learn = Learner(dls, digits_model(), loss_func=loss_func, cbs=[MixUp(alpha=1.0), rec])
    fit_quietly(learn)
    valid_x = torch.cat(rec.valid_xs)
    assert torch.equal(valid_x, _X[1400:1440])  # the validation inputs went through untouched
    model = learn.model.eval()
    with torch.no_grad():
        expected = nn.functional.cross_entropy(model(_X[1400:1440]), _Y[1400:1440])
    assert learn.recorder.values[-1][1] == pytest.approx(float(expected), rel=1e-5)
    assert learn.validate()[0] == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("make_cb", [MixUp, CutMix,
                                     lambda: MixupCallback(Mixup(cutmix_alpha=1.0, num_classes=10,
                                                                 pairing="random"))],
                         ids=["MixUp", "CutMix", "MixupCallback"])
def test_batch_of_one_and_an_odd_last_batch(make_cb):
    # bs=1 breaks fastai's MixUp (it squeezes lambda to 0-d); an odd last batch of 5 follows 4 batches of 9.
    for n_train, bs in ((3, 1), (41, 9)):
        rec = Record()
        learn = Learner(digits_dls(n_train=n_train, n_valid=16, bs=bs), digits_model(),
                        loss_func=nn.CrossEntropyLoss(),
                        cbs=[make_cb(), rec])
        fit_quietly(learn)
        sizes = [x.shape[0] for x in rec.xs]
        assert sizes == ([1, 1, 1] if bs == 1 else [9, 9, 9, 9, 5])
        assert all(torch.isfinite(loss) for loss in rec.losses)


def test_a_batch_of_one_is_plain_cross_entropy():
    rec, learn = run_batches(MixUp(alpha=1.0), nn.CrossEntropyLoss(), n_batches=2,
                             dls=digits_dls(n_train=2, bs=1, shuffle=False), lr=0.0)
    for i, loss in enumerate(rec.losses):  # lr=0: the model is the initial one
        with torch.no_grad():
            expected = nn.functional.cross_entropy(learn.model(_X[i:i + 1]), _Y[i:i + 1])
        assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_lr_find_mixes_and_restores_the_loss():
    loss_func = nn.CrossEntropyLoss()
    cb = MixUp()
    seen = []

    class Spy(Callback):
        order = 5

        def before_batch(self):
            seen.append(cb._pending)

    learn = Learner(digits_dls(n_train=320, bs=32), digits_model(), loss_func=loss_func, cbs=[cb, Spy()])
    with learn.no_bar():
        suggestion = learn.lr_find(num_it=20, show_plot=False)
    assert suggestion.valley > 0
    assert learn.loss_func is loss_func
    assert seen and all(seen)  # every lr_find batch was mixed


def test_loss_restored_after_cancel_and_after_a_crash():
    loss_func = CrossEntropyLossFlat()
    cb = MixUp()
    learn = Learner(digits_dls(n_train=64, bs=16), digits_model(), loss_func=loss_func, cbs=cb)
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, cbs=StopAfter(2))  # CancelFitException mid-epoch
    assert learn.loss_func is loss_func

    with learn.no_bar(), learn.no_logging(), pytest.raises(RuntimeError, match="boom"):
        learn.fit(1, cbs=StopAfter(1, lambda: RuntimeError("boom")))
    # fastai runs no after_* event on an exception: the wrapper is left, but behaves as the original loss
    wrapped = learn.loss_func
    assert wrapped is not loss_func and wrapped.loss_func is loss_func
    pred, y = torch.randn(5, 10), torch.randint(0, 10, (5,))
    assert torch.equal(wrapped(pred, y), loss_func(pred, y))
    assert wrapped.reduction == "mean"
    fit_quietly(learn, one_cycle=False)  # the next fit unwraps it and restores the original
    assert learn.loss_func is loss_func


# --------------------------------------------------------------------------------------------------
# The same loss as fastai's callbacks, batch by batch, given the same lambda and permutation (same seed).
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ours, theirs", [(MixUp, FastaiMixUp), (CutMix, FastaiCutMix)],
                         ids=["MixUp", "CutMix"])
@pytest.mark.parametrize("make_loss, onehot", [
    (CrossEntropyLossFlat, False),
    (lambda: LabelSmoothingCrossEntropyFlat(eps=0.2), False),
    (lambda: FocalLossFlat(gamma=2.0), False),          # no CE form: fastai's lerp of per-sample losses
    (BCEWithLogitsLossFlat, True),                      # float targets: the targets are mixed
], ids=["CEFlat", "LabelSmoothingCEFlat", "FocalLossFlat", "BCE-onehot"])
def test_per_batch_loss_equals_fastai(ours, theirs, make_loss, onehot):
    dls = digits_dls(n_train=96, bs=24, shuffle=False, onehot=onehot)
    ref, _ = run_batches(theirs(alpha=0.7), make_loss(), n_batches=4, dls=dls)
    got, _ = run_batches(ours(alpha=0.7), make_loss(), n_batches=4, dls=dls)
    assert len(got.losses) == len(ref.losses) == 4
    for a, b in zip(got.xs, ref.xs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(got.losses, ref.losses):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ours, theirs", [(MixUp, FastaiMixUp), (CutMix, FastaiCutMix)],
                         ids=["MixUp", "CutMix"])
def test_plain_cross_entropy_matches_fastai_on_its_flat_loss(ours, theirs):
    dls = digits_dls(n_train=96, bs=24, shuffle=False)
    ref, _ = run_batches(theirs(), CrossEntropyLossFlat(), dls=dls)
    for loss_func in (nn.CrossEntropyLoss(), nn.functional.cross_entropy,
                      nn.CrossEntropyLoss(label_smoothing=0.0)):
        got, _ = run_batches(ours(), loss_func, dls=dls)
        for a, b in zip(got.losses, ref.losses):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fastai_attribute_names_are_kept():
    class Check(Callback):
        order = 5

        def __init__(self, cb):
            self.cb, self.checked = cb, 0

        def after_pred(self):
            if self.training:
                cb = self.cb
                assert cb.stack_y and cb.old_lf is loss_func and cb.lam.shape == (self.x.shape[0],)
                y1 = cb.yb1[0]
                assert torch.equal(y1, self.y[cb.perm])
                expected = torch.lerp(nn.functional.cross_entropy(self.pred, y1, reduction="none"),
                                      nn.functional.cross_entropy(self.pred, self.y, reduction="none"),
                                      cb.lam).mean()
                torch.testing.assert_close(cb.lf(self.pred, self.y), expected, rtol=1e-5, atol=1e-6)
                self.checked += 1

    loss_func = CrossEntropyLossFlat()
    cb = MixUp()
    check = Check(cb)
    run_batches(cb, loss_func, n_batches=2, extra_cbs=[check])
    assert check.checked == 2


def test_mixup_loss_formula_with_fixed_lambda_and_permutation():
    """Against the definition: lam-weighted smoothed one-hot targets, given the callback's own draw."""

    class Fixed(MixUp):
        def _draw(self, batch, device):
            lam = torch.linspace(0.5, 1.0, batch)
            return lam, torch.roll(torch.arange(batch), 3)

    dls = digits_dls(n_train=48, bs=24, shuffle=False)
    rec, learn = run_batches(Fixed(), nn.CrossEntropyLoss(label_smoothing=0.1), n_batches=1, dls=dls, lr=0.0)
    lam, perm = torch.linspace(0.5, 1.0, 24), torch.roll(torch.arange(24), 3)
    x, y = _X[:24], _Y[:24]
    lam4 = lam.view(-1, 1, 1, 1)
    x_mixed = lam4 * x + (1 - lam4) * x[perm]
    torch.testing.assert_close(rec.xs[0], x_mixed, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        logits = learn.model(x_mixed)
    soft = mixup_target(y, 10, lam, perm, label_smoothing=0.1)
    expected = SoftTargetCrossEntropy()(logits, soft)
    torch.testing.assert_close(rec.losses[0], expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# MixupCallback: timm semantics through a Mixup policy.
# --------------------------------------------------------------------------------------------------
class Capture(Callback):
    """Keeps the mixing callback's lam/perm and the raw targets of each training batch."""

    order = 1

    def __init__(self, cb):
        self.cb, self.draws = cb, []

    def before_batch(self):
        if self.training:
            self.draws.append((self.cb.lam.clone(), self.cb.perm, self.y.clone()))


@pytest.mark.parametrize("loss_func, extra", [
    (CrossEntropyLossFlat(), 0.0),
    (LabelSmoothingCrossEntropyFlat(eps=0.1), 0.1),
], ids=["CEFlat", "LabelSmoothingCEFlat"])
def test_mixup_callback_loss_is_timm_soft_target_ce(loss_func, extra):
    policy = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, mode="elem", label_smoothing=0.1, num_classes=10,
                   generator=torch.Generator().manual_seed(0))
    cb = MixupCallback(policy)
    cap = Capture(cb)
    rec, learn = run_batches(cb, loss_func, n_batches=3, lr=0.0, extra_cbs=[cap])
    total = 1 - (1 - 0.1) * (1 - extra)  # the policy's smoothing, then the loss's own
    for x, loss, (lam, perm, y) in zip(rec.xs, rec.losses, cap.draws):
        with torch.no_grad():
            logits = learn.model(x)
        expected = SoftTargetCrossEntropy()(logits, mixup_target(y, 10, lam, perm, label_smoothing=total))
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert learn.loss_func is loss_func


def test_mixup_callback_with_dense_targets_and_soft_target_loss():
    timm_loss = pytest.importorskip("timm.loss")

    def policy():
        return Mixup(mixup_alpha=1.0, label_smoothing=0.1, num_classes=10,
                     generator=torch.Generator().manual_seed(1))

    # one-hot float targets: the policy mixes them; a soft-target loss takes them as they are
    learn = Learner(digits_dls(n_train=64, bs=16, onehot=True), digits_model(),
                    loss_func=timm_loss.SoftTargetCrossEntropy(), cbs=MixupCallback(policy()))
    fit_quietly(learn)
    assert all(torch.isfinite(torch.tensor(learn.recorder.values[-1])))
    # integer targets with timm's SoftTargetCrossEntropy: dense mixed targets are built for it
    assert loss_kind(timm_loss.SoftTargetCrossEntropy())[0] == "soft"
    dls = digits_dls(n_train=48, bs=16, shuffle=False)
    ref, _ = run_batches(MixupCallback(policy()), CrossEntropyLossFlat(), dls=dls, lr=0.0)
    got, _ = run_batches(MixupCallback(policy()), timm_loss.SoftTargetCrossEntropy(), dls=dls, lr=0.0)
    for a, b in zip(got.losses, ref.losses):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_mixup_callback_off_switch_leaves_the_batch_alone():
    policy = Mixup(mixup_alpha=1.0, label_smoothing=0.0, num_classes=10)
    policy.mixup_enabled = False
    rec, _ = run_batches(MixupCallback(policy), nn.CrossEntropyLoss(), n_batches=2,
                         dls=digits_dls(n_train=48, bs=24, shuffle=False))
    torch.testing.assert_close(torch.cat(rec.xs), _X[:48])


def test_loss_kinds():
    assert loss_kind(CrossEntropyLossFlat()) == ("ce", 0.0, "mean")
    assert loss_kind(LabelSmoothingCrossEntropyFlat(eps=0.3)) == ("ce", 0.3, "mean")
    assert loss_kind(nn.CrossEntropyLoss(label_smoothing=0.2, reduction="sum")) == ("ce", 0.2, "sum")
    assert loss_kind(nn.CrossEntropyLoss(weight=torch.ones(10)))[0] == "other"  # weighted: loss lerp
    assert loss_kind(FocalLossFlat())[0] == "other"
    assert loss_kind(SoftTargetCrossEntropy())[0] == "ce"


def test_label_smoothing_maps_exactly_to_mixup_cross_entropy():
    # fastai: eps/K * sum_k(-log p_k) + (1 - eps) * nll == CE against timm's smoothed one-hot (off = eps/K)
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(7, 10, generator=g), torch.randint(0, 10, (7,), generator=g)
    lam, perm = torch.rand(7, generator=g), torch.randperm(7, generator=g)
    lf = LabelSmoothingCrossEntropyFlat(eps=0.25)
    lf.reduction = "none"
    fastai_form = torch.lerp(lf(logits, y[perm]), lf(logits, y), lam).mean()
    ours = mixup_cross_entropy(logits, y, lam, perm, label_smoothing=0.25)
    torch.testing.assert_close(ours, fastai_form, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Precision and memory format.
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["to_fp16", "to_bf16"])
def test_mixed_precision_learner(precision):
    # On a CPU-only machine fastai's MixedPrecision (CUDA autocast) is inert; on a GPU this is the real check.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dls = digits_dls(n_train=64, bs=16)
    dls.to(device)
    for cb in (MixUp(), CutMix()):
        learn = getattr(Learner(dls, digits_model().to(device), loss_func=nn.CrossEntropyLoss(), cbs=cb),
                        precision)()
        fit_quietly(learn)
        assert all(torch.isfinite(torch.tensor(learn.recorder.values[-1])))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_batches_and_logits(dtype):
    if dtype == torch.float16 and not torch.cuda.is_available():
        dtype_model = torch.float32  # fp16 convolutions are slow on CPU: fp16 inputs, fp32 model
    else:
        dtype_model = dtype

    class Cast(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            assert x.dtype == dtype
            return self.inner(x.to(dtype_model))

    dls = digits_dls(n_train=48, bs=24, shuffle=False, dtype=dtype)
    rec = Record()
    learn = Learner(dls, Cast(digits_model().to(dtype_model)), loss_func=nn.CrossEntropyLoss(),
                    cbs=[MixUp(), Reseed(), rec])
    fit_quietly(learn, one_cycle=False, lr=1e-3)
    assert all(x.dtype == dtype for x in rec.xs)
    assert all(torch.isfinite(loss) for loss in rec.losses)


def test_channels_last_batches_stay_channels_last():
    class ToChannelsLast(Callback):
        order = -10

        def before_batch(self):
            self.learn.xb = (self.xb[0].contiguous(memory_format=torch.channels_last),)

    dls = digits_dls(n_train=48, bs=24, shuffle=False)
    ref, _ = run_batches(MixUp(), nn.CrossEntropyLoss(), n_batches=2, dls=dls)
    for cb in (MixUp(), CutMix()):
        got, _ = run_batches(cb, nn.CrossEntropyLoss(), n_batches=2, dls=dls, extra_cbs=[ToChannelsLast()])
        assert all(x.is_contiguous(memory_format=torch.channels_last) for x in got.xs)
    got, _ = run_batches(MixUp(), nn.CrossEntropyLoss(), n_batches=2, dls=dls, extra_cbs=[ToChannelsLast()])
    for a, b in zip(got.xs, ref.xs):
        torch.testing.assert_close(a.contiguous(), b, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# fastai's own image pipeline.
# --------------------------------------------------------------------------------------------------
def test_image_data_loaders_from_folder(tmp_path):
    from fastai.vision.all import ImageDataLoaders, Resize
    from PIL import Image

    for split, start in (("train", 0), ("valid", 200)):
        for i in range(start, start + 22 if split == "train" else start + 6):
            d = tmp_path / split / str(int(_Y[i]) % 2)
            d.mkdir(parents=True, exist_ok=True)
            img = (_X[i, 0] * 255).to(torch.uint8).numpy()
            Image.fromarray(img).convert("RGB").save(d / f"{i}.png")
    dls = ImageDataLoaders.from_folder(tmp_path, train="train", valid="valid", bs=5, item_tfms=Resize(16),
                                       device="cpu", num_workers=0)
    for cb in (MixUp(), CutMix(), MixupCallback(Mixup(cutmix_alpha=1.0, num_classes=2))):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                              nn.Linear(8, 2))
        class Spy(Callback):
            order = 5  # right after the mixing callback

            def __init__(self):
                self.types = []

            def before_batch(self):
                self.types.append(type(self.xb[0]).__name__)

        spy = Spy()
        learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=[cb, spy])
        rec = Record()
        learn.add_cb(rec)
        fit_quietly(learn)
        assert rec.xs and all(x.shape[1:] == (3, 16, 16) for x in rec.xs)
        assert spy.types and set(spy.types) == {"TensorImage"}  # fastai's type survives the op
        assert all(torch.isfinite(torch.tensor(learn.recorder.values[-1])))


# --------------------------------------------------------------------------------------------------
# engine: fastai -- the recipe runner with a Learner and MixupCallback.
# --------------------------------------------------------------------------------------------------
_TIMING = ("images_per_s", "seconds")
_RECIPE = os.path.join(os.path.dirname(__file__), os.pardir, "recipes", "digits_fastai.yaml")


def _train(out, *overrides):
    from mixrecipe.train import main

    main([_RECIPE, f"output={out}", "data.train_subset=128", "batch_size=32", "progress=false", *overrides])
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def _same_metrics(a, b):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert set(ra) == set(rb)
        for k in ra:
            if k not in _TIMING:
                assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-9), k


@pytest.fixture(scope="module")
def fastai_two_epochs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fastai_engine")
    policy = ["mixup.cutmix_alpha=1.0", "mixup.mode=elem", "mixup.label_smoothing=0.1"]
    return out, _train(out, "epochs=2", *policy), policy


def test_engine_fastai_writes_the_outputs_and_matches_the_torch_engine(fastai_two_epochs, tmp_path):
    import yaml

    out, history, policy = fastai_two_epochs
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "mixup_preview.png", "last.pt", "best.pt",
                 "summary.json", "reliability.png"):
        assert os.path.getsize(out / name) > 0, name
    assert all(0 < r["val_ece"] < 100 and r["val_nll"] > 0 for r in history)
    with open(out / "config.yaml") as fh:
        assert yaml.safe_load(fh)["engine"] == "fastai"
    with open(out / "summary.json") as fh:
        summary = json.load(fh)
    assert summary["test_top1"] == history[-1]["val_top1"] and summary["engine"] == "fastai"
    assert summary["test_ece"] == history[-1]["val_ece"]
    # The same recipe through the default torch loop: the same numbers (same data order, init, draws).
    torch_history = _train(tmp_path / "torch", "engine=torch", "epochs=2", "preview=false", *policy)
    _same_metrics(history, torch_history)
    assert history[-1]["val_top1"] > 15.0  # 2 short epochs on 128 images: above chance (10%)


def test_engine_fastai_resumes_to_the_same_metrics(fastai_two_epochs, tmp_path, monkeypatch):
    _, history, policy = fastai_two_epochs

    import mixrecipe.fastai as callbacks

    class Killed(BaseException):  # like SIGKILL, in process: nothing after it runs (no cleanup, no save)
        pass

    steps, loss = [], callbacks.mixup_cross_entropy

    def dies_at_step_6(*args, **kwargs):  # the loss of every training step goes through MixupCallback
        steps.append(1)
        if len(steps) >= 6:
            raise Killed
        return loss(*args, **kwargs)

    monkeypatch.setattr(callbacks, "mixup_cross_entropy", dies_at_step_6)
    with pytest.raises(Killed):
        _train(tmp_path, "epochs=2", *policy)  # dies in epoch 2 (4 steps per epoch)
    monkeypatch.undo()
    with open(tmp_path / "metrics.jsonl") as fh:
        assert len(fh.readlines()) == 1
    resumed = _train(tmp_path, "epochs=2", "resume=true", *policy)
    _same_metrics(resumed, history)


def test_engine_fastai_erm_with_label_smoothing_matches_the_torch_engine(tmp_path):
    erm = ["epochs=1", "mixup.alpha=0", "mixup.label_smoothing=0.1", "preview=false"]
    _same_metrics(_train(tmp_path / "fastai", *erm), _train(tmp_path / "torch", "engine=torch", *erm))


def test_fastai_engine_reports_memorization_with_label_noise(tmp_path):
    import json

    from mixrecipe import train

    train.main(["digits_fastai", f"output={tmp_path}", "epochs=1", "data.label_noise=0.5",
                "data.train_subset=400", "progress=false", "preview=false"])
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("train_fit_noisy", "train_true_noisy", "train_fit_clean"):
        assert 0.0 <= record[key] <= 100.0, (key, record[key])
    # Half the labels are wrong: after one epoch the model cannot agree with both the given and true labels.
    assert record["train_fit_noisy"] + record["train_true_noisy"] <= 100.0


def test_engine_fastai_refuses_device_resident_data(tmp_path):
    """data.on_device=true is the torch loop's fused path: the fastai engine says so instead of ignoring it
    (null, the default, keeps the loader), before the output folder is touched."""
    from mixrecipe.config import RecipeError, load_config

    with pytest.raises(RecipeError, match="data.on_device=true is supported by engine=torch only"):
        load_config(_RECIPE, [f"output={tmp_path / 'run'}", "data.on_device=true"])
    assert not (tmp_path / "run").exists()
