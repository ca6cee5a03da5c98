"""Steps to result against batch size (Shallue et al. 2019 / Golmant et al. 2018).

    fastsgd steps --workload mnist1d-mlp --optimizer nesterov \\
        --batch-sizes 8..4096 --trials 32 --out bench/results/steps_mnist1d_mlp_nesterov
    fastsgd steps --workload mypackage.workloads:make_workload --batch-sizes 16..1024 --out out/steps

For each batch size, quasi-random (scrambled Sobol, scrambled anew per batch
size) trials are trained together until each beats the goal, runs out of steps,
diverges or can no longer enter the top --keep-top. Every evaluation is stored
in an Optuna database (DIR/study.db, or --storage URL); rerunning the same
command resumes where it stopped. Writes DIR/study_summary.json,
DIR/curves.csv.gz (every evaluation, the committed record) and PNG plots, and
prints a table.

The search protocol (details: fastsgd.study.steps.runner):
--trials N: non-diverged search trials per batch size; diverged ones are
replaced by further Sobol points, up to --max-trials (default 3N) in all.
--keep-top K: prune a trial only once it cannot beat the K-th best (default 5).
--refine N: a second stage of N points in the box around the best K.
--budget: the initial step budget, "1000" at every batch size, or per batch size
"8:20000,1024:400" (mixable: "1000,8:20000"). When the best trial needs more
than half of it, or none reaches the goal, the best K are rerun with
--budget-growth times the budget (default 2), up to --budget-cap steps. A batch
size with no result at the cap is reported as censored (steps > cap).
--reseeds R: rerun each batch size's best setting with R more seeds (default 3).
--full-curves: rerun the best K without the goal stop (and run the reseeds to
their budget) so steps to result can be recomputed later at harder goals.

--batch-sizes: "8..4096" (powers of two), "8,32,128" or a mix.
--goal: a number, or "golmant" (lower quartile of the best values reached at
the largest batch size); default: the workload's goal.
--space: a JSON file or JSON string in the fastsgd.study.steps.search format.
--protocol: tuned (search every batch size) or a Golmant scaling rule
(constant, sqrt, linear, linear-warmup) from --base-batch-size.
--export DIR: also write the trials in the batch_science layout under DIR.
--threads 1 is faster on a busy machine (several torch threads wait for each
other when cores are shared); on an idle one the default uses every core.
"""
from __future__ import annotations

import argparse
import os
import sys

from fastsgd.study.cli import args as cli_args
from fastsgd.study.steps.allocator import keep_freed_memory
from fastsgd.study.steps.runner import GOAL_RULES, PROTOCOLS, StudyConfig, run_study
from fastsgd.study.steps.search import OPTIMIZERS

HELP = "steps to result against batch size (the algorithmic half)"


