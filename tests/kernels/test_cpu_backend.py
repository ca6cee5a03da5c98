"""The fused C++ CPU backend (fastsgd.kernels.cpu) against the reference."""
import os

import kernel_cases as kc
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastsgd
from fastsgd._native import native
from fastsgd.kernels import cpu, reference

pytestmark = pytest.mark.skipif(cpu.unavailable_reason() is not None,
                                reason=f"fused CPU kernels unavailable: {cpu.unavailable_reason()}")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
CHUNK = native().cpu_chunk if cpu.unavailable_reason() is None else 1  # csrc/cpu/work.h kChunk
SHAPES = kc.AWKWARD_SHAPES + [(CHUNK + 1,)]  # and just past one segment / work item


def _id(x):
    return str(x).replace("torch.", "")


def _sgd_args(**kw):
    base = dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
                lr_in_momentum=False)
    base.update(kw)
    return base


# ---- every dtype x hyperparameters x awkward shapes -----------------------------
@pytest.mark.parametrize("hp", kc.SGD_HPARAMS, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_sgd_matches_reference(dtype, hp):
    kc.check_sgd(cpu, "cpu", SHAPES, dtype, hp)


@pytest.mark.parametrize("hp", kc.LARS_HPARAMS, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_lars_matches_reference(dtype, hp):
    kc.check_lars(cpu, "cpu", SHAPES, dtype, hp)


@pytest.mark.parametrize("hp", kc.LAMB_HPARAMS, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_lamb_matches_reference(dtype, hp):
    kc.check_lamb(cpu, "cpu", SHAPES, dtype, hp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
def test_lr_tensor_and_grad_scale(dtype):
    shapes = kc.AWKWARD_SHAPES
    kc.check_sgd(cpu, "cpu", shapes, dtype, dict(momentum=0.9, nesterov=True), lr_as_tensor=True, grad_scale=512.0)
    kc.check_lars(cpu, "cpu", shapes, dtype, dict(momentum=0.9, weight_decay=1e-4), lr_as_tensor=True,
                  grad_scale=64.0)
    kc.check_lamb(cpu, "cpu", shapes, dtype, dict(weight_decay=0.01), lr_as_tensor=True, grad_scale=1024.0,
                  clip_divisor=torch.tensor(2.5))


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_skipped_step_changes_nothing(dtype):
    kc.check_skip_changes_nothing(cpu, "cpu", dtype)


# ---- mixed dtypes, narrow buffers, layouts ----------------------------------------
def test_mixed_dtypes_in_one_call():
    shapes = [(7,), (1025,), (3, 5), (CHUNK + 1,)]
    params = [kc.make_tensors([s], dt, "cpu", seed=i)[0] for i, (s, dt) in enumerate(zip(shapes, DTYPES))]
    bufs = [torch.zeros_like(p) for p in params]
    ref_params, ref_bufs = [p.clone() for p in params], [b.clone() for b in bufs]
    hp = _sgd_args(momentum=0.9, nesterov=True, weight_decay=1e-3)
    for step in range(3):
        grads = [kc.make_tensors([p.shape], p.dtype, "cpu", seed=100 + 10 * step + i)[0]
                 for i, p in enumerate(params)]
        cpu.sgd_step(params, grads, bufs, lr=kc.LRS[step], first_step=step == 0, **hp)
        reference.sgd_step(ref_params, grads, ref_bufs, lr=kc.LRS[step], first_step=step == 0, **hp)
    for p, r, b, rb in zip(params, ref_params, bufs, ref_bufs):
        kc.assert_all_close([p], [r], p.dtype, "param")
        kc.assert_all_close([b], [rb], p.dtype, "momentum_buffer")


@pytest.mark.parametrize("buf_dtype", [torch.bfloat16, torch.float16, torch.float64], ids=_id)
def test_momentum_buffer_dtype_differs_from_param(buf_dtype):
    shapes = [(1,), (129,), (4097,)]
    params = kc.make_tensors(shapes, torch.float32, "cpu")
    bufs = [torch.zeros(s, dtype=buf_dtype) for s in shapes]
    ref_params, ref_bufs = [p.clone() for p in params], [b.clone() for b in bufs]
    for step in range(4):
        grads = kc.make_tensors(shapes, torch.float32, "cpu", seed=7 + step)
        for fn, ps, bs in ((cpu.lars_step, params, bufs), (reference.lars_step, ref_params, ref_bufs)):
            fn(ps, grads, bs, lr=0.1, momentum=0.9, weight_decay=1e-4, first_step=step == 0)
    # Both round the buffer to buf_dtype after every step; the float32 params
    # follow the (rounded) buffers, so they agree to float32 accuracy.
    kc.assert_all_close(bufs, ref_bufs, buf_dtype, "momentum_buffer")
    kc.assert_all_close(params, ref_params, torch.float32, "param")


def test_bf16_rounding_is_nearest_even():
    # 1 + 2^-8 is halfway between bf16 neighbours 1 and 1 + 2^-7: ties go to the even one (1).
    p = torch.tensor([1.0, 1.0, -1.0, 3.0e38], dtype=torch.float32)
    g = torch.tensor([-2.0 ** -8, -3 * 2.0 ** -8, 2.0 ** -8, -1.0e38], dtype=torch.float32)
    b = torch.zeros(4, dtype=torch.bfloat16)
    cpu.sgd_step([p], [g], [b], lr=1.0, first_step=True, **_sgd_args(momentum=0.9))
    expected = (torch.tensor([-2.0 ** -8, -3 * 2.0 ** -8, 2.0 ** -8, -1.0e38], dtype=torch.float32)
                .to(torch.bfloat16))
    assert torch.equal(b, expected), (b, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_id)
def test_16bit_specials_round_trip(dtype):
    # inf, NaN, subnormals, overflow to inf, signed zero: the kernel's own
    # widening/narrowing must agree with torch's conversions.
    info = torch.finfo(dtype)
    vals = torch.tensor([0.0, -0.0, info.tiny, info.tiny / 4, -info.tiny / 8, info.max, float("inf"),
                         float("-inf"), 1.0, -3.5, 1e-3], dtype=torch.float64)
    p = vals.to(dtype)
    g = torch.zeros_like(p)
    cpu.sgd_step([p], [g], None, lr=0.1, **_sgd_args())  # p - 0.1 * 0: a round trip through float32
    torch.testing.assert_close(p, vals.to(dtype), equal_nan=True, atol=0, rtol=0)
    q = torch.tensor([float("nan")], dtype=dtype)
    cpu.sgd_step([q], [torch.zeros_like(q)], None, lr=0.1, **_sgd_args())
    assert torch.isnan(q).all()
    big = torch.tensor([info.max], dtype=dtype)
    cpu.sgd_step([big], [torch.full_like(big, -info.max)], None, lr=1.0, **_sgd_args())
    assert torch.isinf(big).all()


def test_channels_last_params():
    p = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
    g = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
    b = torch.randn_like(p)
    rp, rb = p.clone(), b.clone()
    hp = _sgd_args(momentum=0.9, nesterov=True)
    cpu.sgd_step([p], [g], [b], lr=0.1, **hp)
    reference.sgd_step([rp], [g], [rb], lr=0.1, **hp)
    torch.testing.assert_close(p, rp)
    torch.testing.assert_close(b, rb)


def test_some_params_without_buffer():
    params = kc.make_tensors([(5,), (9,)], torch.float32, "cpu")
    grads = kc.make_tensors([(5,), (9,)], torch.float32, "cpu", seed=3)
    bufs = [torch.ones(5), None]
    rp, rb = [p.clone() for p in params], [bufs[0].clone(), None]
    hp = _sgd_args(momentum=0.9)
    cpu.sgd_step(params, grads, bufs, lr=0.1, **hp)
    reference.sgd_step(rp, grads, rb, lr=0.1, **hp)
    kc.assert_all_close(params, rp, torch.float32, "param")
    kc.assert_all_close(bufs[:1], rb[:1], torch.float32, "momentum_buffer")


def test_grads_never_modified_and_norms_deterministic():
    shapes = [(3 * CHUNK + 11,), (1000,), (17, 33)]
    results = []
    for threads in (1, 2):
        params = kc.make_tensors(shapes, torch.float32, "cpu")
        grads = kc.make_tensors(shapes, torch.float32, "cpu", seed=5)
        before = [g.clone() for g in grads]
        bufs = [torch.zeros_like(p) for p in params]
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            cpu.lars_step(params, grads, bufs, lr=0.1, momentum=0.9, weight_decay=1e-4, first_step=True)
            m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
            cpu.lamb_step(params, grads, m, v, [torch.zeros(()) for _ in params], lr=0.01)
        finally:
            torch.set_num_threads(old)
        for g, b in zip(grads, before):
            assert torch.equal(g, b)
        results.append(params)
    for a, b in zip(*results):
        assert torch.equal(a, b), "result depends on the thread count"


# ---- stacked trials ------------------------------------------------------------
@pytest.mark.parametrize("hp", [dict(nesterov=True), dict(lr_in_momentum=True, dampening=0.1),
                                dict(weight_decay=0.01, maximize=True)], ids=_id)
@pytest.mark.parametrize("stack", ["lr", "momentum", "both"])
@pytest.mark.parametrize("grads_in_place", [False, True], ids=["new-grads", "same-grad-buffers"])
def test_stacked_trials_match_reference(stack, hp, grads_in_place):
    # same-grad-buffers: every step's table is the one of the step before (the engine's case), so
    # only the per-trial hparams change between calls
    trials = 3
    shapes = [(trials,), (trials, 5), (trials, 7, 2), (trials, 0)]
    params = kc.make_tensors(shapes, torch.float32, "cpu")
    bufs = [torch.zeros_like(p) for p in params]
    rp, rb = [p.clone() for p in params], [b.clone() for b in bufs]
    mus = torch.tensor([0.0, 0.5, 0.9])
    grads = kc.make_tensors(shapes, torch.float32, "cpu", seed=49)
    for step in range(3):
        lrs = torch.tensor([0.1, 0.02, 0.3]) * (step + 1)
        lr = lrs if stack in ("lr", "both") else 0.1
        mu = (mus + 0.01 * step) if stack in ("momentum", "both") else 0.9
        new = kc.make_tensors(shapes, torch.float32, "cpu", seed=50 + step)
        if grads_in_place:
            for g, n in zip(grads, new):
                g.copy_(n)
        else:
            grads = new
        kw = dict(_sgd_args(**hp), momentum=mu, first_step=step == 0, stacked_trials=True)
        cpu.sgd_step(params, grads, bufs, lr=lr, **kw)
        reference.sgd_step(rp, grads, rb, lr=lr, **kw)
    kc.assert_all_close(params, rp, torch.float32, "param")
    kc.assert_all_close(bufs, rb, torch.float32, "momentum_buffer")


# ---- bad input: clear errors, nothing modified ------------------------------------
def _unchanged_after(call, tensors, exc, match):
    before = [t.clone() for t in tensors]
    with pytest.raises(exc, match=match):
        call()
    for t, b in zip(tensors, before):
        assert torch.equal(t, b)


def test_errors_before_any_change():
    p, q = torch.randn(6), torch.randn(6)
    g = torch.randn(6)
    b = torch.zeros(6)
    def sgd(**kw):
        return cpu.sgd_step(**{**dict(params=[p, q], grads=[g, g], bufs=[b, b.clone()], lr=0.1,
                                                 **_sgd_args(momentum=0.9)), **kw})
    _unchanged_after(lambda: sgd(grads=[g, torch.randn(3, 2)]), [p, q, b], ValueError, r"grads\[1\] has shape")
    _unchanged_after(lambda: sgd(grads=[g]), [p, q, b], ValueError, "grads has 1 tensors")
    _unchanged_after(lambda: sgd(grads=[g, g.double()]), [p, q, b], ValueError, r"grads\[1\] has dtype")
    _unchanged_after(lambda: sgd(bufs=[b, torch.zeros(6, device="meta")]), [p, q, b], ValueError,
                     r"bufs\[1\] is on meta")
    _unchanged_after(lambda: sgd(params=[p, torch.randn(6, dtype=torch.complex64)],
                                 grads=[g, torch.randn(6, dtype=torch.complex64)]), [p, b], TypeError,
                     "complex64")
    _unchanged_after(lambda: sgd(params=[p, torch.randn(12)[::2]], grads=[g, torch.randn(12)[::2]]), [p, b],
                     ValueError, "gaps")
    _unchanged_after(lambda: sgd(stochastic_rounding=True), [p, q, b], ValueError, "only in the GPU backends")
    _unchanged_after(lambda: sgd(lr=torch.tensor([0.1, 0.2]), stacked_trials=True), [p, q, b], ValueError,
                     "first dimension")
    _unchanged_after(lambda: sgd(first_step=[True]), [p, q, b], ValueError, "first_step has 1 entries")
    _unchanged_after(lambda: cpu.lars_step([p], [g], [b], lr=torch.tensor([0.1] * 6), momentum=0.9),
                     [p, b], ValueError, r"lr has 6 values .*stacked_trials=True\) only")
    _unchanged_after(lambda: cpu.lamb_step([p], [g], [torch.zeros(6)], [torch.zeros(6, dtype=torch.float16)],
                                           [torch.zeros(())], lr=0.1), [p], ValueError, "share a dtype")
    _unchanged_after(lambda: cpu.lamb_step([p], [g], [torch.zeros(6)], [torch.zeros(6)],
                                           [torch.zeros((), dtype=torch.int64)], lr=0.1), [p], ValueError,
                     "float32/float64")


def test_mismatched_layouts_are_refused():
    p = torch.randn(3, 4)
    g = torch.randn(4, 3).t()  # same shape, transposed memory
    with pytest.raises(ValueError, match="same memory layout|share one memory layout"):
        cpu.sgd_step([p], [g], None, lr=0.1, **_sgd_args())


# ---- property test -------------------------------------------------------------
_shape = st.lists(st.integers(0, 40), min_size=1, max_size=3).map(tuple)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes=st.lists(_shape, min_size=1, max_size=4),
       dtype=st.sampled_from(DTYPES),
       momentum=st.sampled_from([0.0, 0.5, 0.9]),
       dampening=st.sampled_from([0.0, 0.3]),
       weight_decay=st.sampled_from([0.0, 1e-3, 0.1]),
       nesterov=st.booleans(), maximize=st.booleans(), lr_in_momentum=st.booleans(),
       op=st.sampled_from(["sgd", "lars", "lamb"]))
def test_property_matches_reference(shapes, dtype, momentum, dampening, weight_decay, nesterov, maximize,
                                    lr_in_momentum, op):
    if op == "sgd":
        if nesterov and (momentum == 0 or dampening != 0):
            nesterov = False
        kc.check_sgd(cpu, "cpu", shapes, dtype, dict(momentum=momentum, dampening=dampening, nesterov=nesterov,
                                                      weight_decay=weight_decay, maximize=maximize,
                                                      lr_in_momentum=lr_in_momentum), steps=2)
    elif op == "lars":
        kc.check_lars(cpu, "cpu", shapes, dtype, dict(momentum=momentum, dampening=dampening,
                                                       weight_decay=weight_decay, always_adapt=maximize,
                                                       trust_clip=nesterov, lr_in_momentum=lr_in_momentum),
                      steps=2)
    else:
        kc.check_lamb(cpu, "cpu", shapes, dtype, dict(weight_decay=weight_decay, always_adapt=maximize,
                                                       trust_clip=nesterov, bias_correction=not lr_in_momentum),
                      steps=2)


# ---- the table cache ----------------------------------------------------------------
def test_table_is_cached_and_rebuilt_when_its_key_changes(monkeypatch):
    cpu._native()  # loads the dtype codes the table builder uses
    cpu.clear_cache()
    builds = []
    build = cpu._build_sgd_table
    monkeypatch.setattr(cpu, "_build_sgd_table", lambda *a: builds.append(1) or build(*a))
    params = kc.make_tensors([(5,), (300,)], torch.float32, "cpu")
    grads = kc.make_tensors([(5,), (300,)], torch.float32, "cpu", seed=1)
    bufs = [torch.zeros_like(p) for p in params]
    t1 = cpu._sgd_table("t", params, grads, bufs, False)
    assert not t1.flags.writeable and len(builds) == 1
    assert np.array_equal(cpu._sgd_table("t", params, grads, bufs, False), t1) and len(builds) == 1  # a hit
    new_grads = [g.clone() for g in grads]  # re-created grads at new addresses: still a hit
    t2 = cpu._sgd_table("t", params, new_grads, bufs, False)
    assert len(builds) == 1 and list(t2[:, 1]) == [g.data_ptr() for g in new_grads]
    assert np.array_equal(np.delete(t2, 1, axis=1), np.delete(t1, 1, axis=1))
    cpu._sgd_table("t", params, grads, bufs, [True, False])  # first-step flags are in the key
    assert len(builds) == 2
    params[1].data = torch.zeros(300)  # a param re-pointed to new memory
    assert cpu._sgd_table("t", params, grads, bufs, False)[1, 0] == params[1].data_ptr() and len(builds) == 3
    cpu.clear_cache()


def test_cache_does_not_grow_in_a_training_loop():
    """zero_grad(set_to_none=True) re-creates every grad each step, at
    addresses that change: the cache must still hold one table."""
    cpu.clear_cache()
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(8)])
    opt = fastsgd.Nesterov(model.parameters(), lr=0.01, backend="cpu")
    for _ in range(6):
        opt.zero_grad(set_to_none=True)
        model(torch.randn(4, 16)).square().mean().backward()
        opt.step()
    assert len(cpu.TABLES) == 2  # the first step's table (new buffers) and the steady one
    cpu.clear_cache()


def test_cached_tables_still_refuse_bad_arguments():
    """A call that differs from a cached one in any checked way misses the
    cache, so its arguments are checked again."""
    cpu.clear_cache()
    p, g, b = torch.zeros(6), torch.ones(6), torch.zeros(6)
    cpu.sgd_step([p], [g], [b], lr=0.1, **_sgd_args(momentum=0.9))  # cached from here on
    with pytest.raises(ValueError, match=r"grads\[0\] has shape"):
        cpu.sgd_step([p], [torch.ones(7)], [b], lr=0.1, **_sgd_args(momentum=0.9))
    with pytest.raises(ValueError, match=r"grads\[0\] has dtype torch.float64"):
        cpu.sgd_step([p], [torch.ones(6, dtype=torch.float64)], [b], lr=0.1, **_sgd_args(momentum=0.9))
    with pytest.raises(ValueError, match=r"grads\[0\] is on meta"):
        cpu.sgd_step([p], [torch.ones(6, device="meta")], [b], lr=0.1, **_sgd_args(momentum=0.9))
    with pytest.raises(ValueError, match=r"bufs\[0\] has shape"):
        cpu.sgd_step([p], [g], [torch.zeros(5)], lr=0.1, **_sgd_args(momentum=0.9))
    cpu.clear_cache()


def test_non_contiguous_tensors_are_checked_every_call_and_never_cached():
    cpu.clear_cache()
    p = torch.zeros(2, 3, 4, 5).to(memory_format=torch.channels_last)
    g = torch.ones_like(p)
    cpu.sgd_step([p], [g], None, lr=0.5, **_sgd_args())
    cpu.sgd_step([p], [g], None, lr=0.5, **_sgd_args())
    assert torch.all(p == -1.0) and not cpu.TABLES
    with pytest.raises(ValueError, match="strides"):
        cpu.sgd_step([p], [torch.ones(2, 3, 4, 5)], None, lr=0.5, **_sgd_args())


# ---- beyond 2^31 elements (opt-in: needs ~9 GB) ---------------------------------------
@pytest.mark.skipif(os.environ.get("FASTSGD_BIG_TESTS") != "1",
                    reason="set FASTSGD_BIG_TESTS=1 to run (allocates ~9 GB)")
def test_more_than_2_pow_31_elements():
    n = 2 ** 31 + 17
    p = torch.ones(n, dtype=torch.bfloat16)
    g = torch.ones(n, dtype=torch.bfloat16)
    g[-5:] = 2.0
    cpu.sgd_step([p], [g], None, lr=0.25, **_sgd_args())
    assert bool((p[:-5] == 0.75).all())
    assert bool((p[-5:] == 0.5).all())
    cpu.lars_step([p], [g], None, lr=0.25, momentum=0.0, weight_decay=0.0, always_adapt=True, trust_coeff=1.0)
    # r = |p| / |g| over all 2^31+17 elements: only right if nothing was dropped or wrapped.
    p_norm = (0.75 ** 2 * (n - 5) + 0.5 ** 2 * 5) ** 0.5
    g_norm = ((n - 5) + 4.0 * 5) ** 0.5
    r = p_norm / (g_norm + 1e-8)
    torch.testing.assert_close(p[:3].float(), torch.full((3,), 0.75 - 0.25 * r).to(torch.bfloat16).float())


def test_lamb_float64_params_with_float32_moments_match_reference():
    """Moments narrower than the math type (here float32 moments of float64
    params) must not be rounded before the update direction is computed."""
    shapes = [(1000,), (17, 3)]
    params = kc.make_tensors(shapes, torch.float64, "cpu")
    ref_params = [p.clone() for p in params]
    state = [[torch.zeros(s, dtype=torch.float32) for s in shapes] for _ in range(2)]
    ref_state = [[t.clone() for t in ts] for ts in state]
    steps = [torch.zeros(()) for _ in shapes]
    ref_steps = [torch.zeros(()) for _ in shapes]
    hp = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, bias_correction=True,
              trust_clip=False, always_adapt=False)
    for step in range(3):
        grads = kc.make_tensors(shapes, torch.float64, "cpu", seed=50 + step)
        cpu.lamb_step(params, grads, *state, steps, **hp)
        reference.lamb_step(ref_params, grads, *ref_state, ref_steps, **hp)
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p, r, **kc.TOLERANCES[torch.float64])
    for t, r in zip(state[0] + state[1], ref_state[0] + ref_state[1]):
        torch.testing.assert_close(t, r, **kc.TOLERANCES[torch.float32])
