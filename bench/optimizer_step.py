"""Time one optimizer step, as a user calls it (``opt.step()``), for parameter
layouts that mirror real models, against the real alternatives.

    python bench/optimizer_step.py                       # all layouts, nesterov/lars/lamb, CPU
    python bench/optimizer_step.py --quick               # tiny sizes: a smoke test
    python bench/optimizer_step.py --layouts resnet50 --optimizers nesterov,lars --out results.json
    python bench/optimizer_step.py --device cuda --launches

The committed CPU rows (bench/results/optimizer_step_cpu.json) come from

    python bench/optimizer_step.py --threads 2 --out bench/results/optimizer_step_cpu.json

Providers (``--providers`` picks some; unavailable ones are listed with why):
  torch-foreach, torch-fused   torch.optim.SGD(nesterov=True, foreach=True / fused=True)   [nesterov]
  torch-adam-fused             torch.optim.Adam(fused=True), where torch has a fused Adam for the device:
                               LAMB's moment update without the trust ratio, the floor LAMB is held to [lamb]
  fastsgd-<backend>            fastsgd.Nesterov / LARS / LAMB with backend= each backend for the device
  fastsgd-<gpu>-2pass          LARS / LAMB on the triton and cuda backends with FASTSGD_GPU_TWO_PASS=1:
                               every tensor through the norm and update launches, against the
                               fastsgd-<gpu> row in which tensors up to one program/block get
                               norms and update in one launch (fastsgd/kernels/gpu_passes.py)
  timm                         timm.optim.Lars / Lamb (the installed timm package; when ``import timm``
                               fails, e.g. without torchvision, its optim/lars.py and lamb.py files are
                               loaded directly -- still timm's code, and the row says so)      [lars, lamb]
  apex                         apex.optimizers.FusedSGD / FusedLAMB (CUDA only)

Every provider of a layout is measured round-robin: one step of each in turn,
``--reps`` rounds after 2 warm-up rounds, so the ratios between rows of one
layout come from the same minutes of machine time (on a shared machine the
absolute numbers drift; the ratios much less). The float64 reference backend
(tens of times slower) is timed on its own afterwards. ``--separate`` times
every provider on its own instead (less memory: one provider's tensors at a time).

Per row: median and q20/q80 of the step time; "min MB", the bytes every
implementation must move per step (reads + writes of params, grads and
buffers/moments, once each); GB/s from min MB, and that as a percentage of the
memory bandwidth measured at the start of the run (fastsgd.measure.memory_bandwidth);
the speedup against torch fused SGD (nesterov) or timm (lars, lamb); "version",
the package version of the provider; and "ratio" = median / the median of the
row named in "ratio_to": fastsgd LARS against fastsgd Nesterov on the same
backend (a LARS step at the cost of a momentum step is the floor) and fastsgd
LAMB against torch-adam-fused.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import os
import sys
import time
import types
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import layouts  # noqa: E402

import fastsgd  # noqa: E402
from fastsgd import backends  # noqa: E402
from fastsgd.kernels import gpu_passes  # noqa: E402
from fastsgd.measure import environment, memory_bandwidth, quantiles, synchronize, time_fn, write_rows  # noqa: E402  # noqa: E402
from fastsgd.study.tables import format_table  # noqa: E402

OPTIMIZERS = ("nesterov", "lars", "lamb")

# Typical settings; weight decay on every tensor so LARS/LAMB adapt every tensor.
HPARAMS = {
    "nesterov": dict(lr=0.1, momentum=0.9, weight_decay=1e-4),
    "lars": dict(lr=0.1, momentum=0.9, weight_decay=1e-4, trust_coeff=0.001),
    "lamb": dict(lr=1e-3, weight_decay=0.01),
}

# Tensors of one element-size streamed per element: reads + writes, once each.
MIN_STREAMS = {"nesterov": 5, "lars": 5, "lamb": 7}  # p,g,b read, p,b written / p,g,m,v read, p,m,v written

BASELINE = {"nesterov": "torch-fused", "lars": "timm", "lamb": "timm"}


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@dataclass
class Provider:
    name: str
    make: Optional[Callable[[List[torch.Tensor]], torch.optim.Optimizer]]
    skip_reason: Optional[str] = None
    note: str = ""
    version: str = ""


# ---- third-party optimizers ---------------------------------------------------------
def load_timm():
    """(Lars, Lamb, how): timm's classes, imported normally or, when ``import
    timm`` fails (it needs torchvision), loaded from the installed package's
    timm/optim/lars.py and lamb.py under a private package name."""
    try:
        from timm.optim import Lamb, Lars
        return Lars, Lamb, "timm.optim"
    except Exception as exc:  # ImportError, or torchvision failing inside timm
        first_error = exc
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"timm is not installed (pip install --no-deps timm): {first_error}")
    optim_dir = os.path.join(list(spec.submodule_search_locations)[0], "optim")
    pkg = types.ModuleType("_timm_optim_files")
    pkg.__path__ = [optim_dir]
    sys.modules.setdefault(pkg.__name__, pkg)
    lars = importlib.import_module(f"{pkg.__name__}.lars")
    lamb = importlib.import_module(f"{pkg.__name__}.lamb")
    return lars.Lars, lamb.Lamb, f"timm files from {optim_dir} (import timm failed: {type(first_error).__name__})"


def _timm_provider(kind: str) -> Provider:
    version = f"timm {package_version('timm')}"
    try:
        Lars, Lamb, how = load_timm()
    except Exception as exc:
        return Provider("timm", None, f"timm unavailable: {exc}", version=version)
    hp = HPARAMS[kind]
    if kind == "lars":
        return Provider("timm", lambda ps: Lars(ps, lr=hp["lr"], momentum=hp["momentum"],
                                                weight_decay=hp["weight_decay"], trust_coeff=hp["trust_coeff"]),
                        note=f"Lars (foreach, its default) via {how}", version=version)
    return Provider("timm", lambda ps: Lamb(ps, lr=hp["lr"], weight_decay=hp["weight_decay"], max_grad_norm=None),
                    note=f"Lamb via {how} (max_grad_norm=None, as fastsgd's default)", version=version)


def _adam_fused_provider(device: torch.device) -> Provider:
    """torch.optim.Adam(fused=True), if torch has a fused Adam for this device (tried on one tensor)."""
    version = f"torch {torch.__version__}"
    hp = HPARAMS["lamb"]
    try:
        p = torch.zeros(4, device=device, requires_grad=True)
        p.grad = torch.ones(4, device=device)
        torch.optim.Adam([p], lr=hp["lr"], fused=True).step()
    except Exception as exc:
        return Provider("torch-adam-fused", None, f"torch {torch.__version__} has no fused Adam for "
                        f"{device.type}: {type(exc).__name__}: {exc}", version=version)
    return Provider("torch-adam-fused", lambda ps: torch.optim.Adam(ps, lr=hp["lr"], weight_decay=hp["weight_decay"],
                                                                    fused=True),
                    note="torch.optim.Adam(fused=True), weight_decay as L2 on the grad: LAMB without the trust "
                         "ratio", version=version)


def _apex_provider(kind: str, device: torch.device) -> Provider:
    if device.type != "cuda":
        return Provider("apex", None, "apex fused optimizers run on CUDA only")
    try:
        from apex.optimizers import FusedLAMB, FusedSGD
    except Exception as exc:
        return Provider("apex", None, f"apex unavailable: {exc}")
    hp = HPARAMS[kind]
    if kind == "nesterov":
        return Provider("apex", lambda ps: FusedSGD(ps, lr=hp["lr"], momentum=hp["momentum"],
                                                    weight_decay=hp["weight_decay"], nesterov=True),
                        note="apex FusedSGD")
    if kind == "lamb":
        return Provider("apex", lambda ps: FusedLAMB(ps, lr=hp["lr"], weight_decay=hp["weight_decay"],
                                                     max_grad_norm=0.0), note="apex FusedLAMB (no clipping)")
    return Provider("apex", None, "apex has no LARS optimizer")


# ---- providers -----------------------------------------------------------------
def with_two_pass(make: Callable[[List[torch.Tensor]], torch.optim.Optimizer], value: str):
    """``make`` whose optimizer's step runs with FASTSGD_GPU_TWO_PASS=value
    (read by the GPU backends on every call) and restores the variable after."""
    def wrapped(ps):
        opt = make(ps)
        step = opt.step

        def step_with_env(*args, **kwargs):
            old = os.environ.get(gpu_passes.TWO_PASS_ENV)
            os.environ[gpu_passes.TWO_PASS_ENV] = value
            try:
                return step(*args, **kwargs)
            finally:
                if old is None:
                    del os.environ[gpu_passes.TWO_PASS_ENV]
                else:
                    os.environ[gpu_passes.TWO_PASS_ENV] = old
        opt.step = step_with_env
        return opt
    return wrapped


# LARS and LAMB on these backends have a fused and a 2-pass path (gpu_passes.py).
TWO_PASS_BACKENDS = ("triton", "cuda")


def _fastsgd_provider(kind: str, backend: str, device: torch.device, dtype: torch.dtype,
                      two_pass: bool = False) -> Provider:
    name = f"fastsgd-{backend}" + ("-2pass" if two_pass else "")
    try:
        backends.get_backend(backend, device, {dtype})
    except (backends.BackendUnavailable, TypeError) as exc:
        return Provider(name, None, str(exc))
    hp = HPARAMS[kind]
    if kind == "nesterov":
        make = lambda ps: fastsgd.Nesterov(ps, lr=hp["lr"], momentum=hp["momentum"],  # noqa: E731
                                           weight_decay=hp["weight_decay"], backend=backend)
    elif kind == "lars":
        make = lambda ps: fastsgd.LARS(ps, lr=hp["lr"], momentum=hp["momentum"],  # noqa: E731
                                       weight_decay=hp["weight_decay"], trust_coeff=hp["trust_coeff"],
                                       backend=backend)
    else:
        make = lambda ps: fastsgd.LAMB(ps, lr=hp["lr"], weight_decay=hp["weight_decay"],  # noqa: E731
                                       backend=backend)
    note = ""
    if kind in ("lars", "lamb") and backend in TWO_PASS_BACKENDS:
        # Both rows of the comparison set the variable around each step, so both pay for it alike.
        make = with_two_pass(make, "1" if two_pass else "0")
        note = f"{gpu_passes.TWO_PASS_ENV}=1: norms and update in separate launches for every tensor" if two_pass \
            else f"{gpu_passes.TWO_PASS_ENV}=0: tensors that fit one program/block fused (the default)"
    return Provider(name, make, note=note, version=f"fastsgd {fastsgd.__version__}")


def providers_for(kind: str, device: torch.device, dtype: torch.dtype) -> List[Provider]:
    out: List[Provider] = []
    if kind == "nesterov":
        hp = HPARAMS[kind]
        for flag in ("foreach", "fused"):
            out.append(Provider(f"torch-{flag}", lambda ps, flag=flag: torch.optim.SGD(
                ps, lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"], nesterov=True,
                **{flag: True}), note=f"torch.optim.SGD({flag}=True)", version=f"torch {torch.__version__}"))
    else:
        out.append(_timm_provider(kind))
    if kind == "lamb":
        out.append(_adam_fused_provider(device))
    out.append(_apex_provider(kind, device))
    for backend in backends.BACKENDS:
        out.append(_fastsgd_provider(kind, backend, device, dtype))
        if kind in ("lars", "lamb") and backend in TWO_PASS_BACKENDS:
            out.append(_fastsgd_provider(kind, backend, device, dtype, two_pass=True))
    return out


# ---- measuring -----------------------------------------------------------------
def make_params(shapes: Sequence[tuple], device: torch.device, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=gen).to(device=device, dtype=dtype))
        p.grad = (torch.randn(s, generator=gen) * 1e-2).to(device=device, dtype=dtype)
        params.append(p)
    return params


def count_launches(step: Callable[[], None]) -> int:
    """CUDA kernels (and memcpy/memset) run by one call of ``step``, via torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def make_row(layout: str, kind: str, provider: Provider, shapes, dtype: torch.dtype, t: Dict[str, float],
             bandwidth: float) -> Dict:
    n = layouts.numel(shapes)
    min_bytes = MIN_STREAMS[kind] * n * torch.empty((), dtype=dtype).element_size()
    gbs = min_bytes / t["median"] / 1e9
    return dict(layout=layout, optimizer=kind, provider=provider.name, version=provider.version, tensors=len(shapes),
                params_M=n / 1e6, median_ms=t["median"] * 1e3, q20_ms=t["q20"] * 1e3, q80_ms=t["q80"] * 1e3,
                reps=t["n"], min_MB=min_bytes / 1e6, GBps=gbs, pct_bw=100.0 * gbs / bandwidth, note=provider.note)


