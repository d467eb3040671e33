"""One command for a GPU machine, in one short window: the CUDA-relevant tests, the benchmark cases that carry
the GPU targets, training throughput, and a one-screen table of the targets.

    python bench/gpu_check.py                 # at most 9 minutes (--budget 540) on one H100/H200
    python bench/gpu_check.py --budget 300    # a shorter window: every phase gets its share of it
    python bench/gpu_check.py --skip-tests    # benchmarks and throughput only

Phases, in this order, each capped at its share of the budget (time one phase leaves unused goes to the next),
each writing its results file as soon as it is done, so a run stopped at any point still leaves figures:
1. tests (``PHASES`` share 0.35): the tests whose names mention cuda, triton, gpu or kernel in the files that
   exercise the kernels, on CUDA tensors, in parallel with pytest-xdist where it is installed ->
   ``<gpu>-tests.txt``.
2. benchmarks (0.40): ``bench_mixup.py`` on the cases the targets read (ImageNet 256 fp32/bf16/uint8, CIFAR
   128 fp32/bf16; the rows so far go to ``<gpu>-mixup.partial.csv`` after every case, which the targets
   read when the script was stopped), ``bench_loss.py``, ``bench_step.py``, ``bench_input.py`` (image-folder
   decoding with the device decoder, the cifar10 loop on device-resident data against the model-only step)
   -> ``<gpu>-{mixup,loss,step,input}.*``.
3. throughput (0.25): the real loop (``python -m mixrecipe.train cifar10``) on learnable CIFAR-format data
   (each class its own colour, plus noise) at lr 0.01, mixup off / mixup / mixup+CutMix. A run counts only
   if every epoch's training loss is finite and the last is below the first; otherwise the table says why
   and reports no images/s -> ``<gpu>-train.csv``, ``<gpu>-train.png``.

``<gpu>-check.md`` (environment: GPU, driver, torch/triton versions, commit; the targets; tests; throughput;
what failed or ran out of time) is rewritten after every phase. Exit status: 0 when every phase passed
(targets missed are reported, not fatal: they are measurements), 1 when a test, a step or a training run
failed or a phase ran out of time, 2 when there is no CUDA device.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import pickle
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"


# --------------------------------------------------------------------------------------------------
# The targets: what the one-pass kernel is for, as checkable numbers.
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    name: str
    source: str           # "mixup", "loss", "step" or "train": which results file
    where: dict           # column -> value that selects the row
    column: str           # the measured value
    limit: float
    at_most: bool         # True: measured <= limit passes; False: measured >= limit passes
    unit: str = "x"


def _mixup_row(case: str, provider: str) -> dict:
    return {"case": case, "provider": provider, "mode": "eager"}


_LOSS_256_1000 = {"B": "256", "K": "1000", "dtype": "fp32"}
TARGETS = (
    Target("in-place flip pass vs dst.copy_ (ImageNet 256, fp32)", "mixup",
           _mixup_row("imagenet-256 fp32 NCHW", "ours-op-flip"), "x_copy", 1.15, True),
    Target("in-place flip pass vs dst.copy_ (ImageNet 256, bf16)", "mixup",
           _mixup_row("imagenet-256 bf16 NCHW", "ours-op-flip"), "x_copy", 1.15, True),
    Target("Mixup policy vs timm's Mixup (ImageNet 256, fp32)", "mixup",
           _mixup_row("imagenet-256 fp32 NCHW", "ours-Mixup-batch"), "vs_timm-batch", 3.0, False),
    Target("perm + per-sample lam vs torch.compile'd lerp (ImageNet 256, fp32)", "mixup",
           _mixup_row("imagenet-256 fp32 NCHW", "ours-op-perm"), "vs_compile-lerp", 1.3, False),
    Target("uint8 -> bf16 normalize+mix vs bare conversion (ImageNet 256)", "mixup",
           _mixup_row("imagenet-256 u8->bf16 NCHW", "ours-op-flip"), "x_copy", 1.15, True),
    Target("CIFAR 128x3x32x32: Mixup policy vs timm's Mixup", "mixup",
           _mixup_row("cifar-128 fp32 NCHW", "ours-Mixup-batch"), "vs_timm-batch", 3.0, False),
    Target("mixup_cross_entropy fwd+bwd vs timm's dense path (256, 1000, fp32)", "loss",
           {**_LOSS_256_1000, "provider": "ours-mixup-ce"}, "vs_timm-dense", 2.0, False),
    Target("mixup_cross_entropy peak memory: timm dense / ours (256, 1000, fp32)", "loss",
           _LOSS_256_1000, "memory_ratio", 4.0, False),
    Target("Mixup share of a ResNet-50 bf16 training step (batch 256)", "step",
           {"variant": "ours-Mixup"}, "mix_share_pct", 0.5, True, "%"),
    Target("cifar10 loop, device-resident data + mixup, vs the model-only step", "input",
           {"case": "whole loop (preact_resnet18, mixup on)", "provider": "device path"}, "vs_model_only",
           0.9, False),
)


def _rows(results: Path, prefix: str, source: str) -> list[dict]:
    """The rows of ``<prefix>-<source>.csv``; those of ``<prefix>-<source>.partial.csv`` instead where it
    exists (a benchmark deletes it when it finishes: the last run stopped early, and these are its rows)."""
    for path in (results / f"{prefix}-{source}.partial.csv", results / f"{prefix}-{source}.csv"):
        if path.exists():
            with open(path) as f:
                return list(csv.DictReader(f))
    return []


def _measure(target: Target, rows: list[dict]) -> float | None:
    """The target's measured value from its results rows, None when the row is missing or empty."""
    if target.column == "memory_ratio":  # two rows: timm's dense path and ours
        sel = [r for r in rows if all(r.get(k) == v for k, v in target.where.items())]
        peak = {r["provider"]: r.get("peak_mib") for r in sel}
        try:
            return float(peak["timm-dense"]) / float(peak["ours-mixup-ce"])
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            return None
    for r in rows:
        if all(r.get(k) == v for k, v in target.where.items()):
            try:
                return float(r[target.column])
            except (KeyError, TypeError, ValueError):
                return None
    return None


