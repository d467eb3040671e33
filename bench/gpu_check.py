"""One command for a GPU machine: the whole test suite on CUDA, the speed benchmarks, training throughput,
and a one-screen table of the GPU targets.

    python bench/gpu_check.py               # about 10 minutes on one H100
    python bench/gpu_check.py --skip-tests  # benchmarks and throughput only

Steps (each one's output is kept in the results, a failing step does not stop the others):
1. ``pytest -q`` with CUDA visible: every test with a ``device`` fixture runs on the GPU too.
2. ``bench_mixup.py``, ``bench_loss.py``, ``bench_step.py`` with ``--device cuda`` (CSV/Markdown/PNG).
3. Training throughput through the real loop (``python -m mixrecipe.train cifar10``) on CIFAR-shaped
   random data written in the real format: images/s of the last epoch with mixup off / on / on + CutMix,
   eager and ``compile=true``.
4. The targets below, read from those results.

Writes ``bench/results/<gpu>-{mixup,loss,step}.*`` (the benchmarks), ``<gpu>-train.csv``,
``<gpu>-train.png`` and ``<gpu>-check.md`` (environment: GPU, driver, torch/triton versions, commit; the
targets; test summary; throughput). Exit status: 0 when the tests pass (targets missed are reported, not
fatal: they are measurements), 1 when a test or a step fails, 2 when there is no CUDA device.
"""

from __future__ import annotations

import argparse
import csv
import json
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
)


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


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
        rows = cache.setdefault(t.source, _rows(results / f"{prefix}-{t.source}.csv"))
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
# Steps.
# --------------------------------------------------------------------------------------------------
def _run(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> tuple[int, str]:
    """Run a step, echo and keep its output; (exit status, output tail)."""
    print(f"\n$ {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        code, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        code, text = 124, f"{e.stdout or ''}{e.stderr or ''}\n(timed out after {timeout:.0f} s)"
    log.write_text(text if isinstance(text, str) else text.decode(errors="replace"))
    tail = "\n".join(str(text).strip().splitlines()[-3:])
    print(f"  -> exit {code} in {time.perf_counter() - start:.0f} s\n  {tail}", flush=True)
    return code, str(text)


def write_cifar_like(root: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    """Random CIFAR-10 in its real on-disk format (python pickles), for throughput only."""
    import numpy as np

    rng = np.random.default_rng(seed)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True, exist_ok=True)
    per = n_train // 5
    for name, n in [(f"data_batch_{i}", per) for i in range(1, 6)] + [("test_batch", n_test)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, n).tolist()}
        with open(base / name, "wb") as f:
            pickle.dump(batch, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)]}, f)


TRAIN_VARIANTS = {
    "mixup off": ["mixup.alpha=0", "mixup.cutmix_alpha=0"],
    "mixup": ["mixup.alpha=1", "mixup.cutmix_alpha=0"],
    "mixup+CutMix": ["mixup.alpha=1", "mixup.cutmix_alpha=1"],
}


