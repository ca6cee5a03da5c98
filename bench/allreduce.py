#!/usr/bin/env python
"""Data-parallel step time: torch DDP against fastsgd's BucketedDataParallel.

    python bench/allreduce.py                 # world size 2, gloo on CPU (NCCL when >= 2 GPUs)
    python bench/allreduce.py --quick --out bench/results/allreduce.json

Spawns ``--world-size`` processes. For a ResNet-like and a Transformer-like
model it times a full training step (forward, backward, optimizer step,
zero_grad) with each provider:

  ddp+torch_sgd_fused  torch DDP + torch.optim.SGD(momentum, fused=True)
  ddp+fastsgd          torch DDP + fastsgd.Momentum
  bdp                  BucketedDataParallel, fastsgd.Momentum stepped after backward
  bdp+fused_step       BucketedDataParallel(optimizer=...), stepped per bucket while the last
                       buckets are reduced
  bdp+fused_step_eager the same with eager_step=True: stepped from the gradient hooks, during backward

Providers are timed in interleaved rounds (so slow drifts of a shared machine
hit all of them alike); the table shows rank 0's median step time with the
20-80 % range, and ``vs_ddp``, the median over rounds of the ratio of the
provider's to ddp+torch_sgd_fused's median step time in the same round.

Hidden communication: ``compute_s`` is the same step with no communication
(every rank trains its own unwrapped copy at the same time, so CPU contention
is alike) and ``comm_s`` the all-reduce of the gradient buckets alone
(``--bucket-cap-mb``, default DDP's 25 MiB, first bucket 1 MiB). On a shared
machine ``step_s - compute_s`` also contains the time ranks wait for each
other, so the hidden fraction is a lower bound. The exposed communication is
``step_s - compute_s``; ``hidden_comm = 1 - exposed / comm_s``, clipped to
[0, 1].

All-reduce sweep: median time of one all-reduce of float32 tensors from 4 B
to 64 MiB (16 MiB with --quick), small ones timed 20 back to back. ``allreduce_latency_s`` is the time of the
smallest message; ``allreduce_bandwidth_GBps`` is the message bytes over
(time - latency) of the largest one, in 1e9 bytes/s ("algorithm bandwidth",
not NCCL's bus bandwidth), so t(n) ~ latency + n / bandwidth.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from typing import Callable, Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import fastsgd
from fastsgd import measure
from fastsgd.distributed import BucketedDataParallel
from fastsgd.distributed.buckets import assign_buckets
from fastsgd.study.tables import format_table

PROVIDERS = ("ddp+torch_sgd_fused", "ddp+fastsgd", "bdp", "bdp+fused_step", "bdp+fused_step_eager")
BASELINE = "ddp+torch_sgd_fused"
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 1e-4


# ---- models (small enough for 2 CPU cores) ------------------------------------------
class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + self.skip(x))


def resnet_like(width: int) -> nn.Module:
    w = width
    return nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                         Block(w, w, 1), Block(w, 2 * w, 2), Block(2 * w, 4 * w, 2), Block(4 * w, 8 * w, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8 * w, 10))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, seq: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(seq, d))
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens):
        return self.head(self.body(self.emb(tokens) + self.pos))


def workloads(quick: bool) -> Dict[str, Callable]:
    """name -> (model, inputs, targets, loss) factory for one rank's batch."""
    def resnet(device):
        torch.manual_seed(0)
        model = resnet_like(16 if quick else 32).to(device)
        x = torch.randn(8, 3, 32, 32, device=device)
        y = torch.randint(0, 10, (8,), device=device)
        return model, x, y, F.cross_entropy

    def transformer(device):
        torch.manual_seed(0)
        vocab, seq = (2048, 32) if quick else (4096, 32)
        model = TinyLM(vocab, 128 if quick else 256, 2, seq).to(device)
        x = torch.randint(0, vocab, (4, seq), device=device)
        y = torch.randint(0, vocab, (4, seq), device=device)
        return model, x, y, lambda out, t: F.cross_entropy(out.flatten(0, 1), t.flatten())

    return {"resnet": resnet, "transformer": transformer}


