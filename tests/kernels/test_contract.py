"""The kernel contract (fastsgd/kernels/contract.py): every backend's op
signatures, and a test matrix read from each backend's Capabilities record --
what it declares it can do runs and matches the reference, what it declares
it cannot do raises a clear error."""
from __future__ import annotations

import importlib

import kernel_cases as K
import pytest
import torch

from fastsgd import backends
from fastsgd.kernels import contract, reference


def _modules(family):
    """Every registered backend module that imports here (triton needs triton installed)."""
    out = []
    for name, path in backends.REGISTRY[family].items():
        try:
            out.append(pytest.param(importlib.import_module(path), id=name))
        except ImportError as exc:
            out.append(pytest.param(None, id=name, marks=pytest.mark.skip(reason=f"{path}: {exc}")))
    return out


@pytest.mark.parametrize("op", list(contract.OPS))
@pytest.mark.parametrize("mod", _modules("optimizer"))
def test_op_signatures_match_the_contract(mod, op):
    assert contract.signature_mismatch(op, getattr(mod, op)) is None


@pytest.mark.parametrize("family", list(backends.REGISTRY))
def test_every_backend_declares_its_capabilities(family):
    for name, path in backends.REGISTRY[family].items():
        try:
            mod = importlib.import_module(path)
        except ImportError:
            continue
        caps = mod.CAPABILITIES
        assert isinstance(caps, contract.Capabilities) and caps.name == name == mod.NAME
        assert callable(mod.unavailable_reason) and callable(mod.supports)


def _available(device_type):
    """Optimizer backends that run on this machine's test device."""
    device = torch.device(device_type)
    out = []
    for name in backends.REGISTRY["optimizer"]:
        try:
            mod = backends.get_backend(name, device, {torch.float32})
        except (backends.BackendUnavailable, TypeError):
            continue
        out.append(pytest.param(mod, id=name))
    return out


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("mod", _available(DEVICE))
def test_get_backend_follows_declared_dtypes_and_layouts(mod):
    caps = mod.CAPABILITIES
    for dt in contract.FLOATS:
        if dt in caps.dtypes:
            assert backends.get_backend(caps.name, torch.device(DEVICE), {dt}) is mod
        else:
            with pytest.raises(TypeError, match=f"does not support {dt}"):
                backends.get_backend(caps.name, torch.device(DEVICE), {dt})
    if caps.strided:
        assert backends.get_backend(caps.name, torch.device(DEVICE), {torch.float32}, dense=False) is mod
    else:
        with pytest.raises(TypeError, match="needs dense parameters"):
            backends.get_backend(caps.name, torch.device(DEVICE), {torch.float32}, dense=False)


@pytest.mark.parametrize("mod", _available(DEVICE))
def test_stacked_trials_run_or_are_refused(mod):
    trials = 3
    params = K.make_tensors([(trials, 5), (trials, 130)], torch.float32, DEVICE)
    grads = K.make_tensors([(trials, 5), (trials, 130)], torch.float32, DEVICE, seed=1)
    bufs = [torch.zeros_like(p) for p in params]
    lr = torch.tensor([0.1, 0.05, 0.0], device=DEVICE if mod.CAPABILITIES.device_scalars else "cpu")
    if not mod.CAPABILITIES.stacked_trials:
        with pytest.raises((ValueError, NotImplementedError), match="stacked trials"):
            mod.sgd_step(params, grads, bufs, lr=lr, momentum=0.9, first_step=True, stacked_trials=True)
        return
    ref_p, ref_b = [p.clone() for p in params], [b.clone() for b in bufs]
    mod.sgd_step(params, grads, bufs, lr=lr, momentum=0.9, first_step=True, stacked_trials=True)
    reference.sgd_step(ref_p, grads, ref_b, lr=lr, momentum=0.9, first_step=True, stacked_trials=True)
    K.assert_all_close(params, ref_p, torch.float32, "stacked trials")


@pytest.mark.parametrize("mod", [m for m in _available(DEVICE) if m.values[0] is not reference])
def test_stochastic_rounding_runs_or_is_refused(mod):
    params = K.make_tensors([(300,)], torch.float32, DEVICE)
    grads = K.make_tensors([(300,)], torch.float32, DEVICE, seed=1)
    bufs = [torch.zeros(300, dtype=torch.bfloat16, device=DEVICE)]
    if not mod.CAPABILITIES.stochastic_rounding:
        with pytest.raises((ValueError, NotImplementedError), match="stochastic_rounding"):
            mod.sgd_step(params, grads, bufs, lr=0.1, momentum=0.9, first_step=True, stochastic_rounding=True)
        return
    ref_p, ref_b = [p.clone() for p in params], [b.clone() for b in bufs]
    mod.sgd_step(params, grads, bufs, lr=0.1, momentum=0.9, first_step=True, stochastic_rounding=True)
    reference.sgd_step(ref_p, grads, ref_b, lr=0.1, momentum=0.9, first_step=True)
    # one bf16 step of the buffer either way (rounded down or up)
    torch.testing.assert_close(bufs[0].float(), ref_b[0].float(), rtol=2 ** -7, atol=0)


@pytest.mark.parametrize("mod", _modules("ghost_bn"))
def test_ghost_bn_backends_follow_declared_dtypes(mod):
    caps = mod.CAPABILITIES
    device = torch.device(DEVICE)
    for dt in contract.FLOATS:
        x = torch.randn(8, 3, dtype=dt, device=device)
        if mod.supports(device, dt):
            assert backends.get_backend(caps.name, device, {dt}, family="ghost_bn") is mod
            from fastsgd.nn import ghost_batch_norm
            assert ghost_batch_norm(x, None, None, training=True, ghost_batch_size=4,
                                    backend=caps.name).shape == x.shape
        else:
            with pytest.raises(TypeError, match="does not support"):
                backends.get_backend(caps.name, device, {dt}, family="ghost_bn")
