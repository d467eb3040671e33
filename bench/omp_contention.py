"""Whether the CPU kernel runs slow right after a parallel PyTorch op, whose OpenMP threads keep spinning.

    python bench/omp_contention.py                          # the default OpenMP wait policy
    OMP_WAIT_POLICY=PASSIVE python bench/omp_contention.py --tag omp-passive   # threads sleep at once

The kernel's parallel launches run on PyTorch's own OpenMP team, so the spinning threads take the work
instead of competing for the cores (a separate thread pool took 1.55-2.08x the floor at gap 0 on 2 cores).
Each round restores the batch with ``x.copy_(x0)`` (a parallel PyTorch op), waits ``gap`` and times one
in-place ``mixrecipe.mixup``; the floor ``s.mul_(1.0)`` is timed the same way on its own buffer. Writes
``<out>/cpu[-<tag>]-omp.md`` with the median times and their ratio per gap.
"""

from __future__ import annotations

import time

import common
import numpy as np
import torch

import mixrecipe

GAPS_MS = (0.0, 1.0, 5.0, 20.0)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def measure(shape: tuple[int, ...], rounds: int, gaps_ms=GAPS_MS) -> list[dict]:
    """Median ms of the in-place mix and of the floor, each ``gap`` after restoring its buffer."""
    x0 = torch.randn(shape)
    x, s = x0.clone(), x0.clone()
    mix = lambda: mixrecipe.mixup(x, None, 0.3, inplace=True)  # noqa: E731
    floor = lambda: s.mul_(1.0)  # noqa: E731
    for _ in range(2):
        x.copy_(x0)
        mix()
    rows = []
    for gap in gaps_ms:
        t_mix, t_floor = [], []
        for _ in range(rounds):
            x.copy_(x0)
            time.sleep(gap / 1e3)
            t_mix.append(_timed(mix))
            s.copy_(x0)
            time.sleep(gap / 1e3)
            t_floor.append(_timed(floor))
        m, f = float(np.median(t_mix)), float(np.median(t_floor))
        rows.append({"gap_ms": gap, "mix_ms": m, "floor_ms": f, "ratio": m / f})
    return rows


def main(argv=None) -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15, help="timed calls per gap (default 15)")
    args = p.parse_args(argv)
    if args.device != "cpu":
        raise SystemExit("omp_contention.py measures the CPU kernel: --device cpu only")
    device = common.setup(args)
    shape = (4, 3, 32, 32) if args.quick else (128, 3, 224, 224)
    rows = measure(shape, 2 if args.quick else args.rounds)
    lines = [
        "# CPU kernel right after a parallel PyTorch op",
        "",
        f"`{common.command_line()}`",
        "",
        f"{common.environment(device)}; batch {'x'.join(map(str, shape))} fp32",
        "",
        "Median ms of one in-place `mixrecipe.mixup` and of the floor `x.mul_(1.0)`, each started `gap` "
        "after restoring its buffer with `copy_` (a parallel PyTorch op).",
        "",
        "| gap ms | mixup ms | floor ms | mixup / floor |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['gap_ms']:g} | {r['mix_ms']:.3g} | {r['floor_ms']:.3g} | {r['ratio']:.2f} |"
              for r in rows]
    path = common.stem(args, device, "omp").with_suffix(".md")
    common.write_text("\n".join(lines) + "\n", path)
    print("\n".join(lines[-len(rows) - 2:]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
