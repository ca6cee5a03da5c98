"""The optimizer classes as a user sees them: torch.optim.SGD equivalence,
state dicts, schedulers, GradScaler, error handling, LARS/LAMB rules.

Runs on every CPU backend this install has (reference always; cpu when the
native module is built)."""
from __future__ import annotations

import copy
import math

import kernel_cases as kc
import pytest
import torch
from torch import nn

import fastsgd
from fastsgd.backends import BackendUnavailable

CPU_BACKENDS = [b for b in ("reference", "cpu") if fastsgd.available_backends()[b] is None]


def small_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, 13), nn.ReLU(), nn.Linear(13, 3)).to(dtype)


def two_groups(model, lr):
    ws = [p for n, p in model.named_parameters() if n.endswith("weight")]
    bs = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": ws}, {"params": bs, "lr": lr * 0.5, "weight_decay": 0.0}]


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 7, generator=g), torch.randn(16, 3, generator=g)) for _ in range(n)]


def train(model, opt, data, sched=None, sign=1.0):
    """``sign=-1`` turns the objective into one to maximize (for maximize=True)."""
    for x, y in data:
        opt.zero_grad()
        (sign * nn.functional.mse_loss(model(x), y)).backward()
        opt.step()
        if sched is not None:
            sched.step()


def assert_same_training(m1, o1, m2, o2):
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, atol=1e-5, rtol=1e-5)
        b1, b2 = o1.state[p1].get("momentum_buffer"), o2.state[p2].get("momentum_buffer")
        assert (b1 is None) == (b2 is None)
        if b1 is not None:
            torch.testing.assert_close(b1, b2, atol=1e-5, rtol=1e-5)


