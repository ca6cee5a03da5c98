"""Shared cases for testing a kernel backend against the reference.

Every backend test (cpu, triton, cuda) calls ``check_sgd``, ``check_lars`` and
``check_lamb`` with its kernel module and device, so all backends face the same
awkward shapes, dtypes and hyperparameters. The reference runs on float64
copies of the same starting tensors; results are compared in the backend's
dtype with the tolerances below.
"""
from __future__ import annotations

import itertools
from typing import Dict, List, Sequence

import torch

from fastsgd.kernels import reference

# Empty, one element, primes, and sizes straddling common block/chunk sizes.
AWKWARD_SHAPES: List[tuple] = [(0,), (1,), (7,), (13, 17), (127,), (1023,), (1024,), (1025,), (2, 3, 5, 7),
                               (4097,), (65537,)]

# atol/rtol per dtype: the backend computes in fp32 (fp64 for fp64) and
# rounds once; the reference computes in fp64 and rounds once, so results may
# differ by an ulp or two of the storage dtype after a few steps.
TOLERANCES: Dict[torch.dtype, dict] = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}

SGD_HPARAMS: List[dict] = [
    dict(momentum=0.0),
    dict(momentum=0.9),
    dict(momentum=0.9, nesterov=True),
    dict(momentum=0.9, dampening=0.1),
    dict(momentum=0.5, weight_decay=0.01),
    dict(momentum=0.9, nesterov=True, weight_decay=1e-3, maximize=True),
    dict(momentum=0.9, lr_in_momentum=True),
    dict(momentum=0.9, nesterov=True, lr_in_momentum=True, weight_decay=1e-2),
    dict(momentum=0.0, weight_decay=0.1, maximize=True),
]

LARS_HPARAMS: List[dict] = [
    dict(momentum=0.9, weight_decay=0.0),
    dict(momentum=0.9, weight_decay=1e-4),
    dict(momentum=0.9, weight_decay=1e-4, nesterov=True, trust_clip=True),
    dict(momentum=0.0, weight_decay=0.0, always_adapt=True, trust_coeff=0.02),
    dict(momentum=0.9, dampening=0.1, weight_decay=5e-4, lr_in_momentum=True),
]

LAMB_HPARAMS: List[dict] = [
    dict(weight_decay=0.01),
    dict(weight_decay=0.0),
    dict(weight_decay=0.0, always_adapt=True, trust_clip=True),
    dict(weight_decay=0.1, bias_correction=False, beta1=0.8, beta2=0.99, eps=1e-3),
]

LRS = (0.1, 0.05, 0.2)  # a changing lr: one value per step


def make_tensors(shapes: Sequence[tuple], dtype: torch.dtype, device, seed: int = 0) -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype) for s in shapes]


def _clone(ts):
    return [t.clone() for t in ts]


def assert_all_close(actual, expected, dtype, what):
    tol = TOLERANCES[dtype]
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a.cpu(), e.to(a.dtype).cpu(), **tol,
                                   msg=lambda m, i=i: f"{what}[{i}] shape {tuple(a.shape)} {dtype}: {m}")


def _grads(shapes, dtype, device, step):
    return make_tensors(shapes, dtype, device, seed=1000 + step)


def _not_the_reference(kernels) -> None:
    """The cases compare a backend with the reference: the reference against
    itself would pass whatever it computes."""
    if kernels is reference:
        raise ValueError("kernel_cases compare a backend with fastsgd.kernels.reference; "
                         "passing the reference itself tests nothing")


def _lr(lr, lr_as_tensor, device):
    return torch.tensor(lr, dtype=torch.float32, device=device) if lr_as_tensor else lr


def _check_momentum_rule(step_name, kernels, device, shapes, dtype, hp, *, steps, lr_as_tensor, grad_scale):
    """``steps`` steps of sgd_step or lars_step (same arguments) with a changing
    lr on ``kernels`` and on the reference; params and momentum buffers must match."""
    _not_the_reference(kernels)
    params = make_tensors(shapes, dtype, device)
    ref_params = _clone(params)
    has_buf = hp.get("momentum", 0.0) != 0
    bufs = [torch.zeros_like(p) for p in params] if has_buf else None
    ref_bufs = [torch.zeros_like(p) for p in params] if has_buf else None
    for step in range(steps):
        grads = _grads(shapes, dtype, device, step)
        scale = None
        if grad_scale is not None:
            scale = torch.tensor(grad_scale, dtype=torch.float32, device=device)
            grads = [(g.double() * grad_scale).to(dtype) for g in grads]
        kw = dict(hp, first_step=[step == 0] * len(shapes), grad_scale=scale)
        lr = _lr(LRS[step % 3], lr_as_tensor, device)  # the same lr (a float32 tensor too) for both
        getattr(kernels, step_name)(params, grads, bufs, lr=lr, **kw)
        getattr(reference, step_name)(ref_params, grads, ref_bufs, lr=lr, **kw)
    assert_all_close(params, ref_params, dtype, "param")
    if has_buf:
        assert_all_close(bufs, ref_bufs, dtype, "momentum_buffer")


