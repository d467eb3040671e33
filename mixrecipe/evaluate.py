"""Evaluate a finished run: ``python -m mixrecipe.evaluate RUN_DIR [key=value ...]``.

Loads the run's ``config.yaml`` and its best checkpoint (``best.pt``, else ``last.pt``), then measures on
the run's test set (with ``data.val_size: 0`` the validation set is the test set):

- clean top-1 (%), negative log-likelihood, expected calibration error (%, 15 equal-width bins);
- FGSM top-1 (%) at several ε, in [0, 1] pixel units applied to the image *before* normalization and
  clamped to [0, 1] (ε = 8/255 moves each pixel by at most 8 grey levels);
- out-of-distribution detection: AUROC of the maximum softmax probability, the run's test images against
  a second data set (Fashion-MNIST recipes: scikit-learn's digits resized to 28x28; digits recipes:
  Fashion-MNIST resized to 8x8 when installed; otherwise, or for other data sets, uniform noise images,
  and the output says so).

Writes ``RUN_DIR/evaluation.json`` and prints a one-screen table. Keys: ``eps=0,1/255,2/255`` (the FGSM
steps), ``ood=auto|digits|fashion_mnist|noise|none``, ``checkpoint=best|last``, ``n_bins=15``,
``batch_size=500``, ``progress=true`` (a line on stderr as each measurement starts); any other
``key=value`` overrides the run's config (``data.root=...``, ``device=cpu``).
A missing or unfinished run directory, or a bad key, exits with status 2 and a one-line message.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from .config import DataConfig, RecipeError, load_config
from .distributed import wants_cuda
from .metrics import auroc, calibration_bins, ece_from_bins, fgsm, max_softmax
from .outputs import load_checkpoint, write_summary

__all__ = ["EvalOptions", "load_run", "evaluate_run", "main", "DEFAULT_EPS"]

DEFAULT_EPS = (0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255)
OOD_CHOICES = ("auto", "digits", "fashion_mnist", "noise", "none")


@dataclass
class EvalOptions:
    """The evaluation's own keys (everything else on the command line overrides the run's config)."""

    eps: list[float] = field(default_factory=lambda: list(DEFAULT_EPS))
    ood: str = "auto"
    checkpoint: str = "best"
    n_bins: int = 15
    batch_size: int = 500
    progress: bool = True  # a line on stderr as each measurement starts (FGSM on a big model takes minutes)


# ----------------------------------------------------------------------------------------------------
# The run: its config, data and trained model (the only place that uses the training code)


def load_run(run_dir: str, overrides: list[str], checkpoint: str = "best"):
    """(config, data bundle, model in eval mode on CPU, checkpoint path, checkpoint state) of a finished run.

    Raises:
        RecipeError: not a run directory, no checkpoint, an unfinished run, a bad override, missing data.
    """
    from .data import build_data
    from .models import create_model

    if not os.path.isdir(run_dir):
        raise RecipeError(f"{run_dir} is not a directory (expected a run directory of mixrecipe.train)")
    cfg_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise RecipeError(f"{run_dir} is not a run directory: it has no config.yaml")
    last, best = os.path.join(run_dir, "last.pt"), os.path.join(run_dir, "best.pt")
    if not os.path.isfile(last):
        raise RecipeError(f"{run_dir} has no checkpoint (last.pt): the run never finished an epoch")
    state = load_checkpoint(last)
    done, planned = state.get("epoch", 0), state.get("epochs", 0)
    if done < planned:
        raise RecipeError(f"{run_dir} holds an unfinished run ({done}/{planned} epochs): finish it with "
                          f"python -m mixrecipe.train {cfg_path} output={run_dir} resume=true")
    path = best if checkpoint == "best" and os.path.isfile(best) else last
    if path != last:
        state = load_checkpoint(path)
    cfg = load_config(cfg_path, [*overrides, f"output={run_dir}"])
    bundle = build_data(cfg.data)
    model = create_model(cfg.model, bundle.num_classes, bundle.in_chans, False, img_size=bundle.input_size[0])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise RecipeError(f"{path} does not fit the model of {cfg_path} ({cfg.model}): {exc}") from None
    return cfg, bundle, model.eval(), path, state


# ----------------------------------------------------------------------------------------------------
# Measurements


class _Normalized(nn.Module):
    """[0, 1] images -> the model's logits: the run's normalization, then the model."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return self.model((x - self.mean) / self.std)


def _tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
    """All (uint8 images, labels) of an evaluation data set."""
    if hasattr(ds, "images"):
        return ds.images, ds.targets
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([it[0] for it in items]), torch.stack([torch.as_tensor(it[1]) for it in items])