SGD_CONFIGS = [
    dict(momentum=0.0),
    dict(momentum=0.9),
    dict(momentum=0.9, nesterov=True, weight_decay=1e-3),
    dict(momentum=0.8, dampening=0.3, weight_decay=1e-2),
    dict(momentum=0.9, maximize=True),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cfg", SGD_CONFIGS, ids=str)
def test_sgd_matches_torch_over_50_steps_with_scheduler(backend, cfg):
    data = batches(50)
    m_ref, m_fast = small_model(), small_model()
    o_ref = torch.optim.SGD(two_groups(m_ref, 0.05), lr=0.05, weight_decay=cfg.get("weight_decay", 0),
                            **{k: v for k, v in cfg.items() if k != "weight_decay"})
    o_fast = fastsgd.SGD(two_groups(m_fast, 0.05), lr=0.05, backend=backend, **cfg)
    def warm(step):
        return min(1.0, (step + 1) / 10) * 0.5 ** (step // 20)  # warm-up, then decay
    s_ref = torch.optim.lr_scheduler.LambdaLR(o_ref, warm)
    s_fast = torch.optim.lr_scheduler.LambdaLR(o_fast, warm)
    sign = -1.0 if cfg.get("maximize") else 1.0
    train(m_ref, o_ref, data, s_ref, sign)
    train(m_fast, o_fast, data, s_fast, sign)
    assert_same_training(m_ref, o_ref, m_fast, o_fast)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nesterov_and_momentum_classes_are_sgd_with_defaults(backend):
    m = small_model()
    n = fastsgd.Nesterov(m.parameters(), lr=0.1, backend=backend)
    mo = fastsgd.Momentum(m.parameters(), lr=0.1, backend=backend)
    assert n.defaults["nesterov"] and n.defaults["momentum"] == 0.9
    assert not mo.defaults["nesterov"] and mo.defaults["momentum"] == 0.9
    assert isinstance(n, fastsgd.SGD) and isinstance(mo, fastsgd.SGD)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_state_dict_round_trips_with_torch_both_ways(backend):
    data = batches(20)
    # torch -> fastsgd
    m_t, m_f = small_model(), small_model()
    o_t = torch.optim.SGD(m_t.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    train(m_t, o_t, data[:10])
    m_f.load_state_dict(m_t.state_dict())
    o_f = fastsgd.SGD(m_f.parameters(), lr=0.1, momentum=0.9, nesterov=True, backend=backend)
    # deepcopy: load_state_dict shares tensors with the source optimizer's state
    o_f.load_state_dict(copy.deepcopy(o_t.state_dict()))
    train(m_t, o_t, data[10:])
    train(m_f, o_f, data[10:])
    assert_same_training(m_t, o_t, m_f, o_f)
    # fastsgd -> torch: same layout, continues identically
    sd = o_f.state_dict()
    assert set(sd["state"][0]) == {"momentum_buffer"}
    m_t2 = copy.deepcopy(m_f)
    o_t2 = torch.optim.SGD(m_t2.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    o_t2.load_state_dict(copy.deepcopy(sd))
    train(m_t2, o_t2, data[:5])
    train(m_f, o_f, data[:5])
    assert_same_training(m_t2, o_t2, m_f, o_f)


def test_loading_torch_state_dict_fills_fastsgd_group_defaults():
    m = small_model()
    o_t = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    o_f = fastsgd.SGD(m.parameters(), lr=0.1, momentum=0.9, lr_in_momentum=True)
    o_f.load_state_dict(o_t.state_dict())
    assert o_f.param_groups[0]["lr_in_momentum"] is False


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_lr_in_momentum_equals_torch_form_at_constant_lr_and_differs_when_lr_changes(backend):
    data = batches(12)
    m1, m2 = small_model(), small_model()
    o1 = fastsgd.SGD(m1.parameters(), lr=0.1, momentum=0.9, backend=backend)
    o2 = fastsgd.SGD(m2.parameters(), lr=0.1, momentum=0.9, lr_in_momentum=True, backend=backend)
    train(m1, o1, data[:6])
    train(m2, o2, data[:6])
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2)
        # the velocity form stores v = lr * b
        torch.testing.assert_close(o2.state[p2]["momentum_buffer"], 0.1 * o1.state[p1]["momentum_buffer"])
    for o in (o1, o2):
        o.param_groups[0]["lr"] = 0.01
    # One step after the change, by the formulas: torch form moves by lr_new*(mu*b + g),
    # velocity form by mu*v + lr_new*g = mu*lr_old*b + lr_new*g.
    x, y = data[6]
    before = [p.detach().clone() for p in m1.parameters()]
    bufs = [o1.state[p]["momentum_buffer"].clone() for p in m1.parameters()]
    train(m1, o1, [(x, y)])
    train(m2, o2, [(x, y)])
    for p1, p2, p0, b in zip(m1.parameters(), m2.parameters(), before, bufs):
        g = p1.grad
        torch.testing.assert_close(p1, p0 - 0.01 * (0.9 * b + g))
        torch.testing.assert_close(p2, p0 - (0.9 * 0.1 * b + 0.01 * g))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_lr_as_tensor_and_closure(backend):
    m1, m2 = small_model(), small_model()
    o1 = fastsgd.SGD(m1.parameters(), lr=torch.tensor(0.05), momentum=0.9, backend=backend)
    o2 = torch.optim.SGD(m2.parameters(), lr=0.05, momentum=0.9)
    x, y = batches(1)[0]
    returned, computed = [], []
    for m, o in ((m1, o1), (m2, o2)):
        def closure(m=m, o=o):
            o.zero_grad()
            loss = nn.functional.mse_loss(m(x), y)
            loss.backward()  # needs grad mode on inside step(), which runs under no_grad
            computed.append(loss)
            return loss
        returned.append(o.step(closure))
    # step() returns the closure's own loss object, computed once, before the update
    assert len(computed) == 2 and returned[0] is computed[0] and returned[1] is computed[1]
    torch.testing.assert_close(returned[0], returned[1], atol=0, rtol=0)
    assert_same_training(m2, o2, m1, o1)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_params_without_grad_are_skipped_and_get_no_state(backend):
    m = small_model()
    o = fastsgd.SGD(m.parameters(), lr=0.1, momentum=0.9, backend=backend)
    m[0].weight.requires_grad_(False)
    before = m[0].weight.detach().clone()
    nn.functional.mse_loss(m(torch.randn(4, 7)), torch.randn(4, 3)).backward()
    o.step()
    assert torch.equal(m[0].weight, before)
    assert "momentum_buffer" not in o.state[m[0].weight]
    assert o.state[m[2].weight]["momentum_buffer"] is not None


# One step from the same stored values, against torch.optim.SGD in float64 rounded once into the storage
# dtype: the backends compute in float32 (float64 for float64 tensors, the reference always in float64) and
# round once, so a 16-bit result may land one ulp of its dtype away (eps is one ulp at 1.0; the atol covers
# values near 0, where float32 rounding of the inputs dominates). float32 results go through a few float32
# operations: a few float32 ulps. (Under the Triton interpreter, which truncates fp32->bf16 instead of
# rounding to nearest, a bf16 result may need one more ulp.)
ONE_STEP_TOL = {torch.float64: dict(atol=1e-14, rtol=1e-14), torch.float32: dict(atol=1e-6, rtol=4e-7),
                torch.bfloat16: dict(atol=1e-5, rtol=2.0 ** -7), torch.float16: dict(atol=1e-5, rtol=2.0 ** -10)}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_group_mixing_dtypes_matches_float64_torch_per_dtype(backend):
    torch.manual_seed(0)
    dtypes = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    ps = [nn.Parameter(torch.randn(n, dtype=dt)) for n, dt in zip((5, 600, 700, 800), dtypes)]
    o = fastsgd.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, backend=backend)
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        for p in ps:
            p.grad = torch.randn(p.shape, dtype=torch.float64, generator=gen).to(p.dtype)
        # the oracle: the same stored values in float64 through torch.optim.SGD
        wide = [nn.Parameter(p.detach().to(torch.float64, copy=True)) for p in ps]
        for w, p in zip(wide, ps):
            w.grad = p.grad.double()
        o64 = torch.optim.SGD(wide, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
        if step > 0:
            for w, p in zip(wide, ps):
                o64.state[w]["momentum_buffer"] = o.state[p]["momentum_buffer"].to(torch.float64, copy=True)
        o.step()
        o64.step()
        for p, w in zip(ps, wide):
            tol = ONE_STEP_TOL[p.dtype]
            torch.testing.assert_close(p, w.to(p.dtype), **tol, msg=lambda m, p=p: f"{p.dtype} param: {m}")
            torch.testing.assert_close(o.state[p]["momentum_buffer"], o64.state[w]["momentum_buffer"].to(p.dtype),
                                       **tol, msg=lambda m, p=p: f"{p.dtype} buffer: {m}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_channels_last_param_with_contiguous_grad(backend):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last))
    r = nn.Parameter(w.detach().clone().contiguous())
    g = torch.randn(4, 3, 5, 5)
    w.grad, r.grad = g.contiguous(), g.clone()
    o = fastsgd.SGD([w], lr=0.1, momentum=0.9, backend=backend)
    o_ref = torch.optim.SGD([r], lr=0.1, momentum=0.9)
    for _ in range(2):
        o.step()
        o_ref.step()
    torch.testing.assert_close(w, r)
    assert w.is_contiguous(memory_format=torch.channels_last)


# ---- AMP -------------------------------------------------------------------

def _scaled_step(model, opt, scaler, x, y, poison=False):
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    scaler.scale(loss).backward()
    if poison:
        next(model.parameters()).grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cls,kw", [(fastsgd.SGD, dict(momentum=0.9, dampening=0.1)),
                                    (fastsgd.LARS, dict(weight_decay=1e-4)),
                                    (fastsgd.LAMB, dict())], ids=["sgd", "lars", "lamb"])
def test_grad_scaler_skipped_first_step_changes_nothing(backend, cls, kw):
    data = batches(6)
    m, m_plain = small_model(), small_model()
    o = cls(m.parameters(), lr=0.05, backend=backend, **kw)
    o_plain = cls(m_plain.parameters(), lr=0.05, backend=backend, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    before = [p.detach().clone() for p in m.parameters()]
    _scaled_step(m, o, scaler, *data[0], poison=True)  # first step skipped
    for p, b in zip(m.parameters(), before):
        assert torch.equal(p, b)
    assert len(o.state) == 0 or all(len(s) == 0 for s in o.state.values())
    # afterwards training proceeds exactly as if the skipped step never happened
    for i, (x, y) in enumerate(data[1:]):
        _scaled_step(m, o, scaler, x, y, poison=(i == 2))  # and a later skipped step
        if i != 2:
            train(m_plain, o_plain, [(x, y)])
    for p, q in zip(m.parameters(), m_plain.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)


# ---- errors, raised before anything changes --------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(lr=-0.1), "Invalid learning rate: -0.1"),
    (dict(lr=0.1, momentum=-0.5), "Invalid momentum value: -0.5"),
    (dict(lr=0.1, weight_decay=-1.0), "Invalid weight_decay value: -1.0"),
    (dict(lr=0.1, nesterov=True), "Nesterov momentum requires a momentum and zero dampening"),
    (dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), "Nesterov momentum requires"),
    (dict(lr=0.1, backend="gpu"), "Invalid backend: 'gpu'"),
])
def test_sgd_constructor_errors_match_torch_wording(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fastsgd.SGD(small_model().parameters(), **kwargs)


def test_lars_and_lamb_constructor_errors():
    ps = list(small_model().parameters())
    with pytest.raises(ValueError, match="Invalid learning rate"):
        fastsgd.LARS(ps, lr=-1.0)
    with pytest.raises(ValueError, match="Nesterov momentum requires"):
        fastsgd.LARS(ps, lr=0.1, momentum=0.0, nesterov=True)
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1"):
        fastsgd.LAMB(ps, lr=0.1, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="Invalid max_grad_norm"):
        fastsgd.LAMB(ps, lr=0.1, max_grad_norm=0.0)
    with pytest.raises(ValueError, match="Invalid epsilon value"):
        fastsgd.LAMB(ps, lr=0.1, eps=-1.0)


def test_differentiable_is_refused_and_fused_foreach_accepted():
    ps = list(small_model().parameters())
    with pytest.raises(RuntimeError, match="differentiable=True"):
        fastsgd.SGD(ps, lr=0.1, differentiable=True)
    with pytest.raises(RuntimeError, match="cannot be `True` together"):
        fastsgd.SGD(ps, lr=0.1, fused=True, foreach=True)
    fastsgd.SGD(ps, lr=0.1, fused=True)
    fastsgd.SGD(ps, lr=0.1, foreach=True)


def _all_params_unchanged(model, before):
    return all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_error_in_a_later_group_leaves_earlier_groups_untouched():
    m = small_model()
    o = fastsgd.SGD(two_groups(m, 0.1), lr=0.1, momentum=0.9)
    nn.functional.mse_loss(m(torch.randn(4, 7)), torch.randn(4, 3)).backward()
    o.param_groups[1]["lr"] = -1.0  # e.g. a broken scheduler
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(ValueError, match="Invalid learning rate: -1.0"):
        o.step()
    assert _all_params_unchanged(m, before)
    assert all(len(s) == 0 for s in o.state.values())


def test_mixed_devices_in_one_step_is_an_error_before_any_update():
    a = nn.Parameter(torch.randn(3))
    b = nn.Parameter(torch.empty(3, device="meta"))
    a.grad = torch.randn(3)
    b.grad = torch.empty(3, device="meta")
    o = fastsgd.SGD([a, b], lr=0.1, momentum=0.9)
    before = a.detach().clone()
    with pytest.raises(RuntimeError, match="must be on one device"):
        o.step()
    assert torch.equal(a, before) and len(o.state) == 0


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="native cpu backend not built")
def test_complex_params_on_cpu_backend_error_and_auto_uses_reference():
    z = nn.Parameter(torch.randn(4, dtype=torch.complex64))
    z.grad = torch.randn(4, dtype=torch.complex64)
    before = z.detach().clone()
    with pytest.raises(TypeError, match="does not support torch.complex64"):
        fastsgd.SGD([z], lr=0.1, backend="cpu").step()
    assert torch.equal(z, before)
    z_ref = nn.Parameter(before.clone())
    z_ref.grad = z.grad.clone()
    fastsgd.SGD([z], lr=0.1, momentum=0.9).step()
    torch.optim.SGD([z_ref], lr=0.1, momentum=0.9).step()
    torch.testing.assert_close(z, z_ref)


