#!/usr/bin/env python
"""Ghost batch norm, forward + backward: fastsgd against the ways it is done
today, on ResNet-like activations (ghost batch size 32 by default).

    python bench/ghost_bn.py                       # GPU when there is one, else CPU
    python bench/ghost_bn.py --quick               # tiny shapes: checks that it runs
    python bench/ghost_bn.py --device cuda --batch-sizes 256,1024 --out bench/results/ghost_bn_h100.json

Providers (one module each, all trained in train mode on the same tensor):
  bn_full        nn.BatchNorm2d over the whole batch: no ghost batches, the
                 cost floor (cuDNN on GPU, ATen's kernel on CPU)
  chunk_loop     one nn.BatchNorm2d call per ghost batch, outputs
                 concatenated (TabNet, Composer style)
  strided        one batch norm over x.view(N/S, C*S, H, W) with S = N/g
                 splits (cifar10-fast style): fast, but its ghost batches
                 are strided (samples s, s+S, s+2S, ...), not contiguous
  fastsgd        fastsgd.nn.GhostBatchNorm2d (Triton kernels on GPU, the
                 vectorised torch path on CPU)
  fastsgd_torch  (GPU only) the vectorised torch path on the GPU, to show
                 what the kernels add

Each provider is timed as one call of: forward, backward with a fixed
upstream gradient, synchronised; providers take turns in interleaved rounds
and the table shows the median and 20/80 % quantiles (fastsgd.measure). ``x_bn`` is the time over
bn_full's, ``chunk_speedup`` the
chunk loop's time over this one. Targets (issue 4): GPU fastsgd <= 1.25x
bn_full and >= 4x faster than chunk_loop at N=1024; CPU fastsgd <= 1.5x
bn_full.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from fastsgd import measure
from fastsgd.nn import GhostBatchNorm2d
from fastsgd.study.tables import format_table

# (C, H=W) of the four ResNet-50 stages' batch norms.
STAGES = [(64, 56), (128, 28), (256, 14), (512, 7)]
QUICK_STAGES = [(16, 16), (32, 8)]


class ChunkLoopBN(nn.BatchNorm2d):
    """Ghost batch norm as a loop of ordinary batch norm calls (running stats
    get one momentum update per chunk, as in those libraries)."""

    def __init__(self, num_features: int, ghost_batch_size: int):
        super().__init__(num_features)
        self.ghost_batch_size = ghost_batch_size

    def forward(self, x):
        return torch.cat([super(ChunkLoopBN, self).forward(c) for c in x.split(self.ghost_batch_size)])


class StridedBN(nn.BatchNorm2d):
    """Ghost batch norm by reshaping S = N/g splits into channels; needs g | N."""

    def __init__(self, num_features: int, ghost_batch_size: int):
        super().__init__(num_features)
        self.ghost_batch_size = ghost_batch_size

    def forward(self, x):
        n, c, h, w = x.shape
        s = n // self.ghost_batch_size
        y = F.batch_norm(x.reshape(n // s, c * s, h, w), self.running_mean.repeat(s), self.running_var.repeat(s),
                         self.weight.repeat(s), self.bias.repeat(s), True, self.momentum, self.eps)
        return y.view(n, c, h, w)


def providers(device: torch.device) -> Dict[str, Callable[[int, int], nn.Module]]:
    def ghost(backend: str):
        def make(c, g):
            m = GhostBatchNorm2d(c, g)
            m.backend = backend
            return m
        return make
    out = {
        "bn_full": lambda c, g: nn.BatchNorm2d(c),
        "chunk_loop": ChunkLoopBN,
        "strided": StridedBN,
        "fastsgd": ghost("auto"),
    }
    if device.type == "cuda":
        out["fastsgd_torch"] = ghost("torch")
    return out


def bench_shape(n: int, c: int, hw: int, fmt: str, g: int, dtype: torch.dtype, device: torch.device,
                reps: int, warmup: int) -> List[dict]:
    memory_format = torch.channels_last if fmt == "cl" else torch.contiguous_format
    x = torch.randn(n, c, hw, hw, device=device, dtype=dtype).to(memory_format=memory_format).requires_grad_()
    dy = torch.randn_like(x)
    steps = {}
    for name, make in providers(device).items():
        if name == "strided" and n % g:
            continue
        module = make(c, g).to(device)
        if dtype != torch.float32 and device.type == "cpu":
            module = module.to(dtype)  # CPU batch norm wants matching dtypes

        def step(module=module):
            x.grad = None
            module(x).backward(dy)
        steps[name] = step
    # Interleaved rounds: slow drifts of a shared machine hit every provider alike.
    for step in steps.values():
        for _ in range(warmup):
            step()
    samples: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            measure.synchronize(device)
            t0 = time.perf_counter()
            step()
            measure.synchronize(device)
            samples[name].append(time.perf_counter() - t0)
    rows = []
    for name, ts in samples.items():
        t = measure.quantiles(ts)
        rows.append(dict(N=n, C=c, HW=hw, format=fmt, dtype=str(dtype).replace("torch.", ""), ghost=g,
                         provider=name, ms=t["median"] * 1e3, q20_ms=t["q20"] * 1e3, q80_ms=t["q80"] * 1e3))
    base = next(r["ms"] for r in rows if r["provider"] == "bn_full")
    chunk = next(r["ms"] for r in rows if r["provider"] == "chunk_loop")
    for r in rows:
        r["x_bn"] = r["ms"] / base
        r["chunk_speedup"] = chunk / r["ms"]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-sizes", default=None, help="comma-separated N (default: 256,1024 on GPU, 256 on CPU)")
    p.add_argument("--formats", default="nchw,cl", help="nchw and/or cl (channels_last)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--ghost", type=int, default=32, help="ghost batch size")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (on a shared CPU, 1 keeps OpenMP barriers from amplifying the noise)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions")
    p.add_argument("--out", default=None, help="write rows (.json or .csv) with the environment")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.batch_sizes:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    else:
        batch_sizes = [64] if args.quick else ([256, 1024] if device.type == "cuda" else [256])
    stages = QUICK_STAGES if args.quick else STAGES
    reps = args.reps or (3 if args.quick else (30 if device.type == "cuda" else 5))
    warmup = 1 if args.quick else 3

    rows: List[dict] = []
    for n in batch_sizes:
        for c, hw in stages:
            for fmt in args.formats.split(","):
                rows += bench_shape(n, c, hw, fmt, args.ghost, dtype, device, reps, warmup)
                print(f"  done N={n} C={c} {hw}x{hw} {fmt}", file=sys.stderr, flush=True)

    env = measure.environment(device)
    print(f"ghost batch norm forward+backward, ghost={args.ghost}, {args.dtype}, {env['device']}, "
          f"torch {env['torch']}, {env['threads']} threads")
    print(format_table(rows, ["N", "C", "HW", "format", "provider", "ms", "q20_ms", "q80_ms", "x_bn",
                                      "chunk_speedup"]))
    target = 1.25 if device.type == "cuda" else 1.5
    ours = [r for r in rows if r["provider"] == "fastsgd"]
    met = sum(r["x_bn"] <= target for r in ours)
    print(f"\nfastsgd within {target}x of bn_full on {met}/{len(ours)} shapes; "
          f"median chunk_speedup {sorted(r['chunk_speedup'] for r in ours)[len(ours) // 2]:.2f}x")
    if args.out:
        measure.write_rows(args.out, rows, meta=env)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
