"""The same bad argument gets the same answer at every public entry point (rules: mixrecipe.checks).

Each bad value is fed to every entry point that takes the argument; all must raise the same exception
type (TypeError for the wrong kind of value, ValueError for a value out of range, of the wrong shape or on
the wrong device), with a message naming the argument.
"""

import importlib
import math

import pytest
import torch

import mixrecipe
from mixrecipe.loss import SoftTargetCrossEntropy

B, K = 4, 5
X = torch.rand(B, 3, 8, 8)
T = torch.tensor([0, 1, 2, 3])
LOGITS = torch.randn(B, K)


# Entry points of the optional integrations: "fastai.MixUp" lives in mixrecipe.fastai, and so on.
INTEGRATIONS = {"fastai": "fastai", "lightning": "Lightning", "transforms": "torchvision"}


def _integration(name: str):
    """mixrecipe.<name>, or None where the library it integrates with is not installed (optional)."""
    try:
        return importlib.import_module(f"mixrecipe.{name}")
    except ImportError:
        return None


def _fastai():
    return _integration("fastai")


def _lightning():
    return _integration("lightning")


def _transforms():
    return _integration("transforms")


def _missing(entry: str) -> str | None:
    """Why ``entry`` cannot be called here (its optional library is not installed), or None."""
    prefix = entry.split(".", 1)[0]
    if prefix in INTEGRATIONS and _integration(prefix) is None:
        return f"{INTEGRATIONS[prefix]} is not installed (optional dependency): {entry} cannot be called"
    return None


# argument -> {entry point name: call taking the bad value}
ENTRY_POINTS = {
    "label_smoothing": {
        "mix": lambda v: mixrecipe.mix(X, T, 0.5, num_classes=K, label_smoothing=v),
        "mixup": lambda v: mixrecipe.mixup(X, T, 0.5, num_classes=K, label_smoothing=v),
        "mixup_target": lambda v: mixrecipe.mixup_target(T, K, 0.5, None, v),
        "cutmix": lambda v: mixrecipe.cutmix(X, T, num_classes=K, label_smoothing=v),
        "Mixup": lambda v: mixrecipe.Mixup(label_smoothing=v, num_classes=K),
        "mixup_cross_entropy": lambda v: mixrecipe.mixup_cross_entropy(LOGITS, T, 0.5, label_smoothing=v),
        "transforms.MixUp": lambda v: _transforms().MixUp(num_classes=K, label_smoothing=v),
        "transforms.CutMix": lambda v: _transforms().CutMix(num_classes=K, label_smoothing=v),
    },
    "lam": {
        "mix": lambda v: mixrecipe.mix(X, T, v, num_classes=K),
        "mix(lam_y)": lambda v: mixrecipe.mix(X, T, 0.5, v, num_classes=K),
        "mixup": lambda v: mixrecipe.mixup(X, T, v, num_classes=K),
        "mixup_target": lambda v: mixrecipe.mixup_target(T, K, v),
        "cutmix": lambda v: mixrecipe.cutmix(X, T, lam=v, num_classes=K),
        "mixup_cross_entropy": lambda v: mixrecipe.mixup_cross_entropy(LOGITS, T, v),
    },
    "perm": {
        "mix": lambda v: mixrecipe.mix(X, T, 0.5, None, v, num_classes=K),
        "mixup": lambda v: mixrecipe.mixup(X, T, 0.5, v, num_classes=K),
        "mixup_target": lambda v: mixrecipe.mixup_target(T, K, 0.5, v),
        "cutmix": lambda v: mixrecipe.cutmix(X, T, perm=v, num_classes=K),
        "mixup_cross_entropy": lambda v: mixrecipe.mixup_cross_entropy(LOGITS, T, 0.5, v),
    },
    "num_classes": {
        "mix": lambda v: mixrecipe.mix(X, T, 0.5, num_classes=v),
        "mixup": lambda v: mixrecipe.mixup(X, T, 0.5, num_classes=v),
        "mixup_target": lambda v: mixrecipe.mixup_target(T, v, 0.5),
        "cutmix": lambda v: mixrecipe.cutmix(X, T, num_classes=v),
        "Mixup": lambda v: mixrecipe.Mixup(num_classes=v),
        "lightning.MixupCallback": lambda v: _lightning().MixupCallback(num_classes=v),
        "lightning.MixupCallback(mixup=Mixup)": lambda v: _lightning().MixupCallback(
            mixrecipe.Mixup(num_classes=K), num_classes=v),
        "transforms.MixUp": lambda v: _transforms().MixUp(num_classes=v),
        "transforms.CutMix": lambda v: _transforms().CutMix(num_classes=v),
    },
    "target": {
        "mix": lambda v: mixrecipe.mix(X, v, 0.5, num_classes=K),
        "mixup": lambda v: mixrecipe.mixup(X, v, 0.5, num_classes=K),
        "mixup_target": lambda v: mixrecipe.mixup_target(v, K, 0.5),
        "cutmix": lambda v: mixrecipe.cutmix(X, v, num_classes=K),
        "mixup_cross_entropy": lambda v: mixrecipe.mixup_cross_entropy(LOGITS, v, 0.5),
    },
    "alpha": {
        "sample_beta": lambda v: mixrecipe.sample_beta(v),
        "cutmix": lambda v: mixrecipe.cutmix(X, T, alpha=v, num_classes=K),
        "Mixup(mixup_alpha)": lambda v: mixrecipe.Mixup(mixup_alpha=v, num_classes=K),
        "Mixup(cutmix_alpha)": lambda v: mixrecipe.Mixup(cutmix_alpha=v, num_classes=K),
        "fastai.MixUp": lambda v: _fastai().MixUp(v),
        "fastai.CutMix": lambda v: _fastai().CutMix(v),
        "lightning.MixupCallback": lambda v: _lightning().MixupCallback(alpha=v, num_classes=K),
        "transforms.MixUp": lambda v: _transforms().MixUp(alpha=v, num_classes=K),
        "transforms.CutMix": lambda v: _transforms().CutMix(alpha=v, num_classes=K),
    },
    "pairing": {
        "Mixup": lambda v: mixrecipe.Mixup(pairing=v, num_classes=K),
        "transforms.MixUp": lambda v: _transforms().MixUp(pairing=v, num_classes=K),
        "transforms.CutMix": lambda v: _transforms().CutMix(pairing=v, num_classes=K),
    },
    "log_every_n_steps": {
        "lightning.MixupCallback": lambda v: _lightning().MixupCallback(num_classes=K, log_every_n_steps=v),
    },
    "reduction": {
        "mixup_cross_entropy": lambda v: mixrecipe.mixup_cross_entropy(LOGITS, T, 0.5, reduction=v),
        "SoftTargetCrossEntropy": lambda v: SoftTargetCrossEntropy(v),
    },
}

