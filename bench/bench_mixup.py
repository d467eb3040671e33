"""Mixup speed: mixrecipe's one-pass op and policy vs eager gather+lerp, timm's Mixup, torch.compile, a copy.

    python bench/bench_mixup.py [--device cpu|cuda] [--quick] [--out DIR] [--compile | --no-compile]

Writes ``<out>/<device>-mixup.csv`` (every row), ``<device>-mixup.md`` (tables and the target checks) and
``<device>-mixup.png`` (time relative to the copy, per case).

Providers (every one gets its own tensor of the same shape, dtype and layout, made from one base tensor;
"alloc" says whether it allocates the mixed batch on every call):

- ``copy``: ``dst.copy_(x)`` into a warm preallocated tensor, the bandwidth reference (one read + one
  write); ``t / copy`` is the time over it. In a loader case it is the bare conversion
  ``dst_bf16.copy_(x_uint8)``, the floor of the uint8 -> bf16 rows.
- ``convert-alloc`` (loader cases): ``x_uint8.to(torch.bfloat16)``, the conversion into a fresh tensor
  from torch's allocator, which pays new pages (faulted in and zeroed by the OS) on every call at this
  size, as ``ours-op-flip``'s fresh outputs do.
- ``scale-inplace``: ``x.mul_(1.0)`` on the same buffer, the floor for in-place passes (float cases):
  one ATen op that reads and writes the same bytes an in-place mixup does; ``t / in-place`` is the time
  over it. On the CPU the copy's time depends on where its two buffers landed (1.7 or 3.0 ms for the same
  77 MB copy in different processes); this one is steadier, so the CPU targets use it.
- ``ours-op-flip``: ``mixrecipe.mixup(x, t, 0.7, num_classes=K, label_smoothing=0.1, inplace=True)``:
  timm's flip pairing, one λ, in place (loader cases: uint8 -> normalized bf16, out of place).
- ``ours-op-out`` (loader cases): ``ours-op-flip`` writing into a warm preallocated buffer (``out=``), as
  a loader that reuses its batch buffers calls it; the same conditions as the ``copy`` floor.
- ``ours-op-perm``: ``mixrecipe.mixup(x, t, lam, perm, ...)`` with a random permutation and per-sample
  λ, out of place: the same work as ``eager-lerp``.
- ``ours-Mixup-batch`` / ``-pair`` / ``-elem``: the policy ``mixrecipe.Mixup`` with timm's arguments
  (λ ~ Beta(α, α) drawn every call; one λ per batch / per pair / per sample; flip pairing, in place).
- ``ours-MixCut-batch`` / ``timm-MixCut-batch``: both policies with Mixup and CutMix (``cutmix_alpha=1.0``,
  timm's ``switch_prob=0.5``), as timm's ImageNet recipes run them: half the calls paste a box.
- ``eager-lerp``: the fastai / Composer formula in plain torch, ``torch.lerp(x[perm], x, lam)`` with
  per-sample λ, and timm's smoothed one-hot targets (``full`` + ``scatter_``) lerped the same way
  (loader cases: timm PrefetchLoader's ``x.to(bf16).sub_(mean).div_(std)`` first).
- ``timm-batch`` / ``timm-elem``: ``timm.data.Mixup(mixup_alpha=α, label_smoothing=0.1, num_classes=K,
  mode=...)(x, t)``, in place like timm's train loop (loader cases: after the PrefetchLoader conversion).
- ``compile-lerp``: ``torch.compile`` of ``eager-lerp`` (default on CUDA; ``--compile`` on CPU).
- ``tv-MixUp`` / ``tv-CutMix``: ``torchvision.transforms.v2.MixUp`` / ``CutMix(alpha=α, num_classes=K)(x, t)``
  (one λ and box per call drawn on the host, ``roll(1, 0)`` pairing, out of place; loader cases after the
  PrefetchLoader conversion: torchvision's MixUp cannot take uint8); ``ours-tv-MixUp`` / ``ours-tv-CutMix``:
  ``mixrecipe.transforms``' drop-ins, the same draws and outputs through the one-pass op.

Repeated in-place mixing: mixing the same buffer call after call pulls each pair of rows together
(their difference shrinks by |λ_i + λ_j - 1| every call) until it is subnormal, which x86 CPUs compute
tens of times slower; timings then say more about the benchmark than about the code (the per-sample modes
once read 2.3x slower than batch mode for this reason alone). No training loop mixes a batch twice, so every
in-place provider's buffer is restored from the base tensor before each round, outside the timing.

Minimum-bytes model (what any implementation must move; GB/s = these bytes / median time):

    float case   read B*N*e + write B*N*e      (e bytes per element; an out-of-place gather reads each
                                                partner row once more, but the minimum is once)
    loader case  read B*N*1 + write B*N*2      (uint8 in, bf16 out)
    labels       read B*8 + write B*K*4        (int64 class indices in, float32 soft targets out)
    copy         the images' bytes only, no labels

Before timing, every deterministic provider is checked against ``mixrecipe.reference.mix_reference``
(float64) on a 4-sample batch of the case's dtype and layout, so no baseline can drift from the semantics;
``compile-lerp`` is checked against ``eager-lerp`` on the full batch; the policies' soft targets must
sum to 1.
On CUDA, small batches are also timed in CUDA-graph mode (launch overhead removed). ``ops/call`` counts,
with torch.profiler, the GPU operations (kernels, memsets, copies) of one call on CUDA and the top-level
ATen operators it dispatches on CPU (each a dispatch and, for big tensors, an OpenMP parallel region).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import common
import torch

import mixrecipe
from mixrecipe.reference import mix_reference

MEAN = (0.485, 0.456, 0.406)  # timm's IMAGENET_DEFAULT_MEAN / STD, in [0, 1] units
STD = (0.229, 0.224, 0.225)
SMOOTHING = 0.1
LAM = 0.7
PEERS = ("eager-lerp", "timm-batch", "timm-elem", "compile-lerp")
ORDER = ("copy", "convert-alloc", "scale-inplace", "ours-op-flip", "ours-op-out",
         "ours-Mixup-batch", "ours-Mixup-pair", "ours-Mixup-elem", "ours-MixCut-batch", "ours-op-perm",
         "eager-lerp", "compile-lerp", "timm-batch", "timm-elem", "timm-MixCut-batch", "ours-tv-MixUp",
         "tv-MixUp", "ours-tv-CutMix", "tv-CutMix")
GRAPH_MAX_BYTES = 16 << 20  # CUDA-graph rows for batches up to this size (the CIFAR-size ones)


@dataclass(frozen=True)
class Case:
    shape_name: str   # "cifar-128", ...
    batch: int
    chw: tuple[int, int, int]
    num_classes: int
    alpha: float      # the paper's default: 1.0 for CIFAR, 0.2 for ImageNet
    dtype: torch.dtype  # input dtype (uint8 for a loader case)
    channels_last: bool

    @property
    def loader(self) -> bool:
        return self.dtype == torch.uint8

    @property
    def out_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.loader else self.dtype

    @property
    def variant(self) -> str:
        dt = {torch.uint8: "u8->bf16", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[
            self.dtype]
        return f"{dt} {'CL' if self.channels_last else 'NCHW'}"

    @property
    def name(self) -> str:
        return f"{self.shape_name} {self.variant}"

    @property
    def elems(self) -> int:
        c, h, w = self.chw
        return self.batch * c * h * w

    def image_bytes(self) -> int:
        """Minimum bytes for the images: one read of the input, one write of the output."""
        return self.elems * (_esize(self.dtype) + _esize(self.out_dtype))

    def label_bytes(self) -> int:
        return self.batch * 8 + self.batch * self.num_classes * 4


def _esize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def cases(quick: bool) -> list[Case]:
    if quick:
        s = ("tiny-8", 8, (3, 16, 16), 10, 1.0)
        return [Case(*s, torch.float32, False), Case(*s, torch.bfloat16, True), Case(*s, torch.uint8, False)]
    shapes = [("cifar-128", 128, (3, 32, 32), 10, 1.0), ("cifar-512", 512, (3, 32, 32), 10, 1.0),
              ("imagenet-128", 128, (3, 224, 224), 1000, 0.2),
              ("imagenet-256", 256, (3, 224, 224), 1000, 0.2)]
    out = []
    for s in shapes:
        for dtype in (torch.float32, torch.bfloat16, torch.uint8):
            for cl in (False, True):
                out.append(Case(*s, dtype, cl))
    return out


# --------------------------------------------------------------------------------------------------
# Inputs and providers.
# --------------------------------------------------------------------------------------------------
def make_input(case: Case, batch: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    shape = (batch, *case.chw)
    if case.loader:
        x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen).to(device)
    else:
        x = torch.randn(shape, generator=gen).to(device=device, dtype=case.dtype)
    return x.contiguous(memory_format=torch.channels_last) if case.channels_last else x


def _channel(values, case: Case, device) -> torch.Tensor:
    """(1, C, 1, 1) in the batch's out dtype, in 0..255 units (timm PrefetchLoader's constants)."""
    return (torch.tensor(values) * 255).view(1, -1, 1, 1).to(device=device, dtype=case.out_dtype)


@dataclass
class Provider:
    name: str
    fn: Callable[[], object]
    allocates: bool
    graphable: bool  # same work on every replay: no host-side sampling
    buffer: torch.Tensor | None = None  # the batch it mixes in place, restored from x0 before every round


def draws(case: Case, batch: int, device: torch.device, gen: torch.Generator):
    """The op-level providers' fixed (perm, per-sample lam), drawn once per case outside the timing."""
    perm = torch.randperm(batch, generator=gen).to(device)
    g = torch._standard_gamma(torch.full((2, batch), case.alpha), generator=gen)
    lam_vec = (g[0] / (g[0] + g[1])).nan_to_num(0.5).to(device)  # Beta(alpha, alpha)
    return perm, lam_vec


