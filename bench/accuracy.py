"""Accuracy benchmark: does mixup do what it is for? ERM vs mixup through the recipe runner.

Two experiments, every run a subprocess of ``python -m mixrecipe.train`` (no training code here):

1. ``keras``: the keras.io example reproduced (recipes/fashion_mnist.yaml, 10 epochs, full Fashion-MNIST),
   ERM (mixup.alpha=0) vs mixup alpha=0.2 over several seeds, beside the example's published figures.
2. ``noise``: the mixup paper's corrupted-label experiment at small scale (recipes/fashion_mnist_noise.yaml:
   a wide MLP on a training subset with 20/50/80% symmetric label noise), ERM vs mixup alpha in {1, 8, 32}:
   best-epoch and last-epoch test error and the share of corrupted training labels the model fits.
3. ``calib``: beyond top-1, on clean Fashion-MNIST: the Keras-example CNN (recipes/fashion_mnist.yaml) and
   the wide MLP (recipes/fashion_mnist_noise.yaml with data.label_noise=0), ERM vs mixup alpha in {0.2, 1}
   over several seeds; each trained run is then measured by ``python -m mixrecipe.evaluate``: ECE, NLL,
   FGSM top-1 at eps in {1, 2, 4, 8}/255 and out-of-distribution AUROC against scikit-learn's digits.

Usage::

    python bench/accuracy.py                 # the full grid (about 1 h 45 min on 2 CPU cores)
    python bench/accuracy.py --only calib --jobs 1   # experiment 3 alone (~45 min on one core)
    python bench/accuracy.py --quick --out /tmp/acc   # a tiny grid (smoke test)
    python bench/accuracy.py --report-only   # re-aggregate what runs/accuracy holds

Each cell trains into ``<runs>/<cell>/``; a cell whose directory holds ``summary.json`` (and, for calib
cells, ``evaluation.json``) is skipped and an
interrupted one resumes from its checkpoint (``resume=true``), so a killed grid restarts losing nothing.
Outputs: ``<out>/accuracy.md``, ``accuracy.csv``, ``accuracy_keras.png``, ``accuracy_noise.png``,
``accuracy_calib.csv``, ``accuracy_calib.png``. Running one experiment (``--only``) rewrites only its own
section of ``accuracy.md`` and its own rows of the CSV files; the other sections are kept as they are.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KERAS_RECIPE = "recipes/fashion_mnist.yaml"
NOISE_RECIPE = "recipes/fashion_mnist_noise.yaml"
CALIB_EPS = ("0", "1/255", "2/255", "4/255", "8/255")  # FGSM steps of the calib cells, [0, 1] pixel units
CALIB_MODELS = {"keras_cnn": KERAS_RECIPE, "wide_mlp": NOISE_RECIPE}
# keras.io "MixUp augmentation for image classification" (Sayak Paul), test accuracy after 10 epochs.
PUBLISHED = {"ERM": 86.92, "mixup α=0.2": 85.82}
# ... and its printed validation accuracy (the 2,000 held-out training images) after each epoch.
PUBLISHED_VAL = {
    "ERM": [75.85, 78.60, 82.05, 84.15, 86.10, 86.80, 87.50, 87.35, 87.25, 87.45],
    "mixup α=0.2": [76.35, 79.25, 82.90, 83.60, 85.50, 85.60, 86.00, 85.10, 86.45, 86.30],
}


@dataclass
class Settings:
    keras_seeds: list[int]
    keras_epochs: int
    keras_extra: list[str]
    noise_seeds: list[int]
    noise_levels: list[float]
    noise_alphas: list[float]
    noise_epochs: int
    noise_subset: int
    noise_extra: list[str]
    spread_seeds: list[int] = field(default_factory=list)  # extra seeds, at spread_level only
    spread_level: float = 0.5
    spread_alphas: list[float] | None = None  # None: all of noise_alphas
    calib_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    calib_alphas: list[float] = field(default_factory=lambda: [0.0, 0.2, 1.0])
    calib_models: list[str] = field(default_factory=lambda: ["wide_mlp", "keras_cnn"])
    calib_keras_epochs: int = 10
    calib_keras_extra: list[str] = field(default_factory=list)
    calib_mlp_epochs: int = 30
    calib_mlp_subset: int = 5000


FULL = Settings(
    keras_seeds=[0, 1, 2], keras_epochs=10, keras_extra=[],
    noise_seeds=[0, 1], noise_levels=[0.2, 0.5, 0.8], noise_alphas=[0.0, 1.0, 8.0, 32.0], noise_epochs=60,
    noise_subset=5000, noise_extra=[], spread_seeds=[], spread_level=0.5, spread_alphas=None,
)
QUICK = Settings(
    keras_seeds=[0], keras_epochs=2, keras_extra=["data.val_size=64", "data.train_subset=128"],
    noise_seeds=[0], noise_levels=[0.5], noise_alphas=[0.0, 8.0], noise_epochs=3, noise_subset=128,
    noise_extra=[], calib_seeds=[0], calib_alphas=[0.0, 1.0], calib_models=["wide_mlp"], calib_keras_epochs=1,
    calib_keras_extra=["data.val_size=64", "data.train_subset=128"], calib_mlp_epochs=2, calib_mlp_subset=128,
)


@dataclass
class Cell:
    group: str  # "keras", "noise" or "calib"
    method: str  # "ERM" or "mixup α=..."
    alpha: float
    noise: float
    seed: int
    epochs: int
    recipe: str
    overrides: list[str]
    name: str
    cost: float  # relative time, for the ETA
    subset: int = 0
    record: dict = field(default_factory=dict)
    model: str = ""
    evaluate: list[str] = field(default_factory=list)  # calib cells: mixrecipe.evaluate's arguments

    def command(self) -> str:
        """The training command of this cell, as a reader would type it."""
        return " ".join(["python -m mixrecipe.train", self.recipe, *map(shlex.quote, self.overrides)])

    def eval_command(self, run_dir: str = "RUN_DIR") -> str:
        """The evaluation command of a calib cell, as a reader would type it."""
        return " ".join(["python -m mixrecipe.evaluate", run_dir, *map(shlex.quote, self.evaluate)])


def _method(alpha: float) -> str:
    return "ERM" if alpha == 0 else f"mixup α={alpha:g}"


def build_cells(s: Settings, data_root: str | None) -> list[Cell]:
    """The grid in run order: the noise grid at the first seed, the Keras runs, then further noise seeds."""
    root = [f"data.root={data_root}"] if data_root else []
    keras, noise_first, noise_more = [], [], []
    for seed in s.keras_seeds:
        for alpha in (0.0, 0.2):
            ov = [f"mixup.alpha={alpha:g}", f"seed={seed}", f"epochs={s.keras_epochs}", *s.keras_extra, *root]
            keras.append(Cell("keras", _method(alpha), alpha, 0.0, seed, s.keras_epochs, KERAS_RECIPE, ov,
                              f"keras_a{alpha:g}_s{seed}", 25.0 * s.keras_epochs))
    plan = [(s.noise_seeds[0], level) for level in s.noise_levels]
    later = sorted(s.noise_levels, key=lambda v: v != s.spread_level)  # the spread level first
    plan += [(seed, level) for seed in s.noise_seeds[1:] for level in later]
    plan += [(seed, s.spread_level) for seed in s.spread_seeds if seed not in s.noise_seeds]
    for seed, noise in plan:
        extra = seed not in s.noise_seeds
        for alpha in s.spread_alphas if extra and s.spread_alphas is not None else s.noise_alphas:
            ov = [f"data.label_noise={noise:g}", f"mixup.alpha={alpha:g}", f"seed={seed}",
                  f"data.seed={seed}", f"epochs={s.noise_epochs}", f"data.train_subset={s.noise_subset}",
                  *s.noise_extra, *root]
            cell = Cell("noise", _method(alpha), alpha, noise, seed, s.noise_epochs, NOISE_RECIPE, ov,
                        f"noise{round(noise * 100)}_a{alpha:g}_s{seed}", 3.0 * s.noise_epochs,
                        subset=s.noise_subset)
            (noise_first if seed == s.noise_seeds[0] else noise_more).append(cell)
    return noise_first + keras + noise_more + build_calib_cells(s, data_root)


def build_calib_cells(s: Settings, data_root: str | None) -> list[Cell]:
    """The calibration/robustness grid, one seed at a time (partial results stay balanced)."""
    root = [f"data.root={data_root}"] if data_root else []
    cells = []
    for seed in s.calib_seeds:
        for model in s.calib_models:
            for alpha in s.calib_alphas:
                if model == "keras_cnn":
                    epochs, subset = s.calib_keras_epochs, 0
                    ov = [f"mixup.alpha={alpha:g}", f"seed={seed}", f"epochs={epochs}", *s.calib_keras_extra]
                    cost = 25.0 * epochs
                else:
                    epochs, subset = s.calib_mlp_epochs, s.calib_mlp_subset
                    ov = ["data.label_noise=0", f"mixup.alpha={alpha:g}", f"seed={seed}", f"data.seed={seed}",
                          f"epochs={epochs}", f"data.train_subset={subset}"]
                    cost = 3.0 * epochs * subset / 5000
                cells.append(Cell("calib", _method(alpha), alpha, 0.0, seed, epochs, CALIB_MODELS[model],
                                  ov + root, f"calib_{model}_a{alpha:g}_s{seed}", cost + 10.0,
                                  subset=subset, model=model,
                                  evaluate=[f"eps={','.join(CALIB_EPS)}", "checkpoint=last", *root]))
    return cells


# ----------------------------------------------------------------------------------------------------
# Running


def _finished(out: Path, cell: Cell | None = None) -> bool:
    done = (out / "summary.json").is_file() and (out / "metrics.jsonl").is_file()
    if cell is not None and cell.evaluate:
        done = done and (out / "evaluation.json").is_file()
    return done


def _busy(out: Path) -> bool:
    """Whether another process is training into ``out`` now (Linux: its command line names the folder)."""
    needle = f"output={out}".encode()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (proc / "cmdline").read_bytes().split(b"\0"):
                return True
        except OSError:
            continue
    return False


def run_cell(cell: Cell, runs: Path, threads: int) -> float:
    """Train one cell in a subprocess (skipped when finished); return its wall time in seconds.

    A cell that another invocation is still training (a grid restarted with other settings) is waited
    for, not started twice.
    """
    out = runs / cell.name
    while _busy(out):
        time.sleep(10)
    if _finished(out, cell):
        return 0.0
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONUNBUFFERED": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "mixrecipe.train", cell.recipe, *cell.overrides, f"output={out}",
           "progress=false", "preview=false", "resume=true"]
    t0 = time.perf_counter()
    commands = [] if _finished(out) else [cmd]
    if cell.evaluate:
        commands.append([sys.executable, "-m", "mixrecipe.evaluate", str(out), *cell.evaluate])
    for c in commands:
        with open(out / "train.log", "a", encoding="utf-8") as log:
            log.write("$ " + " ".join(map(shlex.quote, c)) + "\n")
            log.flush()
            rc = subprocess.run(c, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            tail = (out / "train.log").read_text(encoding="utf-8").splitlines()[-15:]
            raise RuntimeError(f"cell {cell.name} failed (exit {rc}):\n" + "\n".join(tail))
    return time.perf_counter() - t0


def run_grid(cells: list[Cell], runs: Path, jobs: int, threads: int) -> None:
    """Run the cells not yet finished, ``jobs`` at a time, printing progress and an ETA."""
    todo = [c for c in cells if not _finished(runs / c.name, c)]
    print(f"{len(cells)} cells, {len(cells) - len(todo)} already finished, {len(todo)} to run "
          f"({jobs} at a time, {threads} thread(s) each) -> {runs}", flush=True)
    if not todo:
        return
    total = sum(c.cost for c in todo)
    done_cost, lock, start = 0.0, threading.Lock(), time.perf_counter()
    counter = [0]

    def work(cell: Cell) -> None:
        nonlocal done_cost
        with lock:
            print(f"[{_hms(time.perf_counter() - start)}] start {cell.name}: {cell.command()}", flush=True)
        seconds = run_cell(cell, runs, threads)
        with lock:
            done_cost += cell.cost
            counter[0] += 1
            elapsed = time.perf_counter() - start
            eta = elapsed * (total - done_cost) / max(done_cost, 1e-9)
            summary = json.loads((runs / cell.name / "summary.json").read_text())
            print(f"[{_hms(elapsed)}] done {counter[0]}/{len(todo)} {cell.name} in {seconds:.0f}s: "
                  f"test top-1 {summary.get('test_top1', float('nan')):.2f}%  ETA {_hms(eta)}", flush=True)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for f in [pool.submit(work, c) for c in todo]:
            f.result()


def _add_wall(runs: Path, seconds: float) -> float:
    """Add this invocation's wall time to ``<runs>/wall_seconds.json``; return the total so far."""
    path = runs / "wall_seconds.json"
    total = json.loads(path.read_text())["seconds"] if path.is_file() else 0.0
    if seconds:
        runs.mkdir(parents=True, exist_ok=True)
        total += seconds
        path.write_text(json.dumps({"seconds": total}) + "\n")
    return total


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ----------------------------------------------------------------------------------------------------
# Aggregating