def time_round_robin(steps: Sequence[Callable[[], None]], device: torch.device, reps: int,
                     warmup: int = 2) -> List[Dict[str, float]]:
    """One call of each step in turn, ``reps`` rounds after ``warmup``; quantiles per step."""
    for _ in range(warmup):
        for step in steps:
            step()
    synchronize(device)
    samples: List[List[float]] = [[] for _ in steps]
    for _ in range(reps):
        for i, step in enumerate(steps):
            t0 = time.perf_counter()
            step()
            synchronize(device)
            samples[i].append(time.perf_counter() - t0)
    return [quantiles(s) for s in samples]


def measure_layout(layout: str, shapes, cases: Sequence[tuple], device, dtype, reps: int, bandwidth: float,
                   launches: bool, separate: bool) -> List[Dict]:
    """Rows for (optimizer, provider) ``cases`` of one layout: round-robin, except the reference backend and
    everything under ``separate``, which are timed one provider at a time."""
    rows: List[Dict] = []

    def finish(kind, prov, opt, t):
        row = make_row(layout, kind, prov, shapes, dtype, t, bandwidth)
        if launches and device.type == "cuda":
            row["launches"] = count_launches(opt.step)
        print(f"  {layout:>9} {kind:>8} {prov.name:>17}: {row['median_ms']:9.2f} ms", flush=True)
        rows.append(row)

    together = [] if separate else [c for c in cases if c[1].name != "fastsgd-reference"]
    alone = [c for c in cases if c not in together]
    if together:
        opts = [prov.make(make_params(shapes, device, dtype)) for _, prov in together]
        times = time_round_robin([o.step for o in opts], device, reps)
        for (kind, prov), opt, t in zip(together, opts, times):
            finish(kind, prov, opt, t)
        del opts
    for kind, prov in alone:
        opt = prov.make(make_params(shapes, device, dtype))
        finish(kind, prov, opt, time_fn(opt.step, device=device, warmup=2, reps=reps))
        del opt
    return rows