def providers(case: Case, x0: torch.Tensor, target: torch.Tensor, perm: torch.Tensor, lam_vec: torch.Tensor,
              device: torch.device, *, with_compile: bool) -> list[Provider]:
    """The providers of one case. Each in-place one gets its own clone of ``x0`` (same values)."""
    batch, k = x0.shape[0], case.num_classes
    lam_img = lam_vec.to(case.out_dtype).view(batch, 1, 1, 1)
    mean_std = dict(mean=MEAN, std=STD, out_dtype=torch.bfloat16) if case.loader else {}
    mean255, std255 = _channel(MEAN, case, device), _channel(STD, case, device)
    off = SMOOTHING / k
    on = 1.0 - SMOOTHING + off
    own = lambda: x0.clone(memory_format=torch.preserve_format)  # noqa: E731 - one clone per provider
    out: list[Provider] = []

    dst = torch.empty_like(x0, dtype=case.out_dtype)
    out.append(Provider("copy", lambda: dst.copy_(x0), False, True))
    if case.loader:
        out.append(Provider("convert-alloc", lambda: x0.to(case.out_dtype), True, True))
    if not case.loader:
        x_scale = own()
        out.append(Provider("scale-inplace", lambda: x_scale.mul_(1.0), False, True, x_scale))

    x_flip = x0 if case.loader else own()
    out.append(Provider(
        "ours-op-flip",
        lambda: mixrecipe.mixup(x_flip, target, LAM, num_classes=k, label_smoothing=SMOOTHING,
                                inplace=not case.loader, **mean_std),
        case.loader, True, None if case.loader else x_flip))
    if case.loader:
        out_buf = torch.empty_like(x0, dtype=case.out_dtype)
        out.append(Provider(
            "ours-op-out",
            lambda: mixrecipe.mixup(x0, target, LAM, num_classes=k, label_smoothing=SMOOTHING, out=out_buf,
                                    **mean_std),
            False, True))
    policy = _policy_class()
    if policy is not None:
        for mode in ("batch", "pair", "elem"):
            m = policy(mixup_alpha=case.alpha, label_smoothing=SMOOTHING, num_classes=k, mode=mode,
                       **mean_std)
            xm = x0 if case.loader else own()
            out.append(Provider(f"ours-Mixup-{mode}", lambda m=m, xm=xm: m(xm, target), case.loader, False,
                                None if case.loader else xm))
        m = policy(mixup_alpha=case.alpha, cutmix_alpha=1.0, label_smoothing=SMOOTHING, num_classes=k,
                   **mean_std)
        xm = x0 if case.loader else own()
        out.append(Provider("ours-MixCut-batch", lambda m=m, xm=xm: m(xm, target), case.loader, False,
                            None if case.loader else xm))
    out.append(Provider(
        "ours-op-perm",
        lambda: mixrecipe.mixup(x0, target, lam_vec, perm, num_classes=k, label_smoothing=SMOOTHING,
                                **mean_std),
        True, True))

    def eager_lerp(x):
        # fastai MixUp / Composer: gather the partners, lerp with per-sample lam (out of place).
        if case.loader:
            x = x.to(case.out_dtype).sub_(mean255).div_(std255)  # timm PrefetchLoader
        mixed = torch.lerp(x[perm], x, lam_img)
        # Smoothed one-hot as timm builds it (full + scatter_: no host sync, so CUDA graphs capture it).
        s = torch.full((batch, k), off, device=x.device).scatter_(1, target.view(-1, 1), on)
        return mixed, torch.lerp(s[perm], s, lam_vec.view(-1, 1))

    out.append(Provider("eager-lerp", lambda: eager_lerp(x0), True, True))
    if with_compile:
        compiled = torch.compile(eager_lerp, dynamic=False)
        out.append(Provider("compile-lerp", lambda: compiled(x0), True, True))

    import timm.data

    for name, mode, cutmix in (("timm-batch", "batch", 0.0), ("timm-elem", "elem", 0.0),
                               ("timm-MixCut-batch", "batch", 1.0)):
        tm = timm.data.Mixup(mixup_alpha=case.alpha, cutmix_alpha=cutmix, label_smoothing=SMOOTHING,
                             num_classes=k, mode=mode)
        if case.loader:
            fn = lambda tm=tm: tm(x0.to(case.out_dtype).sub_(mean255).div_(std255), target)  # noqa: E731
        else:
            xt = own()
            fn = lambda tm=tm, xt=xt: tm(xt, target)  # noqa: E731
        out.append(Provider(name, fn, case.loader or mode == "elem", False, None if case.loader else xt))
    out += _torchvision_providers(case, x0, target, mean255, std255)
    order = {n: i for i, n in enumerate(ORDER)}
    return sorted(out, key=lambda p: order[p.name])


