"""Which batch size should this workload train at on this machine? One command, one answer.

    fastsgd advise --workload mypackage.workloads:make_workload
    fastsgd advise --workload mnist1d-mlp --study-trials 16 --out out/advise-mnist1d

Runs, in order, printing progress throughout:
  1. a throughput sweep: time per step against batch size, the fit t(B) = t0 + B/X and the
     hardware knee B_hw = t0*X (what this machine can do);
  2. with --study-trials N > 0, a small steps-to-result study (N trials per batch size), which
     measures B_crit and tunes the learning rate per batch size;
  3. a gradient-noise-scale run at one batch size, which predicts B_crit (McCandlish et al. 2018);
     it uses the study's tuned lr and momentum at that batch size when there is a study;
  4. the combination: steps S(B) (the study's fit, else the prediction) times step time t(B),
     minimised over the measured batch-size range: the recommended batch size and its expected
     time to result, with the caveats that apply.
Writes advise.json and advise.md under --out (and the full report when a study ran), and ends
with one line a person can act on.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional

from fastsgd.study.cli import args as cli_args
from fastsgd.study.steps.allocator import keep_freed_memory

HELP = "recommend a batch size for a workload on this machine (throughput, noise scale, optional study)"
SCHEMA = "fastsgd.advise/1"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", required=True, help=cli_args.WORKLOAD_HELP)
    p.add_argument("--optimizer", default="nesterov", choices=("sgd", "momentum", "nesterov"),
                   help="the fastsgd optimizer to advise for (default: nesterov)")
    p.add_argument("--backend", default="auto", help="fastsgd kernel backend (default: auto)")
    p.add_argument("--device", type=cli_args.device, default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--batch-sizes", type=cli_args.batch_sizes, metavar="LO..HI|LIST",
                   help="batch sizes to time and to recommend from (default: 8..1024 on cpu, 8..8192 on cuda)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="seconds of timing per batch size (default: cpu 3, cuda 1)")
    p.add_argument("--noise-batch-size", type=cli_args.positive_int, default=None,
                   help="batch size of the noise-scale run (default: a power of two near B_hw, 32..256)")
    p.add_argument("--micro-batches", type=cli_args.positive_int, default=4,
                   help="accumulation micro-batches per step in the noise-scale run (>= 2; default 4)")
    p.add_argument("--lr", type=float, default=None,
                   help="lr of the noise-scale run without a study (default 0.1); with a study, its tuned lr")
    p.add_argument("--momentum", type=float, default=None, help="momentum of the noise-scale run (default 0.9)")
    p.add_argument("--goal", type=float, default=None, help="goal on the workload's goal metric (default: its own)")
    p.add_argument("--max-steps", type=cli_args.positive_int, default=20000,
                   help="step cap of the noise-scale run (default 20000)")
    p.add_argument("--study-trials", type=int, default=0, metavar="N",
                   help="also run a steps-to-result study with N trials per batch size (default 0: none)")
    p.add_argument("--study-batch-sizes", type=cli_args.batch_sizes, default=None, metavar="LO..HI|LIST",
                   help="batch sizes of the study (default: the timed ones)")
    p.add_argument("--storage", default=None, help="study storage URL (default: OUT/steps/study.db)")
    p.add_argument("--threads", type=cli_args.positive_int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: out/advise-<workload>)")
    p.add_argument("--quiet", action="store_true", help="no progress; the summary only")


# ----------------------------------------------------------------------------------------------- the stages

def _say(args, text: str) -> None:
    if not args.quiet:
        print(text, flush=True)


def check_workload(workload) -> None:
    """Refuse, before anything runs, a workload the advice cannot be computed for."""
    missing = []
    if workload.evaluate is None:
        missing.append("evaluate (a function (model, device) -> {metric: value} on held-out data)")
    if workload.goal is None:
        missing.append("goal (the value of goal_metric that counts as the result; or give --goal)")
    if missing:
        raise ValueError(f"workload {workload.name!r} cannot be advised on: it has no " + "; no ".join(missing))


def measure_throughput(args, workload, sizes: List[int], out_dir: str):
    from fastsgd.study.cli.throughput import SweepProgress
    from fastsgd.study.hardware.step_time import measure_step_times, write_results

    defaults = {"cpu": (1, 2, 3.0), "cuda": (5, 5, 1.0)}.get(args.device.type, (1, 2, 3.0))
    warmup, steps, budget = defaults
    if args.time_budget is not None:
        budget = args.time_budget
    bar = SweepProgress(sizes, enabled=not args.quiet)
    try:
        sweep = measure_step_times(workload, sizes, optimizer=f"fastsgd-{args.optimizer}:{args.backend}",
                                   device=args.device, warmup=warmup, steps=steps, time_budget_s=budget,
                                   seed=args.seed, progress=bar)
    finally:
        bar.close()
    write_results(sweep, out_dir)
    return sweep


def noise_batch_size(args, b_hw: Optional[float]) -> int:
    """The noise run's batch size: the user's, else the power of two nearest B_hw within 32..256
    (small enough to reach the goal in a few hundred steps, large enough for several micro-batches)."""
    if args.noise_batch_size:
        return args.noise_batch_size
    target = b_hw if b_hw and math.isfinite(b_hw) and b_hw > 0 else 64.0
    b = 2 ** round(math.log2(min(max(target, 32.0), 256.0)))
    return max(b, args.micro_batches * 2)


def run_noise(args, workload, batch_size: int, summary: Optional[dict]) -> Dict[str, Any]:
    from fastsgd.study.combine.noise_prediction import measure_noise_run

    hp = {}
    if summary is not None:
        rows = {int(r["batch_size"]): r for r in summary.get("per_batch_size", []) if r.get("best_hparams")}
        if rows:  # the study's tuned setting at (or nearest to) the noise batch size
            nearest = min(rows, key=lambda b: abs(math.log2(b) - math.log2(batch_size)))
            hp = dict(rows[nearest]["best_hparams"])
            hp["from_batch_size"] = nearest
    lr = args.lr if args.lr is not None else hp.get("lr", 0.1)
    momentum = args.momentum if args.momentum is not None else hp.get("momentum", 0.9)
    source = "--lr" if args.lr is not None else (
        f"the study's best at B={hp['from_batch_size']}" if hp else "default (no study)")
    result = measure_noise_run(workload, optimizer=f"fastsgd-{args.optimizer}:{args.backend}", lr=lr,
                               momentum=momentum, batch_size=batch_size, micro_batches=args.micro_batches,
                               window=25, decay=0.95, noise_mode="each", eval_resolution=0.02,
                               max_steps=args.max_steps, seed=args.seed, device=str(args.device),
                               study_summary=summary, progress=not args.quiet)
    result["lr_source"] = source
    return result


def run_study(args, spec: str, sizes: List[int], out_dir: str) -> Dict[str, Any]:
    from fastsgd.study.steps.runner import StudyConfig
    from fastsgd.study.steps.runner import run_study as run

    keep_freed_memory()  # after the step times are measured: they reflect the allocator users train with
    config = StudyConfig(out=out_dir, workload=spec, optimizer=args.optimizer, batch_sizes=sizes,
                         trials=args.study_trials, goal=args.goal, seed=args.seed, storage=args.storage,
                         backend=args.backend)
    return run(config, progress=not args.quiet, log=(lambda s: None) if args.quiet else print)


# ----------------------------------------------------------------------------------------------- the answer

def recommend(sweep, steps_curve, step_time) -> Dict[str, Any]:
    """Time to result T(B) = S(B) t(B) at each timed batch size, with t(B) the measured median step
    time (not the fit, so the choice among measured sizes does not depend on the fit's shape); the
    recommendation is the timed batch size with the smallest T. B* = sqrt(B_crit B_hw), the optimum of
    the fitted curves, is reported beside it and flagged when it lies outside the timed range."""
    from fastsgd.study.combine.time_to_result import optimal_batch_size

    rows = []
    for r in sweep.records:
        b = r["batch_size"]
        s, t = float(steps_curve.steps(b)), float(r["step_time_s"])
        rows.append({"batch_size": b, "steps": s, "step_time_s": t, "time_to_result_s": s * t})
    best = min(rows, key=lambda r: r["time_to_result_s"])
    sizes = [r["batch_size"] for r in rows]
    b_star = optimal_batch_size(steps_curve, step_time) if step_time is not None else math.nan
    return {"rows": rows, "recommended": best, "b_star_unclipped": b_star,
            "b_star_outside_range": math.isfinite(b_star) and not (sizes[0] <= b_star <= sizes[-1])}


def caveats(sweep, noise: Dict[str, Any], summary: Optional[dict], rec: Dict[str, Any]) -> List[str]:
    out = []
    fit = sweep.fit
    if not fit.ok:
        out.append(f"the step-time fit t(B) = t0 + B/X was not determined ({fit.message}): no B_hw")
    elif fit.r2 is not None and fit.r2 < 0.95:
        out.append(f"the step-time fit is poor (weighted R^2 {fit.r2:.2f}): t(B) between measured points is rough")
    if fit.ok and fit.message:
        out.append(f"step-time fit: {fit.message}")
    if sweep.stopped:
        out.append(f"the throughput sweep stopped early: {sweep.stopped['reason']}")
    if summary is None:
        out.append(f"B_crit is predicted from the noise scale at lr {noise['lr']:.3g} ({noise['lr_source']}), not "
                   "measured; the prediction depends on that lr. Run with --study-trials N to measure it")
    else:
        for w in summary.get("warnings", []):
            out.append(f"study: {w}")
    if rec["b_star_outside_range"]:
        out.append(f"the unconstrained optimum B* = {rec['b_star_unclipped']:.3g} lies outside the timed batch "
                   "sizes; widen --batch-sizes to look there")
    return out


def write_outputs(out_dir: str, doc: Dict[str, Any]) -> Dict[str, str]:
    from fastsgd.measure import strict_json
    from fastsgd.study.tables import format_table

    os.makedirs(out_dir, exist_ok=True)
    js = os.path.join(out_dir, "advise.json")
    with open(js + ".tmp", "w") as f:
        json.dump(strict_json(doc), f, indent=2, allow_nan=False)
    os.replace(js + ".tmp", js)
    rows = [{"batch": r["batch_size"], "steps": f"{r['steps']:.0f}", "step ms": f"{r['step_time_s'] * 1e3:.3g}",
             "time to result s": f"{r['time_to_result_s']:.3g}"} for r in doc["time_to_result"]]
    md = os.path.join(out_dir, "advise.md")
    numbers = [{"quantity": k, "value": v} for k, v in doc["numbers"].items()]
    with open(md, "w") as f:
        f.write(f"# Batch size advice: {doc['workload']}\n\n{doc['summary']}\n\n")
        f.write(format_table(numbers, ["quantity", "value"], markdown=True) + "\n\n")
        f.write("Steps from the S(B) curve named above, step time measured:\n\n")
        f.write(format_table(rows, ["batch", "steps", "step ms", "time to result s"], markdown=True) + "\n")
        if doc["caveats"]:
            f.write("\nCaveats:\n\n" + "".join(f"- {c}\n" for c in doc["caveats"]))
    return {"json": js, "md": md}


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from fastsgd.measure import environment
    from fastsgd.study.combine.time_to_result import StepsCurve, StepTimeCurve
    from fastsgd.study.tables import format_table
    from fastsgd.study.workloads import get_workload

    cli_args.set_threads(args.threads)
    if args.micro_batches < 2:
        parser.error("--micro-batches must be >= 2: the noise scale compares micro-batch and batch gradients")
    if args.study_trials < 0:
        parser.error(f"--study-trials must be >= 0, got {args.study_trials}")
    try:
        workload = get_workload(args.workload, **({} if args.goal is None else {"goal": args.goal}))
        check_workload(workload)
    except ValueError as exc:
        parser.error(str(exc))
    sizes = args.batch_sizes or cli_args.batch_sizes("8..8192" if args.device.type == "cuda" else "8..1024")
    out_dir = args.out or os.path.join("out", f"advise-{cli_args.safe_name(args.workload)}")
    started = time.perf_counter()
    goal_text = f"{workload.goal_metric} {'>' if workload.higher_is_better else '<'} {workload.goal:g}"
    _say(args, f"fastsgd advise: {workload.name} on {args.device}, goal {goal_text}, optimizer {args.optimizer}\n"
               f"  output {out_dir}/")

    _say(args, f"\n[1/{3 if args.study_trials else 2}] time per step against batch size")
    sweep = measure_throughput(args, workload, sizes, os.path.join(out_dir, "throughput"))
    fit = sweep.fit
    timed = [r["batch_size"] for r in sweep.records]
    if not timed:
        print("error: no batch size could be timed" + (f" ({sweep.stopped['reason']})" if sweep.stopped else ""),
              file=sys.stderr)
        return 1
    step_time = StepTimeCurve(fit.t0_s, fit.throughput) if fit.ok else None
    b_hw = step_time.b_hw if step_time else None
    _say(args, f"  t(B) = {fit.t0_s * 1e3:.3g} ms + B / {fit.throughput:,.4g} per s: B_hw = {b_hw:.3g}" if fit.ok
         else f"  t(B) fit not determined ({fit.message}); using the measured step times")

    summary = None
    if args.study_trials:
        _say(args, f"\n[2/3] steps to result, {args.study_trials} trials per batch size")
        summary = run_study(args, args.workload, args.study_batch_sizes or timed, os.path.join(out_dir, "steps"))

    b_noise = noise_batch_size(args, b_hw)
    _say(args, f"\n[{3 if args.study_trials else 2}/{3 if args.study_trials else 2}] gradient noise scale at "
               f"batch size {b_noise}")
    try:
        noise = run_noise(args, workload, b_noise, summary)
    except ValueError as exc:
        print(f"error: noise-scale run: {exc}", file=sys.stderr)
        return 1
    with open(os.path.join(out_dir, "noise_scale.json"), "w") as f:
        json.dump(noise, f, indent=2, default=str)
    pred = noise["prediction"]
    if pred is None and summary is None:
        print(f"error: the noise-scale run did not reach the goal ({goal_text}) in {args.max_steps} steps at lr "
              f"{noise['lr']:.3g}; give --lr, --max-steps or an easier --goal", file=sys.stderr)
        return 1

    fitted = (summary or {}).get("fit")
    if fitted:
        steps_curve, source = StepsCurve(fitted["S_min"], fitted["E_min"]), "measured (study fit)"
    else:
        steps_curve, source = StepsCurve(pred["S_min"], pred["E_min"]), "predicted (noise scale)"
    rec = recommend(sweep, steps_curve, step_time)
    best = rec["recommended"]
    numbers = {"B_hw (hardware knee)": "n/a" if b_hw is None else f"{b_hw:.3g}",
               "B_crit predicted (noise scale)": "n/a" if pred is None else f"{pred['B_crit']:.3g}",
               "B_crit measured (study)": "n/a" if not fitted else f"{fitted['B_crit']:.3g}",
               "steps curve used": source,
               "recommended batch size": str(best["batch_size"]),
               "expected steps to result": f"{best['steps']:.0f}",
               "expected training time to result": f"{best['time_to_result_s']:.3g} s",
               "noise run": f"B={b_noise}, lr {noise['lr']:.3g} ({noise['lr_source']}), "
                            f"{noise['steps'] or 'no'} steps to the goal"}
    hw_text = "n/a" if b_hw is None else f"{b_hw:.3g}"
    summary_line = (f"Train {workload.name} at batch size {best['batch_size']}: about {best['steps']:.0f} steps and "
                    f"{best['time_to_result_s']:.3g} s of training to {goal_text} on {sweep.environment['device']} "
                    f"(B_hw {hw_text}, B_crit {steps_curve.b_crit:.3g} {source.split(' ')[0]}).")
    doc = {"schema": SCHEMA, "workload": workload.name, "goal": {"metric": workload.goal_metric,
                                                                 "value": workload.goal,
                                                                 "higher_is_better": workload.higher_is_better},
           "optimizer": args.optimizer, "summary": summary_line, "numbers": numbers,
           "step_time_fit": fit.as_dict(), "steps_curve": {"S_min": steps_curve.s_min, "E_min": steps_curve.e_min,
                                                           "B_crit": steps_curve.b_crit, "source": source},
           "noise_prediction": pred, "study_fit": fitted, "time_to_result": rec["rows"],
           "b_star_unclipped": rec["b_star_unclipped"], "caveats": caveats(sweep, noise, summary, rec),
           "environment": environment(args.device), "wall_seconds": time.perf_counter() - started}
    paths = write_outputs(out_dir, doc)

    _say(args, "\n" + format_table([{"quantity": k, "value": v} for k, v in numbers.items()], ["quantity", "value"]))
    for c in doc["caveats"]:
        _say(args, f"caveat: {c}")
    _say(args, f"wrote {paths['md']} and {paths['json']} ({doc['wall_seconds']:.0f} s)")
    print(summary_line)
    return 0