def evaluate_targets(results: Path, prefix: str) -> list[dict]:
    """One dict per target: name, measured value (None: not measured), limit, verdict."""
    cache: dict[str, list[dict]] = {}
    out = []
    for t in TARGETS:
        rows = cache.setdefault(t.source, _rows(results, prefix, t.source))
        value = _measure(t, rows)
        ok = None if value is None else (value <= t.limit if t.at_most else value >= t.limit)
        out.append({"target": t.name, "measured": value, "limit": f"{'<=' if t.at_most else '>='} "
                    f"{t.limit:g}{t.unit}", "unit": t.unit, "ok": ok})
    return out


def targets_table(evaluated: list[dict]) -> str:
    lines = ["| target | measured | goal | verdict |", "|---|---|---|---|"]
    for e in evaluated:
        m = "not measured" if e["measured"] is None else f"{e['measured']:.3g}{e['unit']}"
        verdict = {True: "met", False: "MISSED", None: "-"}[e["ok"]]
        lines.append(f"| {e['target']} | {m} | {e['limit']} | {verdict} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The time budget: phases in order, each with its share; unused time flows to the next.
# --------------------------------------------------------------------------------------------------
PHASES = (("tests", 0.35), ("benchmarks", 0.40), ("throughput", 0.25))
DEFAULT_BUDGET_S = 540.0  # 9 minutes: what one GPU window holds with start-up and a rerun to spare


class Clock:
    """Deadlines for the phases of one run: phase i ends by start + budget x (shares of phases 0..i)."""

    def __init__(self, budget_s: float, phases=PHASES, now=time.monotonic):
        self.budget_s, self.now, self.start = budget_s, now, now()
        ends, total = {}, 0.0
        for name, share in phases:
            total += share
            ends[name] = total * budget_s
        self.ends = ends

    def left(self, phase: str) -> float:
        """Seconds this phase may still use (0 when its deadline has passed)."""
        return max(0.0, self.start + self.ends[phase] - self.now())


# --------------------------------------------------------------------------------------------------
# Steps.
# --------------------------------------------------------------------------------------------------
def _run(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> tuple[int, str]:
    """Run a step, echo and keep its output; (exit status, output). 124 when it ran out of time."""
    print(f"\n$ {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    if timeout < 1:
        code, text = 124, "(not started: no time left in this phase)"
    else:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
            code, text = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            out = "".join(v.decode(errors="replace") if isinstance(v, bytes) else (v or "")
                          for v in (e.stdout, e.stderr))
            code, text = 124, f"{out}\n(timed out after {timeout:.0f} s)"
    log.write_text(text)
    tail = "\n".join(text.strip().splitlines()[-3:])
    print(f"  -> exit {code} in {time.perf_counter() - start:.0f} s\n  {tail}", flush=True)
    return code, text


TEST_FILES = ("tests/test_ops.py", "tests/test_loss.py", "tests/test_policy.py", "tests/test_transforms.py",
              "tests/test_bench.py", "tests/test_augment.py", "tests/test_gpu_data.py",
              "tests/test_resize.py")
# Module names count as keywords: "gpu", "augment" and "resize" select every test of test_gpu_data,
# test_augment and test_resize.
TEST_SELECTION = "cuda or triton or gpu or kernel or augment or resize"


def test_command(workers: int | None = None) -> list[str]:
    """pytest on the kernel-facing tests, with pytest-xdist workers where it is installed."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--maxfail=25",
           "-k", TEST_SELECTION, *TEST_FILES]
    if workers is None:
        workers = 8 if importlib.util.find_spec("xdist") is not None else 0
    return cmd + (["-n", str(workers)] if workers else [])


def test_summary(code: int, text: str) -> str:
    """pytest's closing line ("12 passed, 3 skipped in 40s"), or why there is none."""
    found = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|error).*?)\s*=*$", text, flags=re.M)
    if code == 124:
        return "ran out of time" + (f" (last count: {found[-1]})" if found else "")
    return found[-1] if found else f"exit {code}"


# In order of what they carry: bench_mixup keeps its rows after every case, so a stopped run has the first.
MIXUP_CASES = ("imagenet-256 fp32 NCHW", "cifar-128 fp32 NCHW", "imagenet-256 bf16 NCHW",
               "imagenet-256 u8->bf16 NCHW", "cifar-128 bf16 NCHW")
BENCHMARKS = (("bench_mixup.py", ["--cases", ",".join(MIXUP_CASES)], 0.55),
              ("bench_loss.py", [], 0.10), ("bench_step.py", [], 0.20),
              ("bench_input.py", ["--rounds", "3"], 0.15))


def write_cifar_like(root: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    """CIFAR-10 in its real on-disk format (python pickles) that a model can learn: each class has its own
    colour, and every image is that colour plus strong uniform noise. For throughput, where a run must train
    (a falling, finite loss) to count."""
    import numpy as np

    rng = np.random.default_rng(seed)
    colours = rng.integers(40, 216, (10, 3))
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)

    def batch(n):
        labels = rng.integers(0, 10, n)
        pixels = colours[labels][:, :, None] + rng.integers(-40, 41, (n, 3, 1024))
        return {b"data": pixels.clip(0, 255).astype(np.uint8).reshape(n, 3072), b"labels": labels.tolist()}

    per = n_train // 5
    for name, n in [(f"data_batch_{i}", per) for i in range(1, 6)] + [("test_batch", n_test)]:
        with open(base / name, "wb") as f:
            pickle.dump(batch(n), f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)]}, f)


