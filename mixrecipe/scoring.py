"""Evaluation of predictions, the same for every engine: accuracy, loss, calibration and label-noise
memorization.

Both functions take an iterable of (float32 logits, targets) batches (an engine's ``predict``), sum on the
device in float64 and reduce the sums over ranks, so a sharded evaluation gives the numbers of one process
evaluating everything.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from .distributed import DistContext, all_sum
from .metrics import calibration_bins, ece_from_bins

__all__ = ["ECE_BINS", "evaluate", "memorization"]

ECE_BINS = 15  # equal-width confidence bins of val_ece / test_ece and reliability.png


def evaluate(batches: Iterable[tuple[Tensor, Tensor]], d: DistContext,
             prefix: str = "val") -> tuple[dict, Tensor]:
    """Top-1 and top-5 accuracy (%), mean cross-entropy (NLL) and ECE (%) over all ranks' batches.

    Returns:
        ``{prefix_loss, prefix_top1, prefix_top5, prefix_nll, prefix_ece}`` (``prefix_nll`` is
        ``prefix_loss``, named for what it measures), and the (3, ECE_BINS) calibration sums behind the ECE
        (on the CPU, summed over ranks; :func:`mixrecipe.metrics.calibration_bins`) for a reliability
        diagram.
    """
    sums = torch.zeros(4, dtype=torch.float64, device=d.device)  # loss, top-1, top-5, count
    bins = torch.zeros(3, ECE_BINS, dtype=torch.float64, device=d.device)
    for logits, y in batches:
        hit = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]
        sums += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(),
                             hit[:, 0].sum().double(), hit.any(dim=1).sum().double(),
                             torch.tensor(float(y.shape[0]), dtype=torch.float64, device=y.device)])
        bins += calibration_bins(logits.softmax(dim=1), y, ECE_BINS)
    totals = all_sum(sums.tolist() + bins.flatten().tolist(), d)  # one reduction for both
    loss, c1, c5, n = totals[:4]
    bins = torch.tensor(totals[4:], dtype=torch.float64).view(3, ECE_BINS)
    n = max(n, 1.0)
    return ({f"{prefix}_loss": loss / n, f"{prefix}_top1": 100.0 * c1 / n, f"{prefix}_top5": 100.0 * c5 / n,
             f"{prefix}_nll": loss / n, f"{prefix}_ece": 100.0 * ece_from_bins(bins)}, bins)


def memorization(batches: Iterable[tuple[Tensor, Tensor]], d: DistContext) -> dict:
    """On the un-augmented training set with label noise, how much of the noise the model has fitted.

    Targets are (B, 2) = (given label, true label). ``train_fit_noisy``: % of corrupted samples predicted
    as their corrupted (training) label; ``train_true_noisy``: % of them predicted as their true label;
    ``train_fit_clean``: % of clean samples predicted as their label.
    """
    sums = torch.zeros(5, dtype=torch.float64, device=d.device)
    for logits, y in batches:
        pred = logits.argmax(dim=1)
        given, true = y[:, 0], y[:, 1]
        noisy = given != true
        sums += torch.stack([noisy.sum(), (noisy & (pred == given)).sum(), (noisy & (pred == true)).sum(),
                             (~noisy).sum(), (~noisy & (pred == given)).sum()]).double()
    n_noisy, fit_noisy, true_noisy, n_clean, fit_clean = all_sum(sums.tolist(), d)
    return {"train_fit_noisy": 100.0 * fit_noisy / max(n_noisy, 1.0),
            "train_true_noisy": 100.0 * true_noisy / max(n_noisy, 1.0),
            "train_fit_clean": 100.0 * fit_clean / max(n_clean, 1.0)}
