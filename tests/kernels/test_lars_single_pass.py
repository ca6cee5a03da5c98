"""The CPU LARS/LAMB kernels' tensor-by-tensor walk (norms, then the update of
the same tensor while it is in cache; csrc/cpu/work.h) against the float64
reference, and bit for bit against the two-sweep form (all norms, then all
updates), which FASTSGD_CPU_TWO_PASS=1 selects.

Shapes sit below, at and above the update block (kBlock), the norm segment
(kChunk) and the size past which one tensor is split over the threads, with
odd lengths; layouts are chosen so that 2 threads take both the whole-tensor
items and the shared (split, one barrier) path.
"""
import os
import sys

import pytest
import torch

# kernel_cases lives next to this file or one level up (tests/).
sys.path[:0] = [os.path.dirname(__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
import kernel_cases as kc  # noqa: E402

from fastsgd._native import native  # noqa: E402
from fastsgd.kernels import cpu  # noqa: E402

pytestmark = pytest.mark.skipif(cpu.unavailable_reason() is not None,
                                reason=f"fused CPU kernels unavailable: {cpu.unavailable_reason()}")

_C = native() if cpu.unavailable_reason() is None else None
BLOCK = _C.cpu_block if _C else 1
CHUNK = _C.cpu_chunk if _C else 1
WHOLE_MAX = _C.cpu_whole_max if _C else 1
TWO_PASS_ENV = _C.cpu_two_pass_env if _C else ""

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

# Under 2^20 elements in all: the kernels run these on one thread (whole items only).
BOUNDARY_SHAPES = [(0,), (1,), (7,), (BLOCK - 1,), (BLOCK,), (BLOCK + 1,), (3, BLOCK + 5), (CHUNK - 1,), (CHUNK,),
                   (CHUNK + 1,), (2 * CHUNK + BLOCK + 3,)]
# Over 2^21 elements: two threads. One tensor is more than a quarter of the step, so it is shared.
SHARED_LAYOUT = [(8 * CHUNK + 13,), (5,), (BLOCK + 3,), (0,)]
# Nine tensors just over one segment: whole items handed to two threads.
WHOLE_LAYOUT = [(CHUNK + 7 + 2 * i,) for i in range(9)] + [(1,), (BLOCK,)]

LARS_CASES = [
    dict(momentum=0.9, weight_decay=1e-4),
    dict(momentum=0.9, weight_decay=1e-4, nesterov=True, trust_clip=True),
    dict(momentum=0.9, weight_decay=0.0, always_adapt=True, nesterov=True),
    dict(momentum=0.0, weight_decay=5e-4, always_adapt=True, trust_clip=True),  # no momentum buffer
    dict(momentum=0.9, dampening=0.1, weight_decay=5e-4, lr_in_momentum=True),
    dict(momentum=0.9, weight_decay=0.0),  # nothing adapts: no norms at all
]
LAMB_CASES = kc.LAMB_HPARAMS


def _id(x):
    return str(x).replace("torch.", "")


def _with_threads(n, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


def _lars_run(shapes, dtype, hp, buf_dtype=None, steps=3):
    """params and momentum buffers after `steps` cpu.lars_step calls with a changing lr."""
    params = kc.make_tensors(shapes, dtype, "cpu")
    has_buf = hp.get("momentum", 0.0) != 0
    bufs = [torch.zeros_like(p, dtype=buf_dtype or dtype) for p in params] if has_buf else None
    for step in range(steps):
        grads = kc.make_tensors(shapes, dtype, "cpu", seed=1000 + step)
        cpu.lars_step(params, grads, bufs, lr=kc.LRS[step % 3], first_step=[step == 0] * len(shapes), **hp)
    return params + (bufs or [])


def _lamb_run(shapes, dtype, hp, state_dtype=None, steps=3):
    """params, exp_avgs and exp_avg_sqs after `steps` cpu.lamb_step calls."""
    params = kc.make_tensors(shapes, dtype, "cpu")
    m = [torch.zeros_like(p, dtype=state_dtype or dtype) for p in params]
    v = [torch.zeros_like(p, dtype=state_dtype or dtype) for p in params]
    counters = [torch.zeros(()) for _ in params]
    for step in range(steps):
        grads = kc.make_tensors(shapes, dtype, "cpu", seed=2000 + step)
        cpu.lamb_step(params, grads, m, v, counters, lr=kc.LRS[step % 3], **hp)
    return params + m + v


def _assert_bitwise(got, expected, what):
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert a.dtype == b.dtype and a.shape == b.shape
        if not torch.equal(a, b):
            diff = (a.double() - b.double()).abs()
            raise AssertionError(f"{what}: tensor {i} {tuple(a.shape)} {a.dtype} differs from the two-sweep form in "
                                 f"{int((diff != 0).sum())} elements (max |diff| {float(diff.max()):.3g})")


def _single_vs_two_pass(monkeypatch, run, layout, threads):
    """run() once per path; the tensor-by-tensor walk at `threads` threads and at 1 thread must both give
    the two-sweep form's bits."""
    monkeypatch.setenv(TWO_PASS_ENV, "1")
    assert _C.cpu_two_pass_forced()
    expected = _with_threads(threads, run)
    monkeypatch.delenv(TWO_PASS_ENV)
    assert not _C.cpu_two_pass_forced()
    _assert_bitwise(_with_threads(threads, run), expected, f"{layout} at {threads} threads")
    if threads > 1:
        _assert_bitwise(_with_threads(1, run), expected, f"{layout} at 1 thread")


LAYOUTS = {"boundary": (BOUNDARY_SHAPES, 1), "shared": (SHARED_LAYOUT, 2), "whole": (WHOLE_LAYOUT, 2)}


# ---- bit for bit against the two-sweep form ----------------------------------------
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("hp", LARS_CASES, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_lars_bitwise_two_pass(monkeypatch, dtype, hp, layout):
    shapes, threads = LAYOUTS[layout]
    _single_vs_two_pass(monkeypatch, lambda: _lars_run(shapes, dtype, hp), layout, threads)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("hp", LAMB_CASES, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_lamb_bitwise_two_pass(monkeypatch, dtype, hp, layout):
    shapes, threads = LAYOUTS[layout]
    _single_vs_two_pass(monkeypatch, lambda: _lamb_run(shapes, dtype, hp), layout, threads)


# Narrow state: bfloat16 momentum for float32 params (LARS); moments narrower than the math type, which
# LAMB recomputes in its update pass (float32 moments of float64 params, bfloat16 moments of float32).
@pytest.mark.parametrize("layout", ["shared", "whole"])
@pytest.mark.parametrize("param_dtype,state_dtype", [(torch.float32, torch.bfloat16), (torch.float64, torch.float32),
                                                     (torch.float16, torch.float32)], ids=_id)
def test_narrow_state_bitwise_two_pass(monkeypatch, param_dtype, state_dtype, layout):
    shapes, threads = LAYOUTS[layout]
    _single_vs_two_pass(monkeypatch, lambda: _lars_run(shapes, param_dtype, LARS_CASES[1], buf_dtype=state_dtype),
                        layout, threads)
    _single_vs_two_pass(monkeypatch, lambda: _lamb_run(shapes, param_dtype, LAMB_CASES[0], state_dtype=state_dtype),
                        layout, threads)


# ---- against the float64 reference ---------------------------------------------------
@pytest.mark.parametrize("hp", kc.LARS_HPARAMS, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_lars_boundaries_match_reference(dtype, hp):
    kc.check_lars(cpu, "cpu", BOUNDARY_SHAPES, dtype, hp)


@pytest.mark.parametrize("hp", kc.LAMB_HPARAMS, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_lamb_boundaries_match_reference(dtype, hp):
    kc.check_lamb(cpu, "cpu", BOUNDARY_SHAPES, dtype, hp)


@pytest.mark.parametrize("layout", ["shared", "whole"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
def test_two_thread_layouts_match_reference(dtype, layout):
    shapes, threads = LAYOUTS[layout]
    _with_threads(threads, lambda: kc.check_lars(cpu, "cpu", shapes, dtype, LARS_CASES[1], steps=2))
    _with_threads(threads, lambda: kc.check_lamb(cpu, "cpu", shapes, dtype, LAMB_CASES[0], steps=2))


# ---- the split of entries over threads ------------------------------------------------
def _covered(shared, items):
    return sorted(list(shared) + [e for item in items for e in item])


def test_reduce_plan_split():
    # One thread: nothing is shared; empty entries are skipped; items of ~CHUNK elements, largest first.
    numel = [CHUNK // 2, 0, CHUNK // 2, 3, 5 * CHUNK, 7]
    shared, items = _C.cpu_reduce_plan(numel, 1)
    assert shared == [] and _covered(shared, items) == [0, 2, 3, 4, 5]
    assert items == [[3, 4], [0, 2], [5]]  # sizes 5*CHUNK + 3, CHUNK, 7
    # Two threads: past WHOLE_MAX an entry is shared even when it is a small part of the step ...
    numel = [WHOLE_MAX + 1] + [CHUNK] * (4 * WHOLE_MAX // CHUNK)
    shared, items = _C.cpu_reduce_plan(numel, 2)
    assert shared == [0] and _covered(shared, items) == list(range(len(numel)))
    assert all(len(item) == 1 for item in items)  # each CHUNK-sized entry is an item of its own
    # ... and below it when it alone is over a quarter of the step (two threads) ...
    numel = [8 * CHUNK + 13, 5, BLOCK + 3]
    assert _C.cpu_reduce_plan(numel, 2)[0] == [0]
    # ... but never with fewer than two segments to split.
    assert _C.cpu_reduce_plan([CHUNK, 5], 2)[0] == []
    shared, items = _C.cpu_reduce_plan([CHUNK + 7 + 2 * i for i in range(9)], 2)
    assert shared == [] and len(items) == 9
