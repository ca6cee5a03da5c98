#!/usr/bin/env python
"""Time per training step against batch size: the hardware half of time to result.

    fastsgd throughput                      # Simple CNN on the CPU, batch sizes 1..512
    fastsgd throughput --model resnet50 --device cuda --optimizer fastsgd-nesterov:triton
    fastsgd throughput --model transformer --seq-len 128 --batch-sizes 1..256 --out results/
    fastsgd throughput --model mypackage.workloads:make_workload   # your own model

For each batch size: warm-up steps, then timed full training steps (forward,
backward, optimizer step) on synthetic inputs. Prints a table (step time
median and 20-80 % range, its forward+backward and optimizer parts,
examples/s, peak memory, energy on NVIDIA GPUs), fits t(B) = t0 + B/X and
reports the hardware knee B_hw = t0*X, and writes throughput.json,
throughput.csv and throughput.png (schema: fastsgd/study/hardware/step_time.py).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import time
from typing import Any, Dict, List

import torch

from fastsgd.backends import BackendUnavailable
from fastsgd.measure import device_name
from fastsgd.study import render
from fastsgd.study.cli import args as cli_args
from fastsgd.study.hardware.step_time import StepTimeSweep, measure_step_times, write_results
from fastsgd.study.optimizers import OPTIMIZERS
from fastsgd.study.progress import Progress
from fastsgd.study.tables import format_table
from fastsgd.study.workloads import WORKLOADS as DATA_WORKLOADS
from fastsgd.study.workloads import get_workload, is_user_workload
from fastsgd.study.workloads.synthetic import WORKLOADS, synthetic_workload

# Per device type: batch sizes, warm-up steps, minimum timed steps, seconds of timing per batch size.
# The CPU values make the default run take about two minutes on 2 cores.
DEFAULTS = {
    "cpu": {"batch_sizes": "1..512", "warmup": 2, "steps": 3, "time_budget": 8.0},
    "cuda": {"batch_sizes": "1..8192", "warmup": 5, "steps": 10, "time_budget": 2.0},
}


HELP = "time per training step against batch size (the hardware half)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    models = "\n".join(f"  {name:<17} {desc}" for name, desc in WORKLOADS.items())
    models += "\n  " + ", ".join(sorted(DATA_WORKLOADS) + ["least-squares"]) + ": the study's data workloads"
    models += "\n  package.module:factory  your own workload (factory() returns a fastsgd.study.Workload)"
    optimizers = "\n".join(f"  {name:<17} {desc}" for name, desc in OPTIMIZERS.items())
    p.epilog = (f"models:\n{models}\n\noptimizers (fastsgd ones take :BACKEND, e.g. fastsgd-lars:triton):\n"
                f"{optimizers}\n\nDefaults per device: {DEFAULTS}")
    p.add_argument("--model", "--workload", dest="model", default="simple-cnn",
                   help="workload to time (default: simple-cnn; see below)")
    p.add_argument("--seq-len", type=cli_args.positive_int, help="transformer: tokens per sequence (default 64)")
    p.add_argument("--vocab-size", type=cli_args.positive_int, help="transformer: vocabulary size (default 1024)")
    p.add_argument("--image-size", type=cli_args.positive_int,
                   help="torchvision:/timm: models: input height = width (224)")
    p.add_argument("--optimizer", type=cli_args.optimizer_spec, default="fastsgd-nesterov",
                   help="optimizer spec (default: fastsgd-nesterov, backend auto)")
    p.add_argument("--lr", type=float, default=0.01, help="learning rate (does not change the time; default 0.01)")
    p.add_argument("--ghost-bn", type=cli_args.positive_int, metavar="SIZE",
                   help="convert the model's batch norms to ghost batch norm with this ghost batch size")
    p.add_argument("--device", type=cli_args.device, default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--batch-sizes", type=cli_args.batch_sizes, metavar="LO..HI|LIST",
                   help="powers of two LO..HI or a list (default: 1..512 on cpu, 1..8192 on cuda; the sweep "
                        "stops at the largest that fits in memory)")
    p.add_argument("--steps", type=cli_args.positive_int,
                   help="minimum timed steps per batch size (default: cpu 3, cuda 10)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="keep timing each batch size until this many seconds are spent (default: cpu 8, cuda 2; "
                        "0: exactly --steps)")
    p.add_argument("--warmup", type=int, help="untimed steps per batch size first (default: cpu 2, cuda 5)")
    p.add_argument("--memory-limit-gb", type=float,
                   help="stop before a batch size whose estimated peak memory passes this (default on cpu: "
                        "current use + 80%% of available memory; on cuda: 90%% of the device's memory)")
    p.add_argument("--threads", type=cli_args.positive_int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", metavar="DIR", help="where to write throughput.{json,csv,png} "
                                                "(default: out/throughput-<model>-<device>)")
    p.add_argument("--quiet", action="store_true", help="no progress or explanations; table and paths only")


def model_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The model flags that apply to --model (an error names the ones that do not)."""
    given = {"seq_len": args.seq_len, "vocab_size": args.vocab_size, "image_size": args.image_size}
    given = {k: v for k, v in given.items() if v is not None}
    applies = {"seq_len", "vocab_size"} if args.model == "transformer" else (
        {"image_size"} if ":" in args.model and not is_user_workload(args.model) else set())
    wrong = sorted(set(given) - applies)
    if wrong:
        flags = ", ".join("--" + w.replace("_", "-") for w in wrong)
        raise ValueError(f"{flags} does not apply to --model {args.model}")
    return given


