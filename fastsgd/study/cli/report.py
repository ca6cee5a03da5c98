"""The batch-size report: which batch size, and is more hardware worth it?

    fastsgd report --study DIR --throughput DIR [--noise FILE] [--allreduce FILE] --out DIR

--study       a steps-to-result study (directory with study_summary.json, or the file)
--throughput  a throughput sweep (directory with throughput.json, or the file), same workload
--noise       `fastsgd noise`'s JSON: the noise-scale prediction of B_crit
--allreduce   bench/allreduce.py's JSON: bandwidth, latency and overlap for the what-if table
              (or give --bandwidth-gbps / --latency-us / --overlap)

Writes report.md, the PNGs it shows and report.json into --out and prints the headline
numbers.
"""
from __future__ import annotations

import argparse
import json
import sys

from fastsgd.study.combine.report import build_report, write_report
from fastsgd.study.combine.time_to_result import load_study, load_throughput
from fastsgd.study.combine.whatif import load_comm_model

HELP = "combine a study, a throughput sweep and a noise-scale prediction into one report"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study", required=True)
    p.add_argument("--throughput", required=True)
    p.add_argument("--noise", default=None)
    p.add_argument("--allreduce", default=None)
    p.add_argument("--grad-bytes", type=float, default=None,
                   help="gradient bytes per all-reduce (default: parameters x 4 from the throughput sweep)")
    p.add_argument("--bandwidth-gbps", type=float, default=None, help="per-link bandwidth, GB/s")
    p.add_argument("--latency-us", type=float, default=None, help="latency per ring step, microseconds")
    p.add_argument("--overlap", type=float, default=None, help="fraction of communication hidden behind backward")
    p.add_argument("--max-devices", type=int, default=4096)
    p.add_argument("--extrapolate", action="store_true",
                   help="let the what-if table use batch sizes outside the measured ranges (rows are marked)")
    p.add_argument("--title", default="Batch size report")
    p.add_argument("--note", action="append", default=[], help="a provenance line for the report (repeatable)")
    p.add_argument("--out", required=True)


def run(args: argparse.Namespace, p: argparse.ArgumentParser) -> int:

    study = load_study(args.study)
    throughput = load_throughput(args.throughput)
    noise = None
    if args.noise:
        with open(args.noise) as f:
            noise = json.load(f)
        if not str(noise.get("schema", "")).startswith("fastsgd.noise_scale_run/"):
            p.error(f"{args.noise} is not a `fastsgd noise` result (schema {noise.get('schema')!r})")
    grad_bytes = args.grad_bytes
    if grad_bytes is None:
        with open(throughput.meta["path"]) as f:
            params = ((json.load(f).get("meta") or {}).get("workload") or {}).get("parameters")
        grad_bytes = None if params is None else 4.0 * params
    comm = None
    if grad_bytes is not None:
        comm = load_comm_model(args.allreduce, grad_bytes,
                               bandwidth=None if args.bandwidth_gbps is None else args.bandwidth_gbps * 1e9,
                               latency=None if args.latency_us is None else args.latency_us * 1e-6,
                               overlap=args.overlap)
    report = build_report(study, throughput, noise=noise, comm=comm, max_devices=args.max_devices,
                          extrapolate=args.extrapolate)
    report.notes = list(args.note)
    paths = write_report(report, args.out, args.title)
    n = report.numbers
    for k in ("workload", "measured_b_crit", "predicted_b_crit", "ratio_predicted_measured", "b_hw", "b_star",
              "t_star_s", "best_measured_batch_size", "whatif_stops_paying_off"):
        if k in n:
            print(f"{k:>28}: {n[k]}")
    for w in report.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"wrote {paths['md']} and {paths['json']}")
    return 0
