"""One training step with mixup on vs off vs timm's Mixup: the share of the step that mixup costs.

    python bench/bench_step.py [--device cpu|cuda] [--quick] [--out DIR] [--model smallcnn|resnet50|...]

Writes ``<out>/<device>-step.csv`` and ``<device>-step.md``. A step is: mix the batch (variants with
mixup), forward, loss, backward, SGD with momentum. Defaults: on CUDA a torchvision ResNet-50 at
256 x 3 x 224 x 224, channels_last, bf16 input under ``torch.autocast(bfloat16)``, 1000 classes, Mixup
alpha 0.2 (the ImageNet recipe); on CPU a small 4-conv CNN at 128 x 3 x 32 x 32, 10 classes, alpha 1.0
(the CIFAR recipe). Variants (each with its own copy of the same initial model and optimizer):

- ``off``: no mixup, ``F.cross_entropy(logits, target, label_smoothing=0.1)``.
- ``ours-Mixup``: ``mixrecipe.Mixup(mixup_alpha, label_smoothing=0.1, num_classes=K)(x, t)`` (flip
  pairing, in place) + ``mixrecipe.loss.SoftTargetCrossEntropy``.
- ``ours-mix_batch``: ``Mixup.mix_batch(x, t)`` + ``mixup_cross_entropy`` (no (B, K) target matrix).
- ``timm-Mixup``: ``timm.data.Mixup(...)(x, t)`` + ``timm.loss.SoftTargetCrossEntropy``.

When ``mixrecipe.Mixup`` is unavailable, ``ours-op`` replaces the two ``ours`` variants: a host-drawn
Beta(alpha, alpha) lam and ``mixrecipe.mixup(x, t, lam, inplace=True)``.

Per step we time the mixing call (images + soft targets or lam) and the whole step: CUDA events on the
GPU (no synchronization inside the step), ``time.perf_counter`` on the CPU, where the variants' steps are
interleaved round-robin so background load hits them alike. ``mixup share`` is the median mixing time over
the median step time of that variant; ``step vs off`` is the step time over the ``off`` step's.
"""

from __future__ import annotations

import copy
import gc
import sys
import time

import common
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import mixrecipe
from mixrecipe.loss import SoftTargetCrossEntropy, mixup_cross_entropy

SMOOTHING = 0.1


def small_cnn(num_classes: int, width: int = 32) -> nn.Module:
    """Four 3x3 conv-BN-ReLU blocks (three with stride 2), global pooling, a linear head."""
    layers, c_in = [], 3
    for i, c_out in enumerate((width, 2 * width, 4 * width, 8 * width)):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                   nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        c_in = c_out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes))


def build_model(name: str, num_classes: int, quick: bool) -> nn.Module:
    if name == "smallcnn":
        return small_cnn(num_classes, width=8 if quick else 32)
    import torchvision

    return getattr(torchvision.models, name)(num_classes=num_classes)


def _policy_class():
    """``mixrecipe.Mixup``; None (its rows are skipped) where the policy is not there."""
    policy = getattr(mixrecipe, "Mixup", None)
    if policy is None:
        print("note: mixrecipe.Mixup unavailable; timing the op with a host-drawn lam", file=sys.stderr)
    return policy


def variants(alpha: float, num_classes: int, gen: np.random.Generator) -> dict:
    """name -> mix(x, t) returning (x, loss_fn(logits))."""
    import timm.data
    import timm.loss

    out = {"off": lambda x, t: (x, lambda z: F.cross_entropy(z, t, label_smoothing=SMOOTHING))}
    policy = _policy_class()
    soft_ce = SoftTargetCrossEntropy()
    if policy is not None:
        ours = policy(mixup_alpha=alpha, label_smoothing=SMOOTHING, num_classes=num_classes)

        def ours_mixup(x, t):
            x, soft = ours(x, t)
            return x, lambda z: soft_ce(z, soft)

        def ours_mix_batch(x, t):
            mb = ours.mix_batch(x, t)
            return mb.x, lambda z: mixup_cross_entropy(z, mb.target, mb.lam, mb.perm,
                                                       label_smoothing=mb.label_smoothing)

        out["ours-Mixup"] = ours_mixup
        out["ours-mix_batch"] = ours_mix_batch
    else:
        def ours_op(x, t):
            lam = float(gen.beta(alpha, alpha))
            x, soft = mixrecipe.mixup(x, t, lam, num_classes=num_classes, label_smoothing=SMOOTHING,
                                      inplace=True)
            return x, lambda z: soft_ce(z, soft)

        out["ours-op"] = ours_op
    tm = timm.data.Mixup(mixup_alpha=alpha, label_smoothing=SMOOTHING, num_classes=num_classes)
    timm_ce = timm.loss.SoftTargetCrossEntropy()

    def timm_mixup(x, t):
        x, soft = tm(x, t)
        return x, lambda z: timm_ce(z, soft)

    out["timm-Mixup"] = timm_mixup
    return out


