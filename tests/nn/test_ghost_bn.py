"""Ghost batch norm (fastsgd.nn) against the loop-over-ghost-batches oracle
(fastsgd.nn.ghost_bn_reference): outputs, input/weight/bias gradients and
running statistics; the error paths; equality with nn.BatchNorm where the
semantics say so; the converter; DDP; and the Triton kernels through the
Triton interpreter (CPU) or compiled (GPU, skipped without CUDA).
"""
from __future__ import annotations

import copy
import datetime
import importlib
import os
import tempfile
import traceback

import pytest
import requirements
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from fastsgd.nn import (
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    convert_ghost_batch_norm,
    ghost_batch_norm,
    revert_ghost_batch_norm,
)
from fastsgd.nn.ghost_bn_reference import ghost_batch_norm_reference

TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=2e-5),
    # bf16/fp16 output vs a float32 reference on the same (rounded) input
    torch.bfloat16: dict(rtol=2e-2, atol=3e-2),
    torch.float16: dict(rtol=4e-3, atol=4e-3),
}

# (shape, ghost size, memory format): divides / does not divide, (N, C),
# (N, C, L), NCHW, channels_last, 3d; group sizes >= 3 keep dx well
# conditioned (with 2 values per channel xhat is +-1 and dx is rounding noise).
CASES = [
    ((64, 5), 16, None),
    ((37, 6), 16, None),                             # last ghost batch of 5
    ((40, 3, 7), 16, None),                          # last of 8 samples x 7
    ((19, 3, 5), 1, None),                           # 1 sample x 5 values per ghost batch
    ((70, 5, 3, 4), 16, None),
    ((70, 5, 3, 4), 16, torch.channels_last),
    ((19, 3, 2, 3, 2), 8, None),
    ((19, 3, 2, 3, 2), 8, torch.channels_last_3d),
]


def _case_id(case):
    shape, g, fmt = case
    return f"{'x'.join(map(str, shape))}-g{g}" + ("-cl" if fmt is not None else "")


def _inputs(shape, dtype, fmt=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 2).to(dtype)
    if fmt is not None:
        x = x.to(memory_format=fmt)
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.randn(c, generator=gen, dtype=pdt)
    b = torch.randn(c, generator=gen, dtype=pdt)
    rm = torch.randn(c, generator=gen, dtype=pdt)
    rv = torch.rand(c, generator=gen, dtype=pdt) + 0.5
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    return x, w, b, rm, rv, dy


def _run(fn, x, w, b, rm, rv, dy, **kw):
    """fn's output, x/w/b gradients and running stats, on copies of everything."""
    x = x.detach().clone().requires_grad_()
    w = None if w is None else w.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    rm = None if rm is None else rm.clone()
    rv = None if rv is None else rv.clone()
    y = fn(x, rm, rv, w, b, **kw)
    y.backward(dy)
    return dict(y=y, dx=x.grad, dw=None if w is None else w.grad, db=None if b is None else b.grad, rm=rm, rv=rv)


def _compare(got, want, tol):
    for key, g in got.items():
        w = want[key]
        if w is None:
            assert g is None, key
            continue
        torch.testing.assert_close(g.to(w.dtype), w, **tol, msg=lambda m, key=key: f"{key}: {m}")


def _check_against_reference(case, dtype, backend, affine=True, running=True, momentum=0.1):
    shape, g, fmt = case
    x, w, b, rm, rv, dy = _inputs(shape, dtype, fmt)
    if not affine:
        w = b = None
    if not running:
        rm = rv = None
    got = _run(ghost_batch_norm, x, w, b, rm, rv, dy, training=True, momentum=momentum, eps=1e-5,
               ghost_batch_size=g, backend=backend)
    # The oracle runs float32 on the same rounded input for bf16/fp16.
    ref_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    want = _run(ghost_batch_norm_reference, x.to(ref_dtype), w, b, rm, rv, dy.to(ref_dtype), training=True,
                momentum=momentum, eps=1e-5, ghost_batch_size=g)
    assert got["y"].dtype == dtype and got["dx"].dtype == dtype
    assert got["y"].stride() == x.stride() and got["dx"].stride() == x.stride()
    _compare(got, want, TOL[dtype])


# ----------------------------------------------------------------------------- torch (CPU) path

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_torch_path_matches_reference(case, dtype):
    _check_against_reference(case, dtype, "torch")