def make_workload(args: argparse.Namespace):
    """A synthetic-input model from the zoo, or one of the study's data
    workloads (mnist1d-mlp, digits-mlp, least-squares, ...), so a throughput
    sweep can be combined with a steps-to-result study of the same workload."""
    options = model_options(args)
    if args.model in DATA_WORKLOADS or args.model == "least-squares" or is_user_workload(args.model):
        return get_workload(args.model)
    return synthetic_workload(args.model, **options)


class SweepProgress:
    """The sweep's progress events on a bar (terminal) or as one line per batch size (logs)."""

    def __init__(self, sizes: List[int], enabled: bool):
        self.progress = Progress(len(sizes), unit="batch size", enabled=enabled)

    def __call__(self, event: str, batch_size: int, steps: int) -> None:
        if event == "start":
            self.progress.status(f"B={batch_size} warm-up")
        elif event == "step":
            self.progress.status(f"B={batch_size} step {steps}")
        elif event == "done":
            self.progress.advance()
            self.progress.line(f"  batch size {batch_size}: {steps} timed steps")

    def close(self) -> None:
        self.progress.close()


def _ms(seconds: float) -> str:
    """Milliseconds with about three significant digits and no exponent."""
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:,.0f}"
    return f"{ms:.1f}" if ms >= 10 else f"{ms:.3g}"


def table_text(sweep: StepTimeSweep) -> str:
    measured_energy = any(r["power_w"] is not None for r in sweep.records)
    rows = []
    for r in sweep.records:
        row = {
            "batch": r["batch_size"],
            "step ms": _ms(r["step_time_s"]),
            "(20-80 %)": f"{_ms(r['step_time_q20_s'])}-{_ms(r['step_time_q80_s'])}",
            "fwd+bwd ms": _ms(r["fwd_bwd_time_s"]),
            "optim ms": _ms(r["optimizer_time_s"]),
            "examples/s": f"{r['examples_per_s']:,.0f}" if r["examples_per_s"] >= 100 else
                          f"{r['examples_per_s']:.3g}",
            "peak MB": f"{r['peak_memory_bytes'] / 2**20:,.0f}",
            "mJ/example": "n/a" if r["energy_per_example_j"] is None else f"{r['energy_per_example_j'] * 1e3:.3g}",
            "steps": r["steps"],
        }
        if measured_energy:
            row["W"] = "n/a" if r["power_w"] is None else f"{r['power_w']:.0f}"
            row["util %"] = "n/a" if r["gpu_util_pct"] is None else f"{r['gpu_util_pct']:.0f}"
        rows.append(row)
    columns = ["batch", "step ms", "(20-80 %)", "fwd+bwd ms", "optim ms", "examples/s", "peak MB", "mJ/example"]
    columns += ["W", "util %", "steps"] if measured_energy else ["steps"]
    return format_table(rows, columns)


def fit_text(sweep: StepTimeSweep) -> List[str]:
    fit = sweep.fit
    head = "Fit  t(B) = t0 + B/X:  "
    if fit.ok:
        lines = [head + f"t0 = {fit.t0_s * 1e3:.3g} ms fixed cost per step, X = {fit.throughput:,.4g} examples/s  "
                 f"(weighted R^2 {fit.r2:.3f}, largest residual {fit.max_abs_rel_residual:.0%})",
                 f"Hardware knee  B_hw = t0*X = {fit.knee_batch_size:.3g}: below it a larger batch costs little "
                 "extra time per step; above it step time grows in proportion to B."]
    elif fit.t0_s is not None:
        lines = [head + f"t0 ~ {fit.t0_s * 1e3:.3g} ms, X not determined (step time flat in B)"]
    else:
        lines = [head + "not determined"]
    if fit.message:
        lines.append(f"Note: {fit.message}.")
    return lines


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def header_text(args: argparse.Namespace, workload, device: torch.device, sizes: List[int], warmup: int,
                steps: int, budget: float, out_dir: str) -> List[str]:
    budget_text = f" and up to {budget:g} s" if budget else ""
    listed = ", ".join(map(str, sizes)) if len(sizes) <= 4 else f"{sizes[0]}, {sizes[1]}, ..., {sizes[-1]}"
    return [
        "fastsgd throughput: time per training step against batch size",
        f"  model      {workload.name}: {workload.info.get('description', '')}",
        f"  optimizer  {args.optimizer}" + (f", ghost batch norm of {args.ghost_bn}" if args.ghost_bn else ""),
        f"  device     {device}: {device_name(device)}, torch threads: {torch.get_num_threads()}",
        f"  plan       batch sizes {listed}; each: {_count(warmup, 'warm-up step')}, then at least "
        f"{_count(steps, 'timed step')}{budget_text}",
        f"  output     {out_dir}/",
    ] + busy_machine_note()