def _torchvision_providers(case: Case, x0, target, mean255, std255) -> list[Provider]:
    """torchvision's v2 MixUp/CutMix and mixrecipe.transforms' drop-ins, on the same batch."""
    from torchvision.transforms import v2

    from mixrecipe import transforms

    out = []
    for name, cls in (("tv-MixUp", v2.MixUp), ("tv-CutMix", v2.CutMix), ("ours-tv-MixUp", transforms.MixUp),
                      ("ours-tv-CutMix", transforms.CutMix)):
        t = cls(alpha=case.alpha, num_classes=case.num_classes)
        if case.loader:
            fn = lambda t=t: t(x0.to(case.out_dtype).sub_(mean255).div_(std255), target)  # noqa: E731
        else:
            fn = lambda t=t: t(x0, target)  # noqa: E731
        out.append(Provider(name, fn, True, False))
    return out


def _policy_class():
    """``mixrecipe.Mixup``; None (its rows are skipped) where the policy is not there."""
    policy = getattr(mixrecipe, "Mixup", None)
    if policy is None:
        print("note: mixrecipe.Mixup unavailable; its rows are skipped", file=sys.stderr)
    return policy


# --------------------------------------------------------------------------------------------------
# Check against the reference before timing.
# --------------------------------------------------------------------------------------------------
def verify(case: Case, device: torch.device, with_compile: bool) -> None:
    """Every provider with fixed (lam, perm) must match the float64 reference on a 4-sample batch."""
    gen = torch.Generator().manual_seed(1)
    x0 = make_input(case, 4, device, gen)
    target = torch.randint(0, case.num_classes, (4,), generator=gen).to(device)
    perm, lam_vec = draws(case, 4, device, gen)
    ps = {p.name: p for p in providers(case, x0, target, perm, lam_vec, device, with_compile=with_compile)}
    tol = dict(rtol=1e-5, atol=1e-5) if case.out_dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    norm = dict(mean=MEAN, std=STD) if case.loader else {}
    checks = {"ours-op-flip": (LAM, None), "ours-op-perm": (lam_vec, perm), "eager-lerp": (lam_vec, perm)}
    if "compile-lerp" in ps:
        checks["compile-lerp"] = (lam_vec, perm)
    if "ours-op-out" in ps:
        checks["ours-op-out"] = (LAM, None)
    for name, (lam, p) in checks.items():
        # In-place providers hold fresh clones of x0: before their first call they equal x0.
        ref_x, ref_soft = mix_reference(x0, target, lam, perm=p, num_classes=case.num_classes,
                                        label_smoothing=SMOOTHING, out_dtype=torch.float64, **norm)
        got_x, got_soft = ps[name].fn()
        torch.testing.assert_close(got_x.double(), ref_x, **tol, msg=lambda m, n=name: f"{n}: {m}")
        torch.testing.assert_close(got_soft.double(), ref_soft.double(), rtol=1e-5, atol=1e-6)
        if case.channels_last and got_x.ndim == 4:
            assert got_x.is_contiguous(memory_format=torch.channels_last), f"{name} lost channels_last"
    for ours, theirs in (("ours-tv-MixUp", "tv-MixUp"), ("ours-tv-CutMix", "tv-CutMix")):
        torch.manual_seed(0)  # both draw λ and the box from the global RNG, in torchvision's order
        want = ps[theirs].fn()
        torch.manual_seed(0)
        got = ps[ours].fn()
        torch.testing.assert_close(got[0].float(), want[0].float(), **tol, msg=lambda m, n=ours: f"{n}: {m}")
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
    for name in ("ours-Mixup-batch", "ours-Mixup-pair", "ours-Mixup-elem", "ours-MixCut-batch",
                 "timm-batch", "timm-elem", "timm-MixCut-batch"):
        if name in ps:
            got_x, got_soft = ps[name].fn()
            assert torch.isfinite(got_x.float()).all(), f"{name}: non-finite output"
            # timm-elem rounds its per-sample lam to the batch's dtype (bf16): rows sum to 1 within 1e-2.
            torch.testing.assert_close(got_soft.float().sum(1), torch.ones(4, device=device), rtol=0,
                                       atol=1e-2)