@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[5]], ids=_case_id)
@pytest.mark.parametrize("affine,running", [(False, True), (True, False), (False, False)])
def test_torch_path_without_affine_or_running_stats(case, affine, running):
    _check_against_reference(case, torch.float32, "torch", affine=affine, running=running)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [CASES[2], CASES[4], CASES[5]], ids=_case_id)
def test_torch_path_low_precision(case, dtype):
    _check_against_reference(case, dtype, "torch")


def test_large_mean_keeps_the_variance():
    """|mean|/std = 1e4: the one-pass float32 variance would be noise; the
    torch path must notice and recompute it two-pass."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, 5, 5, generator=gen) + 1e4
    y = ghost_batch_norm(x, None, None, training=True, ghost_batch_size=16, backend="torch")
    want = ghost_batch_norm_reference(x.double(), None, None, training=True, ghost_batch_size=16)
    torch.testing.assert_close(y.double(), want, rtol=1e-3, atol=2e-3)


def test_non_dense_input_and_grad():
    """A transposed (neither NCHW nor channels-last) input and an expanded
    upstream gradient: copied to a dense layout, same results."""
    x, w, b, rm, rv, _ = _inputs((32, 3, 4, 5), torch.float32)
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)
    assert not xt.is_contiguous()
    dy = torch.randn(1, 3, 1, 1).expand(32, 3, 4, 5)
    got = _run(ghost_batch_norm, xt, w, b, rm, rv, dy, training=True, ghost_batch_size=8, backend="torch")
    want = _run(ghost_batch_norm_reference, x, w, b, rm, rv, dy, training=True, ghost_batch_size=8)
    _compare(got, want, TOL[torch.float32])


# ----------------------------------------------------------------------------- error paths

@pytest.mark.parametrize("shape,g", [((8, 3), 1), ((33, 4), 32), ((5, 2, 1), 2)])
def test_one_value_per_channel_raises(shape, g):
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training, got input size"):
        ghost_batch_norm(torch.randn(shape), None, None, training=True, ghost_batch_size=g)
    m = GhostBatchNorm1d(shape[1], ghost_batch_size=g)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        m(torch.randn(shape))
    assert m.running_mean.eq(0).all() and m.running_var.eq(1).all()  # nothing half-updated


def test_one_sample_ghost_batches_with_spatial_values_are_fine():
    """g=1 on (N, C, L>1) input: each sample normalised on its own (like instance norm)."""
    _check_against_reference(((6, 2, 5), 1, None), torch.float32, "torch")


@pytest.mark.parametrize("g", [0, -1, 2.5, True, "32"])
def test_invalid_ghost_batch_size(g):
    with pytest.raises(ValueError, match="Invalid ghost_batch_size"):
        GhostBatchNorm2d(4, ghost_batch_size=g)
    with pytest.raises(ValueError, match="Invalid ghost_batch_size"):
        ghost_batch_norm(torch.randn(8, 4), None, None, training=True, ghost_batch_size=g)


@pytest.mark.parametrize("ghost_cls,bn_cls,bad", [
    (GhostBatchNorm1d, nn.BatchNorm1d, (4, 3, 2, 2)),
    (GhostBatchNorm2d, nn.BatchNorm2d, (4, 3, 2)),
    (GhostBatchNorm3d, nn.BatchNorm3d, (4, 3, 2, 2)),
])
def test_input_dim_errors_match_nn_batchnorm(ghost_cls, bn_cls, bad):
    x = torch.randn(bad)
    with pytest.raises(ValueError) as want:
        bn_cls(3)(x)
    with pytest.raises(ValueError) as got:
        ghost_cls(3)(x)
    assert str(got.value) == str(want.value)


def test_channel_mismatch_and_backend_errors():
    with pytest.raises(RuntimeError, match="running_mean should contain 3 elements"):
        GhostBatchNorm2d(4)(torch.randn(8, 3, 2, 2))
    with pytest.raises(ValueError, match="Invalid backend"):
        ghost_batch_norm(torch.randn(8, 3), None, None, training=True, ghost_batch_size=4, backend="cuda")


# ----------------------------------------------------------------------------- modules

def _copy_bn_state(src, dst):
    dst.load_state_dict(src.state_dict())


@pytest.mark.parametrize("ghost_cls,bn_cls,shape", [
    (GhostBatchNorm1d, nn.BatchNorm1d, (24, 5)),
    (GhostBatchNorm2d, nn.BatchNorm2d, (24, 5, 3, 3)),
    (GhostBatchNorm3d, nn.BatchNorm3d, (24, 5, 2, 2, 2)),
])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_ghost_size_at_least_batch_is_nn_batchnorm(ghost_cls, bn_cls, shape, momentum):
    """Several training steps then eval: outputs, gradients, buffers equal
    nn.BatchNorm's (auto backend hands g >= N to F.batch_norm; the forced
    torch path matches to rounding)."""
    bn = bn_cls(shape[1], momentum=momentum)
    for backend, exact in (("auto", True), ("torch", False)):
        gbn = ghost_cls(shape[1], ghost_batch_size=shape[0] + 3, momentum=momentum)
        gbn.backend = backend
        bn_ref = copy.deepcopy(bn)
        with torch.no_grad():
            for m in (gbn, bn_ref):
                m.weight.copy_(torch.linspace(0.5, 2, shape[1]))
                m.bias.copy_(torch.linspace(-1, 1, shape[1]))
        tol = dict(rtol=0, atol=0) if exact else TOL[torch.float32]
        for step in range(3):
            x = torch.randn(shape) * 2 + step
            outs = []
            for m in (gbn, bn_ref):
                xi = x.clone().requires_grad_()
                y = m(xi)
                y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y))
                outs.append((y, xi.grad))
            torch.testing.assert_close(outs[0][0], outs[1][0], **tol)
            torch.testing.assert_close(outs[0][1], outs[1][1], **tol)
        for name, t in bn_ref.state_dict().items():
            torch.testing.assert_close(gbn.state_dict()[name], t, **tol, msg=lambda m, n=name: f"{n}: {m}")
        torch.testing.assert_close(gbn.weight.grad, bn_ref.weight.grad, **tol)
        gbn.eval(), bn_ref.eval()
        x = torch.randn(shape)
        torch.testing.assert_close(gbn(x), bn_ref(x), **tol)


@pytest.mark.parametrize("momentum", [0.3, None])
def test_module_steps_match_reference(momentum):
    """Three steps of a module with ghost batches: running stats (momentum or
    cumulative average) and num_batches_tracked follow the reference."""
    gbn = GhostBatchNorm2d(3, ghost_batch_size=5, momentum=momentum)
    rm, rv = torch.zeros(3), torch.ones(3)
    for step in range(1, 4):
        x = torch.randn(13, 3, 2, 2) * step + step
        y = gbn(x)
        factor = 1.0 / step if momentum is None else momentum
        want = ghost_batch_norm_reference(x, rm, rv, gbn.weight, gbn.bias, True, factor, gbn.eps, 5)
        torch.testing.assert_close(y, want, **TOL[torch.float32])
    assert int(gbn.num_batches_tracked) == 3
    torch.testing.assert_close(gbn.running_mean, rm, **TOL[torch.float32])
    torch.testing.assert_close(gbn.running_var, rv, **TOL[torch.float32])


def test_eval_is_plain_batch_norm_with_running_stats():
    bn = nn.BatchNorm2d(4)
    bn.running_mean.copy_(torch.randn(4))
    bn.running_var.copy_(torch.rand(4) + 0.5)
    gbn = GhostBatchNorm2d(4, ghost_batch_size=2)
    _copy_bn_state(bn, gbn)
    bn.eval(), gbn.eval()
    x = torch.randn(9, 4, 3, 3)
    torch.testing.assert_close(gbn(x), bn(x), rtol=0, atol=0)
    torch.testing.assert_close(gbn.running_mean, bn.running_mean, rtol=0, atol=0)


def test_eval_without_running_stats_uses_the_whole_batch():
    """track_running_stats=False: inference normalises with the whole batch
    (as nn.BatchNorm does), never in ghost batches."""
    bn = nn.BatchNorm1d(4, track_running_stats=False).eval()
    gbn = GhostBatchNorm1d(4, ghost_batch_size=2, track_running_stats=False).eval()
    x = torch.randn(10, 4)
    torch.testing.assert_close(gbn(x), bn(x), rtol=0, atol=0)


def test_state_dicts_interchange_and_repr():
    bn = nn.BatchNorm2d(6)
    bn.running_mean.normal_()
    bn.num_batches_tracked.fill_(7)
    gbn = GhostBatchNorm2d(6, ghost_batch_size=16)
    assert list(gbn.state_dict()) == list(bn.state_dict())
    gbn.load_state_dict(bn.state_dict())
    back = nn.BatchNorm2d(6)
    back.load_state_dict(gbn.state_dict())
    for name, t in bn.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    assert "ghost_batch_size=16" in repr(gbn)
    assert [n for n, _ in gbn.named_parameters()] == ["weight", "bias"]
    none = GhostBatchNorm1d(3, affine=False, track_running_stats=False)
    assert none.weight is None and none.running_mean is None and none.num_batches_tracked is None


def test_dtype_and_device_arguments():
    gbn = GhostBatchNorm1d(3, device="cpu", dtype=torch.float64)
    assert gbn.weight.dtype == torch.float64 and gbn.running_var.dtype == torch.float64
    assert gbn.num_batches_tracked.dtype == torch.long
    y = gbn(torch.randn(12, 3, dtype=torch.float64))
    assert y.dtype == torch.float64


# ----------------------------------------------------------------------------- converter

def _model():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Sequential(nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4, momentum=None, eps=1e-3)),
                         nn.Flatten(), nn.Linear(4 * 5 * 5, 6), nn.BatchNorm1d(6, affine=False), nn.Linear(6, 2))


def test_converter_round_trip():
    torch.manual_seed(0)
    model = _model()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
            m.num_batches_tracked.fill_(3)
            if m.affine:
                m.weight.data.normal_()
                m.bias.data.normal_()
    model.eval()
    x = torch.randn(10, 3, 5, 5)
    before = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tensors = [m.weight for m in model.modules() if isinstance(m, nn.BatchNorm2d)]

    ghost = convert_ghost_batch_norm(model, ghost_batch_size=4)
    assert ghost is model
    kinds = [type(m) for m in ghost.modules() if "Norm" in type(m).__name__]
    assert kinds == [GhostBatchNorm2d, GhostBatchNorm2d, GhostBatchNorm1d]
    assert all(m.ghost_batch_size == 4 and not m.training for m in ghost.modules() if hasattr(m, "ghost_batch_size"))
    assert ghost[1].weight is tensors[0]  # the same Parameter: optimizers stay valid
    assert ghost[3][1].momentum is None and ghost[3][1].eps == 1e-3 and ghost[6].weight is None
    for k, v in ghost.state_dict().items():
        assert torch.equal(v, state[k]), k
    torch.testing.assert_close(ghost(x), before, rtol=0, atol=0)

    ghost.train()
    y = ghost(x)  # ghost batches of 4 in training
    assert y.shape == before.shape

    back = revert_ghost_batch_norm(ghost)
    kinds = [type(m) for m in back.modules() if "Norm" in type(m).__name__]
    assert kinds == [nn.BatchNorm2d, nn.BatchNorm2d, nn.BatchNorm1d]
    assert all(m.training for m in back.modules())
    back.eval()
    ghost_eval = copy.deepcopy(back)
    torch.testing.assert_close(back(x), convert_ghost_batch_norm(ghost_eval, 4)(x), rtol=0, atol=0)


def test_converter_root_and_sync_batch_norm():
    root = convert_ghost_batch_norm(nn.BatchNorm3d(2), 8)
    assert type(root) is GhostBatchNorm3d and root.ghost_batch_size == 8
    assert type(revert_ghost_batch_norm(root)) is nn.BatchNorm3d
    with pytest.raises(TypeError, match="SyncBatchNorm"):
        convert_ghost_batch_norm(nn.Sequential(nn.SyncBatchNorm(3)), 8)
    # SyncBatchNorm's own converter leaves ghost batch norm alone.
    ghost = nn.Sequential(GhostBatchNorm2d(3))
    assert type(nn.SyncBatchNorm.convert_sync_batchnorm(ghost)[0]) is GhostBatchNorm2d


# ----------------------------------------------------------------------------- DDP (gloo, 2 processes)

STEPS, LOCAL_BATCH, GHOST = 3, 10, 4


def _ddp_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), GhostBatchNorm1d(5, ghost_batch_size=GHOST), nn.ReLU(), nn.Linear(5, 1))


def _ddp_data(rank, step):
    gen = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(LOCAL_BATCH, 6, generator=gen) * 2 + 1, torch.randn(LOCAL_BATCH, 1, generator=gen)


def _train_wrapped(rank, wrap, make_optimizer):
    model = _ddp_model()
    opt = make_optimizer(model.parameters())
    wrapped = wrap(model, opt)
    for step in range(STEPS):
        x, t = _ddp_data(rank, step)
        nn.functional.mse_loss(wrapped(x), t).backward()
        opt.step()
        opt.zero_grad()
    return {k: v.clone() for k, v in model.state_dict().items()}


def _ddp_worker(rank, world, init_file, out_file):
    """torch DDP and fastsgd's BucketedDataParallel, in one process group
    (a spawn costs ~20 s here)."""
    torch.set_num_threads(1)
    try:
        import fastsgd
        from fastsgd.distributed import BucketedDataParallel
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        ddp = _train_wrapped(rank, lambda m, opt: nn.parallel.DistributedDataParallel(m),
                             lambda params: torch.optim.SGD(params, lr=0.1))
        bdp = _train_wrapped(rank, lambda m, opt: BucketedDataParallel(m, optimizer=opt),
                             lambda params: fastsgd.SGD(params, lr=0.1))
        result = {"ok": {"ddp": ddp, "bdp": bdp}}
    except Exception:  # noqa: BLE001
        result = {"crash": traceback.format_exc()}
    torch.save(result, out_file)
    os._exit(0)  # skip the slow process-group teardown


def _ddp_emulated(world):
    """One process: per step, each rank's forward on its own batch (ghost
    batches per rank) starting from rank 0's buffers (DDP broadcasts them),
    gradients averaged over ranks."""
    model = _ddp_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bn = model[1]
    buffers = {k: v.clone() for k, v in bn.named_buffers()}
    finals = [None] * world
    for step in range(STEPS):
        after = []
        for rank in range(world):
            for k, v in bn.named_buffers():
                v.copy_(buffers[k])
            x, t = _ddp_data(rank, step)
            (nn.functional.mse_loss(model(x), t) / world).backward()
            after.append({k: v.clone() for k, v in bn.named_buffers()})
        opt.step()
        opt.zero_grad()
        buffers = after[0]
        finals = after
    return model, finals


def test_ddp_and_bucketed_data_parallel_two_processes_gloo():
    """Each rank normalises its own ghost batches; after three steps every
    rank's parameters and buffers equal a one-process emulation of that."""
    world = 2
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        outs = [os.path.join(tmp, f"rank{r}.pt") for r in range(world)]
        procs = [ctx.Process(target=_ddp_worker, args=(r, world, os.path.join(tmp, "init"), outs[r]), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(150)
            if p.is_alive():
                p.kill()
        results = []
        for r in range(world):
            assert os.path.exists(outs[r]), f"rank {r} produced no result (exit code {procs[r].exitcode})"
            res = torch.load(outs[r])
            assert "crash" not in res, res.get("crash")
            results.append(res["ok"])
    model, finals = _ddp_emulated(world)
    for rank, per_wrapper in enumerate(results):
        for wrapper, state in per_wrapper.items():
            for name, want in model.state_dict().items():
                if name.startswith("1.") and name.split(".", 1)[1] in finals[rank]:
                    want = finals[rank][name.split(".", 1)[1]]
                torch.testing.assert_close(state[name], want, rtol=1e-5, atol=1e-6,
                                           msg=lambda m, n=name, r=rank, w=wrapper: f"{w} rank {r} {n}: {m}")
        assert not torch.equal(per_wrapper["ddp"]["1.running_mean"], results[1 - rank]["ddp"]["1.running_mean"])


# ----------------------------------------------------------------------------- Triton kernels

TRITON_CASES = [
    ((15, 5), 4, None),                  # last ghost batch of 3, (N, C)
    ((10, 3, 2, 3), 4, None),            # NCHW, last of 2 samples x 6 values
    ((10, 3, 2, 3), 4, torch.channels_last),
    ((7, 2, 2, 2, 2), 3, torch.channels_last_3d),
]


TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def triton_env():
    """The Triton ghost-BN kernels: compiled on a CUDA machine, else run by the
    interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1
    before triton is first imported)."""
    requirements.triton()
    return importlib.import_module("fastsgd.kernels.triton_ghost_bn"), TRITON_DEVICE


def _to(d, device):
    return {k: None if v is None else v.to(device) for k, v in d.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", TRITON_CASES, ids=_case_id)
def test_triton_matches_reference(triton_env, case, dtype):
    device = triton_env[1]
    shape, g, fmt = case
    x, w, b, rm, rv, dy = _inputs(shape, dtype, fmt)
    got = _run(ghost_batch_norm, x.to(device), w.to(device), b.to(device), rm.to(device), rv.to(device),
               dy.to(device), training=True, ghost_batch_size=g, backend="triton")
    assert got["y"].stride() == x.stride() and got["y"].dtype == dtype
    want = _run(ghost_batch_norm_reference, x.float(), w, b, rm, rv, dy.float(), training=True, ghost_batch_size=g)
    _compare(_to(got, "cpu"), want, TOL[dtype])


def test_triton_many_chunks_no_affine_fp16(triton_env, monkeypatch):
    """Tiny tiles and chunks so every ghost batch spans several programs (the
    partial sums are combined across chunks) and NCHW planes take several
    tiles; no weight/bias, no running stats."""
    tg, device = triton_env
    monkeypatch.setattr(tg, "_TILE", 8)
    monkeypatch.setattr(tg, "_MAX_INNER", 4)
    monkeypatch.setattr(tg, "_VALUES_PER_PROGRAM", 8)
    for case in [((7, 2, 2, 3), 4, None), ((7, 2, 2, 3), 4, torch.channels_last)]:  # last batch: 3
        x, _, _, _, _, dy = _inputs(case[0], torch.float16, case[2], seed=3)
        cfg = tg._launch_config(x.view(7, 2, 6), 4)
        assert cfg["chunks"] > 1 and (cfg["inner"] == 1 or cfg["inner"] > cfg["block_i"])
        got = _run(ghost_batch_norm, x.to(device), None, None, None, None, dy.to(device), training=True,
                   ghost_batch_size=4, backend="triton")
        want = _run(ghost_batch_norm_reference, x.float(), None, None, None, None, dy.float(), training=True,
                    ghost_batch_size=4)
        _compare(_to(got, "cpu"), want, TOL[torch.float16])


def test_triton_refuses_float64(triton_env):
    device = triton_env[1]
    with pytest.raises(RuntimeError, match="float32, bfloat16, float16"):
        ghost_batch_norm(torch.randn(8, 3, dtype=torch.float64, device=device), None, None, training=True,
                         ghost_batch_size=4, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", [None, torch.channels_last])
def test_triton_gpu_resnet_shape_and_auto_backend(fmt):
    """A ResNet-sized tensor on the GPU (chunked ghost batches, many programs);
    backend="auto" must pick the kernels there."""
    x, w, b, rm, rv, dy = _inputs((256, 64, 28, 28), torch.float32, fmt)
    dev = torch.device("cuda")
    got = _run(ghost_batch_norm, x.to(dev), w.to(dev), b.to(dev), rm.to(dev), rv.to(dev), dy.to(dev),
               training=True, ghost_batch_size=32, backend="auto")
    want = _run(ghost_batch_norm_reference, x.to(dev), w.to(dev), b.to(dev), rm.to(dev), rv.to(dev), dy.to(dev),
                training=True, ghost_batch_size=32)
    _compare(got, want, dict(rtol=1e-3, atol=1e-3))


@pytest.mark.parametrize("layout", ["1d", "nchw", "channels_last"])
def test_converted_model_with_inplace_relu_trains(layout):
    """torchvision ResNets follow every BatchNorm with nn.ReLU(inplace=True)."""
    torch.manual_seed(0)
    if layout == "1d":
        body, x = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(inplace=True)), torch.randn(8, 3)
    else:
        body, x = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(inplace=True)), torch.randn(8, 3, 6, 6)
        if layout == "channels_last":
            body, x = body.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    reference = copy.deepcopy(body)
    ghost = convert_ghost_batch_norm(body, 4)
    # the same model with ghost batches emulated by hand (ReLU not in place)
    y = ghost(x)
    y.sum().backward()
    y_ref = torch.cat([torch.relu(reference[1](reference[0](xi))) for xi in x.split(4)])
    y_ref.sum().backward()
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ghost[0].weight.grad, reference[0].weight.grad, atol=1e-4, rtol=1e-4)
