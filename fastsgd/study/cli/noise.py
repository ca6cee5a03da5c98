"""Predict the critical batch size from one ordinary training run.

Trains a workload once at one batch size with a fastsgd optimizer, splitting every
step into ``--micro-batches`` accumulation micro-batches so that
``fastsgd.noise_scale.NoiseScaleAccumulator`` measures the gradient noise scale
B_simple along the way (McCandlish et al. 2018). Stops at the first evaluation that
beats the goal, then predicts B_crit and S(B) = S_min + E_min/B
(``predict_critical_batch``: the progress-weighted mean of B_simple over the run).
With ``--study DIR`` (a steps-to-result summary) the run uses the study's tuned learning
rate and momentum at this batch size (the default way: B_simple depends on where training
goes, so the prediction belongs to the settings it was measured with) and reports the
predicted/measured B_crit ratio and predicted against measured steps per batch size.
Without ``--study``, ``--lr`` and ``--momentum`` must be given explicitly.

``--hessian-every K`` also measures the Hessian-aware noise scale
B_noise = tr(H Sigma)/(G^T H G) every K steps from the step's micro-batch gradients and
Hessian-vector products on one extra batch (``fastsgd.study.combine.hessian_noise``; about 2
micro-batches' backward per micro-batch on those steps); the trajectory then has ``b_noise``
per window and ``prediction_b_noise`` predicts B_crit from it the same way.

    fastsgd noise --workload mnist1d-mlp --batch-size 64 \\
        --out bench/results/noise_scale.json [--study bench/results/study]

JSON written (schema ``fastsgd.noise_scale_run/1``): run settings, ``reached_goal``,
``steps`` (steps to the goal), ``trajectory`` (one row per noise window: end step, window
steps, B_simple / |G|^2 / tr(Sigma) of the window, the running EMA B_simple),
``evaluations`` (step, metric), ``prediction`` (CriticalBatchPrediction.as_dict()),
``comparison`` (with --study), ``environment``, ``wall_seconds``.
"""
from __future__ import annotations

import argparse
import os
import sys

from fastsgd.noise_scale import NoiseScaleAccumulator
from fastsgd.study.cli import args as cli_args
from fastsgd.study.combine.noise_prediction import measure_noise_run, study_hparams
from fastsgd.study.tables import format_table
from fastsgd.study.workloads import get_workload


def measure(args) -> dict:
    wl = get_workload(args.workload, **({} if args.goal is None else {"goal": args.goal}))
    summary, hp = (None, None)
    if args.study:
        summary, hp = study_hparams(args.study, args.batch_size)
        if hp is None and (args.lr is None or args.momentum is None):
            raise SystemExit(f"the study has no tuned settings at batch size {args.batch_size}: measure at one of its "
                             "batch sizes, or give --lr and --momentum explicitly")
    elif args.lr is None or args.momentum is None:
        raise SystemExit("give --study DIR (its tuned lr and momentum at this batch size: the default way) or "
                         "--lr and --momentum explicitly")
    lr = args.lr if args.lr is not None else hp["lr"]
    momentum = args.momentum if args.momentum is not None else hp.get("momentum", 0.0)
    lr_source = "study best trial" if args.lr is None else "--lr"
    try:
        result = measure_noise_run(wl, optimizer=args.optimizer, lr=lr, momentum=momentum,
                                   batch_size=args.batch_size, micro_batches=args.micro_batches,
                                   window=args.window, decay=args.decay, noise_mode=args.noise_mode,
                                   eval_resolution=args.eval_resolution, max_steps=args.max_steps,
                                   seed=args.seed, device=args.device, study_summary=summary,
                                   progress=args.progress, hessian_every=args.hessian_every)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    result["lr_source"] = lr_source
    if not result["reached_goal"]:
        print(f"goal {wl.goal} not reached in {args.max_steps} steps: no prediction (raise --max-steps or the lr)",
              file=sys.stderr)
    return result


HELP = "predict the critical batch size from the gradient noise scale of one training run"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", default="mnist1d-mlp", help=cli_args.WORKLOAD_HELP)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--micro-batches", type=int, default=4, help="accumulation micro-batches per step (>= 2)")
    p.add_argument("--optimizer", default="fastsgd-nesterov", help="optimizer spec (fastsgd.study.optimizers)")
    p.add_argument("--lr", type=float, default=None, help="default: the study's tuned lr at this batch size (--study)")
    p.add_argument("--momentum", type=float, default=None, help="default: the study's tuned momentum (--study)")
    p.add_argument("--hessian-every", type=int, default=0,
                   help="also measure B_noise = tr(H Sigma)/(G^T H G) with HVPs every this many steps (0: off)")
    p.add_argument("--goal", type=float, default=None, help="goal on the workload's goal metric (default: its own)")
    p.add_argument("--max-steps", type=int, default=20000)
    p.add_argument("--window", type=int, default=25, help="steps per noise-scale window")
    p.add_argument("--noise-mode", default="each", choices=NoiseScaleAccumulator.MODES,
                   help="each: every micro-batch is a small-batch sample (more samples per step); "
                        "first: only the first (cheaper)")
    p.add_argument("--decay", type=float, default=0.95, help="EMA decay of the running estimate (logged only)")
    p.add_argument("--eval-resolution", type=float, default=0.02,
                   help="evaluate every max(1, step x this) steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--study", default=None, help="steps-to-result study dir / study_summary.json to compare with")
    p.add_argument("--out", default="out/noise_scale.json")
    p.add_argument("--progress", action="store_true")


def run(args: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    if args.micro_batches < 2:
        p.error("--micro-batches must be >= 2: the noise scale compares micro-batch and batch gradients")
    cli_args.set_threads(args.threads)
    result = measure(args)
    import json
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(format_table(result["trajectory"], ["step", "window_steps", "b_simple", "b_simple_ema", "g2", "trace"]))
    if result["prediction"]:
        pr = result["prediction"]
        print(f"\n{result['workload']} at B={result['batch_size']} (lr {result['lr']:.4g}, momentum "
              f"{result['momentum']:.3g}, {result['lr_source']}): goal reached in {result['steps']} steps, "
              f"{result['wall_seconds']:.1f} s")
        print(f"predicted B_crit {pr['B_crit']:.4g} (mean B_simple {pr['b_simple_mean']:.4g}, at goal "
              f"{pr['b_simple_final']:.4g}); S(B) = {pr['S_min']:.4g} + {pr['E_min']:.4g}/B")
        if result.get("prediction_b_noise"):
            pn, hn = result["prediction_b_noise"], result["hessian_noise"]
            print(f"from B_noise (Hessian-aware, {hn['hvp_steps']} steps with HVPs): predicted B_crit "
                  f"{pn['B_crit']:.4g}; run mean B_noise {hn['b_noise']:.4g} against B_simple "
                  f"{hn['b_simple_same_steps']:.4g} on the same steps")
    if result["comparison"]:
        c = result["comparison"]
        if c["ratio"] is not None:
            print(f"measured B_crit (study fit) {c['measured_B_crit']:.4g}: predicted/measured = {c['ratio']:.3g}")
        print(format_table(c["per_batch_size"], ["batch_size", "measured_steps", "predicted_steps"]))
    print(f"wrote {args.out}")
    return 0
