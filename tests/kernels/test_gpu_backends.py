"""GPU backends (triton, and cuda when built) on a real GPU; skipped without CUDA.

Except ``test_triton_kernels_compile_for_gpu``, which runs everywhere: it
compiles every Triton kernel variant (optimizer and ghost batch norm) to a
cubin for sm_80 and sm_90 with Triton's bundled ptxas (no GPU needed), in a
fresh process where triton is imported without TRITON_INTERPRET
(tests/kernels/triton_compile.py).
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import kernel_cases as K
import pytest
import requirements
import torch

import fastsgd
from fastsgd.backends import get_backend

HAS_CUDA = requirements.HAS_GPU
requires_cuda = pytest.mark.gpu
CUDA = torch.device("cuda")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _id(hp):
    return ",".join(f"{k}={v}" for k, v in hp.items())


@pytest.fixture(params=["triton", "cuda"])
def kernels(request):
    requirements.gpu(request.param)
    return get_backend(request.param, CUDA, {torch.float32})


# ---- against the reference ---------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hp", K.SGD_HPARAMS, ids=_id)
def test_sgd_matches_reference(kernels, dtype, hp):
    K.check_sgd(kernels, CUDA, K.AWKWARD_SHAPES, dtype, hp)
    K.check_sgd(kernels, CUDA, K.AWKWARD_SHAPES, dtype, hp, lr_as_tensor=True, grad_scale=512.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hp", K.LARS_HPARAMS, ids=_id)
def test_lars_matches_reference(kernels, dtype, hp):
    K.check_lars(kernels, CUDA, K.AWKWARD_SHAPES, dtype, hp)
    K.check_lars(kernels, CUDA, K.AWKWARD_SHAPES, dtype, hp, lr_as_tensor=True, grad_scale=512.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hp", K.LAMB_HPARAMS, ids=_id)
def test_lamb_matches_reference(kernels, dtype, hp):
    K.check_lamb(kernels, CUDA, K.AWKWARD_SHAPES, dtype, hp)
    K.check_lamb(kernels, CUDA, K.AWKWARD_SHAPES, dtype, hp, lr_as_tensor=True, grad_scale=512.0,
                 clip_divisor=torch.tensor(1.5, device=CUDA))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_found_inf_changes_nothing(kernels, dtype):
    K.check_skip_changes_nothing(kernels, CUDA, dtype)


# ---- against torch.optim.SGD(fused=True) --------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hp", [dict(momentum=0.0), dict(momentum=0.9), dict(momentum=0.9, nesterov=True),
                                dict(momentum=0.9, dampening=0.1, weight_decay=1e-2),
                                dict(momentum=0.9, nesterov=True, weight_decay=5e-4, maximize=True)], ids=_id)
def test_matches_torch_fused_sgd(kernels, dtype, hp):
    shapes = [(64, 3, 7, 7), (64,), (1000, 2048), (1000,), (1,), (4097,)]
    ours = K.make_tensors(shapes, dtype, CUDA)
    theirs = [p.clone() for p in ours]
    ps = [torch.nn.Parameter(p) for p in ours]
    ts = [torch.nn.Parameter(p) for p in theirs]
    opt = fastsgd.SGD(ps, lr=0.05, backend=kernels.NAME, **hp)
    torch_opt = torch.optim.SGD(ts, lr=0.05, fused=True, **hp)
    for step in range(5):
        for p, t, g in zip(ps, ts, K.make_tensors(shapes, dtype, CUDA, seed=100 + step)):
            p.grad, t.grad = g.clone(), g.clone()
        opt.step()
        torch_opt.step()
    K.assert_all_close([p.detach() for p in ps], [t.detach() for t in ts], dtype, "param vs torch fused")


# ---- CUDA graphs: capture once, replay with a changing lr -----------------------

GRAPH_OPTIMIZERS = {
    "Momentum": lambda ps, lr, b: fastsgd.Momentum(ps, lr=lr, weight_decay=1e-4, backend=b),
    "Nesterov": lambda ps, lr, b: fastsgd.Nesterov(ps, lr=lr, backend=b),
    "LARS": lambda ps, lr, b: fastsgd.LARS(ps, lr=lr, weight_decay=1e-4, trust_clip=True, backend=b),
    "LAMB": lambda ps, lr, b: fastsgd.LAMB(ps, lr=lr, weight_decay=0.01, backend=b),
}


@pytest.mark.parametrize("name", list(GRAPH_OPTIMIZERS))
def test_cuda_graph_capture_and_replay_with_changing_lr(kernels, name):
    shapes = [(257, 129), (1,), (4097,), (0,), (33, 3, 3)]
    init = K.make_tensors(shapes, torch.float32, CUDA)
    ps = [torch.nn.Parameter(t.clone()) for t in init]
    refs = [torch.nn.Parameter(t.clone()) for t in init]
    lr = torch.tensor(0.1, device=CUDA)
    opt = GRAPH_OPTIMIZERS[name](ps, lr, kernels.NAME)
    ref_opt = GRAPH_OPTIMIZERS[name](refs, lr, "reference")

    def set_grads(seed):
        for p, r, g in zip(ps, refs, K.make_tensors(shapes, torch.float32, CUDA, seed=seed)):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.copy_(g)  # in place: the graph reads the grads' addresses
            r.grad = g.clone()

    set_grads(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # eager warm-up creates state and the tensor tables
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    ref_opt.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for i in range(80):  # more tensor sets than the table caches hold: the graph's tables must survive
        q = torch.zeros(3 + i, device=CUDA)
        kernels.sgd_step([q], [torch.ones_like(q)], None, lr=0.1)
    for step, value in enumerate([0.05, 0.2, 0.01]):
        lr.fill_(value)
        set_grads(step + 1)
        graph.replay()
        ref_opt.step()
    torch.cuda.synchronize()
    K.assert_all_close([p.detach() for p in ps], [r.detach() for r in refs], torch.float32, f"{name} replayed")


def test_capture_with_a_missing_table_raises():
    """State and tables must exist before capture: new gradient tensors since
    the warm-up step mean a new table, which cannot be copied during capture."""
    if not HAS_CUDA:
        requirements.missing("needs a CUDA device")
    p = torch.nn.Parameter(torch.randn(100, device=CUDA))
    p.grad = torch.randn(100, device=CUDA)
    opt = fastsgd.Momentum([p], lr=torch.tensor(0.1, device=CUDA), backend="triton")
    with pytest.raises(RuntimeError, match="before CUDA graph capture"):  # no state yet (base class)
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            opt.step()
    opt.step()
    p.grad = torch.randn(100, device=CUDA)  # a new address: the cached table no longer applies
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="table must be built before CUDA graph capture"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            opt.step()
    torch.cuda.synchronize()
    assert torch.equal(p.detach(), before)


# ---- a tensor past 2^31 elements ----------------------------------------------

def _need_free_bytes(n):
    free, _ = torch.cuda.mem_get_info()
    if free < n:
        pytest.skip(f"needs {n / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")


def test_tensor_over_2_31_elements(kernels):
    n = 2 ** 31 + 4099
    _need_free_bytes(3 * 2 * n + n + 2 ** 30)  # bf16 param, grad, buffer; a bool mask; slack
    p = torch.ones(n, dtype=torch.bfloat16, device=CUDA)
    g = torch.ones(n, dtype=torch.bfloat16, device=CUDA)
    g[-3:] = 2.0  # past 2^31: only a correct 64-bit offset reaches these
    b = torch.zeros_like(p)
    kernels.sgd_step([p], [g], [b], lr=0.25, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False,
                     maximize=False, lr_in_momentum=False, first_step=[True])
    assert p[0].item() == 0.75 and p[2 ** 31 - 1].item() == 0.75 and p[2 ** 31 + 7].item() == 0.75
    assert p[-3:].tolist() == [0.5, 0.5, 0.5] and b[-1].item() == 2.0
    assert int((p == 0.75).sum()) == n - 3  # every element once, none twice
    # LARS: the trust ratio needs the norm over all n elements.
    p.fill_(1.0)
    g.fill_(1.0)
    kernels.lars_step([p], [g], None, lr=1.0, momentum=0.0, weight_decay=0.5, trust_coeff=0.02, first_step=True)
    ratio = 0.02 / 1.5  # ||p|| = ||g|| = sqrt(n): r = tc / (1 + wd)
    expected = torch.tensor(1.0 - 1.5 * ratio, dtype=torch.bfloat16).item()
    assert p[0].item() == expected and p[-1].item() == expected


# ---- torch.compile -------------------------------------------------------------

def test_torch_compile_of_a_training_step(kernels):
    K.check_compiled_training_step(
        lambda params: fastsgd.Nesterov(params, lr=0.1, weight_decay=1e-4, backend=kernels.NAME),
        device=CUDA, compile_backend="inductor", steps=4)


# ---- launches per step ----------------------------------------------------------

@pytest.mark.parametrize("name,limit", [("Nesterov", 1), ("LARS", 3), ("LAMB", 3)])
def test_launches_per_step(name, limit):
    if not HAS_CUDA:
        requirements.missing("needs a CUDA device")
    shapes = [(i % 7 + 1, 97 * (i % 5) + 3) for i in range(300)] + [(2048, 1024)]
    ps = [torch.nn.Parameter(t) for t in K.make_tensors(shapes, torch.float32, CUDA)]
    for p in ps:
        p.grad = torch.randn_like(p)
    lr = torch.tensor(0.1, device=CUDA)
    opt = GRAPH_OPTIMIZERS[name](ps, lr, "triton")
    opt.step()  # creates state and the table
    launched = K.cuda_kernel_launches(opt.step)
    assert 1 <= len(launched) <= limit, launched


# ---- LARS/LAMB: a tensor that fits one program/block, norms and update in one launch ----

def _fused_max(kernels) -> int:
    return kernels.CHUNK_SIZE if kernels.NAME == "cuda" else kernels.common.GPU_CONFIG.fused_max


def _gpu_fused_layout(kernels, layout):
    f = _fused_max(kernels)
    fused = [(1,), (7,), (3, 5, 7), (f - 1,), (f,), (f // 64, 64), (1000,)]
    return fused if layout == "all_fused" else fused + [(f + 1,), (0,), (2 * f + 5,), (512, 1000)]


def _gpu_run(kernels, op, shapes, dtype, steps=3):
    params = K.make_tensors(shapes, dtype, CUDA)
    states = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    counts = [torch.zeros((), device=CUDA) for _ in params]
    for step in range(steps):
        grads = K.make_tensors(shapes, dtype, CUDA, seed=100 + step)
        lr = torch.tensor(K.LRS[step], device=CUDA)
        if op == "lars":
            kernels.lars_step(params, grads, states[0], lr=lr, momentum=0.9, weight_decay=1e-4, nesterov=True,
                              trust_clip=True, first_step=step == 0)
        else:
            kernels.lamb_step(params, grads, *states, counts, lr=lr, weight_decay=0.01)
    return params + states[0] + (states[1] + counts if op == "lamb" else [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["all_fused", "mixed"])
@pytest.mark.parametrize("op", ["lars", "lamb"])
def test_fused_equals_two_pass_bit_for_bit(kernels, monkeypatch, op, layout, dtype):
    """The fused path sums squares in the 2-pass order: the same bits, compiled for the GPU too."""
    from fastsgd.kernels import gpu_passes
    shapes = _gpu_fused_layout(kernels, layout)
    monkeypatch.delenv(gpu_passes.TWO_PASS_ENV, raising=False)
    fused = _gpu_run(kernels, op, shapes, dtype)
    monkeypatch.setenv(gpu_passes.TWO_PASS_ENV, "1")
    two_pass = _gpu_run(kernels, op, shapes, dtype)
    for i, (a, b) in enumerate(zip(fused, two_pass)):
        assert torch.equal(a, b), f"tensor {i} {tuple(a.shape)}: fused and 2-pass differ"


@pytest.mark.parametrize("op,layout,fused,two_pass", [("lars", "all_fused", 1, 3), ("lars", "mixed", 3, 3),
                                                      ("lamb", "all_fused", 1, 3), ("lamb", "mixed", 3, 3)])
def test_fused_launches(kernels, monkeypatch, op, layout, fused, two_pass):
    from fastsgd.kernels import gpu_passes
    shapes = _gpu_fused_layout(kernels, layout)
    params = K.make_tensors(shapes, torch.float32, CUDA)
    grads = K.make_tensors(shapes, torch.float32, CUDA, seed=1)
    states = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    counts = [torch.zeros((), device=CUDA) for _ in params]
    lr = torch.tensor(0.1, device=CUDA)

    def step():
        if op == "lars":
            kernels.lars_step(params, grads, states[0], lr=lr, momentum=0.9, weight_decay=1e-4)
        else:
            kernels.lamb_step(params, grads, *states, counts, lr=lr, weight_decay=0.01)

    for env, expected in (("0", fused), ("1", two_pass)):
        monkeypatch.setenv(gpu_passes.TWO_PASS_ENV, env)
        step()  # builds and caches the tables (their upload is a copy, not counted anyway)
        launched = K.cuda_kernel_launches(step)
        assert len(launched) == expected, (env, launched)


# ---- stochastic rounding on the GPU --------------------------------------------

def test_stochastic_rounding_is_unbiased_on_the_gpu():
    if not HAS_CUDA:
        requirements.missing("needs a CUDA device")
    from fastsgd.kernels import triton_optim as T
    x = 1.0 + 0.3 * 2 ** -7
    n = 1 << 20
    T.manual_seed(7, CUDA)
    p, g = torch.zeros(n, device=CUDA), torch.full((n,), x, device=CUDA)
    b = torch.zeros(n, dtype=torch.bfloat16, device=CUDA)
    T.sgd_step([p], [g], [b], lr=0.0, momentum=0.9, first_step=True, stochastic_rounding=True)
    first = b.float().clone()
    T.sgd_step([p], [g], [b], lr=0.0, momentum=0.9, first_step=True, stochastic_rounding=True)
    sigma = 2 ** -7 * (0.21 / n) ** 0.5
    assert abs(first.mean().item() - x) < 5 * sigma
    assert not torch.equal(first, b.float())  # fresh bits each call
    T.manual_seed(7, CUDA)
    T.sgd_step([p], [g], [b], lr=0.0, momentum=0.9, first_step=True, stochastic_rounding=True)
    assert torch.equal(first, b.float())  # same seed, same bits


# ---- compile-only check, no GPU needed ------------------------------------------

@pytest.mark.parametrize("family", ["optimizer", "ghost_bn"])
@pytest.mark.parametrize("arch", [80, 90])
def test_triton_kernels_compile_for_gpu(arch, family):
    """Every Triton kernel variant compiles to a cubin for sm_80 and sm_90 with
    Triton's bundled ptxas (no GPU needed). A fresh process: the kernels must
    be defined without TRITON_INTERPRET, which this session may have set."""
    requirements.triton()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "triton_compile.py"), str(arch),
                           family], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-10000:]
    assert int(proc.stdout.split()[-1]) == {"optimizer": 18, "ghost_bn": 8}[family]


# ---- two devices: params on cuda:1 while the caller is on cuda:0 -------------------

@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("op", ["sgd", "lars", "lamb"])
def test_step_on_the_second_gpu_matches_reference_and_keeps_the_callers_device(backend, op):
    """Launches go to the params' device (not the current one), and the
    current device is the caller's again after the step."""
    requirements.gpu(backend, count=2)
    kernels = get_backend(backend, torch.device("cuda", 1), {torch.float32})
    dev1 = torch.device("cuda", 1)
    torch.cuda.set_device(0)
    shapes = [(37,), (1000, 3), (4097,)]
    params = K.make_tensors(shapes, torch.float32, dev1)
    grads = K.make_tensors(shapes, torch.float32, dev1, seed=1)
    states = [torch.zeros_like(p) for p in params]
    ref_p, ref_s = [p.clone() for p in params], [s.clone() for s in states]
    if op == "lamb":
        v, ref_v = [s.clone() for s in states], [s.clone() for s in states]
        steps = [torch.zeros((), device=dev1) for _ in params]
        ref_steps = [s.clone() for s in steps]
        kernels.lamb_step(params, grads, states, v, steps, lr=0.01, weight_decay=0.01)
        reference_ops = importlib.import_module("fastsgd.kernels.reference")
        reference_ops.lamb_step(ref_p, grads, ref_s, ref_v, ref_steps, lr=0.01, weight_decay=0.01)
    else:
        kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-4, first_step=True)
        getattr(kernels, f"{op}_step")(params, grads, states, **kw)
        getattr(importlib.import_module("fastsgd.kernels.reference"), f"{op}_step")(ref_p, grads, ref_s, **kw)
    torch.cuda.synchronize(dev1)
    assert torch.cuda.current_device() == 0
    K.assert_all_close(params, ref_p, torch.float32, f"{backend} {op} on cuda:1")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_optimizer_on_the_second_gpu(backend):
    requirements.gpu(backend, count=2)
    torch.cuda.set_device(0)
    model = torch.nn.Linear(64, 32).to("cuda:1")
    ref = torch.nn.Linear(64, 32).to("cuda:1")
    ref.load_state_dict(model.state_dict())
    opt = fastsgd.Nesterov(model.parameters(), lr=0.05, backend=backend)
    ref_opt = fastsgd.Nesterov(ref.parameters(), lr=0.05, backend="reference")
    for _ in range(3):
        x = torch.randn(16, 64, device="cuda:1")
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad(set_to_none=True)
            m(x).square().mean().backward()
            o.step()
    assert torch.cuda.current_device() == 0
    K.assert_all_close(list(model.parameters()), list(ref.parameters()), torch.float32, f"{backend} on cuda:1")