# --------------------------------------------------------------------------------------------------
# Run.
# --------------------------------------------------------------------------------------------------
def run_case(case: Case, device: torch.device, args, with_compile: bool) -> list[dict]:
    verify(case, device, with_compile=False)  # compile-lerp is eager-lerp compiled: spare a recompile
    gen = torch.Generator().manual_seed(0)
    x0 = make_input(case, case.batch, device, gen)
    target = torch.randint(0, case.num_classes, (case.batch,), generator=gen).to(device)
    perm, lam_vec = draws(case, case.batch, device, gen)
    ps = providers(case, x0, target, perm, lam_vec, device, with_compile=with_compile)
    by_name = {p.name: p for p in ps}
    if "compile-lerp" in by_name:  # compiles here, outside the timing; must agree with eager-lerp
        tol = dict(rtol=1e-5, atol=1e-5) if case.out_dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        for got, want in zip(by_name["compile-lerp"].fn(), by_name["eager-lerp"].fn()):
            torch.testing.assert_close(got, want, **tol)
    load_before = common.load1()
    buffers = [p.buffer for p in ps if p.buffer is not None]

    def restore():  # outside the timing; see "Repeated in-place mixing" in the module docstring
        for buf in buffers:
            buf.copy_(x0)

    timings = {"eager": common.time_providers({p.name: p.fn for p in ps}, device, quick=args.quick,
                                              target_s=args.seconds, before_round=restore)}
    if device.type == "cuda":
        ops = {p.name: common.count_cuda_kernels(p.fn) for p in ps}
        if case.elems * _esize(case.dtype) <= GRAPH_MAX_BYTES:
            timings["graph"] = {}
            for p in ps:
                if not p.graphable:
                    continue
                try:
                    timings["graph"][p.name] = common.time_cuda_graph(p.fn, n_inner=5 if args.quick else 20)
                except Exception as exc:  # report and go on: one provider that cannot be captured
                    print(f"  {case.name} {p.name}: CUDA-graph capture failed: {exc}", file=sys.stderr)
                    torch.cuda.synchronize()
            if "copy" not in timings["graph"]:
                del timings["graph"]
    else:
        ops = {p.name: common.count_aten_ops(p.fn) for p in ps}
    load_after = common.load1()
    c, h, w = case.chw
    image_bytes, label_bytes = case.image_bytes(), case.label_bytes()
    rows = []
    for mode, tim in timings.items():
        copy = tim["copy"].median
        for p in ps:
            if p.name not in tim:
                continue
            t = tim[p.name]
            nbytes = image_bytes + (0 if p.name in ("copy", "scale-inplace") else label_bytes)
            row = {
                "case": case.name, "provider": p.name, "mode": mode,
                "shape": f"{case.batch}x{c}x{h}x{w}", "dtype": case.variant.split()[0],
                "layout": "channels_last" if case.channels_last else "NCHW", "num_classes": case.num_classes,
                "device": common.device_name(device), "allocates": "yes" if p.allocates else "no",
                "ops": ops.get(p.name) if mode == "eager" else None,
                "median_ms": t.median, "p20_ms": t.p20, "p80_ms": t.p80, "samples": t.n or None,
                "min_bytes": nbytes, "gbps": nbytes / (t.median * 1e-3) / 1e9,
                "x_copy": t.median / copy,
                "x_inplace": t.median / tim["scale-inplace"].median if "scale-inplace" in tim else None,
            }
            for peer in PEERS:
                if p.name.startswith("ours") and peer in tim:
                    row[f"vs_{peer}"] = tim[peer].median / t.median
                else:
                    row[f"vs_{peer}"] = None
            if device.type == "cpu":
                row["load_before"], row["load_after"] = load_before, load_after
            rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------