def test_missing_native_backend_error_says_why(monkeypatch):
    import fastsgd.kernels.cpu as cpu_kernels
    monkeypatch.setattr(cpu_kernels, "unavailable_reason",
                        lambda: "the native module fastsgd._C could not be imported (test)")
    assert "could not be imported" in fastsgd.available_backends()["cpu"]
    m = small_model()
    nn.functional.mse_loss(m(torch.randn(4, 7)), torch.randn(4, 3)).backward()
    with pytest.raises(BackendUnavailable, match="'cpu' is not available: the native module"):
        fastsgd.SGD(m.parameters(), lr=0.1, backend="cpu").step()
    fastsgd.SGD(m.parameters(), lr=0.1).step()  # auto quietly uses the reference


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("FASTSGD_BACKEND", "reference")
    assert fastsgd.SGD(small_model().parameters(), lr=0.1).backend == "reference"
    monkeypatch.setenv("FASTSGD_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FASTSGD_BACKEND='nonsense'"):
        fastsgd.SGD(small_model().parameters(), lr=0.1)


def test_available_backends_lists_every_backend_with_reason_or_none():
    av = fastsgd.available_backends()
    assert set(av) == {"reference", "cpu", "triton", "cuda"}
    assert av["reference"] is None
    for _name, reason in av.items():
        assert reason is None or (isinstance(reason, str) and reason)