def _load(cell: Cell, runs: Path) -> dict | None:
    out = runs / cell.name
    if not _finished(out, cell):
        return None
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((out / "summary.json").read_text())
    if not history:
        return None
    err = [100.0 - r["val_top1"] for r in history]
    best = min(range(len(err)), key=err.__getitem__)
    rec = {
        "history": history, "test_top1": summary["test_top1"], "best_err": err[best], "best_epoch": best + 1,
        "last_err": err[-1], "seconds": sum(r.get("seconds", 0.0) for r in history),
        "fit_noisy": history[-1].get("train_fit_noisy"), "true_noisy": history[-1].get("train_true_noisy"),
        "fit_clean": history[-1].get("train_fit_clean"), "best_val_top1": max(r["val_top1"] for r in history),
    }
    if cell.evaluate:
        rec["evaluation"] = json.loads((out / "evaluation.json").read_text())
    return rec


def _mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, std


def _ms(values: list[float], digits: int = 2) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    mean, std = _mean_std(values)
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _machine(threads: int, jobs: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    from importlib.metadata import version

    return (f"{cpu}, {os.cpu_count()} CPU cores (shared), no GPU; torch {version('torch')}; "
            f"{jobs} runs at a time, {threads} thread(s) each")


def write_csv(cells: list[Cell], path: Path) -> None:
    cols = ["group", "method", "alpha", "label_noise", "seed", "epochs", "train_subset", "test_top1",
            "best_epoch", "best_test_err", "last_test_err", "train_fit_noisy", "train_true_noisy",
            "train_fit_clean", "train_seconds", "command"]
    regenerated = {c.group for c in cells if c.record}
    kept = []
    if path.is_file():  # rows of the experiments this invocation did not cover stay as they are
        with open(path, newline="", encoding="utf-8") as fh:
            kept = [row for row in csv.DictReader(fh) if row["group"] not in regenerated]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for row in kept:
            w.writerow([row.get(k, "") for k in cols])
        for c in cells:
            r = c.record
            if not r or c.group == "calib":
                continue
            w.writerow([c.group, c.method, c.alpha, c.noise, c.seed, c.epochs, c.subset or "",
                        f"{r['test_top1']:.2f}", r["best_epoch"], f"{r['best_err']:.2f}",
                        f"{r['last_err']:.2f}",
                        "" if r["fit_noisy"] is None else f"{r['fit_noisy']:.2f}",
                        "" if r["true_noisy"] is None else f"{r['true_noisy']:.2f}",
                        "" if r["fit_clean"] is None else f"{r['fit_clean']:.2f}",
                        f"{r['seconds']:.0f}", c.command()])


def _group(cells, **keys):
    return [c for c in cells if c.record and all(getattr(c, k) == v for k, v in keys.items())]


def plot_keras(cells: list[Cell], path: Path, cmd: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for alpha, color in ((0.0, "tab:blue"), (0.2, "tab:orange")):
        runs = _group(cells, group="keras", alpha=alpha)
        if not runs:
            continue
        n_ep = min(len(c.record["history"]) for c in runs)
        epochs = list(range(1, n_ep + 1))
        curves = [[c.record["history"][e]["val_top1"] for e in range(n_ep)] for c in runs]
        stats = [_mean_std([cv[e] for cv in curves]) for e in range(n_ep)]
        mean = [m for m, _ in stats]
        std = [0.0 if math.isnan(s) else s for _, s in stats]
        label = f"{_method(alpha)}: validation (2,000 held-out), mean of {len(runs)} seeds"
        ax.plot(epochs, mean, color=color, marker="o", ms=3, label=label)
        ax.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=color, alpha=0.2)
        tm, ts = _mean_std([c.record["test_top1"] for c in runs])
        ax.errorbar([n_ep + 0.25], [tm], yerr=[0 if math.isnan(ts) else ts], color=color, marker="s", ms=7,
                    capsize=4, label=f"{_method(alpha)}: test after {n_ep} epochs, {tm:.2f}%")
        key = "ERM" if alpha == 0 else "mixup α=0.2"
        pv = PUBLISHED_VAL[key][:n_ep]
        ax.plot(range(1, len(pv) + 1), pv, color=color, ls="--", lw=1,
                label=f"{key}: keras.io published validation")
        pub = PUBLISHED[key]
        ax.scatter([n_ep + 0.5], [pub], color=color, marker="*", s=140, edgecolor="black", zorder=5,
                   label=f"{_method(alpha)}: keras.io published test, {pub:.2f}%")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Fashion-MNIST, keras.io mixup example reproduced: ERM vs mixup α=0.2")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="lower right")
    fig.text(0.01, -0.02, f"made by: {cmd}  (runs: {KERAS_RECIPE})", fontsize=7, color="dimgray")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


ALPHA_COLORS = {0.0: "black", 1.0: "tab:blue", 8.0: "tab:orange", 32.0: "tab:green"}


def plot_noise(cells: list[Cell], s: Settings, path: Path, cmd: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    levels = [lv for lv in s.noise_levels if _group(cells, group="noise", noise=lv)]
    if not levels:
        return
    fig, axes = plt.subplots(2, len(levels), figsize=(4.6 * len(levels), 7.2), squeeze=False, sharex=True)
    for j, level in enumerate(levels):
        for alpha in s.noise_alphas:
            runs = _group(cells, group="noise", noise=level, alpha=alpha)
            if not runs:
                continue
            n_ep = min(len(c.record["history"]) for c in runs)
            epochs = list(range(1, n_ep + 1))
            color = ALPHA_COLORS.get(alpha)
            width = 2.2 if alpha == 0 else 1.5
            for row, key, fn in ((0, "val_top1", lambda v: 100.0 - v), (1, "train_fit_noisy", lambda v: v)):
                ys = [_mean_std([fn(c.record["history"][e][key]) for c in runs])[0] for e in range(n_ep)]
                axes[row][j].plot(epochs, ys, color=color, lw=width, label=_method(alpha))
        axes[0][j].set_title(f"{round(level * 100)}% corrupted labels")
        axes[0][j].set_ylabel("test error (%)")
        axes[1][j].set_ylabel("corrupted training labels fitted (%)")
        axes[1][j].set_xlabel("epoch")
        axes[1][j].set_ylim(-2, 102)
        for row in (0, 1):
            axes[row][j].grid(alpha=0.3)
        axes[0][j].legend(fontsize=8)
    counts = sorted({len(_group(cells, group="noise", noise=lv, alpha=a)) for lv in levels
                     for a in s.noise_alphas} - {0})
    seeds = (f"mean of {counts[0]} seed(s) per curve" if len(counts) == 1
             else f"mean of {counts[0]}–{counts[-1]} seeds per curve")
    fig.suptitle(f"Fashion-MNIST, {s.noise_subset:,} training images with symmetric label noise, wide MLP, "
                 f"{s.noise_epochs} epochs ({seeds})", fontsize=11)
    fig.text(0.01, -0.01, f"made by: {cmd}  (runs: {NOISE_RECIPE})", fontsize=7, color="dimgray")
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _keras_section(cells, s: Settings) -> list[str]:
    lines: list[str] = []
    # 1. Keras example
    lines += [
        "## 1. The keras.io mixup example, reproduced",
        "",
        f"`{KERAS_RECIPE}`: the example's CNN, Adam 1e-3, batch 64, {s.keras_epochs} epochs, 58,000 "
        "training images (2,000 held out), test on the 10,000 test images; seeds "
        f"{', '.join(map(str, s.keras_seeds))}. Mean ± sample std over seeds.",
        "",
        "| method | test accuracy (%) | per seed | mean ± 2 std: a re-run's expected range | "
        "best validation (%) | keras.io published (%) | command |",
        "|---|---|---|---|---|---|---|",
    ]
    for alpha in (0.0, 0.2):
        runs = _group(cells, group="keras", alpha=alpha)
        if not runs:
            continue
        per_seed = ", ".join(f"{c.record['test_top1']:.2f}" for c in runs)
        cmd_i = runs[0].command().replace(f"seed={runs[0].seed}", "seed=S")
        m, sd = _mean_std([c.record["test_top1"] for c in runs])
        rng = "–" if math.isnan(sd) else f"{m - 2 * sd:.2f}–{m + 2 * sd:.2f}"
        lines.append(f"| {_method(alpha)} | {_ms([c.record['test_top1'] for c in runs])} | {per_seed} | "
                     f"{rng} | {_ms([c.record['best_val_top1'] for c in runs])} | "
                     f"{PUBLISHED['ERM' if alpha == 0 else 'mixup α=0.2']:.2f} | `{cmd_i}` |")
    erm = [c.record["test_top1"] for c in _group(cells, group="keras", alpha=0.0)]
    mix = [c.record["test_top1"] for c in _group(cells, group="keras", alpha=0.2)]
    if erm and mix:
        (em, es), (mm, ms) = _mean_std(erm), _mean_std(mix)
        gap = em - mm
        spread = max(v for v in (es, ms, 0.0) if not math.isnan(v))
        if gap > 0:
            effect = "ERM ahead, as in the example"
        else:
            effect = "mixup ahead, the opposite of the example's ordering"
        where = []
        for name, m, sd in (("ERM", em, es), ("mixup α=0.2", mm, ms)):
            pub = PUBLISHED[name]
            inside = not math.isnan(sd) and abs(m - pub) <= 2 * sd
            where.append(f"the published {name} figure ({pub:.2f}%) lies {'inside' if inside else 'outside'} "
                         f"our mean ± 2 std ({m - 2 * sd:.2f}–{m + 2 * sd:.2f}%)")
        lines += [
            "",
            f"Measured gap ERM − mixup: {gap:+.2f} points ({effect}; published: +1.10, one run each from "
            f"one shared initialization); the seed-to-seed std is up to {spread:.2f} points; "
            + "; ".join(where) + ". "
            + "What differs from the example: PyTorch instead of Keras/TensorFlow (same architecture, "
            "Glorot init, Adam with eps 1e-7, one λ ~ Beta(0.2, 0.2) per image); the example mixes two "
            "independently shuffled copies of the training set (a shuffle buffer of 6,400 images), we pair "
            "each batch with a random permutation of itself; the example reports one unseeded run per "
            "method, we report several seeds. With 10 epochs and an 18,762-parameter model neither "
            "method overfits, so mixup's regularization has little to cure here.",
        ]
    lines += ["", "![Keras example](accuracy_keras.png)", ""]
    return lines


def _noise_section(cells, s: Settings) -> list[str]:
    lines: list[str] = []
    noise = [c for c in cells if c.group == "noise" and c.record]
    # 2. Noise grid
    lines += [
        "## 2. The paper's corrupted-label experiment, at small scale",
        "",
        f"`{NOISE_RECIPE}`: `wide_mlp` (784-1024-1024-10, no dropout, no weight decay), Adam 1e-3 with a "
        f"cosine schedule, batch 128, {s.noise_epochs} epochs, a random subset of {s.noise_subset:,} "
        "training images (`data.train_subset`) with "
        f"{', '.join(f'{round(v * 100)}%' for v in s.noise_levels)} of their labels moved to a different "
        "random class (`data.label_noise`); test error on the clean "
        f"10,000 test images after every epoch; seed{'s' if len(s.noise_seeds) > 1 else ''} "
        f"{', '.join(map(str, s.noise_seeds))} at every level"
        + (f", plus seed {', '.join(map(str, s.spread_seeds))} at {round(s.spread_level * 100)}% noise to "
           "measure the spread" if s.spread_seeds else "")
        + " (`seed` and `data.seed`: model init, order, mixup, subset and which labels are corrupted); "
        "a cell with one run shows its value, one with more shows mean ± sample std."
        + " Best = the lowest test error over the epochs (an oracle, as in the paper's table), last = after "
        "the final epoch; fitted = % of the corrupted training labels the final model predicts "
        "(memorization: 100% when every wrong label is learned; a model that ignores them scores about 0% "
        "here and recovers their true class in the last column).",
        "",
        "| label noise | method | best test error (%) | best epoch | last test error (%) | corrupted labels "
        "fitted (%) | true class recovered on them (%) |",
        "|---|---|---|---|---|---|---|",
    ]
    for level in s.noise_levels:
        for alpha in s.noise_alphas:
            runs = _group(cells, group="noise", noise=level, alpha=alpha)
            if not runs:
                continue
            r = [c.record for c in runs]
            lines.append(
                f"| {round(level * 100)}% | {_method(alpha)} | {_ms([x['best_err'] for x in r])} | "
                f"{', '.join(str(x['best_epoch']) for x in r)} | {_ms([x['last_err'] for x in r])} | "
                f"{_ms([x['fit_noisy'] for x in r], 1)} | {_ms([x['true_noisy'] for x in r], 1)} |")
    # verdict, from the numbers
    verdict, ratios = [], []
    for level in s.noise_levels:
        erm_r = _group(cells, group="noise", noise=level, alpha=0.0)
        mix = [a for a in s.noise_alphas if a != 0 and _group(cells, group="noise", noise=level, alpha=a)]
        if not erm_r or not mix:
            continue
        e_last = _mean_std([c.record["last_err"] for c in erm_r])[0]
        best_a = min(mix, key=lambda a: _mean_std([c.record["last_err"] for c in
                                                    _group(cells, group="noise", noise=level, alpha=a)])[0])
        m_last = _mean_std([c.record["last_err"] for c in _group(cells, group="noise", noise=level,
                                                                  alpha=best_a)])[0]
        sds = [_mean_std([c.record["last_err"] for c in
                          _group(cells, group="noise", noise=level, alpha=x)])[1] for x in (0.0, best_a)]
        if not any(math.isnan(v) for v in sds):
            ratios.append(f"{(e_last - m_last) / max(max(sds), 1e-9):.0f}× (at {round(level * 100)}%)")
        verdict.append(f"{round(level * 100)}% noise: ERM last {e_last:.1f}% vs mixup α={best_a:g} "
                       f"{m_last:.1f}% ({e_last - m_last:+.1f} points)")
    if verdict:
        lines += ["", "Last-epoch test error, ERM vs the best mixup: " + "; ".join(verdict) + "."]
    multi = [(lv, a, _mean_std([c.record["last_err"] for c in runs])[1], len(runs))
             for lv in s.noise_levels for a in s.noise_alphas
             for runs in [_group(cells, group="noise", noise=lv, alpha=a)] if len(runs) > 1]
    if multi:
        lv, a, sd, n = max(multi, key=lambda t: t[2])
        text = (f"Seed-to-seed spread: over the {len(multi)} cells with {n} or more seeds, the largest "
                f"sample std of the last-epoch error is {sd:.2f} points ({round(lv * 100)}% noise, "
                f"{_method(a)}); per-run values are in `accuracy.csv`. With so few seeds a std is only a "
                "rough guide")
        if ratios:
            text += ("; the ERM − best-mixup gap in last-epoch error is "
                     + ", ".join(ratios) + " the larger std of the two cells")
        lines += ["", text + "."]
    if noise:
        cmd_n = noise[0].command()
        lines += ["", f"One cell, e.g.: `{cmd_n}` (the grid varies `data.label_noise`, `mixup.alpha`, "
                      "`seed` and `data.seed`).", ""]
    lines += ["![Corrupted labels](accuracy_noise.png)", ""]
    return lines


# ----------------------------------------------------------------------------------------------------
# 3. Calibration and robustness


CALIB_COLORS = {0.0: "black", 0.2: "tab:orange", 1.0: "tab:blue"}
MODEL_TEXT = {"keras_cnn": "Keras-example CNN", "wide_mlp": "wide MLP"}


def _calib_values(runs: list[Cell]) -> dict[str, list[float]]:
    """Per-seed metrics of calib cells: top1, nll, ece, conf, fgsm_<k> (k/255), auroc."""
    out: dict[str, list[float]] = {}
    for c in runs:
        e = c.record["evaluation"]
        vals = {"top1": e["top1"], "nll": e["nll"], "ece": e["ece"], "conf": e["mean_confidence"],
                "auroc": e["ood"]["auroc"] if "ood" in e else math.nan}
        for f in e["fgsm"]:
            vals[f"fgsm_{f['eps_255']:g}"] = f["top1"]
        for k, v in vals.items():
            out.setdefault(k, []).append(v)
    return out


def write_calib_csv(cells: list[Cell], path: Path) -> None:
    runs = [c for c in cells if c.group == "calib" and c.record]
    eps = [f"{float(Fraction(e)) * 255:g}" for e in CALIB_EPS]
    cols = (["model", "method", "alpha", "seed", "epochs", "train_subset", "checkpoint", "test_top1", "nll",
             "ece", "mean_confidence"] + [f"fgsm_top1_eps{e}" for e in eps]
            + ["ood_auroc", "ood_data", "train_seconds", "command", "evaluate"])
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for c in runs:
            e = c.record["evaluation"]
            fg = {f"{f['eps_255']:g}": f["top1"] for f in e["fgsm"]}
            w.writerow([c.model, c.method, c.alpha, c.seed, c.epochs, c.subset or "", e["checkpoint"],
                        f"{e['top1']:.2f}", f"{e['nll']:.4f}", f"{e['ece']:.2f}",
                        f"{e['mean_confidence']:.2f}",
                        *(f"{fg[k]:.2f}" if k in fg else "" for k in eps),
                        f"{e['ood']['auroc']:.4f}" if "ood" in e else "", e.get("ood", {}).get("data", ""),
                        f"{c.record['seconds']:.0f}", c.command(), c.eval_command()])


def plot_calib(cells: list[Cell], s: Settings, path: Path, cmd: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    models = [m for m in s.calib_models if _group(cells, group="calib", model=m)]
    if not models:
        return
    fig, axes = plt.subplots(len(models), 4, figsize=(17, 3.9 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        alphas = [a for a in s.calib_alphas if _group(cells, group="calib", model=model, alpha=a)]
        names = [_method(a) for a in alphas]
        for j, (key, label) in enumerate((("ece", "ECE (%), lower is better"),
                                          ("nll", "test NLL, lower is better"),
                                          ("auroc", "OOD AUROC vs digits, higher is better"))):
            ax = axes[i][[0, 1, 3][j]]
            for x, a in enumerate(alphas):
                v = _calib_values(_group(cells, group="calib", model=model, alpha=a))[key]
                ax.bar([x], [sum(v) / len(v)], color=CALIB_COLORS.get(a, "gray"), alpha=0.55)
                ax.plot([x] * len(v), v, "o", color="black", ms=4)
            ax.set_xticks(range(len(alphas)), names)
            ax.set_title(f"{MODEL_TEXT.get(model, model)}: {label}", fontsize=9)
            ax.grid(alpha=0.3, axis="y")
            if key == "auroc":
                lo = min(min(_calib_values(_group(cells, group="calib", model=model, alpha=a))["auroc"])
                         for a in alphas)
                ax.set_ylim(max(0.0, lo - 0.05), 1.0)
        ax = axes[i][2]
        for a in alphas:
            v = _calib_values(_group(cells, group="calib", model=model, alpha=a))
            ks = sorted((float(k[5:]), k) for k in v if k.startswith("fgsm_"))
            means = [_mean_std(v[k])[0] for _, k in ks]
            sds = [0.0 if math.isnan(_mean_std(v[k])[1]) else _mean_std(v[k])[1] for _, k in ks]
            ax.errorbar([e for e, _ in ks], means, yerr=sds, marker="o", ms=4, capsize=3,
                        color=CALIB_COLORS.get(a, "gray"), label=_method(a))
        ax.set_xlabel("FGSM ε (/255, before normalization)")
        ax.set_title(f"{MODEL_TEXT.get(model, model)}: FGSM top-1 (%), higher is better", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    n_seeds = sorted({len(_group(cells, group="calib", model=m, alpha=a)) for m in models
                      for a in s.calib_alphas} - {0})
    fig.suptitle(f"Clean Fashion-MNIST test set: calibration and robustness, ERM vs mixup "
                 f"(bars: mean; dots: {'–'.join(map(str, n_seeds))} seeds)", fontsize=11)
    fig.text(0.01, -0.01, f"made by: {cmd}  (each run: mixrecipe.train, then mixrecipe.evaluate "
             "checkpoint=last)", fontsize=7, color="dimgray")
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _compare(name: str, unit: str, erm: list[float], mix: list[float], lower_better: bool,
             digits: int) -> str:
    """'mixup 1.2 ± 0.3 vs ERM 3.4 ± 0.2: better by 2.2 (3.1x the larger std)' and whether it separates."""
    (em, es), (mm, ms) = _mean_std(erm), _mean_std(mix)
    diff = (em - mm) if lower_better else (mm - em)
    sd = max([v for v in (es, ms) if not math.isnan(v)], default=math.nan)
    word = "better" if diff > 0 else "worse"
    if math.isnan(sd):
        sep = "one seed: no spread"
    elif abs(diff) > 2 * sd:
        sep = f"{abs(diff) / max(sd, 1e-12):.1f}× the larger seed std: outside the spread"
    else:
        sep = f"within 2× the larger seed std ({sd:.{digits}f}): not separated"
    return (f"{name} {mm:.{digits}f}{unit} vs ERM {em:.{digits}f}{unit}, {word} by "
            f"{abs(diff):.{digits}f} ({sep})")


def calib_section(cells, s: Settings, cmd: str, machine: str) -> list[str]:
    runs_all = _group(cells, group="calib")
    seeds = sorted({c.seed for c in runs_all})
    mlp = f"{s.calib_mlp_subset:,}" if s.calib_mlp_subset else "all"
    planned = len([c for c in cells if c.group == "calib"])
    minutes = sum(c.record["seconds"] for c in runs_all) / 60
    lines = [
        "## 3. Beyond top-1: calibration, adversarial robustness, out-of-distribution detection",
        "",
        f"Made by `{cmd}` on {datetime.date.today().isoformat()}: {machine}; {len(runs_all)} of {planned} "
        f"planned runs finished, {minutes:.1f} min of training summed over them.",
        "",
        "Clean Fashion-MNIST (no label noise). Models: the Keras-example CNN "
        f"(`{KERAS_RECIPE}`, {s.calib_keras_epochs} epochs, 58,000 training images) and the wide MLP "
        f"(`{NOISE_RECIPE}` with `data.label_noise=0`: 784-1024-1024-10, {s.calib_mlp_epochs} epochs on a "
        f"seeded subset of {mlp} training images, no regularization, so ERM fits its training set), "
        f"ERM vs mixup α in {{{', '.join(f'{a:g}' for a in s.calib_alphas if a)}}} (the recipes' one λ per "
        f"image, random partner), seeds {', '.join(map(str, seeds))}. Each trained run is measured by "
        f"`python -m mixrecipe.evaluate RUN_DIR eps={','.join(CALIB_EPS)} checkpoint=last` on the 10,000 "
        "test images: the final model (not the best epoch: that one is picked on the test set for the MLP); "
        "ECE with 15 equal-width confidence bins; FGSM with ε in [0, 1] pixel units applied before "
        "normalization, clamped to [0, 1]; out-of-distribution AUROC of the maximum softmax probability, "
        "test images vs scikit-learn's 1,797 digits resized to 28x28. Mean ± sample std over seeds; "
        "per-run values and both commands in `accuracy_calib.csv`.",
        "",
        "| model | method | seeds | test top-1 (%) | NLL | ECE (%) | mean confidence (%) | "
        "FGSM top-1, ε=1/255 | 2/255 | 4/255 | 8/255 | OOD AUROC |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model in s.calib_models:
        for alpha in s.calib_alphas:
            runs = _group(cells, group="calib", model=model, alpha=alpha)
            if not runs:
                continue
            v = _calib_values(runs)
            fg = [_ms(v.get(f"fgsm_{k}", [])) for k in ("1", "2", "4", "8")]
            lines.append(f"| {MODEL_TEXT.get(model, model)} | {_method(alpha)} | {len(runs)} | "
                         f"{_ms(v['top1'])} | "
                         f"{_ms(v['nll'], 3)} | {_ms(v['ece'])} | {_ms(v['conf'], 1)} | {' | '.join(fg)} | "
                         f"{_ms(v['auroc'], 3)} |")
    lines += ["", "What the numbers say (mixup vs ERM of the same model; a difference counts as measured "
              "when it exceeds twice the larger seed-to-seed std of the two cells):", ""]
    for model in s.calib_models:
        erm = _group(cells, group="calib", model=model, alpha=0.0)
        if not erm:
            continue
        ev = _calib_values(erm)
        for alpha in [a for a in s.calib_alphas if a]:
            runs = _group(cells, group="calib", model=model, alpha=alpha)
            if not runs:
                continue
            mv = _calib_values(runs)
            parts = [_compare("ECE", "%", ev["ece"], mv["ece"], True, 2),
                     _compare("NLL", "", ev["nll"], mv["nll"], True, 3),
                     _compare("FGSM top-1 at 8/255", "%", ev.get("fgsm_8", [math.nan]),
                              mv.get("fgsm_8", [math.nan]), False, 2),
                     _compare("OOD AUROC", "", ev["auroc"], mv["auroc"], False, 3),
                     _compare("clean top-1", "%", ev["top1"], mv["top1"], False, 2)]
            lines.append(f"- {MODEL_TEXT.get(model, model)}, {_method(alpha)}: " + "; ".join(parts) + ".")
    for model in s.calib_models:
        gaps = []
        for alpha in s.calib_alphas:
            runs = _group(cells, group="calib", model=model, alpha=alpha)
            if runs:
                v = _calib_values(runs)
                gap = _mean_std([c - t for c, t in zip(v["conf"], v["top1"])])[0]
                kind = "over-confident" if gap > 0 else "under-confident"
                gaps.append(f"{_method(alpha)} {gap:+.1f} points ({kind})")
        if gaps:
            lines.append(f"- {MODEL_TEXT.get(model, model)}, mean confidence − test accuracy: "
                         + ", ".join(gaps) + ".")
    example = runs_all[0]
    lines += ["", f"One cell, e.g.: `{example.command()} output=RUN_DIR` then `{example.eval_command()}`.",
              "", "![Calibration and robustness](accuracy_calib.png)", ""]
    return lines


def merge_report(old: str, new: str, regenerated: set[str]) -> str:
    """``new``'s sections for the experiments in ``regenerated``, ``old``'s for the others (by '## N.')."""

    def split(text: str) -> tuple[str, dict[str, str]]:
        head, sections, key = [], {}, None
        for line in text.splitlines(keepends=True):
            if line.startswith("## ") and line[3:4].isdigit():
                key = line[3:].split(".", 1)[0]
                sections[key] = ""
            if key is None:
                head.append(line)
            else:
                sections[key] += line
        return "".join(head), sections

    numbers = {"keras": "1", "noise": "2", "calib": "3"}
    old_head, old_sec = split(old)
    new_head, new_sec = split(new)
    keep = {numbers[g] for g in regenerated}
    head = new_head if keep & {"1", "2"} else old_head
    merged = {k: (new_sec if k in keep else old_sec)[k] for k in sorted(set(old_sec) | set(new_sec))
              if k in (new_sec if k in keep else old_sec)}
    return head + "".join(merged[k] for k in sorted(merged))


def write_report(cells, s: Settings, out: Path, cmd: str, machine: str, wall: float, quick: bool) -> str:
    total_train = sum(c.record["seconds"] for c in cells if c.record)
    lines = [
        "# Does mixup do what it is for? ERM vs mixup on Fashion-MNIST",
        "",
        f"Made by `{cmd}` on {datetime.date.today().isoformat()}: {machine}. "
        f"Training time summed over runs: {total_train / 60:.1f} min; wall time of the grid (all "
        f"invocations, resumed ones included): {wall / 60:.1f} min. Each run is "
        "`python -m mixrecipe.train` (the command in each table; the runner adds "
        "`output=runs/accuracy/<cell> progress=false preview=false resume=true`); per-run metrics are in "
        "`accuracy.csv`.",
        "",
    ]
    if quick:
        lines += ["**Quick mode: tiny settings for a smoke test; these figures mean nothing.**", ""]

    if _group(cells, group="keras"):
        lines += _keras_section(cells, s)
    if _group(cells, group="noise"):
        lines += _noise_section(cells, s)
    if _group(cells, group="calib"):
        lines += calib_section(cells, s, cmd, machine)
    text = "\n".join(lines) + "\n"
    path = out / "accuracy.md"
    if path.is_file():
        text = merge_report(path.read_text(encoding="utf-8"), text, {c.group for c in cells if c.record})
    path.write_text(text, encoding="utf-8")
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny grid on tiny settings (smoke test)")
    p.add_argument("--out", default=None, help="where the report goes (default: bench/results; "
                   "required with --quick)")
    p.add_argument("--runs", default=None, help="run directories (default: runs/accuracy[_quick])")
    p.add_argument("--data-root", default=None, help="Fashion-MNIST IDX folder (default: the recipes')")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (OMP_NUM_THREADS)")
    p.add_argument("--noise-seeds", default=None, help="comma-separated seeds of the noise grid")
    p.add_argument("--spread-seeds", default=None,
                   help="comma-separated extra seeds of the noise grid at 50%% noise only ('' for none)")
    p.add_argument("--keras-seeds", default=None, help="comma-separated seeds of the Keras runs")
    p.add_argument("--noise-epochs", type=int, default=None)
    p.add_argument("--noise-subset", type=int, default=None)
    p.add_argument("--calib-seeds", default=None, help="comma-separated seeds of the calib grid")
    p.add_argument("--calib-keras-epochs", type=int, default=None)
    p.add_argument("--calib-mlp-epochs", type=int, default=None)
    p.add_argument("--calib-mlp-subset", type=int, default=None)
    p.add_argument("--only", choices=("keras", "noise", "calib"), default=None,
                   help="run one experiment only")
    p.add_argument("--report-only", action="store_true", help="aggregate finished runs, train nothing")
    args = p.parse_args(argv)
    if args.quick and args.out is None:
        p.error("--quick writes a report of meaningless figures: give --out DIR (not bench/results)")
    s = QUICK if args.quick else FULL
    if args.noise_seeds:
        s.noise_seeds = [int(v) for v in args.noise_seeds.split(",")]
    if args.spread_seeds is not None:
        s.spread_seeds = [int(v) for v in args.spread_seeds.split(",") if v.strip()]
    if args.keras_seeds:
        s.keras_seeds = [int(v) for v in args.keras_seeds.split(",")]
    if args.noise_epochs:
        s.noise_epochs = args.noise_epochs
    if args.noise_subset:
        s.noise_subset = args.noise_subset
    if args.calib_seeds:
        s.calib_seeds = [int(v) for v in args.calib_seeds.split(",")]
    for key in ("calib_keras_epochs", "calib_mlp_epochs", "calib_mlp_subset"):
        if getattr(args, key):
            setattr(s, key, getattr(args, key))
    out = Path(args.out) if args.out else REPO / "bench" / "results"
    runs = Path(args.runs) if args.runs else REPO / "runs" / ("accuracy_quick" if args.quick else "accuracy")
    cmd = "python bench/accuracy.py" + "".join(f" {shlex.quote(a)}" for a in (argv if argv is not None
                                                                              else sys.argv[1:]))
    cells = build_cells(s, args.data_root)
    if args.only:
        cells = [c for c in cells if c.group == args.only]
    t0 = time.perf_counter()
    if not args.report_only:
        run_grid(cells, runs, args.jobs, args.threads)
    wall = _add_wall(runs, 0.0 if args.report_only else time.perf_counter() - t0)
    if args.report_only:  # the report names the command that ran the grid
        cmd = cmd.replace(" --report-only", "")
    for c in cells:
        c.record = _load(c, runs) or {}
    out.mkdir(parents=True, exist_ok=True)
    write_csv(cells, out / "accuracy.csv")
    if any(c.group == "calib" and c.record for c in cells):
        write_calib_csv(cells, out / "accuracy_calib.csv")
        plot_calib(cells, s, out / "accuracy_calib.png", cmd)
    if any(c.group == "keras" and c.record for c in cells):
        plot_keras(cells, out / "accuracy_keras.png", cmd)
    if any(c.group == "noise" and c.record for c in cells):
        plot_noise(cells, s, out / "accuracy_noise.png", cmd)
    write_report(cells, s, out, cmd, _machine(args.threads, args.jobs), wall, args.quick)
    print(f"wrote {out / 'accuracy.md'}, the CSV files and plots ({_hms(wall)})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
