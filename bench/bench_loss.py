"""Mixup loss speed and memory: mixup_cross_entropy vs the dense soft-target path, forward + backward.

    python bench/bench_loss.py [--device cpu|cuda] [--quick] [--out DIR] [--dtypes fp32,bf16]

Writes ``<out>/<device>-loss.csv`` and ``<device>-loss.md``. Every provider computes the same number,
timm's mixup loss with flip pairing, lam = 0.7 and label smoothing 0.1, and its gradient w.r.t. the
logits (a leaf tensor; ``.grad`` is reset before each call):

- ``ours-mixup-ce``: ``mixrecipe.loss.mixup_cross_entropy(logits, target, lam, label_smoothing=0.1)``;
  never builds the (B, K) target matrix (Triton kernels on CUDA, plain PyTorch on CPU).
- ``ours-dense``: ``mixrecipe.loss.SoftTargetCrossEntropy()(logits, mixrecipe.mixup_target(...))``.
- ``timm-dense``: ``timm.loss.SoftTargetCrossEntropy()(logits, timm.data.mixup.mixup_target(...))``,
  what timm's train loop runs (the target is built every step).
- ``eager-two-ce``: fastai's MixUp loss, ``torch.lerp(ce(logits, t[perm]), ce(logits, t), lam).mean()``
  with ``F.cross_entropy(..., reduction="none", label_smoothing=0.1)``.
- ``ce-no-mixup``: ``F.cross_entropy(logits, target, label_smoothing=0.1)``, the floor (no mixup at all).

Bytes model for GB/s: forward reads the logits, backward reads them again and writes the gradient:
3 * B * K * element size (targets and per-row values are negligible). Peak memory is what one
forward + backward allocates above what was allocated before it, the gradient included (B*K*e).
Before timing, each provider's loss and gradient are checked against a float64 reference built from
``mixrecipe.reference.mixup_target_reference``.
"""

from __future__ import annotations

import common
import torch
import torch.nn.functional as F

import mixrecipe
from mixrecipe.loss import SoftTargetCrossEntropy, mixup_cross_entropy
from mixrecipe.reference import mixup_target_reference

LAM = 0.7
SMOOTHING = 0.1
PEERS = ("timm-dense", "ours-dense", "eager-two-ce")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def shapes(quick: bool) -> list[tuple[int, int]]:
    if quick:
        return [(8, 10), (16, 100)]
    return [(128, 10), (256, 1000), (1024, 1000), (256, 21843)]


def providers(logits: torch.Tensor, target: torch.Tensor) -> dict:
    """name -> callable computing the mixup loss (not yet backpropagated)."""
    import timm.data.mixup
    import timm.loss

    k = logits.shape[1]
    flip = target.flip(0)
    timm_ce, ours_ce = timm.loss.SoftTargetCrossEntropy(), SoftTargetCrossEntropy()

    def two_ce(z):
        own = F.cross_entropy(z, target, reduction="none", label_smoothing=SMOOTHING)
        other = F.cross_entropy(z, flip, reduction="none", label_smoothing=SMOOTHING)
        return torch.lerp(other, own, LAM).mean()

    return {
        "ours-mixup-ce": lambda z: mixup_cross_entropy(z, target, LAM, label_smoothing=SMOOTHING),
        "ours-dense": lambda z: ours_ce(z, mixrecipe.mixup_target(target, k, LAM, label_smoothing=SMOOTHING)),
        "timm-dense": lambda z: timm_ce(z, timm.data.mixup.mixup_target(target, k, LAM, SMOOTHING)),
        "eager-two-ce": two_ce,
        "ce-no-mixup": lambda z: F.cross_entropy(z, target, label_smoothing=SMOOTHING),
    }


def step(loss_fn, logits):
    """One forward + backward with a fresh gradient: what a training step pays for the loss."""

    def run():
        logits.grad = None
        loss_fn(logits).backward()

    return run


def verify(logits: torch.Tensor, target: torch.Tensor, dtype: torch.dtype) -> None:
    """Each mixup provider's loss and gradient against float64 math on the reference's soft targets."""
    k = logits.shape[1]
    z = logits.detach().double().requires_grad_(True)
    soft = mixup_target_reference(target, k, LAM, label_smoothing=SMOOTHING).double()
    ref = torch.sum(-soft * torch.log_softmax(z, dim=1), dim=1).mean()
    ref.backward()
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for name, fn in providers(logits, target).items():
        if name == "ce-no-mixup":
            continue
        logits.grad = None
        loss = fn(logits)
        loss.backward()
        torch.testing.assert_close(loss.double(), ref.detach(), **tol, msg=lambda m, n=name: f"{n}: {m}")
        # bf16 gradients: compare scaled by the batch so the tolerance is about softmax values.
        torch.testing.assert_close(logits.grad.double() * logits.shape[0], z.grad * logits.shape[0], **tol,
                                   msg=lambda m, n=name: f"{n} grad: {m}")
    logits.grad = None


