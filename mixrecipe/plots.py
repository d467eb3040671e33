"""The run's pictures: ``curves.png`` (loss and accuracy per epoch), ``mixup_preview.png`` and
``reliability.png`` (confidence against accuracy).

matplotlib is imported lazily with the Agg backend, so training on a headless machine never needs a display.
Both files are written atomically (to a temporary name, then renamed).
"""

from __future__ import annotations

import math
import os

__all__ = ["plot_curves", "plot_mixup_preview", "mixup_preview_figure", "plot_reliability"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    os.replace(tmp, path)


def plot_curves(history: list[dict], path: str) -> None:
    """Loss (train and val) and validation accuracy (top-1, top-5) against the epoch.

    Args:
        history: the metrics.jsonl records, one per epoch.
        path: the PNG to write.
    """
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train (mixed targets)")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.set_title("loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [h["val_top1"] for h in history], "o-", label="val top-1")
    ax_acc.plot(epochs, [h["val_top5"] for h in history], "o-", label="val top-5")
    if history and "train_fit_noisy" in history[0]:
        ax_acc.plot(epochs, [h["train_fit_noisy"] for h in history], "o--",
                    label="train: corrupted labels fitted")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("%")
    ax_acc.set_title("accuracy")
    ax_acc.legend()
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def mixup_preview_figure(images, labels_a, labels_b, lam, classes, title: str = "", cols: int = 4):
    """A matplotlib Figure: mixed images in a grid, each titled with its two labels and their weights.

    Made without pyplot (no backend switch, nothing left open): ``plot_mixup_preview`` saves it, the
    Lightning callback draws it into an array for the logger.

    Args:
        images: (N, C, H, W) float tensor in [0, 1] (already de-normalized).
        labels_a, labels_b: (N,) class indices of each image and of its partner.
        lam: (N,) weight of labels_a.
        classes: class names.
        title: figure title.
        cols: images per row.
    """
    from matplotlib.figure import Figure

    n = images.shape[0]
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(2.6 * cols, 2.9 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        ax = axes.flat[i]
        img = images[i].detach().float().clamp(0, 1).cpu()
        if img.shape[0] == 1:
            ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(img.permute(1, 2, 0).numpy())
        a, b, w = int(labels_a[i]), int(labels_b[i]), float(lam[i])
        if a == b:
            text = f"{classes[a]} 1.00\n(λ={w:.2f}, same class)"
        else:
            parts = sorted([(w, classes[a]), (1.0 - w, classes[b])], reverse=True)  # dominant label first
            text = "\n".join(f"{name} {weight:.2f}" for weight, name in parts)
        ax.set_title(text, fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_mixup_preview(images, labels_a, labels_b, lam, classes, path: str, title: str = "", cols: int = 4):
    """Write :func:`mixup_preview_figure` to ``path`` (PNG, atomically); same arguments plus the path."""
    _save(mixup_preview_figure(images, labels_a, labels_b, lam, classes, title=title, cols=cols), path)


def plot_reliability(bins, path: str, title: str = "") -> float:
    """A reliability diagram: accuracy against confidence per equal-width bin, the gap to the diagonal shaded.

    Args:
        bins: (3, n_bins) [count, sum of confidence, sum of correct] per bin
            (:func:`mixrecipe.metrics.calibration_bins`).
        path: the PNG to write.
        title: the first title line; the ECE and the number of predictions are added below it.

    Returns:
        The ECE (a fraction), as written in the title.
    """
    import torch

    from .metrics import ece_from_bins

    plt = _pyplot()
    bins = torch.as_tensor(bins, dtype=torch.float64).cpu()
    count, conf_sum, correct_sum = bins
    n_bins = bins.shape[1]
    width = 1.0 / n_bins
    lo = torch.arange(n_bins, dtype=torch.float64) * width
    filled = count > 0
    acc = torch.where(filled, correct_sum / count.clamp(min=1), torch.zeros_like(count))
    conf = torch.where(filled, conf_sum / count.clamp(min=1), lo + width / 2)
    ece = ece_from_bins(bins)
    n = int(count.sum().item())

    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(5.2, 6.2), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls="--", color="gray", lw=1, label="perfect calibration")
    ax.bar(lo[filled].tolist(), acc[filled].tolist(), width=width, align="edge", color="tab:blue",
           edgecolor="black", lw=0.6, label="accuracy")
    gap_lo = torch.minimum(acc, conf)[filled].tolist()
    gap_h = (acc - conf).abs()[filled].tolist()
    ax.bar(lo[filled].tolist(), gap_h, bottom=gap_lo, width=width, align="edge", color="tab:red", alpha=0.3,
           edgecolor="tab:red", hatch="//", lw=0.6, label="gap to mean confidence")
    ax.plot(conf[filled].tolist(), conf[filled].tolist(), "k.", ms=4)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    head = f"{title}\n" if title else ""
    ax.set_title(f"{head}ECE {100 * ece:.2f}% ({n_bins} bins, {n:,} predictions)", fontsize=10)
    ax_n.bar(lo.tolist(), (count / max(n, 1)).tolist(), width=width, align="edge", color="gray",
             edgecolor="black", lw=0.6)
    ax_n.set_xlabel("confidence (maximum softmax probability)")
    ax_n.set_ylabel("share of predictions")
    ax_n.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return ece