TRAIN_VARIANTS = {
    "mixup off": ["mixup.alpha=0", "mixup.cutmix_alpha=0"],
    "mixup": ["mixup.alpha=1", "mixup.cutmix_alpha=0"],
    "mixup+CutMix": ["mixup.alpha=1", "mixup.cutmix_alpha=1"],
}
TRAIN_LR = 0.01  # the recipe's 0.1 diverges on random-looking data within ~30 steps, in plain PyTorch too


def judge_run(code: int, metrics_path: Path) -> tuple[str, float | None, list]:
    """(verdict, images/s of the last epoch or None, training losses) of one throughput run.

    Only a run that exited 0 with every epoch's loss finite and the last below the first reports a
    throughput: a run of NaNs is fast and worthless.
    """
    records = []
    if metrics_path.exists():
        records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    epochs = [r for r in records if "train_loss" in r]
    losses = [r["train_loss"] for r in epochs]
    if any(not isinstance(v, (int, float)) or not math.isfinite(v) for v in losses):
        return "failed: loss not finite", None, losses
    if code == 124:
        return "failed: ran out of time", None, losses
    if code != 0 or not epochs:
        return f"failed: exit {code}", None, losses
    if len(losses) > 1 and not losses[-1] < losses[0]:
        return "failed: loss did not fall", None, losses
    return "ok", epochs[-1].get("images_per_s"), losses