# ---- LARS and LAMB against test-local transcriptions -------------------------

def timm_lars_step(params, state, *, lr, momentum, dampening, weight_decay, nesterov, trust_coeff, eps,
                   trust_clip, always_adapt):
    """Transcription of timm.optim.Lars.step for one group (grads copied, not modified)."""
    for p in params:
        grad = p.grad.clone()
        if weight_decay != 0 or always_adapt:
            w_norm, g_norm = p.norm(2.0), grad.norm(2.0)
            trust_ratio = trust_coeff * w_norm / (g_norm + w_norm * weight_decay + eps)
            trust_ratio = torch.where(w_norm > 0, torch.where(g_norm > 0, trust_ratio, 1.0), 1.0)
            if trust_clip:
                trust_ratio = torch.minimum(trust_ratio / lr, torch.tensor(1.0))
            grad = (grad + weight_decay * p) * trust_ratio
        if momentum != 0:
            if p not in state:
                buf = state[p] = grad.clone()
            else:
                buf = state[p]
                buf.mul_(momentum).add_(grad, alpha=1.0 - dampening)
            grad = grad + momentum * buf if nesterov else buf
        p.data.add_(grad, alpha=-lr)


LARS_CONFIGS = [
    dict(momentum=0.9, weight_decay=1e-4),
    dict(momentum=0.9, weight_decay=0.0),
    dict(momentum=0.9, weight_decay=0.0, always_adapt=True),
    dict(momentum=0.9, weight_decay=5e-4, nesterov=True, trust_clip=True),
    dict(momentum=0.0, weight_decay=1e-3, trust_coeff=0.02),
    dict(momentum=0.5, dampening=0.2, weight_decay=1e-4),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cfg", LARS_CONFIGS, ids=str)
def test_lars_matches_timm_rule(backend, cfg):
    full = dict(momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, trust_coeff=0.001, eps=1e-8,
                trust_clip=False, always_adapt=False)
    full.update(cfg)
    data = batches(10)
    m1, m2 = small_model(), small_model()
    o = fastsgd.LARS(m1.parameters(), lr=0.5, backend=backend, **full)
    state = {}
    for x, y in data:
        for m in (m1, m2):
            m.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
        o.step()
        with torch.no_grad():
            timm_lars_step(list(m2.parameters()), state, lr=0.5, **full)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5)


