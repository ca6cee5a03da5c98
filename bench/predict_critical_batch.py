"""Predict the critical batch size from one ordinary training run.

Trains a workload once at one batch size with a fastsgd optimizer, splitting every
step into ``--micro-batches`` accumulation micro-batches so that
``fastsgd.study.noise_scale.NoiseScaleAccumulator`` measures the gradient noise scale
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
Hessian-vector products on one extra batch (``fastsgd.study.combine.hessian_noise``; costs
about 2 micro-batches' backward per micro-batch on those steps); the trajectory then has
``b_noise`` per window and ``prediction_b_noise`` predicts B_crit from it the same way.

    python bench/predict_critical_batch.py --workload mnist1d-mlp --batch-size 64 \\
        --out bench/results/noise_scale.json [--study bench/results/study]

JSON written (schema ``fastsgd.noise_scale_run/1``): run settings, ``reached_goal``,
``steps`` (steps to the goal), ``trajectory`` (one row per noise window: end step, window
steps, B_simple / |G|^2 / tr(Sigma) of the window, the running EMA B_simple),
``evaluations`` (step, metric), ``prediction`` (CriticalBatchPrediction.as_dict()),
``comparison`` (with --study), ``environment``, ``wall_seconds``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

from fastsgd.measure import environment, format_table
from fastsgd.study.combine.hessian_noise import HessianNoiseScale, noise_scale_estimates
from fastsgd.study.noise_scale import GradientNoiseScale, NoiseScaleAccumulator, predict_critical_batch

SCHEMA = "fastsgd.noise_scale_run/1"


def _get_workload(name: str, goal):
    kwargs = {} if goal is None else {"goal": goal}
    if name == "least-squares":
        from fastsgd.study.least_squares import least_squares_workload
        return least_squares_workload(**kwargs)
    from fastsgd.study.data_workloads import get_workload
    return get_workload(name, **kwargs)


def _study_hparams(study_dir: str, batch_size: int):
    """(study summary dict, best hparams at batch_size or None)."""
    import json
    from fastsgd.study.time_to_result import _find
    with open(_find(study_dir, "study_summary.json")) as f:
        summary = json.load(f)
    for row in summary.get("per_batch_size", []):
        if int(row["batch_size"]) == batch_size:
            return summary, row.get("best_hparams")
    return summary, None


def run(args) -> dict:
    from fastsgd.study.optimizer_factory import make_optimizer

    wl = _get_workload(args.workload, args.goal)
    if wl.evaluate is None or wl.goal is None:
        raise SystemExit(f"workload {wl.name} has no evaluate/goal: give --goal")
    if args.batch_size % args.micro_batches:
        raise SystemExit(f"--batch-size {args.batch_size} is not divisible by --micro-batches {args.micro_batches}")
    summary, hp = (None, None)
    if args.study:
        summary, hp = _study_hparams(args.study, args.batch_size)
        if hp is None and (args.lr is None or args.momentum is None):
            raise SystemExit(f"the study has no tuned settings at batch size {args.batch_size}: measure at one of its "
                             "batch sizes, or give --lr and --momentum explicitly")
    elif args.lr is None or args.momentum is None:
        raise SystemExit("give --study DIR (its tuned lr and momentum at this batch size: the default way) or "
                         "--lr and --momentum explicitly")
    lr = args.lr if args.lr is not None else hp["lr"]
    momentum = args.momentum if args.momentum is not None else hp.get("momentum", 0.0)
    lr_source = "study best trial" if args.lr is None else "--lr"

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = wl.make_model().to(device)
    opt = make_optimizer(args.optimizer, model.parameters(), lr=lr, momentum=momentum)
    noise = GradientNoiseScale(decay=args.decay)
    acc = NoiseScaleAccumulator(model, noise, mode=args.noise_mode)
    gen = torch.Generator().manual_seed(args.seed + 1)
    micro = args.batch_size // args.micro_batches
    sign = -1.0 if wl.higher_is_better else 1.0

    trajectory, evaluations = [], []
    hess_total, hess_win = HessianNoiseScale(), HessianNoiseScale()
    win_g2 = win_tr = None
    win_steps, step, reached = 0, 0, False
    next_eval = 1
    t_start = time.perf_counter()
    while step < args.max_steps:
        x, y = wl.sample_batch(args.batch_size, gen, device)
        if args.hessian_every and step % args.hessian_every == 0:
            est = noise_scale_estimates(model, wl.loss, list(zip(x.split(micro), y.split(micro))),
                                        wl.sample_batch(args.batch_size, gen, device))
            hess_total.update(est)
            hess_win.update(est)
        for xb, yb in zip(x.split(micro), y.split(micro)):
            (wl.loss(model(xb), yb) / args.micro_batches).backward()
            acc.micro_step(len(xb))
        d = acc.finish()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        win_steps += 1
        win_g2 = d["g2_raw"] if win_g2 is None else win_g2 + d["g2_raw"]
        win_tr = d["trace_raw"] if win_tr is None else win_tr + d["trace_raw"]
        done = False
        if step >= next_eval:
            metric = wl.evaluate(model, device)[wl.goal_metric]
            evaluations.append({"step": step, wl.goal_metric: metric})
            if not math.isfinite(metric):
                raise SystemExit(f"training diverged at step {step} ({wl.goal_metric}={metric}); lower --lr")
            done = sign * (metric - wl.goal) < 0
            # resolve steps to result within ~2 %: the evaluation interval grows with the step
            next_eval = step + max(1, int(step * args.eval_resolution))
        if win_steps >= args.window or done:
            g2, tr = float(win_g2 / win_steps), float(win_tr / win_steps)
            trajectory.append({"step": step, "window_steps": win_steps, "g2": g2, "trace": tr,
                               "b_simple": tr / g2 if g2 > 0 else float("nan"), "b_simple_ema": noise.b_simple})
            if hess_win.count:
                h = hess_win.read()
                trajectory[-1].update(b_noise=h["b_noise"], b_simple_hvp_steps=h["b_simple"], hvp_steps=h["updates"])
                hess_win = HessianNoiseScale()
            win_g2 = win_tr = None
            win_steps = 0
        if done:
            reached = True
            break
        if args.progress and step % 100 == 0:
            print(f"  step {step}: {wl.goal_metric} {evaluations[-1][wl.goal_metric]:.4g} (goal {wl.goal}), "
                  f"B_simple(EMA) {noise.b_simple:.4g}", file=sys.stderr)
    wall = time.perf_counter() - t_start
    acc.remove()

    result = {"schema": SCHEMA, "workload": wl.name, "optimizer": args.optimizer, "lr": lr, "momentum": momentum,
              "lr_source": lr_source, "batch_size": args.batch_size, "micro_batches": args.micro_batches,
              "window": args.window, "ema_decay": args.decay, "seed": args.seed, "noise_mode": args.noise_mode,
              "goal": {"metric": wl.goal_metric, "value": wl.goal, "higher_is_better": wl.higher_is_better},
              "reached_goal": reached, "steps": step if reached else None, "max_steps": args.max_steps,
              "trajectory": trajectory, "evaluations": evaluations, "prediction": None, "comparison": None,
              "environment": environment(device), "wall_seconds": wall}
    if not reached:
        print(f"goal {wl.goal} not reached in {args.max_steps} steps: no prediction (raise --max-steps or the lr)",
              file=sys.stderr)
        return result
    pred = predict_critical_batch([r["b_simple"] for r in trajectory], [r["window_steps"] for r in trajectory],
                                  args.batch_size)
    result["prediction"] = pred.as_dict()
    if hess_total.count:
        h = hess_total.read()
        result["hessian_noise"] = {"b_noise": h["b_noise"], "b_simple_same_steps": h["b_simple"],
                                   "hvp_steps": h["updates"], "every": args.hessian_every}
        wins = [r for r in trajectory if "b_noise" in r]
        try:
            pn = predict_critical_batch([r["b_noise"] for r in wins], [r["window_steps"] for r in wins],
                                        args.batch_size)
            result["prediction_b_noise"] = {**pn.as_dict(), "method": "progress-weighted mean of B_noise "
                                            "(Hessian-aware) along the run"}
        except ValueError as e:  # no window with a usable B_noise
            result["prediction_b_noise"] = None
            result["hessian_noise"]["message"] = str(e)
    if summary is not None:
        result["comparison"] = compare_with_study(pred, summary)
    return result


def compare_with_study(pred, summary: dict) -> dict:
    """Predicted vs measured B_crit and steps per batch size."""
    fit = summary.get("fit") or {}
    measured = fit.get("B_crit")
    rows = [{"batch_size": int(r["batch_size"]), "measured_steps": r.get("steps"),
             "predicted_steps": float(pred.steps(int(r["batch_size"])))} for r in summary.get("per_batch_size", [])]
    return {"measured_B_crit": measured, "measured_B_crit_ci": fit.get("B_crit_ci"),
            "predicted_B_crit": pred.b_crit,
            "ratio": (pred.b_crit / measured) if measured else None,
            "ratio_mean_b_simple": (pred.b_simple_mean / measured) if measured else None,
            "ratio_final_b_simple": (pred.b_simple_final / measured) if measured else None,
            "measured_S_min": fit.get("S_min"), "predicted_S_min": pred.s_min, "per_batch_size": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="mnist1d-mlp", help="mnist1d-mlp | mnist1d-cnn | digits-mlp | least-squares")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--micro-batches", type=int, default=4, help="accumulation micro-batches per step (>= 2)")
    p.add_argument("--optimizer", default="fastsgd-nesterov", help="optimizer spec (fastsgd.study.optimizer_factory)")
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
    p.add_argument("--out", default="bench/results/noise_scale.json")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    if args.micro_batches < 2:
        p.error("--micro-batches must be >= 2: the noise scale compares micro-batch and batch gradients")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
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
            pn = result["prediction_b_noise"]
            print(f"from B_noise (Hessian-aware, {result['hessian_noise']['hvp_steps']} steps with HVPs): predicted "
                  f"B_crit {pn['B_crit']:.4g}; run mean B_noise {result['hessian_noise']['b_noise']:.4g} against "
                  f"B_simple {result['hessian_noise']['b_simple_same_steps']:.4g} on the same steps")
    if result["comparison"]:
        c = result["comparison"]
        if c["ratio"] is not None:
            print(f"measured B_crit (study fit) {c['measured_B_crit']:.4g}: predicted/measured = {c['ratio']:.3g}")
        print(format_table(c["per_batch_size"], ["batch_size", "measured_steps", "predicted_steps"]))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