# Reporting.
# --------------------------------------------------------------------------------------------------
COLUMNS = [("case", "case"), ("provider", "provider"), ("mode", "mode"), ("allocates", "alloc"),
           ("ops", "ops/call"), ("median_ms", "median ms"), ("p20_ms", "p20"), ("p80_ms", "p80"),
           ("gbps", "GB/s"), ("x_copy", "t / copy"), ("x_inplace", "t / in-place"),
           ("vs_eager-lerp", "x vs eager"),
           ("vs_timm-batch", "x vs timm-batch"), ("vs_timm-elem", "x vs timm-elem"),
           ("vs_compile-lerp", "x vs compile")]


def _find(rows, case, provider, mode="eager"):
    for r in rows:
        if r["case"] == case and r["provider"] == provider and r["mode"] == mode:
            return r
    return None


def target_checks(rows: list[dict], device: torch.device) -> list[str]:
    """The project's targets, judged from these rows: 'met' / 'MISSED' with the measured figure."""
    lines = []

    def check(label, value, goal, better, unit="x"):
        if value is None:
            lines.append(f"- {label}: not measured")
            return
        ok = value >= goal if better == "higher" else value <= goal
        sign = ">=" if better == "higher" else "<="
        verdict = "met" if ok else "MISSED"
        lines.append(f"- {label}: {value:.2f}{unit} (target {sign} {goal}{unit}) -> {verdict}")

    def ratio(case, a, b, field="median_ms"):
        ra, rb = _find(rows, case, a), _find(rows, case, b)
        return None if ra is None or rb is None else rb[field] / ra[field]

    def x_copy(case, a):
        r = _find(rows, case, a)
        return None if r is None else r["x_copy"]

    def x_inplace(case, a):
        r = _find(rows, case, a)
        return None if r is None else r["x_inplace"]

    if device.type == "cpu":
        for batch in (128, 256):
            case = f"imagenet-{batch} fp32 NCHW"
            check(f"{case}: ours-Mixup-batch time / in-place floor (x.mul_(1.0))",
                  x_inplace(case, "ours-Mixup-batch"), 1.25, "lower")
            for mode in ("pair", "elem"):
                check(f"{case}: ours-Mixup-{mode} time / ours-Mixup-batch",
                      ratio(case, "ours-Mixup-batch", f"ours-Mixup-{mode}"), 1.2, "lower")
        for layout in ("NCHW", "CL"):
            case = f"imagenet-256 bf16 {layout}"
            check(f"{case}: ours-Mixup-batch time / bf16 in-place floor",
                  x_inplace(case, "ours-Mixup-batch"), 1.5, "lower")
            case = f"imagenet-256 u8->bf16 {layout}"
            check(f"{case}: ours-op-flip (fused normalize + mix, fresh output) time / bare conversion floor",
                  x_copy(case, "ours-op-flip"), 1.5, "lower")
            check(f"{case}: ours-op-out (fused normalize + mix into a warm buffer) time / bare conversion "
                  "floor", x_copy(case, "ours-op-out"), 1.5, "lower")
            fresh = ratio(case, "convert-alloc", "ours-op-flip")
            if fresh is not None:
                lines.append(f"- {case} (information): ours-op-flip (fresh output) time / torch's allocating "
                             f"conversion x.to(bf16), new pages every call: {fresh:.2f}x")
        case = "cifar-128 fp32 NCHW"
        check(f"{case}: ours-Mixup-batch speedup vs timm-batch",
              ratio(case, "ours-Mixup-batch", "timm-batch"), 3.0, "higher")
        for mode in ("pair", "elem"):  # per-call costs weigh most at this size
            check(f"{case}: ours-Mixup-{mode} time / ours-Mixup-batch",
                  ratio(case, "ours-Mixup-batch", f"ours-Mixup-{mode}"), 1.2, "lower")
        op, floor = _find(rows, case, "ours-op-flip"), _find(rows, case, "scale-inplace")
        if op is not None and floor is not None:
            check(f"{case}: ours-op-flip per-call overhead (its time minus the in-place floor's)",
                  1e3 * (op["median_ms"] - floor["median_ms"]), 30, "lower", unit=" µs")
        mixcut = ratio(case, "ours-MixCut-batch", "timm-MixCut-batch")
        if mixcut is not None:
            lines.append(f"- {case} (information): with CutMix too (switch_prob 0.5), ours-MixCut-batch "
                         f"speedup vs timm-MixCut-batch: {mixcut:.2f}x")
    else:
        for layout in ("NCHW", "CL"):
            case = f"imagenet-256 bf16 {layout}"
            check(f"{case}: ours-op-flip time / copy", x_copy(case, "ours-op-flip"), 1.15, "lower")
            check(f"{case}: ours-Mixup-batch speedup vs timm-batch",
                  ratio(case, "ours-Mixup-batch", "timm-batch"), 3.0, "higher")
            check(f"{case}: ours-op-perm speedup vs compile-lerp (same work)",
                  ratio(case, "ours-op-perm", "compile-lerp"), 1.3, "higher")
            check(f"{case}: ours-op-flip speedup vs compile-lerp",
                  ratio(case, "ours-op-flip", "compile-lerp"), 1.3, "higher")
            case = f"imagenet-256 u8->bf16 {layout}"
            check(f"{case}: ours-op-flip time / bare conversion", x_copy(case, "ours-op-flip"), 1.15, "lower")
            check(f"{case}: ours-op-out time / bare conversion", x_copy(case, "ours-op-out"), 1.15, "lower")
        case = "cifar-128 fp32 NCHW"
        r = _find(rows, case, "ours-op-flip")
        if r is not None and r.get("ops") is not None:
            lines.append(f"- {case}: ours-op-flip GPU ops per call: {r['ops']} (target 1) -> "
                         f"{'met' if r['ops'] == 1 else 'MISSED'}")
        check(f"{case}: ours-Mixup-batch speedup vs timm-batch",
              ratio(case, "ours-Mixup-batch", "timm-batch"), 3.0, "higher")
        check(f"{case}: ours-op-flip speedup vs timm-batch", ratio(case, "ours-op-flip", "timm-batch"),
              3.0, "higher")
    return lines


