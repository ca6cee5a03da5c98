"""bench/optimizer_step.py's microbenchmarks as pytest-benchmark cases, to
save results and compare them across commits (outside CI's tests/ run):

    pytest bench/test_bench_optimizer.py --benchmark-autosave
    pytest bench/test_bench_optimizer.py --benchmark-compare
    FASTSGD_BENCH_QUICK=1 pytest bench/test_bench_optimizer.py      # tiny layouts: a smoke run

Each case times ``opt.step()`` for one (layout, optimizer, provider); the
bytes a step must move are stored in ``extra_info`` so GB/s can be derived.
Unavailable providers are skipped with their reason.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import layouts  # noqa: E402
import optimizer_step as bench  # noqa: E402

QUICK = os.environ.get("FASTSGD_BENCH_QUICK") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() and os.environ.get("FASTSGD_BENCH_DEVICE") == "cuda"
                      else "cpu")
DTYPE = torch.float32

CASES = [(layout, kind, prov.name)
         for layout in layouts.LAYOUTS
         for kind in bench.OPTIMIZERS
         for prov in bench.providers_for(kind, DEVICE, DTYPE)
         if prov.name != "fastsgd-reference" or layout != "bert_base"]  # fp64 oracle: minutes per BERT step


@pytest.mark.parametrize("layout,kind,provider", CASES, ids=["-".join(c) for c in CASES])
def test_optimizer_step(benchmark, layout, kind, provider):
    prov = next(p for p in bench.providers_for(kind, DEVICE, DTYPE) if p.name == provider)
    if prov.make is None:
        pytest.skip(prov.skip_reason)
    shapes = layouts.LAYOUTS[layout](layouts.QUICK_DIV[layout] if QUICK else 1)
    params = bench.make_params(shapes, DEVICE, DTYPE)
    opt = prov.make(params)
    opt.step()  # creates the state: not part of a timed step

    def step():
        opt.step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    n = layouts.numel(shapes)
    elem = torch.empty((), dtype=DTYPE).element_size()
    benchmark.extra_info.update(device=str(DEVICE), tensors=len(shapes), params=n,
                                min_bytes=bench.MIN_STREAMS[kind] * n * elem, version=prov.version, note=prov.note)
    benchmark.pedantic(step, rounds=3 if QUICK else 20, warmup_rounds=1)