class Trainer:
    """One variant: its own model and optimizer, a fixed batch it mixes in place every step."""

    def __init__(self, model, mix, x, t, device, amp_dtype):
        self.model, self.mix, self.x, self.t = model, mix, x, t
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.device, self.amp_dtype = device, amp_dtype
        self.mix_ms, self.step_ms = [], []

    def _step(self, before_mix=None, after_mix=None):
        x, loss_fn = self.mix(self.x, self.t)
        if after_mix is not None:
            after_mix()
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            loss = loss_fn(self.model(x))
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss

    def step(self, record: bool) -> None:
        if self.device.type == "cuda":
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            ev[0].record()
            self._step(after_mix=ev[1].record)
            ev[2].record()
            torch.cuda.synchronize()
            if record:
                self.mix_ms.append(ev[0].elapsed_time(ev[1]))
                self.step_ms.append(ev[0].elapsed_time(ev[2]))
            return
        marks = []
        t0 = time.perf_counter()
        self._step(after_mix=lambda: marks.append(time.perf_counter()))
        t1 = time.perf_counter()
        if record:
            self.mix_ms.append((marks[0] - t0) * 1e3)
            self.step_ms.append((t1 - t0) * 1e3)


def main(argv=None) -> None:
    p = common.parser(__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="smallcnn or a torchvision model name "
                                                 "(default: resnet50 on CUDA, smallcnn on CPU)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--size", type=int, default=None, help="image side in pixels")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per variant")
    args = p.parse_args(argv)
    device = common.setup(args)
    cuda = device.type == "cuda"
    model_name = args.model or ("resnet50" if cuda and not args.quick else "smallcnn")
    imagenet = model_name != "smallcnn"
    num_classes = 1000 if imagenet else 10
    alpha = 0.2 if imagenet else 1.0
    batch = args.batch or (8 if args.quick else 256 if imagenet else 128)
    size = args.size or (16 if args.quick else 224 if imagenet else 32)
    steps = args.steps or (3 if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    amp_dtype = torch.bfloat16 if cuda else None
    in_dtype = torch.bfloat16 if cuda else torch.float32
    env = common.environment(device)
    print(env)
    print(f"model {model_name}, batch {batch}x3x{size}x{size} {in_dtype}, {num_classes} classes, "
          f"alpha {alpha}, amp {amp_dtype}, {warmup} warm-up + {steps} timed steps per variant")

    torch.manual_seed(0)
    base = build_model(model_name, num_classes, args.quick).to(device)
    if cuda:
        base = base.to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, 3, size, size, generator=gen).to(device=device, dtype=in_dtype)
    x0 = x0.contiguous(memory_format=torch.channels_last) if cuda else x0
    t0 = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
    trainers = {name: Trainer(copy.deepcopy(base), mix, x0.clone(memory_format=torch.preserve_format), t0,
                              device, amp_dtype)
                for name, mix in variants(alpha, num_classes, np.random.default_rng(0)).items()}
    load_before = common.load1()
    gc.collect()
    if cuda:  # one variant after another: the GPU is not shared
        for tr in trainers.values():
            for i in range(warmup + steps):
                tr.step(record=i >= warmup)
    else:  # interleaved: background load lands on every variant alike
        for i in range(warmup + steps):
            for tr in trainers.values():
                tr.step(record=i >= warmup)
    load_after = common.load1()

    off = common.summarize(trainers["off"].step_ms)
    rows = []
    for name, tr in trainers.items():
        st, mx = common.summarize(tr.step_ms), common.summarize(tr.mix_ms)
        row = {
            "variant": name, "model": model_name, "batch": f"{batch}x3x{size}x{size}",
            "dtype": str(in_dtype).removeprefix("torch."), "amp": str(amp_dtype).removeprefix("torch."),
            "device": common.device_name(device), "step_median_ms": st.median, "step_p20_ms": st.p20,
            "step_p80_ms": st.p80, "mix_median_ms": None if name == "off" else mx.median,
            "mix_p20_ms": None if name == "off" else mx.p20, "mix_p80_ms": None if name == "off" else mx.p80,
            "mix_share_pct": None if name == "off" else 100 * mx.median / st.median,
            "step_vs_off": st.median / off.median, "steps": st.n,
        }
        if not cuda:
            row["load_before"], row["load_after"] = load_before, load_after
        rows.append(row)
    columns = [("variant", "variant"), ("step_median_ms", "step ms"), ("step_p20_ms", "p20"),
               ("step_p80_ms", "p80"), ("mix_median_ms", "mixup ms"), ("mix_share_pct", "mixup share %"),
               ("step_vs_off", "step / off")]
    table = common.markdown_table(rows, columns)
    print(table)
    checks = []
    for r in rows:
        if r["mix_share_pct"] is not None and r["variant"].startswith("ours"):
            ok = r["mix_share_pct"] <= 0.5
            scope = "" if cuda and model_name == "resnet50" else " (a target for ResNet-50 bf16 on a GPU)"
            checks.append(f"- {r['variant']}: mixup share of the step {r['mix_share_pct']:.3f}% "
                          f"(target <= 0.5%) -> {'met' if ok else 'MISSED'}{scope}")
    print("\n".join(checks))
    stem = common.stem(args, device, "step")
    common.write_csv(rows, stem.with_suffix(".csv"))
    md = [f"# Training-step benchmark ({device.type})", "", f"`{common.command_line()}`", "", env, "",
          f"Model {model_name}, batch {batch}x3x{size}x{size} {str(in_dtype).removeprefix('torch.')}, "
          f"{num_classes} classes, Mixup alpha {alpha}, label smoothing {SMOOTHING}, SGD momentum 0.9, "
          f"autocast {amp_dtype}; {steps} timed steps per variant after {warmup} warm-up steps. "
          "Times in ms (median, p20, p80); `mixup ms` is the mixing call inside the step.", "",
          common.load_note(rows), "", "## Targets", "", *checks, "", "## Rows", "", table, ""]
    common.write_text("\n".join(md), stem.with_suffix(".md"))
    print(f"\nwrote {stem}.csv, .md")


if __name__ == "__main__":
    main()