def busy_machine_note() -> List[str]:
    """A warning when other programs already keep the CPUs busy: the timings will be noisy."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return []
    cores = os.cpu_count() or 1
    if load < 0.75 * cores:
        return []
    return [f"  warning    the machine is busy (load average {load:.1f} on {cores} cores): expect noisy timings; "
            "--threads 1 is often steadier on a shared CPU"]


def summary_text(sweep: StepTimeSweep, elapsed: float) -> List[str]:
    s, w, env = sweep.settings, sweep.workload, sweep.environment
    lines = [f"  optimizer step  {s['implementation']}; model {w['parameters'] / 1e6:.3g} M parameters; "
             f"torch {env['torch']}, fastsgd {env['fastsgd']}, commit {env['commit']}"]
    if "reference" in s["implementation"]:
        lines.append("  note            the optimizer step ran on fastsgd's float64 reference backend (no compiled "
                     "backend is available here: see fastsgd.available_backends()), so 'optim ms' is slow")
    example = w["info"].get("example")
    if example and example not in ("image", "vector"):
        lines.append(f"  examples        one example is one {example}")
    lines.append(f"  memory          {s['memory_method']}")
    if sweep.records and sweep.records[0]["energy_note"].startswith("n/a"):
        lines.append(f"  energy          {sweep.records[0]['energy_note']}")
    lines.append(f"  measured in     {elapsed:.0f} s")
    return lines


TABLE_LEGEND = ("step ms: median time of one training step (forward, backward, optimizer) with its 20-80 % "
                "range; fwd+bwd ms and optim ms: medians of its two parts")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    device = args.device
    defaults = DEFAULTS.get(device.type, DEFAULTS["cpu"])
    sizes = args.batch_sizes or cli_args.batch_sizes(defaults["batch_sizes"])
    steps = args.steps or defaults["steps"]
    warmup = defaults["warmup"] if args.warmup is None else args.warmup
    budget = defaults["time_budget"] if args.time_budget is None else args.time_budget
    memory_limit = args.memory_limit_gb
    cli_args.set_threads(args.threads)
    try:
        workload = make_workload(args)
        if memory_limit is None and device.type == "cuda" and torch.cuda.is_available():
            memory_limit = 0.9 * torch.cuda.get_device_properties(device).total_memory / 1e9
        out_dir = args.out or os.path.join("out", f"throughput-{cli_args.safe_name(args.model)}-{device.type}")
        if not args.quiet:
            print("\n".join(header_text(args, workload, device, sizes, warmup, steps, budget, out_dir)), flush=True)
        bar = SweepProgress(sizes, enabled=not args.quiet)
        started = time.perf_counter()
        try:
            sweep = measure_step_times(workload, sizes, optimizer=args.optimizer, device=device, warmup=warmup,
                                       steps=steps, time_budget_s=budget, memory_limit_gb=memory_limit,
                                       ghost_bn=args.ghost_bn, lr=args.lr, seed=args.seed, progress=bar)
        finally:
            bar.close()
        elapsed = time.perf_counter() - started
    except (ValueError, BackendUnavailable) as exc:
        parser.error(str(exc))

    paths = write_results(sweep, out_dir)
    png = None
    plot_note = None
    if importlib.util.find_spec("matplotlib") is None:
        plot_note = "plot skipped: matplotlib is not installed (pip install matplotlib)"
    elif sweep.records:
        env = sweep.environment
        fig = render.throughput_figure(sweep.records, sweep.fit,
                                       title=f"{sweep.workload['name']}, {sweep.settings['optimizer']} "
                                             f"({sweep.settings['implementation']}) on {env['device']}",
                                       subtitle=f"torch {env['torch']}, fastsgd {env['fastsgd']}, {env['date']}")
        png = render.save(fig, os.path.join(out_dir, "throughput.png"))

    if not args.quiet:
        print()
    print(table_text(sweep) if sweep.records else "No batch size ran.")
    if not args.quiet and sweep.records:
        print(TABLE_LEGEND)
    print()
    for line in fit_text(sweep):
        print(line)
    if sweep.stopped:
        print(f"Stopped: {sweep.stopped['reason']}. Largest batch size that fit: {sweep.largest_fit}.")
    if not args.quiet:
        print()
        print("\n".join(summary_text(sweep, elapsed)))
    if plot_note:
        print(plot_note)
    written = [p for p in (png, paths["json"], paths["csv"]) if p]
    print(f"Wrote {written[0]}" + (f" (and {', '.join(os.path.basename(p) for p in written[1:])})"
                                   if len(written) > 1 else ""))
    return 0