# ---- providers -------------------------------------------------------------------------
def make_step(provider: str, make, device, cap_mb: float) -> Callable[[], None]:
    """One training step of ``provider`` as a closure."""
    model, x, y, loss_fn = make(device)
    fast = provider not in (BASELINE, "compute_torch")
    opt = (fastsgd.Momentum(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY) if fast
           else torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                                fused=True))
    if provider.startswith("ddp"):
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                                  gradient_as_bucket_view=True, bucket_cap_mb=cap_mb)
    elif provider == "bdp":
        net = BucketedDataParallel(model, bucket_cap_mb=cap_mb)
    elif provider.startswith("bdp+fused_step"):
        net = BucketedDataParallel(model, optimizer=opt, eager_step=provider.endswith("eager"),
                                   bucket_cap_mb=cap_mb)
    else:  # compute only: no wrapper, no communication
        net = model

    def step():
        loss_fn(net(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def make_comm(make, device, group, cap_mb: float) -> Callable[[], None]:
    """All-reduce of the model's gradients alone, in buckets of the providers' sizes."""
    model = make(device)[0]
    params = [p for p in model.parameters() if p.requires_grad]
    buckets = assign_buckets(params, list(reversed(range(len(params)))), 2**20, int(cap_mb * 2**20))
    flats = [torch.zeros(sum(params[i].numel() for i in b), device=device) for b in buckets]

    def comm():
        for w in [dist.all_reduce(f, group=group, async_op=True) for f in flats]:
            w.wait()
    return comm


def timed(fn: Callable[[], None], reps: int, device) -> List[float]:
    """``reps`` timings of ``fn``, each after a barrier so the ranks start together."""
    out = []
    for _ in range(reps):
        dist.barrier()
        measure.synchronize(device)
        t0 = time.perf_counter()
        fn()
        measure.synchronize(device)
        out.append(time.perf_counter() - t0)
    return out


def bench_model(name, make, device, args) -> List[dict]:
    cap = args.bucket_cap_mb
    fns = {p: make_step(p, make, device, cap) for p in PROVIDERS}
    fns["compute_only:torch"] = make_step("compute_torch", make, device, cap)
    fns["compute_only:fastsgd"] = make_step("compute_fastsgd", make, device, cap)
    fns["comm_only"] = make_comm(make, device, dist.group.WORLD, cap)
    for fn in fns.values():  # warm-up (also lets BucketedDataParallel rebuild its buckets)
        timed(fn, args.warmup, device)
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    ratios: Dict[str, List[float]] = {p: [] for p in PROVIDERS}
    for _ in range(args.rounds):
        medians = {}
        for k, fn in fns.items():
            ts = timed(fn, args.reps, device)
            samples[k] += ts
            medians[k] = measure.quantiles(ts)["median"]
        for p in PROVIDERS:  # paired within a round: robust to the machine's slow drifts
            ratios[p].append(medians[p] / medians[BASELINE])
    q = {k: measure.quantiles(v) for k, v in samples.items()}
    model = make(device)[0]
    nparams = sum(p.numel() for p in model.parameters())
    comm = q["comm_only"]["median"]
    rows = []
    for p in PROVIDERS:
        compute = q["compute_only:torch" if p == BASELINE else "compute_only:fastsgd"]["median"]
        step = q[p]["median"]
        rows.append({"model": name, "provider": p, "step_s": step, "q20_s": q[p]["q20"], "q80_s": q[p]["q80"],
                     "vs_ddp": measure.quantiles(ratios[p])["median"], "compute_s": compute, "comm_s": comm,
                     "hidden_comm": min(1.0, max(0.0, 1.0 - (step - compute) / comm)) if comm > 0 else None,
                     "params": nparams, "grad_MiB": nparams * 4 / 2**20, "n": q[p]["n"]})
    return rows


def allreduce_sweep(device, quick: bool, reps: int) -> List[dict]:
    top = 24 if quick else 26
    rows = []
    for k in [2] + list(range(10, top + 1, 2)):
        t = torch.ones(max(1, 2**k // 4), device=device)
        # Small messages back to back, so the barrier's skew between ranks is amortised.
        count = max(1, min(20, 2**20 // 2**k))

        def run():
            for _ in range(count):
                dist.all_reduce(t)
        timed(run, 1, device)
        rows.append({"bytes": t.numel() * 4,
                     "time_s": measure.quantiles(timed(run, reps, device))["median"] / count})
    return rows


# ---- processes ---------------------------------------------------------------------------
def worker(rank: int, world: int, init_file: str, args, out_file: str) -> None:
    use_cuda = torch.cuda.device_count() >= world
    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if use_cuda else "gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    rows = []
    for name, make in workloads(args.quick).items():
        if args.models and name not in args.models:
            continue
        rows += bench_model(name, make, device, args)
        if rank == 0:
            print(f"  {name} done", flush=True)
    sweep = allreduce_sweep(device, args.quick, args.reps)
    if rank == 0:
        latency = sweep[0]["time_s"]
        big = sweep[-1]
        meta = {**measure.environment(device), "world_size": world, "backend": dist.get_backend(),
                "fastsgd_cpu_backend": fastsgd.available_backends().get("cpu") is None,
                "allreduce_latency_s": latency,
                "allreduce_bandwidth_GBps": big["bytes"] / max(big["time_s"] - latency, 1e-12) / 1e9,
                "allreduce_sweep": sweep, "quick": args.quick, "bucket_cap_mb": args.bucket_cap_mb}
        with open(out_file, "w") as f:
            json.dump({"rows": rows, "meta": meta}, f, default=str)
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="smaller models, fewer repetitions (~1 minute on 2 cores)")
    ap.add_argument("--models", nargs="*", choices=["resnet", "transformer"], default=None)
    ap.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 5, quick 3)")
    ap.add_argument("--reps", type=int, default=None, help="timed steps per provider per round (default 5, quick 3)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--bucket-cap-mb", type=float, default=25.0, help="bucket size of every provider (MiB)")
    ap.add_argument("--out", default=None, help="write rows and meta to this .json or .csv file")
    args = ap.parse_args(argv)
    if args.world_size < 2:
        ap.error(f"--world-size must be at least 2, got {args.world_size}")
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.reps = args.reps or (3 if args.quick else 5)
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "result.json")
        print(f"spawning {args.world_size} processes ...", flush=True)
        mp.start_processes(worker, args=(args.world_size, os.path.join(tmp, "init"), args, out_file),
                           nprocs=args.world_size, start_method="spawn")
        with open(out_file) as f:
            result = json.load(f)
    rows, meta = result["rows"], result["meta"]
    print(f"\n{meta['device']}, {meta['backend']}, world size {meta['world_size']}, torch {meta['torch']}, "
          f"{meta['threads']} threads/rank, fastsgd cpu backend: {meta['fastsgd_cpu_backend']}")
    print(format_table(rows, ["model", "provider", "step_s", "q20_s", "q80_s", "vs_ddp", "compute_s",
                                      "comm_s", "hidden_comm", "grad_MiB"]))
    print(f"\nall-reduce: latency {meta['allreduce_latency_s'] * 1e6:.1f} us, "
          f"bandwidth {meta['allreduce_bandwidth_GBps']:.2f} GB/s")
    print(format_table(meta["allreduce_sweep"], ["bytes", "time_s"]))
    if args.out:
        print("wrote", measure.write_rows(args.out, rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