def add_speedups(rows: List[Dict]) -> None:
    """speedup = baseline median / this median, within each (layout, optimizer); ratio = this median / the
    median of the row it is held to (fastsgd LARS: fastsgd Nesterov, same backend; fastsgd LAMB: torch's
    fused Adam); vs_2pass (fastsgd-<gpu> LARS/LAMB rows) = this median / the median of the same backend's
    -2pass row."""
    def find(layout, kind, provider):
        return next((b for b in rows if (b["layout"], b["optimizer"], b["provider"]) == (layout, kind, provider)),
                    None)

    for r in rows:
        base = find(r["layout"], r["optimizer"], BASELINE[r["optimizer"]])
        r["baseline"] = BASELINE[r["optimizer"]]
        r["speedup"] = None if base is None else base["median_ms"] / r["median_ms"]
        r["ratio_to"] = r["ratio"] = None
        two_pass = find(r["layout"], r["optimizer"], r["provider"] + "-2pass")
        r["vs_2pass"] = None if two_pass is None else r["median_ms"] / two_pass["median_ms"]
        if r["provider"].startswith("fastsgd-") and r["provider"] != "fastsgd-reference" and \
                r["optimizer"] in ("lars", "lamb"):
            base_provider = r["provider"].removesuffix("-2pass")
            kind, prov = ("nesterov", base_provider) if r["optimizer"] == "lars" else ("lamb", "torch-adam-fused")
            other = find(r["layout"], kind, prov)
            if other is not None:
                r["ratio_to"] = f"{kind} {prov}"
                r["ratio"] = r["median_ms"] / other["median_ms"]


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", default=",".join(layouts.LAYOUTS), help="comma list of " +
                    ", ".join(layouts.LAYOUTS))
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma list of " + ", ".join(OPTIMIZERS))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--providers", default="", help="comma list of provider names (default: all), e.g. "
                    "torch-fused,fastsgd-cpu,timm")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads(N) first (fastsgd's CPU kernels use "
                    "torch.get_num_threads() too); default: torch's default")
    ap.add_argument("--reps", type=int, default=20, help="timed steps per row (after 2 warm-up steps)")
    ap.add_argument("--separate", action="store_true", help="time each provider on its own instead of round-robin "
                    "within a layout (needs only one provider's tensors in memory at a time)")
    ap.add_argument("--quick", action="store_true", help="tiny layouts and 3 reps: checks the script end to end")
    ap.add_argument("--launches", action="store_true", help="count CUDA kernel launches per step (--device cuda)")
    ap.add_argument("--out", help="write rows to FILE (.json or .csv)")
    ap.add_argument("--note", default="", help="a remark stored with the rows (e.g. how busy the machine was)")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    dtype = torch.float32
    names = [x for x in args.layouts.split(",") if x]
    kinds = [x for x in args.optimizers.split(",") if x]
    for x in names:
        if x not in layouts.LAYOUTS:
            ap.error(f"unknown layout {x!r}; choose from {', '.join(layouts.LAYOUTS)}")
    for x in kinds:
        if x not in OPTIMIZERS:
            ap.error(f"unknown optimizer {x!r}; choose from {', '.join(OPTIMIZERS)}")
    wanted = {x for x in args.providers.split(",") if x}
    reps = 3 if args.quick else args.reps

    env = environment(device)
    bandwidth = memory_bandwidth(device, nbytes=(16 if args.quick else 256) * 2**20)
    timm_version = package_version("timm")
    print(f"# {env['device']} | torch {env['torch']} | timm {timm_version} | fastsgd {env['fastsgd']} | "
          f"threads {env['threads']} | commit {env['commit']} | {env['date']}")
    print(f"# measured memory bandwidth (best of copy and in-place axpy, read + write): {bandwidth:.1f} GB/s")

    rows: List[Dict] = []
    skipped: List[Dict] = []
    for name in names:
        shapes = layouts.LAYOUTS[name](layouts.QUICK_DIV[name] if args.quick else 1)
        cases = []
        for kind in kinds:
            for prov in providers_for(kind, device, dtype):
                if wanted and prov.name not in wanted:
                    continue
                if prov.make is None:
                    skipped.append(dict(layout=name, optimizer=kind, provider=prov.name, skipped=prov.skip_reason))
                    continue
                cases.append((kind, prov))
        rows += measure_layout(name, shapes, cases, device, dtype, reps, bandwidth, args.launches, args.separate)
    add_speedups(rows)

    cols = ["layout", "optimizer", "provider", "version", "tensors", "params_M", "median_ms", "q20_ms", "q80_ms",
            "min_MB", "GBps", "pct_bw", "speedup", "ratio_to", "ratio"]
    if any(r["vs_2pass"] is not None for r in rows):
        cols.append("vs_2pass")
    if args.launches:
        cols.append("launches")
    print()
    print(format_table(rows, cols))
    print("\nspeedup: median of the baseline / median of the row; baseline torch-fused for nesterov, timm for "
          "lars and lamb.\nratio: median of the row / median of the row named in ratio_to (measured in the same "
          "round-robin unless --separate).\nvs_2pass: median of a fastsgd-<gpu> LARS/LAMB row / median of its "
          "-2pass row (below 1: fusing small tensors' norms into the update pays).")
    notes = sorted({(r["provider"], r["note"]) for r in rows if r["note"]})
    for prov, note in notes:
        print(f"  {prov}: {note}")
    if skipped:
        print("\nskipped:")
        seen = set()
        for s in skipped:
            key = (s["provider"], s["skipped"])
            if key not in seen:
                seen.add(key)
                print(f"  {s['provider']}: {s['skipped']}")
    if args.out:
        meta = dict(env, timm=timm_version, memory_bandwidth_GBps=bandwidth, quick=args.quick,
                    timing="separate" if args.separate else "round-robin per layout", note=args.note,
                    benchmark="optimizer_step")
        write_rows(args.out, rows + skipped, meta)
        print(f"\nwrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