def budget_arg(text: str):
    """ "1000" -> (1000, {}); "8:20000,1024:400" -> (None, {8: 20000, 1024: 400}); mixable."""
    default, per = None, {}
    try:
        for part in (p.strip() for p in text.split(",")):
            if ":" in part:
                b, steps = part.split(":")
                per[int(b)] = int(steps)
            elif part:
                default = int(part)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid budget {text!r}: use STEPS, B:STEPS,... or both") from None
    return default, per


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", default="mnist1d-mlp", help=cli_args.WORKLOAD_HELP)
    p.add_argument("--optimizer", default="nesterov", choices=OPTIMIZERS)
    p.add_argument("--batch-sizes", type=cli_args.batch_sizes, default=cli_args.batch_sizes("8..4096"))
    p.add_argument("--trials", type=int, default=StudyConfig.trials,
                   help="non-diverged search trials per batch size")
    p.add_argument("--max-trials", type=int, default=0, help="at most this many search trials (0: 3 x --trials)")
    p.add_argument("--keep-top", type=int, default=StudyConfig.keep_top,
                   help="prune only trials that cannot beat the K-th best")
    p.add_argument("--reseeds", type=int, default=StudyConfig.reseeds, help="extra seeds of the best setting")
    p.add_argument("--refine", type=int, default=0, help="second-stage trials around the best region")
    p.add_argument("--full-curves", action="store_true", help="rerun the top trials to their budget, no goal stop")
    p.add_argument("--goal", default=None, help='goal value or "golmant" (default: the workload\'s goal)')
    p.add_argument("--goal-metric", default=None, help="e.g. val_error, val_loss, train_loss")
    p.add_argument("--higher-is-better", action="store_true")
    p.add_argument("--space", type=cli_args.json_value, default=None, help="search space: JSON file or string")
    p.add_argument("--protocol", default="tuned", choices=PROTOCOLS)
    p.add_argument("--base-batch-size", type=int, default=None)
    p.add_argument("--budget", type=budget_arg, default=(None, {}),
                   help=f"initial step budget: STEPS and/or B:STEPS,... (default {StudyConfig.budget})")
    p.add_argument("--budget-growth", type=float, default=StudyConfig.budget_growth)
    p.add_argument("--budget-cap", type=int, default=StudyConfig.budget_cap, help="largest step budget")
    p.add_argument("--group-size", type=int, default=0, help="trials per vmapped group (0: all)")
    p.add_argument("--no-prune", action="store_true", help="run every trial to the goal or budget")
    p.add_argument("--train-metrics", action="store_true", help="also score a training subset at each evaluation")
    p.add_argument("--eval-ratio", type=float, default=StudyConfig.eval_ratio)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--storage", default=None, help="SQLAlchemy URL or SQLite path (default: OUT/study.db)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--heartbeat-interval", type=int, default=StudyConfig.heartbeat_interval,
                   help="seconds between heartbeats of a running trial (several workers on one --storage)")
    p.add_argument("--grace-period", type=int, default=StudyConfig.grace_period,
                   help="seconds without a heartbeat before other workers rerun a trial")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--export", default=None, help="also export to the batch_science layout under this directory")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True)


def run(a: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    cli_args.set_threads(a.threads)
    keep_freed_memory()  # trials allocate the same large activations every step
    goal, rule = None, "fixed"
    if a.goal is not None:
        if a.goal in GOAL_RULES[1:]:
            rule = a.goal
        else:
            try:
                goal = float(a.goal)
            except ValueError:
                p.error(f"--goal must be a number or 'golmant', got {a.goal!r}")
    budget, budgets = a.budget
    try:
        config = StudyConfig(out=a.out, workload=a.workload, optimizer=a.optimizer, batch_sizes=a.batch_sizes,
                             trials=a.trials, max_trials=a.max_trials, keep_top=a.keep_top, reseeds=a.reseeds,
                             refine=a.refine, goal=goal, goal_rule=rule, goal_metric=a.goal_metric,
                             higher_is_better=a.higher_is_better, space=a.space, protocol=a.protocol,
                             base_batch_size=a.base_batch_size,
                             budget=StudyConfig.budget if budget is None else budget, budgets=budgets,
                             budget_growth=a.budget_growth, budget_cap=a.budget_cap, full_curves=a.full_curves,
                             group_size=a.group_size, prune=not a.no_prune, train_metrics=a.train_metrics,
                             eval_ratio=a.eval_ratio, seed=a.seed, storage=a.storage, backend=a.backend,
                             heartbeat_interval=a.heartbeat_interval, grace_period=a.grace_period)
        summary = run_study(config, progress=not a.no_progress)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if a.export:
        from fastsgd.study.steps.batch_science import export_records
        from fastsgd.study.steps.runner import open_storage
        dataset, _, model = cli_args.safe_name(a.workload).partition("-")
        path = export_records(open_storage(config).records(), a.export, dataset=dataset, model=model or "model",
                              optimizer=a.optimizer, study_info={"goal": summary["goal"]})
        print(f"exported to {path}")
    print(f"summary: {os.path.join(a.out, 'study_summary.json')}")
    return 0