def train_throughput(work: Path, logs: Path, epochs: int, n_train: int, *, device: str = "cuda",
                     variants=tuple(TRAIN_VARIANTS), compile_modes=(False,), extra=(),
                     deadline=None) -> list[dict]:
    """images/s of the last epoch of the real training loop, per variant (and compile mode).

    Args:
        deadline: ``() -> seconds left``; a run is given what is left, and runs past it are not started.
    """
    write_cifar_like(work / "data", n_train, min(2000, n_train))
    rows = []
    for compiled in compile_modes:
        for variant in variants:
            out = work / f"run-{len(rows)}"
            cmd = [sys.executable, "-m", "mixrecipe.train", "cifar10", f"data.root={work / 'data'}",
                   f"epochs={epochs}", "batch_size=128", f"optim.lr={TRAIN_LR}", f"output={out}",
                   f"compile={str(compiled).lower()}", "preview=false", "progress=false", f"device={device}",
                   *TRAIN_VARIANTS[variant], *extra]
            code, _ = _run(cmd, logs / f"train-{len(rows)}.log",
                           timeout=900 if deadline is None else deadline())
            verdict, ips, losses = judge_run(code, out / "metrics.jsonl")
            rows.append({"variant": variant, "compile": compiled, "images_per_s": ips, "exit": code,
                         "verdict": verdict, "train_loss": " -> ".join(f"{v:.4g}" for v in losses)})
    base = {r["compile"]: r["images_per_s"] for r in rows if r["variant"] == "mixup off"}
    for r in rows:
        off = base.get(r["compile"])
        r["vs_off"] = r["images_per_s"] / off if r["images_per_s"] and off else None
    return rows


