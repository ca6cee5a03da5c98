"""Overhead of measuring the gradient noise scale, per training step.

Times one accumulation step (``--micro-batches`` forward/backward passes + the optimizer
step) with and without ``fastsgd.noise_scale.NoiseScaleAccumulator`` (one squared
norm per parameter per micro-batch in a gradient hook, one ``_foreach_norm`` of the
accumulated gradient and the 0-dim EMA update per step; no host sync). The two variants
are timed in alternating rounds so that a noisy shared machine affects both alike; the
overhead is the ratio of the medians over rounds. On CPU the default clock is the process's
CPU time (``time.process_time``, all threads), which other users of a shared machine
disturb far less than wall time; ``--clock wall`` for wall time (the default on GPU). Also times the
data-parallel source
alone (``update_from_distributed`` with two precomputed scalars), which is what a
data-parallel run pays on top of the squared norms its all-reduce wrapper provides.

    python bench/noise_scale_overhead.py                       # simple-cnn, B=64, 4 micro-batches
    python bench/noise_scale_overhead.py --workload mnist1d-mlp --batch-size 256 --out DIR

Target: < 2 % of the step time. Writes ``noise_scale_overhead.json`` (rows per workload and
batch size) with ``--out``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from fastsgd.measure import environment, quantiles, time_fn, write_rows
from fastsgd.noise_scale import GradientNoiseScale, NoiseScaleAccumulator
from fastsgd.study.tables import format_table

TARGET = 0.02


def _workload(name: str):
    try:
        from fastsgd.study.workloads import WORKLOADS, get_workload
        if name in WORKLOADS or name == "least-squares":
            return get_workload(name)
    except ImportError:
        pass
    from fastsgd.study.workloads.synthetic import synthetic_workload
    return synthetic_workload(name)


def _time(fn, dev, clock: str, warmup: int, reps: int) -> float:
    """Median seconds of fn() on ``clock`` ("wall": synchronised wall time; "process": CPU time)."""
    if clock == "wall":
        return time_fn(fn, device=dev, warmup=warmup, reps=reps)["median"]
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        samples.append(time.process_time() - t0)
    return statistics.median(samples)


def measure(workload_name: str, batch_size: int, micro_batches: int, optimizer: str, device: str,
            rounds: int, reps: int, clock: str = "wall", mode: str = "each") -> dict:
    from fastsgd.study.optimizers import make_optimizer

    wl = _workload(workload_name)
    dev = torch.device(device)
    torch.manual_seed(0)
    model = wl.make_model().to(dev)
    opt = make_optimizer(optimizer, model.parameters(), lr=1e-3, momentum=0.9)
    x, y = wl.sample_batch(batch_size, torch.Generator().manual_seed(0), dev)
    micro = batch_size // micro_batches
    chunks = list(zip(x.split(micro), y.split(micro)))
    noise = GradientNoiseScale()
    acc = [None]

    def step(with_noise: bool):
        def fn():
            for xb, yb in chunks:
                (wl.loss(model(xb), yb) / micro_batches).backward()
                if with_noise:
                    acc[0].micro_step(len(xb))
            if with_noise:
                acc[0].finish()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return fn

    plain_med, noise_med = [], []
    for _ in range(rounds):
        plain_med.append(_time(step(False), dev, clock, 2, reps))
        acc[0] = NoiseScaleAccumulator(model, noise, mode=mode)
        noise_med.append(_time(step(True), dev, clock, 2, reps))
        acc[0].remove()
    # the data-parallel path on top of norms that the all-reduce wrapper already computed
    local, glob = torch.tensor(3.0, device=dev), torch.tensor(2.0, device=dev)
    ddp_update = _time(lambda: noise.update_from_distributed(local, glob, micro, micro_batches), dev, clock, 5, 200)
    plain, with_noise = statistics.median(plain_med), statistics.median(noise_med)
    ratios = [n / p - 1 for p, n in zip(plain_med, noise_med)]
    return {"workload": wl.name, "batch_size": batch_size, "micro_batches": micro_batches, "optimizer": optimizer,
            "mode": mode, "clock": clock,
            "parameters": sum(p.numel() for p in model.parameters()),
            "param_tensors": sum(1 for _ in model.parameters()),
            "plain_step_s": plain, "noise_step_s": with_noise, "overhead": with_noise / plain - 1,
            "overhead_q20": quantiles(ratios)["q20"], "overhead_q80": quantiles(ratios)["q80"],
            "ddp_update_s": ddp_update, "ddp_update_overhead": ddp_update / plain, "rounds": rounds,
            "meets_target": with_noise / plain - 1 < TARGET}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", action="append", help="workload name(s) (default: simple-cnn, mnist1d-mlp)")
    p.add_argument("--batch-size", type=int, action="append", help="batch size(s) (default 64, 256)")
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--optimizer", default="fastsgd-nesterov")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, default=7, help="alternating rounds of plain / with-noise timing")
    p.add_argument("--reps", type=int, default=10, help="timed steps per round and variant")
    p.add_argument("--mode", action="append", choices=NoiseScaleAccumulator.MODES,
                   help="accumulator mode(s) (default: each and first)")
    p.add_argument("--clock", choices=("wall", "process"), default=None,
                   help="default: process CPU time on cpu, wall time on cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="directory for noise_scale_overhead.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = args.clock or ("wall" if args.device.startswith("cuda") else "process")
    if args.micro_batches < 2:
        p.error("--micro-batches must be >= 2")
    rows = []
    for name in args.workload or ["simple-cnn", "mnist1d-mlp"]:
        for b in args.batch_size or [64, 256]:
            if b % args.micro_batches:
                p.error(f"batch size {b} not divisible by --micro-batches {args.micro_batches}")
            for mode in args.mode or ["each", "first"]:
                rows.append(measure(name, b, args.micro_batches, args.optimizer, args.device, args.rounds,
                                    args.reps, clock, mode))
                print(f"  {name} B={b} {mode}: overhead {rows[-1]['overhead']:+.2%}", file=sys.stderr)
    print(format_table([{**r, "overhead": f"{r['overhead']:+.2%}",
                         "overhead_q20..q80": f"{r['overhead_q20']:+.1%}..{r['overhead_q80']:+.1%}",
                         "ddp_update": f"{r['ddp_update_overhead']:.3%}"} for r in rows],
                       ["workload", "batch_size", "micro_batches", "mode", "param_tensors", "plain_step_s",
                        "noise_step_s", "overhead", "overhead_q20..q80", "ddp_update"]))
    print(f"target: < {TARGET:.0%} of the step time; clock: {clock}; device {environment(args.device)['device']}")
    if args.out:
        path = write_rows(os.path.join(args.out, "noise_scale_overhead.json"), rows,
                          {"schema": "fastsgd.noise_scale_overhead/1", "target": TARGET,
                           "environment": environment(args.device)})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