def test_param_groups_excludes_1d_and_biases():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    groups = fastsgd.param_groups(m, weight_decay=5e-4)
    decay, no_decay = groups
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(m[0].weight), id(m[3].weight)}
    assert len(no_decay["params"]) == 4
    assert len(fastsgd.param_groups(m, 5e-4, exclude_1d=False)) == 1


def paper_lamb_step(params, state, *, lr, beta1, beta2, eps, weight_decay, bias_correction, trust_clip,
                    always_adapt):
    """Transcription of Algorithm 2 of You et al. 2019 (as timm's Lamb computes it)."""
    for p in params:
        g = p.grad
        st = state.setdefault(p, {"t": 0, "m": torch.zeros_like(p), "v": torch.zeros_like(p)})
        st["t"] += 1
        st["m"] = beta1 * st["m"] + (1 - beta1) * g
        st["v"] = beta2 * st["v"] + (1 - beta2) * g * g
        bc1 = 1 - beta1 ** st["t"] if bias_correction else 1.0
        bc2 = 1 - beta2 ** st["t"] if bias_correction else 1.0
        r = (st["m"] / bc1) / (st["v"].sqrt() / math.sqrt(bc2) + eps)
        u = r + weight_decay * p
        ratio = 1.0
        if weight_decay != 0 or always_adapt:
            pn, un = p.norm(), u.norm()
            ratio = (pn / un) if (pn > 0 and un > 0) else 1.0
            if trust_clip:
                ratio = min(float(ratio), 1.0)
        p.data.add_(u * ratio, alpha=-lr)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cfg", [dict(), dict(weight_decay=0.0), dict(weight_decay=0.0, always_adapt=True),
                                 dict(bias_correction=False, trust_clip=True, weight_decay=0.1)], ids=str)
