"""Trials per second: the trial engine and the vmap path against one-at-a-time training.

    python bench/trials_per_second.py --threads 2

For each workload (MNIST-1D MLP and CNN) and batch size, three ways train the
same trials (same seeds, hyperparameters and batches) for --steps steps and
evaluate on the validation split at steps 0, 1, 2, 4, 8, ... (--eval-ratio):

  engine         fastsgd.study.steps.trials.run_trials with the trial engine (the study's path)
  vmap           run_trials with engine="vmap" (the path models that do not convert take)
  one_at_a_time  a plain loop per trial: model, torch.optim.SGD(nesterov=True), eval mode for evaluation

A "trial" is one such run; trials/s = trials / wall seconds. One-at-a-time
cost grows linearly with the number of trials, so it runs --baseline-trials of
them and its rate is scaled from those. The three are interleaved in each of
--reps rounds, so a disturbance on a shared machine hits them alike; each row
gives the median of the rounds, the paired ratios (median over rounds of
one_at_a_time time per trial / engine time per trial, wall and CPU time), the
same ratio for the training alone (wall time outside evaluation: evaluation is
the same matrix products in every method, so batching cannot shrink it much)
and each method's evaluation share (seconds in evaluation / total).

Writes bench/results/trials_per_second.json (or --out) with the environment
(device, versions, threads, date, commit) in "meta".
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from fastsgd.backends import get_backend
from fastsgd.measure import environment, write_rows
from fastsgd.study.steps import search
from fastsgd.study.steps.allocator import keep_freed_memory
from fastsgd.study.steps.engine import batch_indices, trial_keys
from fastsgd.study.steps.trials import RunSettings, TrialSpec, data_seed, evaluation_steps, run_trials
from fastsgd.study.tables import format_table
from fastsgd.study.workloads import get_workload
from fastsgd.study.workloads.data import restrict_eval_sets

CPU = torch.device("cpu")


def specs_for(n: int, seed: int):
    # Moderate hyperparameters (no divergence), so every method does exactly the same work.
    space = {"lr": {"low": 0.01, "high": 0.3, "scale": "log"},
             "one_minus_momentum": {"low": 0.05, "high": 0.5, "scale": "log"}}
    pts = search.sobol_points(space, n, seed=seed)
    return [TrialSpec(i, s, search.hparams(p, space)) for i, (p, s) in
            enumerate(zip(pts, search.trial_seeds(seed, 0, n)))]


def one_at_a_time(stats: dict):
    def run(workload, specs, batch_size: int, steps: int, eval_ratio: float) -> None:
        stats["eval_seconds"] = 0.0
        start = time.perf_counter()
        train_one_at_a_time(workload, specs, batch_size, steps, eval_ratio, stats)
        stats["total_seconds"] = time.perf_counter() - start
    return run


def train_one_at_a_time(workload, specs, batch_size: int, steps: int, eval_ratio: float, stats: dict) -> None:
    """What a user without the engine writes: one model and optimizer per trial, the same batches."""
    evals = set(evaluation_steps(steps, eval_ratio))
    x_train, y_train = workload.train_data
    for spec in specs:
        torch.manual_seed(spec.seed)
        model = workload.make_model()
        opt = torch.optim.SGD(model.parameters(), lr=spec.hparams["lr"], momentum=spec.hparams["momentum"],
                              nesterov=True)
        key = trial_keys([data_seed(spec.seed)])
        for t in range(steps + 1):
            if t in evals:
                t0 = time.perf_counter()
                model.eval()
                workload.evaluate(model, CPU)
                model.train()
                stats["eval_seconds"] += time.perf_counter() - t0
            if t == steps:
                break
            idx = batch_indices(key, t, batch_size, len(x_train))[0]
            opt.zero_grad(set_to_none=True)
            workload.loss(model(x_train[idx]), y_train[idx]).backward()
            opt.step()


def batched(engine: str, stats: dict):
    def run(workload, specs, batch_size: int, steps: int, eval_ratio: float) -> None:
        run_trials(workload, specs, RunSettings(batch_size=batch_size, max_steps=steps, optimizer="nesterov",
                                                eval_ratio=eval_ratio, engine=engine), stats=stats)
    return run


def timed(fn, *args):
    w0, c0 = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - w0, time.process_time() - c0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="mnist1d-mlp,mnist1d-cnn", help="comma-separated")
    p.add_argument("--trials", type=int, default=32, help="trials trained together by the batched methods")
    p.add_argument("--baseline-trials", type=int, default=4, help="trials the one-at-a-time loop runs (rate scaled)")
    p.add_argument("--batch-sizes", default="8,64,256,1024", help="comma-separated")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--eval-ratio", type=float, default=2.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--methods", default="engine,vmap,one_at_a_time", help="comma-separated subset")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join("bench", "results", "trials_per_second.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    freed_memory_kept = keep_freed_memory()  # for every method alike (see fastsgd.study.steps.allocator)
    specs = specs_for(a.trials, seed=0)
    backend = get_backend("auto", CPU, {torch.float32}).NAME
    methods = a.methods.split(",")
    rows = []
    for name in a.workloads.split(","):
        workload = restrict_eval_sets(get_workload(name), ["val"])
        for bs in (int(b) for b in a.batch_sizes.split(",")):
            stats = {m: {} for m in methods}
            runs = {"engine": (batched("engine", stats["engine"]), specs),
                    "vmap": (batched("vmap", stats["vmap"]), specs),
                    "one_at_a_time": (one_at_a_time(stats["one_at_a_time"]), specs[:a.baseline_trials])}
            for m in methods:  # warm-up: first calls, allocator, vmap/fx tracing
                runs[m][0](workload, runs[m][1][:2], bs, 2, a.eval_ratio)
            per_trial = {m: [] for m in methods}  # (wall, cpu) seconds per trial, one entry per round
            training = {m: [] for m in methods}  # wall seconds per trial outside evaluation
            eval_share = {m: [] for m in methods}
            for _ in range(a.reps):
                for m in methods:
                    fn, trial_specs = runs[m]
                    wall, cpu = timed(fn, workload, trial_specs, bs, a.steps, a.eval_ratio)
                    per_trial[m].append((wall / len(trial_specs), cpu / len(trial_specs)))
                    st = stats[m]
                    training[m].append((st["total_seconds"] - st["eval_seconds"]) / len(trial_specs))
                    eval_share[m].append(st["eval_seconds"] / st["total_seconds"])
            row = {"workload": name, "batch_size": bs, "trials": a.trials, "baseline_trials": a.baseline_trials,
                   "steps": a.steps, "eval_ratio": a.eval_ratio, "reps": a.reps}
            for m in methods:
                row[f"{m}_trials_per_s"] = 1.0 / statistics.median(w for w, _ in per_trial[m])
            for m in methods:
                if m != "engine" and "engine" in methods:
                    pairs = list(zip(per_trial[m], per_trial["engine"]))
                    row[f"engine_vs_{m}"] = statistics.median(o[0] / e[0] for o, e in pairs)
                    row[f"engine_vs_{m}_cpu_time"] = statistics.median(o[1] / e[1] for o, e in pairs)
                    row[f"engine_vs_{m}_training"] = statistics.median(
                        o / e for o, e in zip(training[m], training["engine"]))
            for m in methods:
                row[f"{m}_eval_share"] = statistics.median(eval_share[m])
            row.update(backend=backend, threads=torch.get_num_threads(), keep_freed_memory=freed_memory_kept,
                       load_avg_1min=os.getloadavg()[0])
            rows.append(row)
            cols = ["workload", "batch_size"] + [f"{m}_trials_per_s" for m in methods] + \
                [k for k in row if k.startswith("engine_vs_") and not k.endswith("_cpu_time")] + \
                [f"{m}_eval_share" for m in methods] + ["load_avg_1min"]
            print(format_table(rows[-1:], cols), flush=True)
            write_rows(a.out, rows, meta=environment("cpu"))  # after every row: an interrupted run keeps its rows
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
