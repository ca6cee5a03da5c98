"""Drop-in means drop-in: ordinary torch.optim.SGD programs run unchanged on
fastsgd.SGD/Momentum/Nesterov (and the shared machinery of LARS/LAMB).

One section per way a plain PyTorch program used to break; each compares with
torch.optim.SGD itself where torch defines the behaviour. Runs on every CPU
backend this install has (reference always; cpu when the native module is built).
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import fastsgd
from fastsgd.backends import get_backend
from fastsgd.kernels import reference

CPU_BACKENDS = [b for b in ("reference", "cpu") if fastsgd.available_backends()[b] is None]
# float32 math in every backend; one rounding of a few fp32 operations apart from torch's own order
F32 = dict(atol=1e-6, rtol=1e-5)


def twin_params(shapes, seed=0):
    """The same random tensors twice, as two independent lists of Parameters."""
    g = torch.Generator().manual_seed(seed)
    values = [torch.randn(s, generator=g) for s in shapes]
    return [nn.Parameter(v.clone()) for v in values], [nn.Parameter(v.clone()) for v in values]


def set_grads(ps, qs, step):
    g = torch.Generator().manual_seed(100 + step)
    for p, q in zip(ps, qs):
        grad = torch.randn(p.shape, generator=g)
        p.grad, q.grad = grad.clone(), grad.clone()


def assert_same(ps, o_fast, qs, o_torch, **tol):
    for i, (p, q) in enumerate(zip(ps, qs)):
        torch.testing.assert_close(p, q, **(tol or F32), msg=lambda m, i=i: f"param {i}: {m}")
        b_fast = o_fast.state.get(p, {}).get("momentum_buffer")
        b_torch = o_torch.state.get(q, {}).get("momentum_buffer")
        assert (b_fast is None) == (b_torch is None), f"param {i}: momentum buffer present in one only"
        if b_torch is not None:
            b_torch = b_torch.to_dense() if b_torch.is_sparse else b_torch
            b_fast = b_fast.to_dense() if b_fast.is_sparse else b_fast
            torch.testing.assert_close(b_fast, b_torch, **(tol or F32), msg=lambda m, i=i: f"buffer {i}: {m}")


def no_state(opt):
    return all(len(s) == 0 for s in opt.state.values())


# ---- 1. lr=torch.tensor([0.1]); stacked trials only on request -------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_one_element_1d_lr_tensor_works_like_torch(backend):
    shapes = [(3, 5), (), (1,), (4, 1, 2)]  # first dimensions other than 1: no "stacked trials" guess
    ps, qs = twin_params(shapes)
    o_fast = fastsgd.SGD(ps, lr=torch.tensor([0.1]), momentum=0.9, nesterov=True, backend=backend)
    o_torch = torch.optim.SGD(qs, lr=torch.tensor([0.1]), momentum=0.9, nesterov=True)
    for step in range(3):
        set_grads(ps, qs, step)
        o_fast.step()
        o_torch.step()
    assert_same(ps, o_fast, qs, o_torch)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kernel_stacked_trials_are_an_explicit_opt_in(backend):
    kernels = get_backend(backend, torch.device("cpu"), {torch.float32})
    shapes = [(3, 4), (3,)]
    lrs, mus = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.0, 0.5, 0.9])
    params = [torch.randn(s) for s in shapes]
    grads = [torch.randn(s) for s in shapes]
    bufs = [torch.randn(s) for s in shapes]
    before = [t.clone() for t in params + bufs]
    # a 1-D lr with several values is refused without the flag, naming the flag
    with pytest.raises(ValueError, match="stacked_trials=True"):
        kernels.sgd_step(params, grads, bufs, lr=lrs, momentum=0.9)
    with pytest.raises(ValueError, match="stacked_trials=True"):
        kernels.sgd_step(params, grads, bufs, lr=0.1, momentum=mus)
    assert all(torch.equal(a, b) for a, b in zip(params + bufs, before))
    # with the flag, row i of every tensor uses lr[i] and momentum[i] ...
    kernels.sgd_step(params, grads, bufs, lr=lrs, momentum=mus, stacked_trials=True)
    for i in range(3):
        rp, rb = [t[i].clone() for t in before[:2]], [t[i].clone() for t in before[2:]]
        reference.sgd_step(rp, [g[i] for g in grads], rb, lr=float(lrs[i]), momentum=float(mus[i]))
        torch.testing.assert_close([p[i] for p in params], rp, **F32)
        torch.testing.assert_close([b[i] for b in bufs], rb, **F32)
    # ... and a 1-element lr without the flag is one lr for everything, whatever the shapes
    p1, p2 = [t.clone() for t in before[:2]], [t.clone() for t in before[:2]]
    kernels.sgd_step(p1, grads, None, lr=torch.tensor([0.25]))
    kernels.sgd_step(p2, grads, None, lr=0.25)
    torch.testing.assert_close(p1, p2, atol=0, rtol=0)


# ---- 2. deepcopy / pickle keep the fastsgd attributes -----------------------------------------------

def _stepped(opt, ps):
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    return opt


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_backend_momentum_dtype_and_options(how):
    copy_of = copy.deepcopy if how == "deepcopy" else (lambda o: pickle.loads(pickle.dumps(o)))
    ps = [nn.Parameter(torch.randn(4, 3))]
    o = _stepped(fastsgd.SGD(ps, lr=0.1, momentum=0.9, backend="reference", momentum_dtype=torch.float64,
                             stochastic_rounding=True), ps)
    c = copy_of(o)
    assert (c.backend, c.momentum_dtype, c.stochastic_rounding) == ("reference", torch.float64, True)
    assert next(iter(c.state.values()))["momentum_buffer"].dtype == torch.float64
    lamb = copy_of(_stepped(fastsgd.LAMB(ps, lr=0.1, max_grad_norm=2.0, backend="reference"), ps))
    assert (lamb.backend, lamb.max_grad_norm) == ("reference", 2.0)
    lars = copy_of(fastsgd.LARS(ps, lr=0.1, momentum_dtype=torch.bfloat16, backend="reference"))
    assert (lars.backend, lars.momentum_dtype) == ("reference", torch.bfloat16)


def test_old_pickles_without_the_attributes_get_defaults():
    ps = [nn.Parameter(torch.randn(4))]
    o = _stepped(fastsgd.SGD(ps, lr=0.1, momentum=0.9), ps)
    old = {"defaults": o.defaults, "state": o.state, "param_groups": o.param_groups}  # torch's own __getstate__
    for cls in (fastsgd.SGD, fastsgd.LARS):
        restored = cls.__new__(cls)
        restored.__setstate__(dict(old))
        assert (restored.backend, restored.momentum_dtype, restored.stochastic_rounding) == ("auto", None, False)
    lamb = fastsgd.LAMB.__new__(fastsgd.LAMB)
    lamb.__setstate__({"defaults": {}, "state": {}, "param_groups": []})
    assert (lamb.backend, lamb.max_grad_norm) == ("auto", None)


# ---- 3. sparse gradients ----------------------------------------------------------------------------

class EmbeddingBag(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 6, sparse=True)
        self.head = nn.Linear(6, 2)

    def forward(self, idx):
        return self.head(self.emb(idx)).sum()


SPARSE_CONFIGS = [dict(), dict(momentum=0.9), dict(momentum=0.9, nesterov=True),
                  dict(momentum=0.8, dampening=0.3), dict(momentum=0.9, maximize=True)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cfg", SPARSE_CONFIGS, ids=str)
def test_sparse_embedding_updates_exactly_as_torch_and_dense_params_stay_fused(backend, cfg, monkeypatch):
    m_fast, m_torch = EmbeddingBag(), EmbeddingBag()
    o_fast = fastsgd.SGD(m_fast.parameters(), lr=0.1, backend=backend, **cfg)
    o_torch = torch.optim.SGD(m_torch.parameters(), lr=0.1, **cfg)
    kernels = get_backend(backend, torch.device("cpu"), {torch.float32})
    fused_calls = []
    real = kernels.sgd_step
    monkeypatch.setattr(kernels, "sgd_step", lambda params, *a, **k: fused_calls.append(list(params))
                        or real(params, *a, **k))
    for step in range(4):
        idx = torch.tensor([[1, 2, 2, 7], [step, 3, 19, 1]])
        for m, o in ((m_fast, o_fast), (m_torch, o_torch)):
            o.zero_grad()
            m(idx).backward()
            o.step()
    assert_same(list(m_fast.parameters()), o_fast, list(m_torch.parameters()), o_torch)
    dense = {id(m_fast.head.weight), id(m_fast.head.bias)}
    assert len(fused_calls) == 4 and all({id(p) for p in c} == dense for c in fused_calls)


@pytest.mark.parametrize("cls", [fastsgd.LARS, fastsgd.LAMB])
def test_lars_and_lamb_refuse_sparse_gradients_clearly(cls):
    m = EmbeddingBag()
    o = cls(m.parameters(), lr=0.1)
    m(torch.tensor([1, 2])).backward()
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(RuntimeError, match=r"does not support sparse gradients \(parameter 0 of param group 0"):
        o.step()
    assert all(torch.equal(p, b) for p, b in zip(m.parameters(), before)) and no_state(o)


@pytest.mark.parametrize("kw,match", [(dict(weight_decay=0.01), "weight decay"),
                                      (dict(lr_in_momentum=True), "lr_in_momentum"),
                                      (dict(momentum_dtype=torch.float64), "momentum_dtype")], ids=str)
def test_sparse_gradients_with_options_outside_torchs_update_are_refused_before_anything_changes(kw, match):
    m = EmbeddingBag()
    o = fastsgd.SGD(m.parameters(), lr=0.1, momentum=0.9, **kw)
    m(torch.tensor([1, 2])).backward()
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(RuntimeError, match=match):
        o.step()
    assert all(torch.equal(p, b) for p, b in zip(m.parameters(), before)) and no_state(o)
    if "weight_decay" in kw:  # torch raises the same exception type (after updating the dense head)
        with pytest.raises(RuntimeError, match="add.sparse, dense. is not supported"):
            torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, **kw).step()


# ---- 4. params and momentum buffers in different memory layouts --------------------------------------

def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.Flatten(), nn.Linear(5 * 3 * 3, 2))


def conv_steps(model, opt, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(2, 3, 7, 7, generator=g)
        if next(model.parameters()).is_contiguous(memory_format=torch.channels_last) and \
                next(model.parameters()).dim() == 4:
            x = x.to(memory_format=torch.channels_last)
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_channels_last_after_some_steps(backend):
    m_fast, m_torch = conv_net(), conv_net()
    o_fast = fastsgd.SGD(m_fast.parameters(), lr=0.01, momentum=0.9, backend=backend)
    o_torch = torch.optim.SGD(m_torch.parameters(), lr=0.01, momentum=0.9)
    conv_steps(m_fast, o_fast, 2, seed=1)
    conv_steps(m_torch, o_torch, 2, seed=1)
    m_fast.to(memory_format=torch.channels_last)
    m_torch.to(memory_format=torch.channels_last)
    conv_steps(m_fast, o_fast, 3, seed=2)
    conv_steps(m_torch, o_torch, 3, seed=2)
    assert m_fast[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert_same(list(m_fast.parameters()), o_fast, list(m_torch.parameters()), o_torch)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_contiguous_checkpoint_into_channels_last_model(backend):
    m_src = conv_net()
    o_src = torch.optim.SGD(m_src.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    conv_steps(m_src, o_src, 2, seed=1)
    m_fast, m_torch = conv_net(), conv_net()
    for m in (m_fast, m_torch):
        m.load_state_dict(m_src.state_dict())
        m.to(memory_format=torch.channels_last)
    o_fast = fastsgd.SGD(m_fast.parameters(), lr=0.01, momentum=0.9, nesterov=True, backend=backend)
    o_torch = torch.optim.SGD(m_torch.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    o_fast.load_state_dict(copy.deepcopy(o_src.state_dict()))
    o_torch.load_state_dict(copy.deepcopy(o_src.state_dict()))
    conv_steps(m_fast, o_fast, 3, seed=2)
    conv_steps(m_torch, o_torch, 3, seed=2)
    assert_same(list(m_fast.parameters()), o_fast, list(m_torch.parameters()), o_torch)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_param_data_swapped_for_a_transposed_view(backend):
    ps, qs = twin_params([(5, 7), (6,)])
    o_fast = fastsgd.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01, backend=backend)
    o_torch = torch.optim.SGD(qs, lr=0.1, momentum=0.9, weight_decay=0.01)
    for step in range(4):
        if step == 2:
            for p in (ps[0], qs[0]):
                p.data = p.data.t().contiguous().t()  # same values, column-major
        set_grads(ps, qs, step)
        o_fast.step()
        o_torch.step()
    assert ps[0].stride() == (1, 5)
    assert_same(ps, o_fast, qs, o_torch)


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="native cpu backend not built")
def test_lamb_moments_follow_a_channels_last_switch():
    # against the reference backend (float64, any layout) on the same model kept contiguous
    m_fast, m_ref = conv_net(), conv_net()
    o_fast = fastsgd.LAMB(m_fast.parameters(), lr=0.01, backend="cpu")
    o_ref = fastsgd.LAMB(m_ref.parameters(), lr=0.01, backend="reference")
    conv_steps(m_fast, o_fast, 2, seed=1)
    conv_steps(m_ref, o_ref, 2, seed=1)
    m_fast.to(memory_format=torch.channels_last)
    conv_steps(m_fast, o_fast, 3, seed=2)
    conv_steps(m_ref, o_ref, 3, seed=2)
    w = m_fast[0].weight
    assert o_fast.state[w]["exp_avg"].stride() == w.stride() != m_ref[0].weight.stride()
    for p, q in zip(m_fast.parameters(), m_ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(o_fast.state[p][key], o_ref.state[q][key], atol=1e-6, rtol=1e-4)


# ---- 5. negative lr as a 0-dim tensor -------------------------------------------------------------------

@pytest.mark.parametrize("cls", [fastsgd.SGD, fastsgd.LARS, fastsgd.LAMB])
def test_negative_tensor_lr_raises_like_torch(cls):
    ps = [nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match="Invalid learning rate"):
        torch.optim.SGD(ps, lr=torch.tensor(-0.1))
    with pytest.raises(ValueError, match="Invalid learning rate"):
        cls(ps, lr=torch.tensor(-0.1))
    # set later (a scheduler gone wrong): refused at the step, before anything changes
    o = cls(ps, lr=torch.tensor(0.1))
    o.param_groups[0]["lr"] = torch.tensor(-0.1)
    ps[0].grad = torch.ones(3)
    before = ps[0].detach().clone()
    with pytest.raises(ValueError, match="Invalid learning rate"):
        o.step()
    assert torch.equal(ps[0], before) and no_state(o)


# ---- 6. backend limits are checked before state is created -------------------------------------------

@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="native cpu backend not built")
@pytest.mark.parametrize("cls", [fastsgd.SGD, fastsgd.LARS])
@pytest.mark.parametrize("problem", ["stochastic_rounding", "int32_momentum"])
def test_unsupported_option_fails_before_state_and_retry_is_a_first_step(cls, problem):
    ps, qs = twin_params([(4, 3), (5,)])
    o = cls(ps, lr=0.1, momentum=0.9, backend="cpu")
    o_ref = cls(qs, lr=0.1, momentum=0.9, backend="reference")
    if problem == "stochastic_rounding":
        o.stochastic_rounding = True
        match = "stochastic_rounding"
    else:
        o.momentum_dtype = torch.int32
        match = "int32"
    set_grads(ps, qs, 0)
    with pytest.raises((ValueError, TypeError), match=match):
        o.step()
    assert no_state(o) and all(torch.equal(p, q) for p, q in zip(ps, qs))
    o.stochastic_rounding, o.momentum_dtype = False, None
    for step in range(2):
        set_grads(ps, qs, step)
        o.step()
        o_ref.step()
    assert_same(ps, o, qs, o_ref)


def test_integer_momentum_dtype_is_refused_by_the_constructor():
    with pytest.raises(ValueError, match="momentum_dtype must be a floating-point"):
        fastsgd.SGD([nn.Parameter(torch.randn(3))], lr=0.1, momentum=0.9, momentum_dtype=torch.int32)


# ---- 8. another optimizer's state dict --------------------------------------------------------------

def _adam_state_dict(ps, **kw):
    adam = torch.optim.Adam(ps, lr=0.01, **kw)
    _stepped(adam, ps)
    return adam.state_dict()


@pytest.mark.parametrize("cls,match", [(fastsgd.SGD, "exp_avg"), (fastsgd.Momentum, "exp_avg"),
                                       (fastsgd.LARS, "exp_avg"), (fastsgd.LAMB, "amsgrad")])
def test_loading_adam_state_dict_is_refused_naming_the_mismatch(cls, match):
    ps = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3))]
    sd = _adam_state_dict(ps)
    o = cls(ps, lr=0.1)
    _stepped(o, ps)
    groups_before = copy.deepcopy(o.param_groups)
    state_before = [{k: v.clone() for k, v in o.state[p].items()} for p in ps]
    with pytest.raises(ValueError, match=match):
        o.load_state_dict(sd)
    assert o.param_groups[0]["lr"] == groups_before[0]["lr"]
    assert set(o.param_groups[0]) == set(groups_before[0])
    for p, before in zip(ps, state_before):
        assert set(o.state[p]) == set(before)
        assert all(torch.equal(o.state[p][k], v) for k, v in before.items())


def test_loading_state_with_wrong_shapes_is_refused():
    ps = [nn.Parameter(torch.randn(4, 3))]
    src = fastsgd.SGD([nn.Parameter(torch.randn(3, 4))], lr=0.1, momentum=0.9)
    _stepped(src, src.param_groups[0]["params"])
    with pytest.raises(ValueError, match=r"momentum_buffer.*\(3, 4\).*\(4, 3\)"):
        fastsgd.SGD(ps, lr=0.1, momentum=0.9).load_state_dict(src.state_dict())


def test_compatible_state_dicts_still_load():
    ps = [nn.Parameter(torch.randn(4, 3))]
    # torch SGD -> fastsgd SGD (with an lr scheduler's initial_lr in the groups)
    o_t = torch.optim.SGD(ps, lr=0.1, momentum=0.9)
    torch.optim.lr_scheduler.StepLR(o_t, 2)
    _stepped(o_t, ps)
    fastsgd.SGD(ps, lr=0.1, momentum=0.9).load_state_dict(o_t.state_dict())
    # fastsgd -> fastsgd, each class
    for make in (lambda: fastsgd.LARS(ps, lr=0.1), lambda: fastsgd.LAMB(ps, lr=0.1), lambda: fastsgd.SGD(ps, lr=0.1)):
        src = _stepped(make(), ps)
        make().load_state_dict(src.state_dict())
    # user keys in the groups of both sides are left alone
    o1 = fastsgd.SGD([{"params": ps, "name": "w"}], lr=0.1, momentum=0.9)
    _stepped(o1, ps)
    o2 = fastsgd.SGD([{"params": ps, "name": "w"}], lr=0.1, momentum=0.9)
    o2.load_state_dict(o1.state_dict())
    assert o2.param_groups[0]["name"] == "w"


# ---- 9. params on the meta device: what torch does ------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_meta_params_step_exactly_like_torch(backend):
    p, q = nn.Parameter(torch.empty(4, 3, device="meta")), nn.Parameter(torch.empty(4, 3, device="meta"))
    p.grad, q.grad = torch.empty(4, 3, device="meta"), torch.empty(4, 3, device="meta")
    o_fast = fastsgd.SGD([p], lr=0.1, momentum=0.9, backend=backend)
    o_torch = torch.optim.SGD([q], lr=0.1, momentum=0.9)
    o_fast.step()
    o_torch.step()
    bf, bt = o_fast.state[p]["momentum_buffer"], o_torch.state[q]["momentum_buffer"]
    assert set(o_fast.state[p]) == set(o_torch.state[q])
    assert (bf.device, bf.dtype, bf.shape) == (bt.device, bt.dtype, bt.shape)
    o_fast.step()  # and again, with the state there


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_meta_params_lamb_creates_meta_state_and_runs_no_kernel(backend):
    p = nn.Parameter(torch.empty(4, 3, device="meta"))
    p.grad = torch.empty(4, 3, device="meta")
    o = fastsgd.LAMB([p], lr=0.1, backend=backend)
    o.step()
    assert {k: v.device.type for k, v in o.state[p].items()} == {"step": "meta", "exp_avg": "meta",
                                                                 "exp_avg_sq": "meta"}


# ---- 10. only lr may be a device tensor ------------------------------------------------------------------
# There is no CUDA device here: a meta tensor stands in for any tensor that is not on the CPU (reading
# either on the host would be the problem), and the check is the same code path.

@pytest.mark.parametrize("cls,name", [(fastsgd.SGD, "momentum"), (fastsgd.SGD, "weight_decay"),
                                      (fastsgd.SGD, "dampening"), (fastsgd.LARS, "trust_coeff"),
                                      (fastsgd.LAMB, "weight_decay"), (fastsgd.LAMB, "eps")])
def test_device_tensor_hyperparameters_other_than_lr_are_refused(cls, name):
    ps = [nn.Parameter(torch.randn(3))]
    device_value = torch.tensor(0.5, device="meta")
    with pytest.raises(ValueError, match=rf"{name} is a tensor on meta.*only lr may be a device tensor"):
        cls(ps, lr=0.1, **{name: device_value})
    o = cls(ps, lr=0.1)
    o.param_groups[0][name] = device_value  # set later, e.g. by a scheduler
    ps[0].grad = torch.ones(3)
    before = ps[0].detach().clone()
    with pytest.raises(ValueError, match="only lr may be a device tensor"):
        o.step()
    assert torch.equal(ps[0], before) and no_state(o)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cpu_tensor_momentum_and_weight_decay_work_like_torch(backend):
    ps, qs = twin_params([(4, 3)])
    kw = dict(lr=0.1, momentum=torch.tensor(0.9), weight_decay=torch.tensor(0.01))
    o_fast, o_torch = fastsgd.SGD(ps, backend=backend, **kw), torch.optim.SGD(qs, **kw)
    for step in range(3):
        set_grads(ps, qs, step)
        o_fast.step()
        o_torch.step()
    assert_same(ps, o_fast, qs, o_torch)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kernel_error_on_a_first_step_drops_the_state_it_created(backend, monkeypatch):
    ps, qs = twin_params([(4, 3), (5,)])
    groups = [{"params": ps[:1]}, {"params": ps[1:], "lr": 0.05}]
    o = fastsgd.SGD(groups, lr=0.1, momentum=0.9, backend=backend)
    o_torch = torch.optim.SGD([{"params": qs[:1]}, {"params": qs[1:], "lr": 0.05}], lr=0.1, momentum=0.9)
    kernels = get_backend(backend, torch.device("cpu"), {torch.float32})
    real = kernels.sgd_step

    def fail_on_second_group(params, *a, **k):
        if params[0] is ps[1]:
            raise RuntimeError("kernel refused")
        return real(params, *a, **k)

    monkeypatch.setattr(kernels, "sgd_step", fail_on_second_group)
    set_grads(ps, qs, 0)
    with pytest.raises(RuntimeError, match="kernel refused"):
        o.step()
    assert "momentum_buffer" in o.state[ps[0]]  # group 0 ran its first step
    assert "momentum_buffer" not in o.state.get(ps[1], {})  # group 1 did not: no buffer left behind
    monkeypatch.setattr(kernels, "sgd_step", real)
    o_torch.step()  # torch's first step for both groups; fastsgd's group 0 moved already
    o.param_groups[0]["lr"] = 0.0  # so that the retry leaves group 0 where it is
    o.step()
    torch.testing.assert_close(ps[1], qs[1], **F32)
    torch.testing.assert_close(o.state[ps[1]]["momentum_buffer"], o_torch.state[qs[1]]["momentum_buffer"], **F32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sparse_gradients_under_grad_scaler_match_torch(backend):
    m_fast, m_torch = EmbeddingBag(), EmbeddingBag()
    o_fast = fastsgd.SGD(m_fast.parameters(), lr=0.1, momentum=0.9, backend=backend)
    o_torch = torch.optim.SGD(m_torch.parameters(), lr=0.1, momentum=0.9)
    for m, o in ((m_fast, o_fast), (m_torch, o_torch)):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
        for step in range(3):
            o.zero_grad()
            scaler.scale(m(torch.tensor([[1, 2, 2], [step, 3, 19]]))).backward()
            if step == 1:
                m.head.weight.grad[0, 0] = float("inf")  # a skipped step: nothing changes
            scaler.step(o)
            scaler.update()
    assert_same(list(m_fast.parameters()), o_fast, list(m_torch.parameters()), o_torch)