def _batches(images: torch.Tensor, labels: torch.Tensor | None, batch_size: int, device):
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].to(device).float() / 255.0
        y = None if labels is None else labels[start:start + batch_size].to(device)
        yield x, y


@torch.no_grad()
def _logits(net, images, batch_size, device) -> torch.Tensor:
    return torch.cat([net(x).float().cpu() for x, _ in _batches(images, None, batch_size, device)])


def _fgsm_top1(net, images, labels, eps: float, batch_size: int, device) -> float:
    hits = 0
    for x, y in _batches(images, labels, batch_size, device):
        x_adv = fgsm(net, x, y, eps)
        with torch.no_grad():
            hits += (net(x_adv).argmax(dim=1) == y).sum().item()
    return 100.0 * hits / max(images.shape[0], 1)


def _resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 at ``size``: bilinear up, area-averaged down."""
    x = images.float()
    if size[0] >= x.shape[-2]:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    else:
        x = F.adaptive_avg_pool2d(x, size)
    return x.round().clamp(0, 255).to(torch.uint8)


def _noise(n: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)


def ood_images(in_name: str, shape: tuple[int, int, int], choice: str = "auto") -> tuple[torch.Tensor, str]:
    """Out-of-distribution images at the run's image shape, and a line saying what they are.

    Args:
        in_name: the run's data set (``data.name``).
        shape: (C, H, W) of the run's images.
        choice: ``auto`` (digits for Fashion-MNIST, Fashion-MNIST for digits, else noise), or a data set.
    """
    c, h, w = shape
    if choice == "auto":
        choice = {"fashion_mnist": "digits", "digits": "fashion_mnist"}.get(in_name, "noise")
    if choice == "digits":
        from sklearn.datasets import load_digits

        d = torch.from_numpy(load_digits().images).float().mul(255.0 / 16.0).round().to(torch.uint8)
        x = _resize(d.unsqueeze(1), (h, w)).expand(-1, c, -1, -1).contiguous()
        return x, f"scikit-learn digits ({x.shape[0]} images, 8x8 resized to {h}x{w})"
    if choice == "fashion_mnist":
        from .data import DataNotFoundError, build_data

        try:
            fm = build_data(DataConfig(name="fashion_mnist"))
        except DataNotFoundError:
            x = _noise(2000, shape)
            return x, ("uniform noise images (2000): Fashion-MNIST is not installed "
                       "(sudo apt-get install dataset-fashion-mnist)")
        imgs, _ = _tensors(fm.val)
        x = _resize(imgs, (h, w)).expand(-1, c, -1, -1).contiguous()
        return x, f"Fashion-MNIST test images ({x.shape[0]}, 28x28 resized to {h}x{w})"
    if choice == "noise":
        return _noise(2000, shape), (f"uniform noise images (2000, {c}x{h}x{w}): no second data set "
                                     f"for {in_name}")
    raise RecipeError(f"ood: {choice!r} is not one of {', '.join(OOD_CHOICES)}")


def evaluate_run(run_dir: str, overrides: list[str] = (), options: EvalOptions | None = None) -> dict:
    """Measure a finished run (see the module docstring); write and return ``evaluation.json``'s content."""
    opt = options or EvalOptions()
    cfg, bundle, model, ckpt, state = load_run(run_dir, list(overrides), opt.checkpoint)
    device = torch.device("cuda" if wants_cuda(cfg) else "cpu")
    net = _Normalized(model, bundle.mean, bundle.std).to(device).eval()
    split = "test"  # bundle.test is None only when data.val_size = 0, and then val is the test set
    images, labels = _tensors(bundle.test if bundle.test is not None else bundle.val)
    labels = labels[:, 0] if labels.ndim == 2 else labels
    torch.manual_seed(0)
    t0 = time.perf_counter()

    def stage(what: str) -> None:
        if opt.progress:
            print(f"[{time.perf_counter() - t0:6.1f}s] {what}", file=sys.stderr, flush=True)

    stage(f"clean predictions on {images.shape[0]:,} {split} images")
    logits = _logits(net, images, opt.batch_size, device)
    bins = calibration_bins(logits.softmax(dim=1), labels, opt.n_bins)
    result = {
        "run": os.path.abspath(run_dir), "checkpoint": os.path.basename(ckpt), "epoch": state.get("epoch"),
        "model": cfg.model, "data": cfg.data.name, "split": split, "images": int(images.shape[0]),
        "mixup_alpha": cfg.mixup.alpha, "device": str(device),
        "top1": 100.0 * (logits.argmax(dim=1) == labels).double().mean().item(),
        "nll": F.cross_entropy(logits.double(), labels).item(),
        "ece": 100.0 * ece_from_bins(bins), "n_bins": opt.n_bins,
        "mean_confidence": 100.0 * (bins[1].sum() / bins[0].sum().clamp(min=1)).item(),
        "fgsm": [],
    }
    for e in opt.eps:
        stage(f"FGSM at ε={e * 255:g}/255")
        result["fgsm"].append({"eps": e, "eps_255": round(e * 255, 4),
                               "top1": _fgsm_top1(net, images, labels, e, opt.batch_size, device)})
    if opt.ood != "none":
        ood, what = ood_images(cfg.data.name, tuple(images.shape[1:]), opt.ood)
        stage(f"out-of-distribution detection against {what}")
        score_in = max_softmax(logits)
        score_out = max_softmax(_logits(net, ood, opt.batch_size, device))
        result["ood"] = {"data": what, "images": int(ood.shape[0]), "auroc": auroc(score_in, score_out),
                         "mean_msp_in": score_in.mean().item(), "mean_msp_out": score_out.mean().item()}
    write_summary(os.path.join(run_dir, "evaluation.json"), result)  # atomic, as the run's summary.json
    return result


