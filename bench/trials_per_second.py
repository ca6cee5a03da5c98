"""Trials per second: vmapped trials with one fused optimizer step against
one-at-a-time training with torch.optim.SGD, on the MNIST-1D MLP.

    python bench/trials_per_second.py --trials 32 --batch-size 64 --steps 100

Both sides train the same trials (same seeds, hyperparameters, batches) for
--steps steps and evaluate on the validation split at the same steps
(every doubling of the step count); a "trial" here is one such run. The
vmapped side is fastsgd.study.steps.trials.run_trials (the study's engine); the
baseline is a plain loop per trial with torch.optim.SGD(nesterov=True).
Writes bench/results/trials_per_second.json (or --out).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from fastsgd.backends import get_backend
from fastsgd.measure import environment, write_rows
from fastsgd.study.steps import search
from fastsgd.study.workloads import get_workload
from fastsgd.study.workloads.data import restrict_eval_sets
from fastsgd.study.steps.trials import RunSettings, TrialSpec, data_seed, evaluation_steps, run_trials
from fastsgd.study.tables import format_table

EVAL_RATIO = 2.0  # evaluate at steps 0, 1, 2, 4, 8, ...: the benchmark is about training throughput


def specs_for(n: int, seed: int):
    # Moderate hyperparameters (no divergence), so both sides do exactly the same work.
    space = {"lr": {"low": 0.01, "high": 0.3, "scale": "log"}, "one_minus_momentum": {"low": 0.05, "high": 0.5,
                                                                                      "scale": "log"}}
    pts = search.sobol_points(space, n, seed=seed)
    return [TrialSpec(i, s, search.hparams(p, space)) for i, (p, s) in
            enumerate(zip(pts, search.trial_seeds(seed, 0, n)))]


def one_at_a_time(workload, specs, batch_size: int, steps: int) -> None:
    evals = set(evaluation_steps(steps, EVAL_RATIO))
    for spec in specs:
        torch.manual_seed(spec.seed)
        model = workload.make_model()
        opt = torch.optim.SGD(model.parameters(), lr=spec.hparams["lr"], momentum=spec.hparams["momentum"],
                              nesterov=True)
        gen = torch.Generator().manual_seed(data_seed(spec.seed))
        for t in range(steps + 1):
            if t in evals:
                workload.evaluate(model, torch.device("cpu"))
            if t == steps:
                break
            x, y = workload.sample_batch(batch_size, gen, torch.device("cpu"))
            opt.zero_grad(set_to_none=True)
            workload.loss(model(x), y).backward()
            opt.step()


def vmapped(workload, specs, batch_size: int, steps: int) -> None:
    run_trials(workload, specs, RunSettings(batch_size=batch_size, max_steps=steps, optimizer="nesterov",
                                            eval_ratio=EVAL_RATIO))


def best_of(fn, reps: int):
    """(wall seconds, CPU seconds of this process) of the least disturbed of ``reps`` runs.
    On a shared machine the CPU time is the steadier figure (it excludes time
    spent waiting for a core); both are reported."""
    best = None
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        t = (time.perf_counter() - w0, time.process_time() - c0)
        best = t if best is None or t[0] < best[0] else best
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="mnist1d-mlp")
    p.add_argument("--trials", type=int, default=32)
    p.add_argument("--batch-sizes", default="64,1024", help="comma-separated")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=os.path.join("bench", "results", "trials_per_second.json"))
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    workload = restrict_eval_sets(get_workload(a.workload), ["val"])
    specs = specs_for(a.trials, seed=0)
    backend = get_backend("auto", torch.device("cpu"), {torch.float32}).NAME
    rows = []
    for bs in (int(b) for b in a.batch_sizes.split(",")):
        vmapped(workload, specs[:2], bs, 2)  # warm-up (first vmap call, allocator)
        (t_vmap, c_vmap) = best_of(lambda: vmapped(workload, specs, bs, a.steps), a.reps)
        (t_one, c_one) = best_of(lambda: one_at_a_time(workload, specs, bs, a.steps), a.reps)
        rows.append({"workload": a.workload, "batch_size": bs, "trials": a.trials, "steps": a.steps,
                     "vmapped_s": t_vmap, "one_at_a_time_s": t_one, "vmapped_cpu_s": c_vmap, "one_at_a_time_cpu_s": c_one,
                     "vmapped_trials_per_s": a.trials / t_vmap, "one_at_a_time_trials_per_s": a.trials / t_one,
                     "speedup": t_one / t_vmap, "speedup_cpu_time": c_one / c_vmap,
                     "backend": backend, "threads": torch.get_num_threads(), "load_avg_1min": os.getloadavg()[0]})
        print(format_table(rows[-1:], ["batch_size", "trials", "steps", "vmapped_trials_per_s",
                                       "one_at_a_time_trials_per_s", "speedup", "speedup_cpu_time", "backend"]),
              flush=True)
    write_rows(a.out, rows, meta=environment("cpu"))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