def summary_table(rows: list[dict], mode: str = "eager") -> str:
    """One line per case: the copy's time in ms, then every provider's time / copy (compact, for README)."""
    rows = [r for r in rows if r["mode"] == mode]
    provs = [p for p in ORDER if p != "copy" and any(r["provider"] == p for r in rows)]
    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        line = {"case": case, "copy": _find(rows, case, "copy", mode)["median_ms"]}
        for p in provs:
            r = _find(rows, case, p, mode)
            line[p] = None if r is None else r["x_copy"]
        out.append(line)
    return common.markdown_table(out, [("case", "case"), ("copy", "copy ms")] + [(p, p) for p in provs])


def plot(rows: list[dict], path, title: str) -> None:
    """Time relative to the copy, eager mode: one panel per batch shape, bars per provider, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["mode"] == "eager"]
    shapes = list(dict.fromkeys(r["case"].split()[0] for r in rows))
    provs = [p for p in ORDER if any(r["provider"] == p for r in rows)]
    colors = {"copy": "#9e9e9e", "convert-alloc": "#bdbdbd", "scale-inplace": "#d0d0d0",
              "ours-op-flip": "#08519c",
              "ours-op-out": "#2171b5",
              "ours-Mixup-batch": "#3182bd", "ours-Mixup-pair": "#4a9bd0", "ours-Mixup-elem": "#6baed6",
              "ours-MixCut-batch": "#9ecae1", "timm-MixCut-batch": "#fb6a4a",
              "ours-op-perm": "#74c476",
              "eager-lerp": "#fd8d3c",
              "compile-lerp": "#e6550d", "timm-batch": "#de2d26", "timm-elem": "#a50f15",
              "ours-tv-MixUp": "#238b45", "tv-MixUp": "#9e9ac8", "ours-tv-CutMix": "#00441b",
              "tv-CutMix": "#54278f"}
    fig, axes = plt.subplots(len(shapes), 1, figsize=(13, 3.6 * len(shapes)), squeeze=False)
    width = 0.85 / len(provs)
    for ax, shape in zip(axes[:, 0], shapes):
        variants = list(dict.fromkeys(" ".join(r["case"].split()[1:]) for r in rows
                                      if r["case"].split()[0] == shape))
        for j, prov in enumerate(provs):
            xs, ys = [], []
            for i, v in enumerate(variants):
                r = _find(rows, f"{shape} {v}", prov)
                if r is not None:
                    xs.append(i + (j - (len(provs) - 1) / 2) * width)
                    ys.append(r["x_copy"])
            bars = ax.bar(xs, ys, width, label=prov, color=colors.get(prov))
            ax.bar_label(bars, labels=[f"{y:.1f}" if y < 10 else f"{y:.0f}" for y in ys], fontsize=6.5,
                         padding=1)
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_xticks(range(len(variants)), variants)
        ax.set_ylabel("time / copy (log)")
        ax.set_title(f"{shape} (labels: K={_find(rows, f'{shape} {variants[0]}', 'copy')['num_classes']})",
                     fontsize=10, loc="left")
        ax.grid(axis="y", which="both", alpha=0.25)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 1.0 / (3.6 * len(shapes))))
    # One swatch per provider from the color table: a panel without a provider has no bar to show it.
    handles = [matplotlib.patches.Patch(color=colors.get(p), label=p) for p in provs]
    fig.legend(handles=handles, ncol=-(-len(provs) // 2), fontsize=7.5, loc="upper center",
               bbox_to_anchor=(0.5, 1 - 0.3 / (3.6 * len(shapes))), frameon=False)  # two rows
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = common.parser(__doc__.split("\n")[0])
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="include torch.compile of the eager formula (default: on CUDA only)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--seconds", type=float, default=3.0, help="CPU: time budget per case (default 3)")
    p.add_argument("--cases", default="", help="only cases whose name contains one of these comma-separated "
                                               "strings, in that order (e.g. 'imagenet-256 fp32')")
    args = p.parse_args(argv)
    device = common.setup(args)
    with_compile = args.compile if args.compile is not None else device.type == "cuda"
    env = common.environment(device)
    print(env)
    selected = cases(args.quick)
    if args.cases:  # in the order asked for: a run stopped early has the first ones
        wanted = [s.strip() for s in args.cases.split(",")]
        selected = [c for w in wanted for c in selected if w in c.name]
        selected = list(dict.fromkeys(selected))
        if not selected:
            names = ", ".join(c.name for c in cases(args.quick))
            sys.exit(f"--cases {args.cases!r} matches no case; the cases: {names}")
    stem = common.stem(args, device, "mixup")
    # The rows so far go to <stem>.partial.csv after every case: a run stopped early leaves what it measured
    # there, and the results of an earlier finished run untouched.
    partial = stem.with_suffix(".partial.csv")
    rows = []
    for case in selected:
        case_rows = run_case(case, device, args, with_compile)
        rows += case_rows
        common.write_csv(rows, partial)
        print()
        print(common.markdown_table(case_rows, COLUMNS), flush=True)
    checks = target_checks(rows, device)
    print("\n" + "\n".join(checks))

    md = [f"# Mixup benchmark ({device.type})", "", f"`{common.command_line()}`", "", env, "",
          "Times in ms (median, p20, p80); GB/s by the minimum-bytes model in bench/bench_mixup.py; "
          "`t / copy` is the time over `dst.copy_(x)` of the same batch into a warm buffer (loader cases: "
          "the bare uint8 -> bf16 conversion) in the same mode; `t / in-place` the time over "
          "`x.mul_(1.0)` on the same buffer (float cases); `x vs P` is P's time over ours; `ops/call`: GPU "
          "operations per call on CUDA, top-level ATen operators per call on CPU.", "",
          common.load_note(rows), "", "## Targets", "", *checks, "",
          "## Summary: time / copy (eager mode)", "", summary_table(rows), ""]
    if any(r["mode"] == "graph" for r in rows):
        md += ["## Summary: time / copy (CUDA-graph mode)", "", summary_table(rows, "graph"), ""]
    md += ["## All rows", "", common.markdown_table(rows, COLUMNS), ""]
    common.write_csv(rows, stem.with_suffix(".csv"))
    common.write_text("\n".join(md), stem.with_suffix(".md"))
    plot(rows, stem.with_suffix(".png"),
         f"mixup, time relative to a copy of the batch: {common.device_name(device)}")
    partial.unlink(missing_ok=True)
    print(f"\nwrote {stem}.csv, .md, .png")


if __name__ == "__main__":
    main()
