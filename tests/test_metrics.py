"""mixrecipe.metrics: ECE on hand-made predictions and against a straightforward loop over bins, NLL, AUROC
against scikit-learn, and FGSM on a trained toy model."""

import math

import pytest
import torch
import torch.nn.functional as F

from mixrecipe.metrics import (
    auroc,
    calibration_bins,
    ece_from_bins,
    expected_calibration_error,
    fgsm,
    max_softmax,
    nll,
)


def _probs(conf_and_class, k=3):
    """Rows whose maximum is ``conf`` at ``cls``, the rest spread evenly over the other classes."""
    rows = []
    for conf, cls in conf_and_class:
        row = torch.full((k,), (1.0 - conf) / (k - 1), dtype=torch.float64)
        row[cls] = conf
        rows.append(row)
    return torch.stack(rows)


# PyTorch reference: the textbook definition, one bin at a time (Guo et al. 2017).
def _ece_loop(probs, target, n_bins):
    conf, pred = probs.double().max(dim=1)
    correct = (pred == target).double()
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            gap = abs(correct[in_bin].mean().item() - conf[in_bin].mean().item())
            total += in_bin.double().mean().item() * gap
    return total


def test_ece_of_hand_made_predictions():
    # Two at confidence 0.9 (one right: accuracy 0.5, gap 0.4) and two at 0.6 (both right: gap 0.4).
    probs = _probs([(0.9, 0), (0.9, 1), (0.6, 2), (0.6, 0)])
    target = torch.tensor([0, 2, 2, 0])
    assert expected_calibration_error(probs, target, n_bins=15) == pytest.approx(0.4, abs=1e-12)
    # Perfectly calibrated: 4 at 0.75 with 3 right.
    probs = _probs([(0.75, 0)] * 4)
    assert expected_calibration_error(probs, torch.tensor([0, 0, 0, 1]), n_bins=10) == pytest.approx(0.0)
    # Always right at confidence 1: ECE 0; always wrong at 1: ECE 1.
    one = torch.eye(3, dtype=torch.float64)
    assert expected_calibration_error(one, torch.tensor([0, 1, 2])) == 0.0
    assert expected_calibration_error(one, torch.tensor([1, 2, 0])) == 1.0


def test_bins_are_half_open_lo_exclusive_hi_inclusive():
    # With 3 bins, a confidence of exactly 2/3 belongs to (1/3, 2/3], not to (2/3, 1].
    probs = _probs([(2 / 3, 0), (2 / 3 + 1e-9, 0), (0.5, 1)], k=3)
    bins = calibration_bins(probs, torch.tensor([0, 0, 1]), n_bins=3)
    assert bins[0].tolist() == [0.0, 2.0, 1.0]
    # By hand: bin 2 holds 2/3 and 0.5 (both right): accuracy 1, confidence 7/12, gap 5/12, weight 2/3;
    # bin 3 holds 2/3 + 1e-9 (right): gap 1/3 - 1e-9, weight 1/3.
    expected = (2 / 3) * (5 / 12) + (1 / 3) * (1 / 3 - 1e-9)
    assert ece_from_bins(bins) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n_bins", [1, 10, 15, 20])
def test_ece_matches_a_loop_over_bins_on_random_predictions(n_bins):
    g = torch.Generator().manual_seed(n_bins)
    logits = torch.randn(5000, 10, generator=g, dtype=torch.float64) * 3
    target = torch.randint(0, 10, (5000,), generator=g)
    probs = logits.softmax(dim=1)
    ece = expected_calibration_error(probs, target, n_bins)
    assert ece == pytest.approx(_ece_loop(probs, target, n_bins), abs=1e-12)
    assert 0.0 < ece < 1.0
    # Bin sums add up over batches (and processes): halves give the whole.
    halves = (calibration_bins(probs[:1234], target[:1234], n_bins)
              + calibration_bins(probs[1234:], target[1234:], n_bins))
    assert ece_from_bins(halves) == pytest.approx(ece, abs=1e-12)
    # numpy arrays are accepted too
    assert expected_calibration_error(probs.numpy(), target.numpy(), n_bins) == ece


def test_ece_rejects_bad_shapes():
    with pytest.raises(ValueError, match="probs"):
        expected_calibration_error(torch.rand(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="target"):
        expected_calibration_error(torch.rand(4, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error(torch.rand(4, 3), torch.zeros(4, dtype=torch.long), n_bins=0)


def test_nll_is_the_mean_negative_log_probability_of_the_true_class():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    target = torch.tensor([0, 2])
    p = logits.softmax(dim=1)
    expected = -(math.log(p[0, 0].item()) + math.log(p[1, 2].item())) / 2
    assert nll(logits, target) == pytest.approx(expected, rel=1e-6)


def test_auroc_matches_scikit_learn_with_ties():
    from sklearn.metrics import roc_auc_score  # a dependency of mixrecipe (the digits data set)

    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 20, (300,), generator=g).double()  # many ties
    neg = torch.randint(0, 15, (200,), generator=g).double()
    labels = [1] * 300 + [0] * 200
    ref = roc_auc_score(labels, torch.cat([pos, neg]).numpy())
    assert auroc(pos, neg) == pytest.approx(ref, abs=1e-12)
    assert auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert auroc(torch.tensor([0.0]), torch.tensor([1.0])) == 0.0
    assert auroc(torch.tensor([1.0]), torch.tensor([1.0])) == 0.5


def test_max_softmax():
    assert max_softmax(torch.zeros(2, 4)).tolist() == [0.25, 0.25]


def _toy_model():
    """A logistic regression trained to separate two classes of 4x4 'images' in [0, 1] by brightness."""
    g = torch.Generator().manual_seed(0)
    n = 400
    y = torch.randint(0, 2, (n,), generator=g)
    x = (0.45 + 0.1 * y.float()).view(n, 1, 1, 1) + 0.1 * torch.randn(n, 1, 4, 4, generator=g)
    x = x.clamp(0, 1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), x, y


def test_fgsm_lowers_the_accuracy_of_a_trained_model():
    model, x, y = _toy_model()
    clean = (model(x).argmax(1) == y).float().mean().item()
    assert clean > 0.9
    accs = []
    for eps in (0.0, 0.05, 0.15):
        x_adv = fgsm(model, x, y, eps)
        assert x_adv.min() >= 0 and x_adv.max() <= 1 and not x_adv.requires_grad
        assert (x_adv - x).abs().max() <= eps + 1e-6
        accs.append((model(x_adv).argmax(1) == y).float().mean().item())
    assert accs[0] == clean
    # Class means 0.1 apart (a mean over 16 pixels, noise std 0.025): 0.05 flips many, 0.15 nearly all.
    assert accs[1] < clean - 0.2 and accs[2] < 0.1
    # A random-sign step of the same size hurts far less: the gradient's direction is what matters.
    g = torch.Generator().manual_seed(1)
    noisy = (x + 0.05 * torch.randint(0, 2, x.shape, generator=g).mul(2).sub(1)).clamp(0, 1)
    assert (model(noisy).argmax(1) == y).float().mean().item() > accs[1] + 0.05
    with pytest.raises(ValueError, match="eps"):
        fgsm(model, x, y, -0.1)
