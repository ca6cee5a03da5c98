"""BucketedDataParallel: multi-process gloo tests on CPU.

Spawning processes is the expensive part (seconds per process on a loaded
machine), so each world size is spawned once and runs every scenario in one
process group; the scenarios' final parameters, buffers and statistics come
back to pytest, which compares them with single-process training on the
concatenated batch (computed here) and with torch DDP (computed in the
workers). A separate group checks that a rank raising mid-backward makes the
other rank fail within the process group's timeout. World-size-1 checks
(errors, checkpoints, fallbacks) run in the pytest process itself.
"""
from __future__ import annotations

import datetime
import os
import tempfile
import time
import traceback
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import fastsgd
from fastsgd.distributed import BucketedDataParallel
from fastsgd.distributed.buckets import assign_buckets

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

STEPS = 3
LOCAL_BATCH = 4
PG_TIMEOUT_S = 20        # every collective in the scenario groups fails after this
FAIL_PG_TIMEOUT_S = 6    # the failing-rank group
JOIN_TIMEOUT_S = 150     # a whole spawned group, startup included

# Bucket caps in MiB: every parameter alone (1 byte), all in one, and in between.
CAPS = {"each": dict(bucket_cap_mb=1e-6, first_bucket_mb=1e-6),
        "one": dict(bucket_cap_mb=100, first_bucket_mb=100),
        "mixed": dict(bucket_cap_mb=0.0004, first_bucket_mb=0.0001)}


# ---- models, data, optimizers (identical in every process) ----------------------
class Branchy(nn.Module):
    """An MLP with a branch used only when asked and a layer never used."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 10)
        self.branch = nn.Linear(10, 10)
        self.never = nn.Linear(10, 10)
        self.out = nn.Linear(10, 3)

    def forward(self, x, use_branch=True):
        h = torch.relu(self.inp(x))
        if use_branch:
            h = h + torch.tanh(self.branch(h))
        return self.out(h)


def make_model(kind: str) -> nn.Module:
    torch.manual_seed(1234)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 3))
    if kind == "bn":
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    if kind == "branchy":
        return Branchy()
    raise ValueError(kind)


def make_opt(kind: str, params):
    if kind == "momentum":
        return fastsgd.Momentum(params, lr=0.05, momentum=0.9, weight_decay=1e-3)
    if kind == "nesterov":
        return fastsgd.Nesterov(params, lr=0.05, momentum=0.9, weight_decay=1e-3)
    if kind == "lars":
        return fastsgd.LARS(params, lr=0.5, momentum=0.9, weight_decay=1e-3, trust_coeff=0.02)
    if kind == "lamb":
        return fastsgd.LAMB(params, lr=0.01, weight_decay=0.01)
    if kind == "lamb_clip":
        return fastsgd.LAMB(params, lr=0.01, weight_decay=0.01, max_grad_norm=0.5)
    raise ValueError(kind)


def global_batch(model_kind: str, step: int, micro: int, world: int):
    g = torch.Generator().manual_seed(1000 * step + micro)
    n = world * LOCAL_BATCH
    x = torch.randn(n, 3, 6, 6, generator=g) if model_kind == "bn" else torch.randn(n, 6, generator=g)
    return x, torch.randn(n, 3, generator=g)


def shard(t, rank):
    return t[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH]


def rank_loss(model, x, y, model_kind, rank):
    """Rank ``rank``'s loss on its shard; in the branchy model only rank 0 uses the branch."""
    if model_kind == "branchy":
        return F.mse_loss(model(x, use_branch=rank == 0), y)
    return F.mse_loss(model(x), y)


