"""The triton backend on CPU tensors through the Triton interpreter (runs in CI).

tests/conftest.py sets TRITON_INTERPRET=1 before triton is first imported on
a machine without CUDA, so the kernels here run in the interpreter. Block and
chunk sizes are small under the interpreter
(triton_common.INTERPRETER_CONFIG: block 64, chunk 128), so the shapes below
cross block, chunk and program boundaries and run the same kernel bodies as a
GPU.

On a machine with CUDA the kernels are compiled for the GPU and these tests
skip; tests/kernels/test_gpu_backends.py covers that case.
"""
from __future__ import annotations

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("CUDA present: the Triton kernels are compiled for the GPU (see tests/kernels/test_gpu_backends.py)",
                allow_module_level=True)

import kernel_cases as K  # noqa: E402
import requirements  # noqa: E402

requirements.triton()

import fastsgd  # noqa: E402
from fastsgd.kernels import reference  # noqa: E402
from fastsgd.kernels import triton_optim as T  # noqa: E402
from fastsgd.kernels.triton_table import TritonTables  # noqa: E402

CPU = torch.device("cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Empty, one element, a prime, 221 (two chunks, ragged block), one past a
# block (65) and one past a chunk (129) of the interpreter launch sizes.
SHAPES = [(0,), (1,), (7,), (13, 17), (65,), (129,)]


def _id(hp):
    return ",".join(f"{k}={v}" for k, v in hp.items())


def test_interpreter_mode_and_module_attributes():
    assert T.common.kernel_mode() == "interpreted"
    assert T.NAME == "triton" and T.STRIDED is False
    assert T.unavailable_reason() is None
    for dt in DTYPES:
        assert T.supports(CPU, dt)
    assert not T.supports(CPU, torch.float64)
    assert not T.supports(CPU, torch.complex64)
    assert fastsgd.backends.get_backend("triton", CPU, {torch.float32}) is T


# ---- backend against the reference: shared cases ------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hp", K.SGD_HPARAMS, ids=_id)
def test_sgd_matches_reference(dtype, hp):
    K.check_sgd(T, CPU, SHAPES, dtype, hp)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hp", K.LARS_HPARAMS, ids=_id)
def test_lars_matches_reference(dtype, hp):
    K.check_lars(T, CPU, SHAPES, dtype, hp)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hp", K.LAMB_HPARAMS, ids=_id)
def test_lamb_matches_reference(dtype, hp):
    K.check_lamb(T, CPU, SHAPES, dtype, hp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lr_tensor_and_grad_scale(dtype):
    """The capturable-style step: lr, grad_scale read on the device."""
    K.check_sgd(T, CPU, SHAPES, dtype, dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
                lr_as_tensor=True, grad_scale=1024.0)
    K.check_lars(T, CPU, SHAPES, dtype, dict(momentum=0.9, weight_decay=1e-4, trust_clip=True),
                 lr_as_tensor=True, grad_scale=1024.0)
    K.check_lamb(T, CPU, SHAPES, dtype, dict(weight_decay=0.01, trust_clip=True), lr_as_tensor=True,
                 grad_scale=1024.0)


@pytest.mark.parametrize("clip", [2.5, "tensor"])
def test_lamb_clip_divisor(clip):
    clip = torch.tensor(3.0) if clip == "tensor" else clip
    K.check_lamb(T, CPU, SHAPES, torch.float32, dict(weight_decay=0.01), clip_divisor=clip, grad_scale=8.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_found_inf_changes_nothing(dtype):
    K.check_skip_changes_nothing(T, CPU, dtype)


def test_found_inf_zero_runs_the_step():
    K.check_sgd(T, CPU, SHAPES, torch.float32, dict(momentum=0.9), grad_scale=1.0)
    params = K.make_tensors(SHAPES, torch.float32, CPU)
    ref = [p.clone() for p in params]
    grads = K.make_tensors(SHAPES, torch.float32, CPU, seed=5)
    zero = torch.zeros(())
    T.sgd_step(params, grads, None, lr=0.1, found_inf=zero)
    reference.sgd_step(ref, grads, None, lr=0.1)
    K.assert_all_close(params, ref, torch.float32, "param")


# ---- calls that mix things ----------------------------------------------------

def _sgd_both(params, grads, bufs, **kw):
    ref_p = [p.clone() for p in params]
    ref_b = [b.clone() for b in bufs] if bufs is not None else None
    T.sgd_step(params, grads, bufs, **kw)
    reference.sgd_step(ref_p, grads, ref_b, **kw)
    return ref_p, ref_b


def test_mixed_first_step_flags():
    params = K.make_tensors(SHAPES, torch.float32, CPU)
    grads = K.make_tensors(SHAPES, torch.float32, CPU, seed=3)
    bufs = K.make_tensors(SHAPES, torch.float32, CPU, seed=4)  # old history that new buffers must ignore
    flags = [i % 2 == 0 for i in range(len(SHAPES))]
    ref_p, ref_b = _sgd_both(params, grads, bufs, lr=0.1, momentum=0.9, dampening=0.3, first_step=flags)
    K.assert_all_close(params, ref_p, torch.float32, "param")
    K.assert_all_close(bufs, ref_b, torch.float32, "momentum_buffer")


def test_mixed_dtypes_in_one_call():
    """fp32, bf16 and fp16 params (and a bf16 buffer for an fp32 param) in one call: one launch per group."""
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32]
    shapes = [(7,), (129,), (13, 17), (65,)]
    params = [K.make_tensors([s], dt, CPU, seed=i)[0] for i, (s, dt) in enumerate(zip(shapes, dtypes))]
    grads = [K.make_tensors([s], dt, CPU, seed=10 + i)[0] for i, (s, dt) in enumerate(zip(shapes, dtypes))]
    bufs = [torch.zeros_like(p) for p in params[:3]] + [torch.zeros_like(params[3], dtype=torch.bfloat16)]
    for step in range(2):
        ref_p, ref_b = _sgd_both(params, grads, bufs, lr=0.1, momentum=0.9, nesterov=True, first_step=step == 0)
        for i, dt in enumerate(dtypes):
            K.assert_all_close(params[i:i + 1], ref_p[i:i + 1], dt, "param")
            K.assert_all_close(bufs[i:i + 1], ref_b[i:i + 1], bufs[i].dtype, "momentum_buffer")
        params, bufs = ref_p, ref_b  # continue from the reference so each step is compared alone


def test_channels_last_params():
    p = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    g = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    b = torch.zeros_like(p)
    ref_p, ref_b = _sgd_both([p], [g], [b], lr=0.1, momentum=0.9, first_step=True)
    K.assert_all_close([p, b], ref_p + ref_b, torch.float32, "channels_last")


def test_unaligned_views():
    """Params, grads and buffers that start 4 bytes into their storage: the
    table is marked unaligned (no vector-load hints) and results still match."""
    def views(seed):
        return [t[1:] for t in K.make_tensors([(8,), (130,), (222,)], torch.float32, CPU, seed=seed)]
    params, grads, bufs = views(0), views(1), [torch.zeros(n + 1)[1:] for n in (7, 129, 221)]
    ref_p, ref_b = _sgd_both(params, grads, bufs, lr=0.1, momentum=0.9, first_step=True)
    K.assert_all_close(params + bufs, ref_p + ref_b, torch.float32, "unaligned")
    addresses = [tuple(t.data_ptr() for t in ts) for ts in (params, grads, bufs)]
    numels = tuple(p.numel() for p in params)
    table = T.TABLES.get(addresses, numels, T.common.INTERPRETER_CONFIG.chunk, CPU)
    assert not table.aligned
    assert T.TABLES.get([tuple(t.data_ptr() for t in ts) for ts in (ref_p, ref_b)], numels,
                        T.common.INTERPRETER_CONFIG.chunk, CPU).aligned


# ---- the device-side table ----------------------------------------------------

def test_table_reused_while_tensors_unchanged_and_rebuilt_when_they_change():
    params = K.make_tensors(SHAPES, torch.float32, CPU)
    bufs = [torch.zeros_like(p) for p in params]
    grads = K.make_tensors(SHAPES, torch.float32, CPU, seed=1)
    T.TABLES.clear()
    built = T.TABLES.builds
    kw = dict(lr=0.1, momentum=0.9)
    T.sgd_step(params, grads, bufs, first_step=True, **kw)
    T.sgd_step(params, grads, bufs, first_step=False, **kw)  # uniform flags are a kernel argument
    T.sgd_step(params, grads, bufs, **kw)
    assert T.TABLES.builds == built + 1
    new_grads = [g.clone() for g in grads]  # grads re-created at new addresses: the table is patched
    ref_p, ref_b = [p.clone() for p in params], [b.clone() for b in bufs]
    T.sgd_step(params, new_grads, bufs, **kw)
    reference.sgd_step(ref_p, new_grads, ref_b, **kw)
    K.assert_all_close(params + bufs, ref_p + ref_b, torch.float32, "new grads")
    assert T.TABLES.builds == built + 1
    unaligned = [torch.empty(g.numel() + 1)[1:].view_as(g).copy_(g) for g in grads]
    table = T.TABLES.get([tuple(t.data_ptr() for t in ts) for ts in (params, unaligned, bufs)],
                         tuple(p.numel() for p in params), T.common.INTERPRETER_CONFIG.chunk, CPU, volatile=1)
    assert not table.aligned and T.TABLES.builds == built + 1  # the vector-load promise follows the grads
    T.sgd_step(params, unaligned, bufs, **kw)
    reference.sgd_step(ref_p, unaligned, ref_b, **kw)
    K.assert_all_close(params + bufs, ref_p + ref_b, torch.float32, "unaligned new grads")
    T.sgd_step(params[:-1], grads[:-1], bufs[:-1], **kw)  # a different param set
    assert T.TABLES.builds == built + 2
    with pytest.raises(ValueError, match="grads\\[0\\] has shape"):  # moved grads of the wrong shape: full checks
        T.sgd_step(params, [torch.zeros(3)] + new_grads[1:], bufs, **kw)


def test_program_table_offsets_are_64_bit():
    """A tensor past 2^31 elements: chunk starts are int64 and cover it exactly
    (the table is built on the host; no 2^31-element tensor needed here)."""
    cache = TritonTables()
    chunk = 1 << 24
    numels = (5, (1 << 31) + 7, 0, 3)
    first, counts, programs = cache._program_table(numels, chunk, CPU)
    assert programs.dtype == torch.int64
    assert counts.tolist() == [1, 129, 0, 1]
    big = programs[programs[:, 0] == 1, 1]
    assert big[0] == 0 and big[-1] == 128 * chunk and big[-1] > 2 ** 31 - chunk
    assert first.tolist() == [0, 1, 130, 130]
    assert programs[:, 0].tolist() == [0] + [1] * 129 + [3]


# ---- stochastic rounding ------------------------------------------------------

def _round_once(value, n, **kw):
    p = torch.zeros(n)
    b = torch.zeros(n, dtype=torch.bfloat16)
    g = torch.full((n,), value)
    T.sgd_step([p], [g], [b], lr=0.0, momentum=0.9, first_step=True, stochastic_rounding=True, **kw)
    return b.float()


def test_stochastic_rounding_is_unbiased_and_seeded():
    x = 1.0 + 0.3 * 2 ** -7  # 30 % of the way from bf16 1.0 to the next bf16 value
    lo, hi = 1.0, 1.0 + 2 ** -7
    assert float(torch.tensor(x).to(torch.bfloat16)) == lo  # round-to-nearest is biased by -0.3 ulp
    T.manual_seed(1234, CPU)
    rounds = torch.stack([_round_once(x, 1000) for _ in range(16)])
    assert set(rounds.unique().tolist()) == {lo, hi}
    n = rounds.numel()
    sigma = (hi - lo) * (0.3 * 0.7 / n) ** 0.5
    assert abs(rounds.mean().item() - x) < 5 * sigma, (rounds.mean().item(), x)
    assert not torch.equal(rounds[0], rounds[1])  # the call counter gives fresh bits each call
    assert int(T._RNG[(CPU, 0)][1]) == 16
    T.manual_seed(1234, CPU)
    assert torch.equal(_round_once(x, 1000), rounds[0])  # same seed and counter: same result


def test_stochastic_rounding_state_is_per_stream(monkeypatch):
    """Launches on two streams keep separate (seed, counter, ticket) states:
    sharing one, their tickets could interleave and bump the counter wrongly."""
    x = 1.0 + 0.3 * 2 ** -7
    T.manual_seed(99, CPU)
    for stream in (0, 7, 7, 0, 7):
        monkeypatch.setattr(T, "_stream_key", lambda device, s=stream: s)
        _round_once(x, 300)
    assert int(T._RNG[(CPU, 0)][1]) == 2 and int(T._RNG[(CPU, 7)][1]) == 3
    assert int(T._RNG[(CPU, 0)][0]) == 99 and int(T._RNG[(CPU, 7)][0]) != 99  # distinct seeds per stream
    T.manual_seed(99, CPU)  # restarts every stream of the device
    assert list(T._RNG) == [(CPU, 7)] and int(T._RNG[(CPU, 7)][1]) == 0


@pytest.mark.parametrize("op", ["sgd", "lars", "lamb"])
def test_every_op_runs_under_its_params_device(monkeypatch, op):
    """Each op enters device_guard(params' device) (on CUDA: the launches go to
    that device, and the caller's current device is restored)."""
    import contextlib
    entered = []

    def guard(device):
        entered.append(device)
        return contextlib.nullcontext()

    monkeypatch.setattr(T, "device_guard", guard)
    params = K.make_tensors([(7,), (130,)], torch.float32, CPU)
    grads = K.make_tensors([(7,), (130,)], torch.float32, CPU, seed=1)
    states = [torch.zeros_like(p) for p in params]
    if op == "lamb":
        T.lamb_step(params, grads, states, [s.clone() for s in states], [torch.zeros(()) for _ in params], lr=0.01)
    else:
        getattr(T, f"{op}_step")(params, grads, states, lr=0.1, momentum=0.9, weight_decay=1e-4)
    assert entered == [CPU]


def test_stochastic_rounding_through_the_optimizer():
    """SGD(momentum_dtype=bf16, stochastic_rounding=True) on triton stays
    within bf16 tolerance of the reference, which rounds to nearest."""
    torch.manual_seed(0)
    params = {b: torch.nn.Parameter(torch.randn(129)) for b in ("triton", "reference")}
    params["reference"].data.copy_(params["triton"].data)
    opts = {b: fastsgd.SGD([p], lr=0.1, momentum=0.9, momentum_dtype=torch.bfloat16, stochastic_rounding=True,
                           backend=b) for b, p in params.items()}
    for _step in range(3):
        grad = torch.randn(129)
        for b, p in params.items():
            p.grad = grad.clone()
            opts[b].step()
    for b, p in params.items():
        assert opts[b].state[p]["momentum_buffer"].dtype == torch.bfloat16
    torch.testing.assert_close(params["triton"].detach(), params["reference"].detach(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(opts["triton"].state[params["triton"]]["momentum_buffer"],
                               opts["reference"].state[params["reference"]]["momentum_buffer"], atol=2e-2, rtol=2e-2)


def test_stochastic_rounding_refuses_fp16_buffers():
    p, g, b = torch.ones(7), torch.ones(7), torch.zeros(7, dtype=torch.float16)
    with pytest.raises(NotImplementedError, match="bfloat16"):
        T.sgd_step([p], [g], [b], lr=0.1, momentum=0.9, first_step=True, stochastic_rounding=True)
    assert torch.equal(p, torch.ones(7)) and torch.count_nonzero(b) == 0


# ---- bad input: a clear error before anything changes ---------------------------

@pytest.mark.parametrize("case", ["stacked_lr", "stacked_momentum", "grad_dtype", "lengths", "float64",
                                  "strided", "first_step_len", "lr_shape", "lamb_step_dtype"])
def test_bad_input_raises_before_changing_anything(case):
    params = K.make_tensors([(7,), (13,)], torch.float32, CPU)
    before = [p.clone() for p in params]
    grads = K.make_tensors([(7,), (13,)], torch.float32, CPU, seed=1)
    bufs = [torch.zeros_like(p) for p in params]
    kw = dict(lr=0.1, momentum=0.9)
    expected = {"stacked_lr": (NotImplementedError, "stacked trials"),
                "stacked_momentum": (NotImplementedError, "stacked trials"),
                "grad_dtype": (TypeError, "grads\\[1\\] is torch.float16"),
                "lengths": (ValueError, "1 grads for 2 params"),
                "float64": (TypeError, "torch.float64"),
                "strided": (TypeError, "strided view"),
                "first_step_len": (ValueError, "first_step has 3 entries"),
                "lr_shape": (ValueError, "lr must be a float or a 1-element tensor"),
                "lamb_step_dtype": (TypeError, "steps\\[0\\] must be a 1-element float32")}[case]
    if case == "stacked_lr":
        kw["lr"] = torch.tensor([0.1, 0.2])
    elif case == "stacked_momentum":
        kw["momentum"] = torch.tensor([0.9, 0.8])
    elif case == "grad_dtype":
        grads[1] = grads[1].half()
    elif case == "lengths":
        grads = grads[:1]
    elif case == "float64":
        params[1], grads[1], bufs[1] = params[1].double(), grads[1].double(), bufs[1].double()
        before[1] = params[1].clone()
    elif case == "strided":
        base = torch.randn(13, 2)
        params[1], before[1] = base[:, 0], base[:, 0].clone()
    elif case == "first_step_len":
        kw["first_step"] = [True] * 3
    elif case == "lr_shape":
        kw["lr"] = torch.ones(2, 2)
    with pytest.raises(expected[0], match=expected[1]):
        if case == "lamb_step_dtype":
            T.lamb_step(params, grads, bufs, [torch.zeros_like(p) for p in params],
                        [torch.zeros((), dtype=torch.int64) for _ in params], lr=0.1)
        else:
            T.sgd_step(params, grads, bufs, **kw)
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    assert all(torch.count_nonzero(b) == 0 for b in bufs)


# ---- the optimizer classes end to end ----------------------------------------

def _model(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(13, 17), torch.nn.ReLU(), torch.nn.Linear(17, 3)).to(dtype)


OPTIMIZERS = {
    "SGD": lambda ps, b: fastsgd.SGD(ps, lr=0.1, backend=b),
    "Momentum": lambda ps, b: fastsgd.Momentum(ps, lr=0.1, weight_decay=1e-3, backend=b),
    "Nesterov": lambda ps, b: fastsgd.Nesterov(ps, lr=torch.tensor(0.05), backend=b),
    "LARS": lambda ps, b: fastsgd.LARS(ps, lr=0.1, weight_decay=1e-4, trust_clip=True, backend=b),
    "LAMB": lambda ps, b: fastsgd.LAMB(ps, lr=0.01, max_grad_norm=1.0, backend=b),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_optimizer_classes_end_to_end(name, dtype):
    models = {b: _model(dtype) for b in ("triton", "reference")}
    opts = {b: OPTIMIZERS[name](fastsgd.param_groups(m, 1e-2), b) for b, m in models.items()}
    data = torch.randn(5, 8, 13, generator=torch.Generator().manual_seed(1)).to(dtype)
    for x in data:
        for b, m in models.items():
            m.zero_grad()
            m(x).square().mean().backward()
            opts[b].step()
    for (n, a), (_, e) in zip(models["triton"].named_parameters(), models["reference"].named_parameters()):
        torch.testing.assert_close(a, e, **K.TOLERANCES[dtype], msg=lambda m, n=n: f"{name} {n}: {m}")


def test_amp_skip_on_the_first_step_creates_no_state():
    p = torch.nn.Parameter(torch.ones(7))
    opt = fastsgd.LAMB([p], lr=0.1, backend="triton")
    p.grad = torch.full((7,), float("inf"))
    opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(1.0)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(7)) and "exp_avg" not in opt.state[p]
    opt.found_inf = torch.tensor(0.0)
    p.grad = torch.full((7,), 2.0)
    opt.step()
    assert float(opt.state[p]["step"]) == 1.0 and not torch.equal(p.detach(), torch.ones(7))


# ---- torch.compile ---------------------------------------------------------------

def test_compiled_training_step_matches_eager():
    K.check_compiled_training_step(
        lambda params: fastsgd.Nesterov(params, lr=0.1, weight_decay=1e-3, backend="triton"))