# argument -> [(bad value, exception type)]
BAD_VALUES = {
    "label_smoothing": [(True, TypeError), ("0.1", TypeError), (None, TypeError), (1.5, ValueError),
                        (-0.1, ValueError), (math.nan, ValueError)],
    "lam": [(True, TypeError), ("0.5", TypeError), (torch.tensor([1, 0, 1, 0]), TypeError),
            (1.5, ValueError), (math.nan, ValueError), (torch.rand(3), ValueError),
            (torch.rand(B, 1), ValueError), (torch.tensor([0.1, 0.2, 1.2, 0.3]), ValueError)],
    "perm": [([3, 2, 1, 0], TypeError), (torch.arange(4.0), TypeError), (torch.arange(3), ValueError),
             (torch.tensor([0, 0, 1, 2]), ValueError), (torch.tensor([0, 1, 2, 4]), ValueError)],
    "num_classes": [(2.5, TypeError), (True, TypeError), ("5", TypeError), (0, ValueError), (-1, ValueError),
                    (-3, ValueError)],
    "target": [([0, 1, 2, 3], TypeError), (torch.rand(B), TypeError),
               (torch.ones(B, dtype=torch.bool), TypeError),
               (torch.zeros(B, 1, 1, dtype=torch.long), ValueError), (torch.tensor([0, 1, 2, K]), ValueError),
               (torch.tensor([0, -1, 2, 3]), ValueError)],
    "alpha": [("1", TypeError), (True, TypeError), (-1.0, ValueError), (math.nan, ValueError),
              (math.inf, ValueError)],
    "reduction": [("avg", ValueError), (None, ValueError), ("MEAN", ValueError)],
    "pairing": [("random_pairs", ValueError), ("FLIP", ValueError), (None, ValueError), (1, ValueError)],
    "log_every_n_steps": [(1.5, TypeError), (True, TypeError), ("10", TypeError), (None, TypeError),
                          (-1, ValueError)],
}

CASES = [(arg, entry, i) for arg, entries in ENTRY_POINTS.items() for entry in entries
         for i in range(len(BAD_VALUES[arg]))]


@pytest.mark.parametrize("arg, entry, i", CASES, ids=[f"{a}-{e}-{i}" for a, e, i in CASES])
def test_same_bad_input_same_error_everywhere(arg, entry, i):
    if _missing(entry):
        pytest.skip(_missing(entry))
    value, error = BAD_VALUES[arg][i]
    with pytest.raises((TypeError, ValueError)) as info:
        ENTRY_POINTS[arg][entry](value)
    assert type(info.value) is error, f"{entry}({arg}={value!r}) raised {info.type.__name__}: {info.value}"
    assert arg in str(info.value), f"{entry}({arg}={value!r}): the message does not name {arg}: {info.value}"


def test_good_values_pass_every_entry_point():
    # The bad values above fail because they are bad: the same calls with good values work.
    good = {"label_smoothing": 0.1, "lam": 0.5, "perm": torch.tensor([3, 2, 1, 0]), "num_classes": K,
            "target": T, "alpha": 0.4, "reduction": "sum", "pairing": "flip", "log_every_n_steps": 10}
    for arg, entries in ENTRY_POINTS.items():
        for entry, call in entries.items():
            if _missing(entry):
                continue
            call(good[arg])
