"""Beyond top-1: calibration, adversarial robustness and out-of-distribution detection.

- :func:`expected_calibration_error`: the standard ECE (Guo et al. 2017; Naeini et al. 2015): predictions
  grouped by confidence (the maximum softmax probability) into ``n_bins`` equal-width bins (lo, hi], then
  ``sum_b |B_b| / n * |accuracy(B_b) - mean confidence(B_b)|``.
  :func:`calibration_bins` gives the per-bin sums, which add up across batches and processes, and
  :func:`ece_from_bins` turns them into the ECE.
- :func:`nll`: mean negative log-likelihood of the true class (cross-entropy on the logits).
- :func:`fgsm`: the fast gradient sign method (Goodfellow et al. 2015), in [0, 1] pixel units before
  normalization, clamped to the valid pixel range.
- :func:`auroc`: area under the ROC curve of in- vs out-of-distribution scores (ties count one half), the
  usual measure of detection by maximum softmax probability (Hendrycks and Gimpel 2017).

Only torch is needed; nothing here knows about recipes or run directories.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "calibration_bins",
    "ece_from_bins",
    "expected_calibration_error",
    "nll",
    "fgsm",
    "auroc",
    "max_softmax",
]


def _as_tensors(probs, target) -> tuple[Tensor, Tensor]:
    """Tensors from tensors or array-likes (numpy arrays, lists); checks the shapes."""
    probs = torch.as_tensor(probs)
    target = torch.as_tensor(target, device=probs.device)
    _check_probs(probs, target)
    return probs, target.long()


def _check_probs(probs: Tensor, target: Tensor) -> None:
    if probs.ndim != 2:
        raise ValueError(f"probs must be (N, K), got shape {tuple(probs.shape)}")
    if target.ndim != 1 or target.shape[0] != probs.shape[0]:
        raise ValueError(f"target must be (N,) matching probs' N={probs.shape[0]}, got {tuple(target.shape)}")


def calibration_bins(probs: Tensor, target: Tensor, n_bins: int = 15) -> Tensor:
    """Per-bin sums for the ECE: a float64 (3, n_bins) tensor of [count, sum of confidence, sum of correct].

    Bin b holds the predictions whose confidence c satisfies b/n_bins < c <= (b+1)/n_bins; a confidence of
    exactly 0 (impossible for a softmax) goes to the first bin. The sums of two batches add up to the sums
    of their union, so they can be accumulated over batches and all-reduced over processes. Rows that are
    not finite (a diverged model) count in the first bin and make its confidence sum NaN: the ECE is then
    NaN, not a number that looks fine.

    Args:
        probs: (N, K) class probabilities (rows sum to 1); a tensor or an array-like.
        target: (N,) true class indices.
        n_bins: number of equal-width confidence bins on [0, 1].
    """
    probs, target = _as_tensors(probs, target)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    probs = probs.detach().double()
    conf, pred = probs.max(dim=1)
    correct = (pred == target).double()
    # (lo, hi]: ceil(c * n) - 1; c = 0 lands in bin 0. A NaN confidence (a diverged model) is binned
    # as 0 so the sums stay indexable; its NaN then makes the confidence sum, and the ECE, NaN.
    idx = (torch.ceil(conf.nan_to_num(0.0) * n_bins) - 1).clamp(0, n_bins - 1).long()
    out = torch.zeros(3, n_bins, dtype=torch.float64, device=probs.device)
    out[0].index_add_(0, idx, torch.ones_like(conf))
    out[1].index_add_(0, idx, conf)
    out[2].index_add_(0, idx, correct)
    return out


def ece_from_bins(bins: Tensor) -> float:
    """The ECE (a fraction in [0, 1]) from :func:`calibration_bins` sums; 0 for no predictions."""
    count, conf, correct = bins.double().cpu()
    n = count.sum().item()
    if n == 0:
        return 0.0
    return (correct - conf).abs().sum().item() / n


def expected_calibration_error(probs: Tensor, target: Tensor, n_bins: int = 15) -> float:
    """Expected calibration error with ``n_bins`` equal-width confidence bins (lo, hi].

    Args:
        probs: (N, K) class probabilities (softmax outputs).
        target: (N,) true class indices.
        n_bins: number of bins.

    Returns:
        The ECE as a fraction in [0, 1] (multiply by 100 for percent).
    """
    return ece_from_bins(calibration_bins(probs, target, n_bins))


def nll(logits: Tensor, target: Tensor) -> float:
    """Mean negative log-likelihood of the true class, from logits (natural log)."""
    logits, target = _as_tensors(logits, target)
    return F.cross_entropy(logits.detach().double(), target, reduction="mean").item()


def max_softmax(logits: Tensor) -> Tensor:
    """The maximum softmax probability of each row: the baseline out-of-distribution score."""
    return logits.detach().float().softmax(dim=1).max(dim=1).values


def fgsm(forward, x: Tensor, target: Tensor, eps: float) -> Tensor:
    """One FGSM step: ``clamp(x + eps * sign(grad_x CE(forward(x), target)), 0, 1)``.

    Args:
        forward: maps [0, 1]-valued images to logits (normalization included), e.g. a model behind a
            normalizing wrapper; it is called once, with gradients on.
        x: (N, ...) float images in [0, 1].
        target: (N,) true class indices.
        eps: the step in [0, 1] pixel units (8/255 moves each pixel by at most 8 grey levels).

    Returns:
        The perturbed images, detached, in [0, 1]; ``x`` itself when ``eps`` is 0.
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if eps == 0:
        return x.detach()
    x_adv = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(forward(x_adv).float(), target, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_adv)
    return (x.detach() + eps * grad.sign()).clamp_(0.0, 1.0)


def auroc(positive: Tensor, negative: Tensor) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counted one half.

    Args:
        positive: (P,) scores of the in-distribution samples (expected higher).
        negative: (Q,) scores of the out-of-distribution samples.

    Returns:
        The AUROC in [0, 1]; 0.5 means the scores do not separate the two sets.
    """
    pos = torch.as_tensor(positive).detach().double().flatten().cpu()
    neg = torch.as_tensor(negative).detach().double().flatten().cpu().sort().values
    if pos.numel() == 0 or neg.numel() == 0:
        raise ValueError("auroc needs at least one positive and one negative score")
    below = torch.searchsorted(neg, pos, right=False).double()  # negatives strictly below each positive
    upto = torch.searchsorted(neg, pos, right=True).double()  # ... and those equal to it
    return ((below + 0.5 * (upto - below)).sum() / (pos.numel() * neg.numel())).item()