def check_sgd(kernels, device, shapes, dtype, hp, *, steps=3, lr_as_tensor=False, grad_scale=None):
    _check_momentum_rule("sgd_step", kernels, device, shapes, dtype, hp, steps=steps, lr_as_tensor=lr_as_tensor,
                         grad_scale=grad_scale)


def check_lars(kernels, device, shapes, dtype, hp, *, steps=3, lr_as_tensor=False, grad_scale=None):
    _check_momentum_rule("lars_step", kernels, device, shapes, dtype, hp, steps=steps, lr_as_tensor=lr_as_tensor,
                         grad_scale=grad_scale)


def check_lamb(kernels, device, shapes, dtype, hp, *, steps=3, lr_as_tensor=False, grad_scale=None,
               clip_divisor=None):
    _not_the_reference(kernels)
    params = make_tensors(shapes, dtype, device)
    ref_params = _clone(params)
    state = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    ref_state = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    steps_t = [torch.zeros((), dtype=torch.float32, device=device) for _ in params]
    ref_steps = [torch.zeros((), dtype=torch.float32, device=device) for _ in params]
    for step in range(steps):
        grads = _grads(shapes, dtype, device, step)
        scale = None
        if grad_scale is not None:
            scale = torch.tensor(grad_scale, dtype=torch.float32, device=device)
            grads = [(g.double() * grad_scale).to(dtype) for g in grads]
        kw = dict(hp, grad_scale=scale, clip_divisor=clip_divisor)
        lr = _lr(LRS[step % 3], lr_as_tensor, device)
        kernels.lamb_step(params, grads, *state, steps_t, lr=lr, **kw)
        reference.lamb_step(ref_params, grads, *ref_state, ref_steps, lr=lr, **kw)
    assert_all_close(params, ref_params, dtype, "param")
    assert_all_close(state[0], ref_state[0], dtype, "exp_avg")
    assert_all_close(state[1], ref_state[1], dtype, "exp_avg_sq")
    assert [float(s) for s in steps_t] == [float(s) for s in ref_steps]


def check_skip_changes_nothing(kernels, device, dtype=torch.float32):
    """found_inf set: params, buffers and LAMB steps stay bit-identical."""
    shapes = [(5,), (33,)]
    found = torch.ones((), dtype=torch.float32, device=device)
    scale = torch.full((), 1024.0, device=device)
    params = make_tensors(shapes, dtype, device)
    before = _clone(params)
    grads = [torch.full_like(p, float("inf")) for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    kernels.sgd_step(params, grads, bufs, lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0,
                     nesterov=False, maximize=False, lr_in_momentum=False, first_step=[True, True],
                     grad_scale=scale, found_inf=found)
    kernels.lars_step(params, grads, bufs, lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-4,
                      nesterov=False, trust_coeff=0.001, eps=1e-8, trust_clip=False, always_adapt=False,
                      lr_in_momentum=False, first_step=[True, True], grad_scale=scale, found_inf=found)
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    steps = [torch.zeros((), device=device) for _ in params]
    kernels.lamb_step(params, grads, m, v, steps, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-6,
                      weight_decay=0.01, bias_correction=True, trust_clip=False, always_adapt=False,
                      grad_scale=scale, found_inf=found)
    for a, b in zip(params, before):
        assert torch.equal(a, b)
    for t in bufs + m + v:
        assert torch.count_nonzero(t) == 0
    assert all(float(s) == 0 for s in steps)


def sgd_cases(dtypes, shapes=AWKWARD_SHAPES):
    """(dtype, hp) pairs, each run over all ``shapes`` in one call (one fused call per step)."""
    return list(itertools.product(dtypes, SGD_HPARAMS))


# ---- torch.compile of a training step ------------------------------------------------

def check_compiled_training_step(make_optimizer, device="cpu", compile_backend="aot_eager", steps=3) -> None:
    """torch.compile of forward + backward + ``opt.step()`` + zero_grad equals
    the eager run, and the only graph break fastsgd causes is the deliberate
    one at the step (FusedOptimizer._step is torch.compiler.disable'd), not
    a scatter of breaks inside its Python. ``make_optimizer(params)`` builds
    the optimizer under test."""
    from torch._dynamo.utils import counters

    def train(compiled):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1)).to(device)
        opt = make_optimizer(model.parameters())

        def step(x, y):
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss

        if compiled:
            step = torch.compile(step, backend=compile_backend)
        gen = torch.Generator(device=device).manual_seed(1)
        for _ in range(steps):
            step(torch.randn(32, 8, device=device, generator=gen), torch.randn(32, 1, device=device, generator=gen))
        return [p.detach().clone() for p in model.parameters()]

    torch._dynamo.reset()
    counters.clear()
    for a, e in zip(train(True), train(False)):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)
    ours = [reason for reason in counters["graph_break"] if "fastsgd" in reason or "FusedOptimizer" in reason]
    assert ours and all("FusedOptimizer._step" in r and "torch.compiler.disable" in r for r in ours), ours


def cuda_kernel_launches(fn) -> List[str]:
    """Names of the CUDA kernels one call of ``fn`` launches (copies and memsets left out), from the
    profiler; the GPU launch-count tests of every backend read it."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
            and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