def test_lamb_matches_paper(backend, cfg):
    full = dict(beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, bias_correction=True, trust_clip=False,
                always_adapt=False)
    full.update(cfg)
    m1, m2 = small_model(), small_model()
    o = fastsgd.LAMB(m1.parameters(), lr=0.01, betas=(full["beta1"], full["beta2"]), eps=full["eps"],
                     weight_decay=full["weight_decay"], bias_correction=full["bias_correction"],
                     trust_clip=full["trust_clip"], always_adapt=full["always_adapt"], backend=backend)
    state = {}
    for x, y in batches(10):
        for m in (m1, m2):
            m.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
        o.step()
        with torch.no_grad():
            paper_lamb_step(list(m2.parameters()), state, lr=0.01, **full)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)
    assert float(o.state[next(m1.parameters())]["step"]) == 10


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_lamb_max_grad_norm_clips_by_global_norm(backend):
    max_norm = 2.0
    m1, m2 = small_model(), small_model()
    o = fastsgd.LAMB(m1.parameters(), lr=0.01, max_grad_norm=max_norm, backend=backend)
    state = {}
    clipped_steps = 0
    # targets scaled so that the global gradient norm is above max_grad_norm in some steps, below in others
    for scale, (x, y) in zip((100.0, 0.01, 30.0), batches(3)):
        for m in (m1, m2):
            m.zero_grad()
            nn.functional.mse_loss(m(x), y * scale).backward()
        total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in m2.parameters()]))
        clipped_steps += bool(total > max_norm)
        with torch.no_grad():
            for p in m2.parameters():  # the test's own clipping, then the paper's update
                p.grad /= max(1.0, float(total) / max_norm)
        o.step()
        with torch.no_grad():
            paper_lamb_step(list(m2.parameters()), state, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-6,
                            weight_decay=0.01, bias_correction=True, trust_clip=False, always_adapt=False)
    assert 0 < clipped_steps < 3
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)
        # the first moment sees the clipped gradient's scale (the normalised update hardly does)
        torch.testing.assert_close(o.state[p]["exp_avg"], state[q]["m"], atol=1e-7, rtol=1e-5)


def test_step_subset_updates_only_given_params():
    m = small_model()
    o = fastsgd.SGD(m.parameters(), lr=0.1, momentum=0.9)
    nn.functional.mse_loss(m(torch.randn(4, 7)), torch.randn(4, 3)).backward()
    first = m[0].weight
    before = {id(p): p.detach().clone() for p in m.parameters()}
    o.step_subset([first])
    for p in m.parameters():
        assert torch.equal(p, before[id(p)]) == (p is not first)
    with pytest.raises(RuntimeError, match="cannot update part"):
        fastsgd.LAMB(m.parameters(), lr=0.1, max_grad_norm=1.0).step_subset([first])


# ---- torch.compile ------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cls,kw", [(fastsgd.Nesterov, dict(lr=0.1, weight_decay=1e-3)),
                                    (fastsgd.LARS, dict(lr=0.1, weight_decay=1e-4)),
                                    (fastsgd.LAMB, dict(lr=0.01, max_grad_norm=1.0))])
def test_compiled_training_step_matches_eager_and_breaks_once_at_the_step(backend, cls, kw):
    kc.check_compiled_training_step(lambda params: cls(params, backend=backend, **kw))