# name -> model, optimizer, wrapper options, micro-batches per step
SCENARIOS = {
    "plain_momentum": dict(model="mlp", opt="momentum", fused=False, caps="mixed", accum=1),
    "fused_momentum": dict(model="mlp", opt="momentum", fused=True, caps="mixed", accum=1),
    "fused_each_bucket": dict(model="mlp", opt="nesterov", fused=True, caps="each", accum=1),
    "fused_eager_each_bucket": dict(model="mlp", opt="momentum", fused=True, caps="each", accum=1, eager=True),
    "fused_one_bucket": dict(model="mlp", opt="nesterov", fused=True, caps="one", accum=1),
    "plain_each_bucket_no_predivide": dict(model="mlp", opt="momentum", fused=False, caps="each", accum=1,
                                           predivide=False),
    "fused_no_sync": dict(model="mlp", opt="momentum", fused=True, caps="mixed", accum=3),
    "plain_no_sync": dict(model="mlp", opt="momentum", fused=False, caps="each", accum=2),
    "fused_lars": dict(model="mlp", opt="lars", fused=True, caps="each", accum=1),
    "fused_lamb": dict(model="mlp", opt="lamb", fused=True, caps="mixed", accum=1),
    "lamb_clip_falls_back": dict(model="mlp", opt="lamb_clip", fused=True, caps="mixed", accum=1),
    "fused_batchnorm": dict(model="bn", opt="momentum", fused=True, caps="mixed", accum=1),
    "fused_find_unused": dict(model="branchy", opt="momentum", fused=True, caps="each", accum=1,
                              find_unused=True),
}
WORLD3_SCENARIOS = ["plain_momentum", "fused_momentum", "fused_no_sync", "fused_find_unused"]


# ---- the worker side ----------------------------------------------------------------
def train(cfg, rank, world, wrapper, group=None):
    """Train STEPS steps; ``wrapper`` is "bdp" or "ddp". Returns final state and per-step records."""
    model = make_model(cfg["model"])
    opt = make_opt(cfg["opt"], model.parameters())
    caps = CAPS[cfg["caps"]]
    find_unused = cfg.get("find_unused", False)
    if wrapper == "bdp":
        net = BucketedDataParallel(model, optimizer=opt if cfg["fused"] else None, **caps, process_group=group,
                                   gradient_predivide=cfg.get("predivide", True),
                                   find_unused_parameters=find_unused, eager_step=cfg.get("eager", False),
                                   track_grad_norms=True)
    else:
        net = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=caps["bucket_cap_mb"],
                                                  find_unused_parameters=find_unused)
    records = []
    for step in range(STEPS):
        moved = []
        for micro in range(cfg["accum"]):
            x, y = global_batch(cfg["model"], step, micro, world)
            last = micro == cfg["accum"] - 1
            before = [p.detach().clone() for p in model.parameters()]
            with nullcontext() if last else net.no_sync():
                rank_loss(net, shard(x, rank), shard(y, rank), cfg["model"], rank).backward()
            moved.append(any(not torch.equal(b, p) for b, p in zip(before, model.parameters())))
        rec = {"moved_in_backward": moved[-1], "moved_in_no_sync": any(moved[:-1]),
               "grad_is_none": {n: p.grad is None for n, p in model.named_parameters()}}
        if wrapper == "bdp":
            rec["norms"] = {k: (v.item() if torch.is_tensor(v) else v) for k, v in net.last_grad_sq_norms.items()}
            rec["per_bucket_step"] = net.per_bucket_step
            rec["buckets"] = net.buckets
        records.append(rec)
        opt.step()
        opt.zero_grad()
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "buffers": {n: b.clone() for n, b in model.named_buffers()},
            "records": records}


def scenario_worker(rank, world, names):
    out = {}
    for name in names:
        cfg = SCENARIOS[name]
        try:
            out[name] = {"bdp": train(cfg, rank, world, "bdp"), "ddp": train(cfg, rank, world, "ddp")}
        except Exception:  # noqa: BLE001 -- reported to pytest with the traceback
            out[name] = {"error": traceback.format_exc()}
    out["unused_error"] = unused_error_message()
    out["mismatch_error"] = mismatch_error_message(rank)
    if world == 3:  # a process group of global ranks 1 and 2: its rank 0 is global rank 1
        sub = dist.new_group([1, 2])
        if rank > 0:
            out["subgroup"] = train(SCENARIOS["fused_momentum"], dist.get_rank(sub), 2, "bdp", group=sub)
    return out


def mismatch_error_message(rank):
    """Rank 1 builds a wider first layer: every rank must refuse to wrap."""
    model = nn.Sequential(nn.Linear(6, 10 + (rank == 1)), nn.ReLU())
    try:
        BucketedDataParallel(model)
    except RuntimeError as exc:
        return str(exc)
    return None


