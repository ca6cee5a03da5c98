"""Steps to result against batch size (Shallue et al. 2019 / Golmant et al. 2018).

    python bench/steps_to_result.py --workload mnist1d-mlp --optimizer nesterov \\
        --batch-sizes 8..4096 --trials 32 --out bench/results/steps_mnist1d_mlp_nesterov

For each batch size, --trials quasi-random (scrambled Sobol) trials are trained
together as one vmapped model until each beats the goal, runs out of steps,
diverges or can no longer win. Every evaluation is stored in an Optuna database
(DIR/study.db, or --storage URL); rerunning the same command resumes where it
stopped. Writes DIR/study_summary.json and PNG plots and prints a table.

--batch-sizes: "8..4096" (powers of two), "8,32,128" or a mix.
--goal: a number, or "golmant" (lower quartile of the best values reached at
the largest batch size); default: the workload's goal.
--space: a JSON file or JSON string in the fastsgd.study.search format.
--protocol: tuned (search every batch size) or a Golmant scaling rule
(constant, sqrt, linear, linear-warmup) from --base-batch-size.
--export DIR: also write the trials in the batch_science layout under DIR.
--threads 1 is faster on a busy machine (several torch threads wait for each
other when cores are shared); on an idle one the default uses every core.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from fastsgd.study.runner import GOAL_RULES, PROTOCOLS, StudyConfig, run_study
from fastsgd.study.search import OPTIMIZERS


def parse_batch_sizes(text: str):
    """ "8..4096" -> powers of two from 8 to 4096; "8,24,64" -> those; mixable: "8..64,100"."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if ".." in part:
            lo, hi = (int(x) for x in part.split(".."))
            if lo < 1 or hi < lo or lo & (lo - 1) or hi & (hi - 1):
                raise argparse.ArgumentTypeError(f"range {part!r} needs powers of two lo <= hi, e.g. 8..4096")
            b = lo
            while b <= hi:
                out.append(b)
                b *= 2
        elif part:
            out.append(int(part))
    if not out or any(b < 1 for b in out):
        raise argparse.ArgumentTypeError(f"invalid batch sizes {text!r}")
    return sorted(set(out))


def parse_space(text: str):
    if text is None:
        return None
    if os.path.exists(text):
        with open(text) as f:
            return json.load(f)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--space is neither a file nor valid JSON: {exc}") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="mnist1d-mlp",
                   help="mnist1d-mlp, mnist1d-cnn, digits-mlp or least-squares")
    p.add_argument("--optimizer", default="nesterov", choices=OPTIMIZERS)
    p.add_argument("--batch-sizes", type=parse_batch_sizes, default=parse_batch_sizes("8..4096"))
    p.add_argument("--trials", type=int, default=32, help="trials per batch size")
    p.add_argument("--goal", default=None, help='goal value or "golmant" (default: the workload\'s goal)')
    p.add_argument("--goal-metric", default=None, help="e.g. val_error, val_loss, train_loss")
    p.add_argument("--higher-is-better", action="store_true")
    p.add_argument("--space", type=parse_space, default=None, help="search space: JSON file or string")
    p.add_argument("--protocol", default="tuned", choices=PROTOCOLS)
    p.add_argument("--base-batch-size", type=int, default=None)
    p.add_argument("--budget-epochs", type=float, default=StudyConfig.budget_epochs)
    p.add_argument("--min-steps", type=int, default=StudyConfig.min_steps)
    p.add_argument("--max-steps", type=int, default=StudyConfig.max_steps)
    p.add_argument("--group-size", type=int, default=0, help="trials per vmapped group (0: all)")
    p.add_argument("--no-prune", action="store_true", help="run every trial to the goal or budget")
    p.add_argument("--train-metrics", action="store_true", help="also score a training subset at each evaluation")
    p.add_argument("--eval-ratio", type=float, default=StudyConfig.eval_ratio)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--storage", default=None, help="SQLAlchemy URL or SQLite path (default: OUT/study.db)")
    p.add_argument("--heartbeat-interval", type=int, default=StudyConfig.heartbeat_interval,
                   help="seconds between heartbeats of a running trial (several workers on one --storage)")
    p.add_argument("--grace-period", type=int, default=StudyConfig.grace_period,
                   help="seconds without a heartbeat before other workers rerun a trial")
    p.add_argument("--backend", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--export", default=None, help="also export to the batch_science layout under this directory")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)

    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    goal, rule = None, "fixed"
    if a.goal is not None:
        if a.goal in GOAL_RULES[1:]:
            rule = a.goal
        else:
            try:
                goal = float(a.goal)
            except ValueError:
                p.error(f"--goal must be a number or 'golmant', got {a.goal!r}")
    config = StudyConfig(out=a.out, workload=a.workload, optimizer=a.optimizer, batch_sizes=a.batch_sizes,
                         trials=a.trials, goal=goal, goal_rule=rule, goal_metric=a.goal_metric,
                         higher_is_better=a.higher_is_better, space=a.space, protocol=a.protocol,
                         base_batch_size=a.base_batch_size, budget_epochs=a.budget_epochs, min_steps=a.min_steps,
                         max_steps=a.max_steps, group_size=a.group_size, prune=not a.no_prune,
                         train_metrics=a.train_metrics, eval_ratio=a.eval_ratio, seed=a.seed, storage=a.storage,
                         backend=a.backend, heartbeat_interval=a.heartbeat_interval, grace_period=a.grace_period)
    try:
        summary = run_study(config, progress=not a.no_progress)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if a.export:
        from fastsgd.study.batch_science import export_records
        from fastsgd.study.runner import open_storage
        dataset, _, model = a.workload.partition("-")
        path = export_records(open_storage(config).records(), a.export, dataset=dataset, model=model or "model",
                              optimizer=a.optimizer, study_info={"goal": summary["goal"]})
        print(f"exported to {path}")
    print(f"summary: {os.path.join(a.out, 'study_summary.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
