"""fastsgd.SGD against torch.optim.SGD on PyTorch's own optimizer test inputs.

The inputs come from the optimizer database that ships in the torch wheel
(``torch.testing._internal.common_optimizers.optim_db``, the SGD entry): every
``optim_inputs_func`` configuration runs through both optimizers for several
steps on the same params and gradients and must give the same params and
momentum buffers; every ``optim_error_inputs_func`` input must raise the same
exception type (and match torch's message pattern). So a torch release that
adds an SGD option or an error case shows up here.

Backends: reference and cpu in this process; triton through the Triton
interpreter on CPU tensors, in a fresh interpreter process when triton was
already imported without ``TRITON_INTERPRET=1`` (Triton decides at import);
on a machine with CUDA, triton and cuda on the GPU.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.testing._internal.common_optimizers import OptimizerErrorEnum, optim_db

import fastsgd

SGD_INFO = next(info for info in optim_db if info.optim_cls is torch.optim.SGD)
STEPS = 5
SHAPES = [(10, 5), (10,), (3, 4, 5), (1,), ()]

_available = fastsgd.available_backends()
CUDA = torch.cuda.is_available()
TRITON_HERE = not CUDA and os.environ.get("TRITON_INTERPRET") == "1" and _available["triton"] is None
if CUDA:  # GPU backends on the GPU, CPU backends on the CPU
    CASES = [("reference", "cpu"), ("cpu", "cpu")] + [(b, "cuda") for b in ("triton", "cuda") if _available[b] is None]
elif TRITON_HERE:  # the fresh interpreter process below runs only these
    CASES = [("triton", "cpu")]
else:
    CASES = [("reference", "cpu"), ("cpu", "cpu")]


def _dtypes(backend):
    return [torch.float32] if backend == "triton" else [torch.float32, torch.float64]


def _inputs(device, dtype):
    return [(oi.kwargs, oi.desc) for oi in SGD_INFO.optim_inputs_func(device=device, dtype=dtype)]


def _params(device, dtype):
    g = torch.Generator().manual_seed(0)
    values = [torch.randn(s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) for s in SHAPES]
    return [nn.Parameter(v.clone()) for v in values], [nn.Parameter(v.clone()) for v in values]


CONFIGS = [pytest.param(backend, device, dtype, kwargs, id=f"{backend}-{device}-{str(dtype)[6:]}-{desc}")
           for backend, device in CASES for dtype in _dtypes(backend) for kwargs, desc in _inputs(device, dtype)]


def test_torch_database_has_the_sgd_inputs():
    # an empty database entry would make every parametrised test below vanish quietly
    assert len(_inputs("cpu", torch.float32)) >= 5
    assert len(SGD_INFO.optim_error_inputs_func(device="cpu", dtype=torch.float32)) >= 3


@pytest.mark.parametrize("backend,device,dtype,kwargs", CONFIGS)
def test_every_torch_input_config_steps_like_torch(backend, device, dtype, kwargs, monkeypatch):
    if backend == "triton" and device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # read again at the first launch
    ours, theirs = _params(device, dtype)
    o_fast = fastsgd.SGD(ours, backend=backend, **kwargs)
    o_torch = torch.optim.SGD(theirs, **kwargs)
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        for p, q in zip(ours, theirs):
            grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
            p.grad, q.grad = grad.clone(), grad.clone()
        o_fast.step()
        o_torch.step()
    # assert_close's defaults for the dtype: what torch's own optimizer tests use
    for i, (p, q) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(p, q, msg=lambda m, i=i: f"param {i} {tuple(p.shape)}: {m}")
        b_fast, b_torch = o_fast.state[p].get("momentum_buffer"), o_torch.state[q].get("momentum_buffer")
        assert (b_fast is None) == (b_torch is None), f"param {i}: momentum buffer in one optimizer only"
        if b_torch is not None:
            torch.testing.assert_close(b_fast, b_torch, msg=lambda m, i=i: f"buffer {i}: {m}")


ERROR_CASES = [pytest.param(backend, device, i, id=f"{backend}-{device}-{i}") for backend, device in CASES
               for i in range(len(SGD_INFO.optim_error_inputs_func(device=device, dtype=torch.float32)))]


@pytest.mark.parametrize("backend,device,index", ERROR_CASES)
def test_every_torch_error_input_raises_the_same_exception(backend, device, index):
    err = SGD_INFO.optim_error_inputs_func(device=device, dtype=torch.float32)[index]
    oi = err.optimizer_error_input
    expect = pytest.warns if issubclass(err.error_type, Warning) else pytest.raises

    def run(cls, **extra):
        opt = cls(oi.params, **oi.kwargs, **extra)
        if err.error_on == OptimizerErrorEnum.STEP_ERROR:
            opt.step()

    with expect(err.error_type, match=err.error_regex):
        run(torch.optim.SGD)
    with expect(err.error_type, match=err.error_regex):
        run(fastsgd.SGD, backend=backend)


@pytest.mark.skipif(CUDA or TRITON_HERE, reason="the triton cases run in this process")
def test_triton_backend_in_a_fresh_interpreter_process():
    """The triton configurations of this file, with TRITON_INTERPRET=1 set before triton is imported."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    # run from this folder: `python -m pytest` puts its working directory first on sys.path, and from the
    # checkout's root that would import the source tree instead of the installed package
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                           "-k", "triton-cpu"], env=env, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)))
    out = proc.stdout[-20000:] + proc.stderr[-5000:]
    assert proc.returncode == 0 and " passed" in out and " skipped" not in out, out  # 5: nothing ran