def run_shape(batch: int, k: int, dtype: torch.dtype, device: torch.device, args) -> list[dict]:
    gen = torch.Generator().manual_seed(batch * 7 + k)
    logits = (torch.randn(batch, k, generator=gen) * 2).to(device=device, dtype=dtype).requires_grad_(True)
    target = torch.randint(0, k, (batch,), generator=gen).to(device)
    verify(logits, target, dtype)
    fns = {name: step(fn, logits) for name, fn in providers(logits, target).items()}
    load_before = common.load1()
    timings = common.time_providers(fns, device, quick=args.quick, target_s=args.seconds)
    # The warm-up call leaves a gradient behind; drop it so the measured step's own gradient counts.
    drop_grad = lambda: setattr(logits, "grad", None)
    peaks = {name: common.peak_memory_bytes(fn, device, before=drop_grad) for name, fn in fns.items()}
    load_after = common.load1()
    nbytes = 3 * batch * k * logits.element_size()
    rows = []
    for name, t in timings.items():
        row = {
            "B": batch, "K": k, "dtype": next(n for n, d in DTYPES.items() if d == dtype), "provider": name,
            "device": common.device_name(device), "median_ms": t.median, "p20_ms": t.p20, "p80_ms": t.p80,
            "samples": t.n or None, "gbps": nbytes / (t.median * 1e-3) / 1e9,
            "peak_mib": peaks[name] / 2**20, "x_ce": t.median / timings["ce-no-mixup"].median,
        }
        for peer in PEERS:
            row[f"vs_{peer}"] = timings[peer].median / t.median if name.startswith("ours-mixup") else None
        if device.type == "cpu":
            row["load_before"], row["load_after"] = load_before, load_after
        rows.append(row)
    return rows


COLUMNS = [("B", "B"), ("K", "K"), ("dtype", "dtype"), ("provider", "provider"), ("median_ms", "median ms"),
           ("p20_ms", "p20"), ("p80_ms", "p80"), ("gbps", "GB/s"), ("peak_mib", "peak MiB"),
           ("x_ce", "t / plain CE"), ("vs_timm-dense", "x vs timm-dense"),
           ("vs_ours-dense", "x vs ours-dense"), ("vs_eager-two-ce", "x vs two-CE")]


def summary_table(rows: list[dict]) -> str:
    """One line per (B, K, dtype): each provider's ms, ours' speedup vs timm, peak MiB of ours and timm."""
    out = []
    keys = list(dict.fromkeys((r["B"], r["K"], r["dtype"]) for r in rows))
    names = list(dict.fromkeys(r["provider"] for r in rows))
    for b, k, dt in keys:
        by = {r["provider"]: r for r in rows if (r["B"], r["K"], r["dtype"]) == (b, k, dt)}
        line = {"shape": f"({b}, {k})", "dtype": dt}
        line.update({n: by[n]["median_ms"] for n in names})
        line["speedup"] = by["ours-mixup-ce"]["vs_timm-dense"]
        line["peak_ours"] = by["ours-mixup-ce"]["peak_mib"]
        line["peak_timm"] = by["timm-dense"]["peak_mib"]
        out.append(line)
    cols = [("shape", "(B, K)"), ("dtype", "dtype")] + [(n, f"{n} ms") for n in names]
    cols += [("speedup", "ours vs timm-dense"), ("peak_ours", "peak MiB ours"),
             ("peak_timm", "peak MiB timm")]
    return common.markdown_table(out, cols)


def target_checks(rows: list[dict], device: torch.device) -> list[str]:
    lines = []
    for r in rows:
        if (r["B"], r["K"]) == (256, 1000) and r["provider"] == "ours-mixup-ce":
            v = r["vs_timm-dense"]
            verdict = "met" if v >= 2.0 else "MISSED"
            scope = "" if device.type == "cuda" else " (a GPU target; the CPU figure is for reference)"
            lines.append(f"- (256, 1000) {r['dtype']}: ours-mixup-ce speedup vs timm-dense (fwd+bwd): "
                         f"{v:.2f}x (target >= 2x) -> {verdict}{scope}")
    return lines or ["- (256, 1000) not measured"]


def main(argv=None) -> None:
    p = common.parser(__doc__.split("\n")[0])
    p.add_argument("--dtypes", default=None,
                   help="comma-separated logits dtypes (default: fp32 on CPU, fp32,bf16 on CUDA)")
    p.add_argument("--seconds", type=float, default=2.0, help="CPU: time budget per shape (default 2)")
    args = p.parse_args(argv)
    device = common.setup(args)
    names = args.dtypes or ("fp32,bf16" if device.type == "cuda" else "fp32")
    dtypes = [DTYPES[n.strip()] for n in names.split(",")]
    env = common.environment(device)
    print(env)
    rows = []
    for dtype in dtypes:
        for batch, k in shapes(args.quick):
            r = run_shape(batch, k, dtype, device, args)
            rows += r
            print()
            print(common.markdown_table(r, COLUMNS), flush=True)
    checks = target_checks(rows, device)
    print("\n" + "\n".join(checks))
    stem = common.stem(args, device, "loss")
    common.write_csv(rows, stem.with_suffix(".csv"))
    md = [f"# Loss benchmark ({device.type}): forward + backward", "", f"`{common.command_line()}`", "", env,
          "", "Times in ms (median, p20, p80) of one forward + backward; GB/s by the 3·B·K·e bytes model; "
          "peak MiB allocated above the start, the gradient included; `x vs P` is P's time over ours.",
          common.load_note(rows), "", "## Targets", "", *checks, "", "## Summary", "", summary_table(rows),
          "", "## All rows", "", common.markdown_table(rows, COLUMNS), ""]
    common.write_text("\n".join(md), stem.with_suffix(".md"))
    print(f"\nwrote {stem}.csv, .md")


if __name__ == "__main__":
    main()