def plot_train(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    modes = sorted({r["compile"] for r in rows})
    width = 0.8 / len(modes)
    for k, compiled in enumerate(modes):
        ips = {r["variant"]: r["images_per_s"] or 0 for r in rows if r["compile"] == compiled}
        xs = [i + (k - (len(modes) - 1) / 2) * width for i in range(len(variants))]
        bars = ax.bar(xs, [ips.get(v, 0) for v in variants], width=width,
                      label="compile=true" if compiled else "eager")
        for bar, v in zip(bars, variants):
            if not ips.get(v):
                ax.annotate("failed", (bar.get_x() + bar.get_width() / 2, 0), ha="center", va="bottom",
                            fontsize=8, color="crimson")
    ax.set_xticks(range(len(variants)), variants)
    ax.set_ylabel("training images/s (last epoch)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _environment() -> dict:
    import torch
    import triton

    driver = "unknown"
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    return {"gpu": torch.cuda.get_device_name(0), "driver": driver, "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda, "commit": common.git_commit(),
            "date": time.strftime("%Y-%m-%d %H:%M %Z")}


def write_report(path: Path, env_info: dict, prefix: str, budget_s: float, results: Path, tests: str,
                 train_rows: list[dict] | None, failures: list[str], phases_done: list[str]) -> None:
    """<gpu>-check.md from what has run so far (rewritten after every phase)."""
    table = targets_table(evaluate_targets(results, prefix))
    train_lines = ["not run yet"]
    if train_rows is not None:
        train_lines = ["| variant | compile | verdict | training loss by epoch | images/s | vs mixup off |",
                       "|---|---|---|---|---|---|"]
        for r in train_rows:
            ratio = "" if r["vs_off"] is None else f"{r['vs_off']:.3f}"
            ips = "" if r["images_per_s"] is None else f"{r['images_per_s']:,.0f}"
            train_lines.append(f"| {r['variant']} | {r['compile']} | {r['verdict']} | {r['train_loss']} | "
                               f"{ips} | {ratio} |")
        train_lines += ["", f"![throughput]({prefix}-train.png)"]
    env_line = ", ".join(f"{k} {v}" for k, v in env_info.items())
    report = "\n".join([
        f"# GPU check: {env_info['gpu']}", "", env_line, "",
        f"Command: `python bench/gpu_check.py --budget {budget_s:g}`; phases done: "
        f"{', '.join(phases_done) or 'none'}", "",
        "## Targets", "", table, "", f"## Tests on CUDA (`-k \"{TEST_SELECTION}\"`)\n\n{tests}", "",
        f"## Training throughput (`python -m mixrecipe.train cifar10 optim.lr={TRAIN_LR}`, learnable "
        "CIFAR-format data, last epoch)", "", *train_lines, "",
        "## Failures", "", *([f"- {f}" for f in failures] or ["none"]), ""])
    path.write_text(report)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default {RESULTS})")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds for the whole check (default {DEFAULT_BUDGET_S:g}); shares: "
                             + ", ".join(f"{n} {s:.0%}" for n, s in PHASES))
    parser.add_argument("--skip-tests", action="store_true", help="benchmarks and throughput only")
    parser.add_argument("--compile", action="store_true", help="also time compile=true training runs")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs per throughput run")
    parser.add_argument("--train-images", type=int, default=10000, help="CIFAR-format training images")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible to torch; this command only runs on a GPU machine "
              "(on CPU: `python -m pytest -q` and `python bench/ptx_report.py`)", file=sys.stderr)
        return 2
    clock = Clock(args.budget)
    env_info = _environment()
    prefix = common.results_prefix(torch.device("cuda"))
    args.out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    report = args.out / f"{prefix}-check.md"
    print(f"gpu_check on {env_info['gpu']} (driver {env_info['driver']}), torch {env_info['torch']}, "
          f"triton {env_info['triton']}, commit {env_info['commit']}; budget {args.budget:.0f} s; "
          f"logs in {logs}")
    failures: list[str] = []
    done: list[str] = []
    tests, train_rows = "skipped (--skip-tests)", None

    def report_now():
        write_report(report, env_info, prefix, args.budget, args.out, tests, train_rows, failures, done)

    if not args.skip_tests:
        code, text = _run(test_command(), logs / "pytest.log", timeout=clock.left("tests"))
        tests = test_summary(code, text)
        (args.out / f"{prefix}-tests.txt").write_text(f"{' '.join(test_command())}\n\n{text[-20000:]}")
        if code != 0:
            failures.append(f"tests: {tests}")
    done.append("tests")
    report_now()

    for i, (script, extra, share) in enumerate(BENCHMARKS):  # each its share of what the phase has left
        timeout = clock.left("benchmarks") * share / sum(s for _, _, s in BENCHMARKS[i:])
        cmd = [sys.executable, str(BENCH / script), "--device", "cuda", "--out", str(args.out), *extra]
        code, _ = _run(cmd, logs / f"{script}.log", timeout=timeout)
        if code != 0:
            failures.append(f"{script}: {'ran out of time' if code == 124 else f'exit {code}'} "
                            f"(log {logs / (script + '.log')})")
        report_now()
    done.append("benchmarks")

    with tempfile.TemporaryDirectory(prefix="gpu_check-train-") as work:
        train_rows = train_throughput(Path(work), logs, args.epochs, args.train_images,
                                      compile_modes=(False, True) if args.compile else (False,),
                                      deadline=lambda: clock.left("throughput"))
    failures += [f"train {r['variant']} compile={r['compile']}: {r['verdict']}"
                 for r in train_rows if r["verdict"] != "ok"]
    common.write_csv(train_rows, args.out / f"{prefix}-train.csv")
    plot_train(train_rows, args.out / f"{prefix}-train.png",
               f"CIFAR-format training throughput, preact_resnet18, batch 128, {env_info['gpu']}")
    done.append("throughput")
    report_now()

    print("\n" + targets_table(evaluate_targets(args.out, prefix)) + f"\n\ntests: {tests}")
    for f in failures:
        print(f"FAILED {f}")
    print(f"\nwrote {report} in {time.monotonic() - clock.start:.0f} s of a {args.budget:.0f} s budget")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