# ----------------------------------------------------------------------------------------------------
# Command line


def format_table(r: dict) -> str:
    """The one-screen summary of an evaluation."""
    lines = [
        f"{r['run']}: {r['model']} on {r['data']} ({r['checkpoint']}, epoch {r['epoch']}), "
        f"{r['images']:,} {r['split']} images, {r['device']}",
        "",
        f"  clean top-1        {r['top1']:6.2f} %",
        f"  NLL                {r['nll']:6.4f}",
        f"  ECE ({r['n_bins']} bins)     {r['ece']:6.2f} %   (mean confidence {r['mean_confidence']:.2f} %)",
    ]
    for f in r["fgsm"]:
        label = f"FGSM ε={f['eps_255']:g}/255"
        lines.append(f"  {label:<18} {f['top1']:6.2f} %")
    if "ood" in r:
        o = r["ood"]
        lines += [f"  OOD AUROC (MSP)    {o['auroc']:6.4f}   vs {o['data']}",
                  f"{'':21}mean max-softmax: in {o['mean_msp_in']:.3f}, out {o['mean_msp_out']:.3f}"]
    lines.append(f"  -> {os.path.join(r['run'], 'evaluation.json')}")
    return "\n".join(lines)


def _parse_eps(raw: str) -> list[float]:
    try:
        values = [float(Fraction(v.strip())) for v in raw.split(",") if v.strip()]
    except (ValueError, ZeroDivisionError):
        raise RecipeError(f"eps: expected comma-separated numbers such as 0,1/255,8/255, got {raw!r}"
                          ) from None
    if not values or any(not math.isfinite(v) or v < 0 or v > 1 for v in values):
        raise RecipeError(f"eps: values must lie in [0, 1] (pixel units; 8/255 is 8 grey levels), "
                          f"got {raw!r}")
    return values


def parse_args(argv: list[str]) -> tuple[str, list[str], EvalOptions]:
    """RUN_DIR, the config overrides and the evaluation's own options from the command line."""
    positional = [a for a in argv if "=" not in a]
    if len(positional) != 1:
        raise RecipeError("usage: python -m mixrecipe.evaluate RUN_DIR [key=value ...] "
                          f"(expected one run directory, got {len(positional)})")
    opt, overrides = EvalOptions(), []
    for item in argv:
        if "=" not in item:
            continue
        key, raw = item.split("=", 1)
        if key == "eps":
            opt.eps = _parse_eps(raw)
        elif key == "ood":
            if raw not in OOD_CHOICES:
                raise RecipeError(f"ood: {raw!r} is not one of {', '.join(OOD_CHOICES)}")
            opt.ood = raw
        elif key == "checkpoint":
            if raw not in ("best", "last"):
                raise RecipeError(f"checkpoint: expected best or last, got {raw!r}")
            opt.checkpoint = raw
        elif key == "progress":
            if raw.lower() not in ("true", "false"):
                raise RecipeError(f"progress: expected true or false, got {raw!r}")
            opt.progress = raw.lower() == "true"
        elif key in ("n_bins", "batch_size"):
            if not raw.isdigit() or int(raw) < 1:
                raise RecipeError(f"{key}: expected a positive integer, got {raw!r}")
            setattr(opt, key, int(raw))
        else:
            overrides.append(item)
    return positional[0], overrides, opt


def main(argv: list[str] | None = None) -> dict | None:
    """Command-line entry point; exit status 2 for a bad run directory, key or value."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return None
    try:
        run_dir, overrides, opt = parse_args(argv)
        result = evaluate_run(run_dir, overrides, opt)
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(format_table(result), flush=True)
    return result


if __name__ == "__main__":
    main()
