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
        able = backends.stacked_trial_backends()  # the advice names exactly the backends that can
        assert able and mod.CAPABILITIES.name not in able
        with pytest.raises((ValueError, NotImplementedError), match="stacked trials") as err:
            mod.sgd_step(params, grads, bufs, lr=lr, momentum=0.9, first_step=True, stacked_trials=True)
        named = {name for name in backends.REGISTRY["optimizer"] if repr(name) in str(err.value)}
        assert named == set(able) | {mod.CAPABILITIES.name}, str(err.value)
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


def _op_args(op, shapes, device):
    """(positional tensor lists, the lists a step may modify) for one call of ``op`` on fresh tensors."""
    params = K.make_tensors(shapes, torch.float32, device)
    grads = K.make_tensors(shapes, torch.float32, device, seed=1)
    if op == "lamb_step":
        state = [torch.full_like(p, 0.1) for p in params], [torch.full_like(p, 0.2) for p in params], \
            [torch.zeros((), dtype=torch.float32, device=device) for _ in params]
        return (params, grads, *state), [params, *state]
    bufs = [torch.full_like(p, 0.1) for p in params]
    return (params, grads, bufs), [params, bufs]


# The hyperparameters of each op that may be tensors, and a value for each.
_TENSOR_HPARAMS = {"sgd_step": {"lr": 0.05, "momentum": 0.9}, "lars_step": {"lr": 0.05, "momentum": 0.9},
                   "lamb_step": {"lr": 0.05, "clip_divisor": 2.0}}


@pytest.mark.parametrize("op", list(contract.OPS))
@pytest.mark.parametrize("mod", _available(DEVICE))
def test_several_values_without_stacked_trials_are_refused_never_stacked(mod, op):
    """Params whose first dimension (3) equals the number of values in a hyperparameter tensor: the shape
    that could pass for stacked trials. Without ``stacked_trials=True`` (lars_step and lamb_step have no such
    mode) every backend refuses it, naming the problem, before it modifies anything."""
    hp_device = DEVICE if mod.CAPABILITIES.device_scalars else "cpu"
    for name, value in _TENSOR_HPARAMS[op].items():
        args, modified = _op_args(op, [(3, 5), (3, 130)], DEVICE)
        before = [t.clone() for ts in modified for t in ts]
        kw = dict(_TENSOR_HPARAMS[op], **{name: torch.tensor([value, value / 2, value / 4], device=hp_device)})
        with pytest.raises((ValueError, NotImplementedError), match=r"stacked.trials") as err:
            getattr(mod, op)(*args, **kw)
        if isinstance(err.value, ValueError):
            assert name in str(err.value)
        after = [t for ts in modified for t in ts]
        assert all(torch.equal(a, b) for a, b in zip(after, before)), f"{op} modified tensors before refusing"


@pytest.mark.parametrize("op", list(contract.OPS))
@pytest.mark.parametrize("mod", _available(DEVICE))
def test_a_one_element_hyperparameter_tensor_is_one_value(mod, op):
    """``lr=torch.tensor([0.05])`` (as torch.optim takes it) is the float 0.05 on every backend and op."""
    hp_device = DEVICE if mod.CAPABILITIES.device_scalars else "cpu"
    args, modified = _op_args(op, [(3, 5), (130,)], DEVICE)
    ref_args, ref_modified = _op_args(op, [(3, 5), (130,)], DEVICE)
    kw = {k: torch.tensor([v], device=hp_device) for k, v in _TENSOR_HPARAMS[op].items()}
    getattr(mod, op)(*args, **kw)
    getattr(reference, op)(*ref_args, **_TENSOR_HPARAMS[op])
    for got, want in zip(modified, ref_modified):
        K.assert_all_close(got, want, torch.float32, f"{op} with 1-element tensors")


def test_reference_stacked_trials_need_the_trial_count_as_first_dimension():
    params = [torch.zeros(3, 4), torch.zeros(2, 4)]
    with pytest.raises(ValueError, match=r"params\[1\] has shape \(2, 4\)"):
        reference.sgd_step(params, [torch.ones_like(p) for p in params], None, lr=torch.tensor([0.1, 0.2, 0.3]),
                           stacked_trials=True)
    assert all(torch.equal(p, torch.zeros_like(p)) for p in params)