def unused_error_message():
    model = make_model("branchy")
    net = BucketedDataParallel(model)
    x, y = global_batch("mlp", 0, 0, dist.get_world_size())
    try:
        F.mse_loss(net(x), y).backward()
    except RuntimeError as exc:
        return str(exc)
    return None


class Boom(torch.autograd.Function):
    """Identity forward; raises in backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("injected failure in backward")


class MaybeBoom(nn.Module):
    def __init__(self, armed: bool):
        super().__init__()
        self.armed = armed

    def forward(self, x):
        return Boom.apply(x) if self.armed else x


def failing_worker(rank, world, fused):
    """Rank 1 raises half-way through its second backward (after two layers'
    buckets are launched) and stays alive, so only the timeout can release
    rank 0; rank 0 reports how it failed and how fast."""
    mlp = make_model("mlp")
    boom = MaybeBoom(False)
    model = nn.Sequential(mlp[0], mlp[1], boom, *mlp[2:])
    opt = fastsgd.Momentum(model.parameters(), lr=0.1)
    net = BucketedDataParallel(model, optimizer=opt if fused else None, **CAPS["each"])
    x, y = global_batch("mlp", 0, 0, world)
    x, y = shard(x, rank), shard(y, rank)
    F.mse_loss(net(x), y).backward()  # one good step
    opt.step()
    boom.armed = rank == 1
    loss = F.mse_loss(net(x), y)
    t0 = time.monotonic()
    try:
        loss.backward()
    except RuntimeError as exc:
        if rank == 1:
            time.sleep(FAIL_PG_TIMEOUT_S + 10)
        return {"error": str(exc), "seconds": time.monotonic() - t0}
    return {"error": None, "seconds": time.monotonic() - t0}


def _entry(fn, rank, world, init_file, out_file, timeout_s, args):
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        result = {"ok": fn(rank, world, *args)}
    except Exception:  # noqa: BLE001
        result = {"crash": traceback.format_exc()}
    torch.save(result, out_file)
    # Skip the interpreter and process-group teardown: it is slow, and after an
    # injected failure it may wait on peers.
    os._exit(0)


def spawn(fn, world, *args, timeout_s=PG_TIMEOUT_S, wait_for=None):
    """Run ``fn(rank, world, *args)`` in ``world`` fresh processes; return the
    per-rank results. ``wait_for``: ranks whose results are needed (the rest
    are killed once those are in)."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "init")
        outs = [os.path.join(tmp, f"rank{r}.pt") for r in range(world)]
        procs = [ctx.Process(target=_entry, args=(fn, r, world, init, outs[r], timeout_s, args), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        needed = range(world) if wait_for is None else wait_for
        for r in needed:
            procs[r].join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results = []
        for r in range(world):
            if r in needed and not os.path.exists(outs[r]):
                pytest.fail(f"rank {r} of {world} produced no result within {JOIN_TIMEOUT_S}s "
                            f"(exit code {procs[r].exitcode})")
            res = torch.load(outs[r]) if os.path.exists(outs[r]) else None
            if res is not None and "crash" in res:
                pytest.fail(f"rank {r} crashed:\n{res['crash']}")
            results.append(None if res is None else res["ok"])
        return results


@pytest.fixture(scope="module")
def world2():
    return spawn(scenario_worker, 2, list(SCENARIOS))


@pytest.fixture(scope="module")
def world3():
    return spawn(scenario_worker, 3, WORLD3_SCENARIOS)


# ---- the single-process reference -------------------------------------------------------
def reference(cfg, world):
    """Single-process training on the concatenated batch. Returns final params and,
    per step, the local squared gradient norms of each shard and the squared norm
    of the mean gradient."""
    model = make_model(cfg["model"])
    opt = make_opt(cfg["opt"], model.parameters())
    norms = []
    for step in range(STEPS):
        local = [0.0] * world
        for micro in range(cfg["accum"]):
            x, y = global_batch(cfg["model"], step, micro, world)
            per_rank = [rank_loss(model, shard(x, r), shard(y, r), cfg["model"], r) for r in range(world)]
            sum(per_rank).div(world).backward()
        full = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        for r in range(world):  # the shards' gradients at the same parameters
            grads = [torch.zeros_like(p) for p in model.parameters()]
            for micro in range(cfg["accum"]):
                x, y = global_batch(cfg["model"], step, micro, world)
                gs = torch.autograd.grad(rank_loss(model, shard(x, r), shard(y, r), cfg["model"], r),
                                         list(model.parameters()), allow_unused=True)
                grads = [a + (b if b is not None else 0) for a, b in zip(grads, gs)]
            local[r] = sum(float(g.double().square().sum()) for g in grads)
        norms.append({"local": local, "global": sum(float(g.double().square().sum()) for g in full)})
        opt.step()
        opt.zero_grad()
    return {n: p.detach() for n, p in model.named_parameters()}, norms


def assert_close_dicts(got, want, what, atol=2e-5, rtol=1e-4):
    assert got.keys() == want.keys(), f"{what}: keys differ: {sorted(got)} vs {sorted(want)}"
    for k in want:
        err = (got[k].double() - want[k].double()).abs().max().item()
        torch.testing.assert_close(got[k], want[k], atol=atol, rtol=rtol,
                                   msg=lambda m: f"{what}: '{k}' differs (max abs err {err:.3g}): {m}")


def result(results, name):
    for r, res in enumerate(results):
        assert "error" not in res[name], f"scenario {name} failed on rank {r}:\n{res[name]['error']}"
    return [res[name] for res in results]


def check_scenario(results, name, world):
    cfg = SCENARIOS[name]
    per_rank = result(results, name)
    want, norms = (None, None) if cfg["model"] == "bn" else reference(cfg, world)
    for r, res in enumerate(per_rank):
        bdp, ddp = res["bdp"], res["ddp"]
        assert_close_dicts(bdp["params"], ddp["params"], f"{name} rank {r}: BucketedDataParallel vs torch DDP")
        assert_close_dicts(bdp["buffers"], ddp["buffers"], f"{name} rank {r}: buffers vs torch DDP")
        if want is not None:
            assert_close_dicts(bdp["params"], want, f"{name} rank {r}: vs single-process on the whole batch")
        for step, rec in enumerate(bdp["records"]):
            per_bucket = cfg["fused"] and cfg["opt"] != "lamb_clip"
            assert rec["per_bucket_step"] == per_bucket
            assert rec["moved_in_backward"] == per_bucket, \
                f"{name} step {step}: params changed in backward: {rec['moved_in_backward']}, expected {per_bucket}"
            assert not rec["moved_in_no_sync"], f"{name} step {step}: params changed in a no_sync() backward"
            assert rec["grad_is_none"] == ddp["records"][step]["grad_is_none"]
            n = rec["norms"]
            assert n["world_size"] == world and n["accumulation_steps"] == cfg["accum"]
            assert n["local_batch_size"] == LOCAL_BATCH * cfg["accum"]
            assert n["global_batch_size"] == world * LOCAL_BATCH * cfg["accum"]
            if norms is not None:
                ref = norms[step]
                assert n["local"] == pytest.approx(ref["local"][r], rel=1e-4, abs=1e-9), f"{name} step {step}"
                assert n["local_mean"] == pytest.approx(sum(ref["local"]) / world, rel=1e-4, abs=1e-9)
                assert n["global"] == pytest.approx(ref["global"], rel=1e-4, abs=1e-9)
    return per_rank


# ---- world size 2 --------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_world2_matches_single_process_and_torch_ddp(world2, name):
    check_scenario(world2, name, 2)


def test_world2_bucket_caps_give_one_bucket_per_param_or_one_for_all(world2):
    each = result(world2, "fused_each_bucket")[0]["bdp"]["records"][-1]["buckets"]
    one = result(world2, "fused_one_bucket")[0]["bdp"]["records"][-1]["buckets"]
    assert [len(b) for b in each] == [1] * 6
    assert len(one) == 1 and len(one[0]) == 6
    # Rebuilt in gradient-ready order: the last layer's grads are ready first.
    assert each[0][0].startswith("4.")


def test_world2_unused_parameter_error_names_the_parameters(world2):
    for res in world2:
        msg = res["unused_error"]
        assert msg is not None, "a parameter without gradient did not raise"
        assert "'never.weight'" in msg and "'never.bias'" in msg and "find_unused_parameters=True" in msg
        assert "'inp.weight'" not in msg


def test_world2_different_models_on_the_ranks_raise_on_every_rank(world2):
    for res in world2:
        assert res["mismatch_error"] is not None and "the ranks' models differ" in res["mismatch_error"]


def test_world2_find_unused_leaves_globally_unused_grad_none_and_param_unchanged(world2):
    init = make_model("branchy").state_dict()
    for res in result(world2, "fused_find_unused"):
        assert all(rec["grad_is_none"]["never.weight"] for rec in res["bdp"]["records"])
        assert not any(rec["grad_is_none"]["branch.weight"] for rec in res["bdp"]["records"])
        torch.testing.assert_close(res["bdp"]["params"]["never.weight"], init["never.weight"], atol=0, rtol=0)


# ---- world size 3 --------------------------------------------------------------------------
@pytest.mark.parametrize("name", WORLD3_SCENARIOS)
def test_world3_matches_single_process_and_torch_ddp(world3, name):
    check_scenario(world3, name, 3)


def test_world3_subgroup_of_ranks_1_and_2_matches_single_process(world3):
    want, _ = reference(SCENARIOS["fused_momentum"], 2)
    for rank in (1, 2):
        assert_close_dicts(world3[rank]["subgroup"]["params"], want, f"process_group=[1, 2], rank {rank}")


# ---- a failing rank ------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [True])  # one spawn is ~25 s here; the fused path is the superset
def test_rank_raising_mid_backward_makes_the_other_fail_within_the_timeout(fused):
    res = spawn(failing_worker, 2, fused, timeout_s=FAIL_PG_TIMEOUT_S, wait_for=[0])[0]
    assert res["error"] is not None, "rank 0 finished its backward although rank 1 never joined"
    assert "BucketedDataParallel" in res["error"] and "rank 0 of 2" in res["error"], res["error"]
    assert res["seconds"] < FAIL_PG_TIMEOUT_S + 10, f"rank 0 failed only after {res['seconds']:.1f}s"


# ---- in-process checks (world size 1) -------------------------------------------------------
@pytest.fixture
def world1(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=10))
    yield
    dist.destroy_process_group()


def test_assign_buckets_caps_order_and_dtypes():
    ps = [torch.zeros(10), torch.zeros(10), torch.zeros(30), torch.zeros(5, dtype=torch.float64), torch.zeros(10)]
    # 4-byte floats: caps of 50 bytes (first) and 100 bytes.
    # [4, 2] reaches the first cap; the still-open buckets follow in the order of their first member.
    assert assign_buckets(ps, [4, 3, 2, 1, 0], 50, 100) == [[4, 2], [3], [1, 0]]
    assert assign_buckets(ps, [0, 1, 2, 3, 4], 1, 1) == [[0], [1], [2], [3], [4]]
    assert assign_buckets(ps, [0, 1, 2, 3, 4], 10**6, 10**6) == [[0, 1, 2, 4], [3]]
    with pytest.raises(ValueError, match="permutation"):
        assign_buckets(ps, [0, 1, 1, 3, 4], 1, 1)


def test_constructor_errors(world1):
    with pytest.raises(ValueError, match="Invalid bucket_cap_mb: 0"):
        BucketedDataParallel(make_model("mlp"), bucket_cap_mb=0)
    with pytest.raises(TypeError, match="needs a fastsgd optimizer"):
        m = make_model("mlp")
        BucketedDataParallel(m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        BucketedDataParallel(make_model("mlp").requires_grad_(False))


def test_without_process_group_is_a_clear_error():
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        BucketedDataParallel(make_model("mlp"))


def test_state_dict_is_the_modules_and_round_trips(world1):
    model = make_model("bn")
    net = BucketedDataParallel(model)
    sd = net.state_dict()
    assert list(sd) == list(model.state_dict())
    fresh = make_model("bn")
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1)
    net.load_state_dict(fresh.state_dict())
    assert_close_dicts(dict(model.named_parameters()), dict(fresh.named_parameters()), "loaded")
    with pytest.raises(ValueError, match="assign=True"):
        net.load_state_dict(sd, assign=True)


def test_grad_views_survive_set_to_none_and_optimizer_state_dict_is_unchanged(world1):
    model = make_model("mlp")
    opt = fastsgd.Momentum(model.parameters(), lr=0.1)
    net = BucketedDataParallel(model, optimizer=opt)
    x, y = global_batch("mlp", 0, 0, 1)
    for _ in range(3):
        F.mse_loss(net(shard(x, 0)), shard(y, 0)).backward()
        flats = {b.flat.untyped_storage().data_ptr() for b in net._reducer.buckets}
        for p in model.parameters():  # every grad is a view into a bucket buffer
            assert p.grad.untyped_storage().data_ptr() in flats
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert all(p.grad is None for p in model.parameters())
    ref_model = make_model("mlp")
    ref_opt = fastsgd.Momentum(ref_model.parameters(), lr=0.1)
    for _ in range(3):
        F.mse_loss(ref_model(shard(x, 0)), shard(y, 0)).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    assert_close_dicts(dict(model.named_parameters()), dict(ref_model.named_parameters()), "world 1")
    sd, ref_sd = opt.state_dict(), ref_opt.state_dict()
    assert sd["param_groups"] == ref_sd["param_groups"] and sd["state"].keys() == ref_sd["state"].keys()


def test_grad_scaler_with_per_bucket_step_is_refused(world1):
    model = make_model("mlp")
    opt = fastsgd.Momentum(model.parameters(), lr=0.1)
    net = BucketedDataParallel(model, optimizer=opt)
    scaler = torch.amp.GradScaler("cpu")
    x, y = global_batch("mlp", 0, 0, 1)
    scaler.scale(F.mse_loss(net(shard(x, 0)), shard(y, 0))).backward()
    with pytest.raises(RuntimeError, match="GradScaler is not supported with the per-bucket step"):
        scaler.step(opt)


def test_backward_without_forward_through_the_wrapper_is_an_error(world1):
    model = make_model("mlp")
    net = BucketedDataParallel(model)
    x, y = global_batch("mlp", 0, 0, 1)
    F.mse_loss(net(shard(x, 0)), shard(y, 0)).backward()
    with pytest.raises(RuntimeError, match="no forward through the wrapper prepared"):
        F.mse_loss(model(shard(x, 0)), shard(y, 0)).backward()


def test_bf16_model_sends_statistics_in_their_own_float64_all_reduce(world1):
    """bf16 buckets cannot carry the statistics exactly; they take the separate path."""
    model = make_model("mlp").to(torch.bfloat16)
    net = BucketedDataParallel(model, track_grad_norms=True)
    assert not net._reducer._stats_in_bucket
    x, y = global_batch("mlp", 0, 0, 1)
    x, y = shard(x, 0).to(torch.bfloat16), shard(y, 0).to(torch.bfloat16)
    F.mse_loss(net(x), y).backward()
    direct = sum(float(p.grad.double().square().sum()) for p in model.parameters())
    n = net.last_grad_sq_norms
    assert n["global"].item() == pytest.approx(direct, rel=1e-3)
    assert n["local"].item() == pytest.approx(direct, rel=1e-3)
    assert n["local_mean"].item() == pytest.approx(direct, rel=1e-3)
    assert n["global_batch_size"] == LOCAL_BATCH and n["local_batch_size"] == LOCAL_BATCH


def test_grad_scaler_without_per_bucket_step_matches_unwrapped_training(world1):
    x, y = global_batch("mlp", 0, 0, 1)
    x, y = shard(x, 0), shard(y, 0)
    finals = []
    for wrap in (True, False):
        model = make_model("mlp")
        opt = fastsgd.Momentum(model.parameters(), lr=0.1)
        net = BucketedDataParallel(model) if wrap else model
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        for _ in range(3):
            scaler.scale(F.mse_loss(net(x), y)).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        finals.append(dict(model.named_parameters()))
    assert_close_dicts(finals[0], finals[1], "GradScaler, wrapped vs unwrapped")