def train_throughput(work: Path, logs: Path, epochs: int, n_train: int, *, device: str = "cuda",
                     variants=tuple(TRAIN_VARIANTS), compile_modes=(False, True), extra=()) -> list[dict]:
    """images/s of the last epoch of the real training loop, per variant, eager and compiled."""
    write_cifar_like(work / "data", n_train, min(2000, n_train))
    rows = []
    for compiled in compile_modes:
        for variant in variants:
            overrides = TRAIN_VARIANTS[variant]
            out = work / f"run-{len(rows)}"
            cmd = [sys.executable, "-m", "mixrecipe.train", "cifar10", f"data.root={work / 'data'}",
                   f"epochs={epochs}", "batch_size=128", f"output={out}", f"compile={str(compiled).lower()}",
                   "preview=false", "progress=false", f"device={device}", *overrides, *extra]
            code, _ = _run(cmd, logs / f"train-{len(rows)}.log", timeout=900)
            ips = None
            metrics = out / "metrics.jsonl"
            if code == 0 and metrics.exists():
                last = json.loads(metrics.read_text().strip().splitlines()[-1])
                ips = last.get("images_per_s")
            rows.append({"variant": variant, "compile": compiled, "images_per_s": ips, "exit": code})
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
    variants = list(TRAIN_VARIANTS)
    for k, compiled in enumerate((False, True)):
        ips = {r["variant"]: r["images_per_s"] or 0 for r in rows if r["compile"] == compiled}
        vals = [ips.get(v, 0) for v in variants]
        xs = [i + (k - 0.5) * 0.38 for i in range(len(variants))]
        ax.bar(xs, vals, width=0.38, label="compile=true" if compiled else "eager")
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results folder (default {RESULTS})")
    parser.add_argument("--skip-tests", action="store_true", help="benchmarks and throughput only")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs per throughput run")
    parser.add_argument("--train-images", type=int, default=20000, help="CIFAR-shaped training images")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible to torch; this command only runs on a GPU machine "
              "(on CPU: `python -m pytest -q` and `python bench/ptx_report.py`)", file=sys.stderr)
        return 2
    env_info = _environment()
    prefix = common.results_prefix(torch.device("cuda"))
    args.out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    print(f"gpu_check on {env_info['gpu']} (driver {env_info['driver']}), torch {env_info['torch']}, "
          f"triton {env_info['triton']}, commit {env_info['commit']}; logs in {logs}")
    failures = []

    test_summary = "skipped (--skip-tests)"
    if not args.skip_tests:
        code, text = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                          logs / "pytest.log", timeout=1800)
        found = re.findall(r"^=*\s*(\d+ (?:passed|failed).*?)\s*=*$", text, flags=re.M)
        test_summary = found[-1] if found else f"exit {code}"
        if code != 0:
            failures.append(f"pytest: {test_summary}")

    for script in ("bench_mixup.py", "bench_loss.py", "bench_step.py"):
        code, _ = _run([sys.executable, str(BENCH / script), "--device", "cuda", "--out", str(args.out)],
                       logs / f"{script}.log", timeout=1200)
        if code != 0:
            failures.append(f"{script}: exit {code} (log {logs / (script + '.log')})")

    with tempfile.TemporaryDirectory(prefix="gpu_check-train-") as work:
        train_rows = train_throughput(Path(work), logs, args.epochs, args.train_images)
    failures += [f"train {r['variant']} compile={r['compile']}: exit {r['exit']}"
                 for r in train_rows if r["exit"]]
    with open(args.out / f"{prefix}-train.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(train_rows[0]))
        writer.writeheader()
        writer.writerows(train_rows)
    plot_train(train_rows, args.out / f"{prefix}-train.png",
               f"CIFAR-shaped training throughput, preact_resnet18, batch 128, {env_info['gpu']}")

    evaluated = evaluate_targets(args.out, prefix)
    table = targets_table(evaluated)
    train_lines = ["| variant | compile | images/s | vs mixup off |", "|---|---|---|---|"]
    for r in train_rows:
        ratio = "" if r["vs_off"] is None else f"{r['vs_off']:.3f}"
        train_lines.append(f"| {r['variant']} | {r['compile']} | {r['images_per_s'] or 'failed'} | {ratio} |")
    env_line = ", ".join(f"{k} {v}" for k, v in env_info.items())
    report = "\n".join([
        f"# GPU check: {env_info['gpu']}", "", env_line, "", "Command: `python bench/gpu_check.py`", "",
        "## Targets", "", table, "", f"## Tests on CUDA\n\n{test_summary}", "",
        "## Training throughput (`python -m mixrecipe.train cifar10`, random CIFAR-shaped data, last epoch)",
        "",
        *train_lines, "", f"![throughput]({prefix}-train.png)", "",
        "## Failures", "", *([f"- {f}" for f in failures] or ["none"]), ""])
    (args.out / f"{prefix}-check.md").write_text(report)
    print("\n" + table + f"\n\ntests: {test_summary}")
    for f in failures:
        print(f"FAILED {f}")
    print(f"\nwrote {args.out / (prefix + '-check.md')}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
