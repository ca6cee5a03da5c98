"""The Triton LARS/LAMB fused path through the Triton interpreter: a tensor
that fits one program (1..fused_max elements) gets its norms, trust ratio
(LAMB: step count) and update in one program of one launch; larger and
empty tensors keep the 2-pass launches (triton_optim.py).

Checked here: the fused path gives the 2-pass path's results bit for bit
(FASTSGD_GPU_TWO_PASS=1 selects the latter), both match the float64
reference, and the launches really are the ones the fused path promises.
Shapes sit below, at and above the interpreter's block (64) and chunk =
fused_max (128); layouts are all-fused, or fused mixed with large and empty
tensors. float64 is not a Triton-backend dtype.
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

from fastsgd.kernels import gpu_passes  # noqa: E402
from fastsgd.kernels import triton_optim as T  # noqa: E402

CPU = torch.device("cpu")
CFG = T.common.INTERPRETER_CONFIG
FUSED, BLOCK = CFG.fused_max, CFG.block
assert FUSED == CFG.chunk, "the shapes below assume fused_max == chunk"

ALL_FUSED = [(1,), (7,), (BLOCK - 1,), (BLOCK,), (BLOCK + 1,), (3, 5, 7), (FUSED - 1,), (FUSED,)]
MIXED = [(FUSED + 1,), (5,), (0,), (2 * FUSED + 5,), (FUSED,), (13, 17), (FUSED - 1,), (1,)]
LAYOUTS = {"all_fused": ALL_FUSED, "mixed": MIXED}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

LARS_CASES = [
    dict(momentum=0.9, weight_decay=1e-4),
    dict(momentum=0.9, weight_decay=1e-4, nesterov=True, trust_clip=True),
    dict(momentum=0.0, weight_decay=0.0, always_adapt=True, trust_coeff=0.02),
    dict(momentum=0.9, dampening=0.1, weight_decay=5e-4, lr_in_momentum=True, trust_clip=True),
]
LAMB_CASES = [
    dict(weight_decay=0.01),
    dict(weight_decay=0.0),  # no adaptation: only the step counts
    dict(weight_decay=0.0, always_adapt=True, trust_clip=True),
    dict(weight_decay=0.1, bias_correction=False, beta1=0.8, beta2=0.99, eps=1e-3),
]


def _id(x):
    return str(x).replace("torch.", "")


def _step_inputs(shapes, dtype, step, lr_as_tensor, grad_scale):
    """A step's gradients (scaled by ``grad_scale`` when given, with the scale tensor) and lr."""
    grads = K.make_tensors(shapes, dtype, CPU, seed=100 + step)
    scale = None
    if grad_scale is not None:
        scale = torch.tensor(grad_scale)
        grads = [(g.double() * grad_scale).to(dtype) for g in grads]
    return grads, scale, torch.tensor(K.LRS[step]) if lr_as_tensor else K.LRS[step]


def _lars_run(shapes, dtype, hp, *, steps=3, lr_as_tensor=False, grad_scale=None):
    params = K.make_tensors(shapes, dtype, CPU)
    bufs = [torch.zeros_like(p) for p in params] if hp.get("momentum", 0.9) != 0 else None
    for step in range(steps):
        grads, scale, lr = _step_inputs(shapes, dtype, step, lr_as_tensor, grad_scale)
        T.lars_step(params, grads, bufs, lr=lr, first_step=step == 0, grad_scale=scale, **hp)
    return params + (bufs or [])


def _lamb_run(shapes, dtype, hp, *, steps=3, lr_as_tensor=False, grad_scale=None, clip_divisor=None):
    params = K.make_tensors(shapes, dtype, CPU)
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    counts = [torch.zeros(()) for _ in params]
    for step in range(steps):
        grads, scale, lr = _step_inputs(shapes, dtype, step, lr_as_tensor, grad_scale)
        T.lamb_step(params, grads, m, v, counts, lr=lr, grad_scale=scale, clip_divisor=clip_divisor, **hp)
    return params + m + v + counts


def _both_paths(monkeypatch, run):
    """``run()`` on the fused path, then with FASTSGD_GPU_TWO_PASS=1 (read per call)."""
    monkeypatch.delenv(gpu_passes.TWO_PASS_ENV, raising=False)
    fused = run()
    monkeypatch.setenv(gpu_passes.TWO_PASS_ENV, "1")
    two_pass = run()
    return fused, two_pass


def _assert_equal(fused, two_pass):
    for i, (a, b) in enumerate(zip(fused, two_pass)):
        assert torch.equal(a, b), f"tensor {i} (shape {tuple(a.shape)}): fused and 2-pass differ by " \
                                  f"{(a.double() - b.double()).abs().max().item()}"


# ---- the fused path gives the 2-pass results bit for bit ------------------------

@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("hp", LARS_CASES, ids=_id)
def test_lars_fused_equals_two_pass(monkeypatch, layout, dtype, hp):
    _assert_equal(*_both_paths(monkeypatch, lambda: _lars_run(LAYOUTS[layout], dtype, hp)))


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("hp", LAMB_CASES, ids=_id)
def test_lamb_fused_equals_two_pass(monkeypatch, layout, dtype, hp):
    _assert_equal(*_both_paths(monkeypatch, lambda: _lamb_run(LAYOUTS[layout], dtype, hp)))


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_device_scalars_fused_equals_two_pass(monkeypatch, layout):
    """lr as a device tensor (LARC's clip reads it in the fused program), grad scale, clip divisor."""
    shapes = LAYOUTS[layout]
    _assert_equal(*_both_paths(monkeypatch, lambda: _lars_run(
        shapes, torch.float32, LARS_CASES[1], lr_as_tensor=True, grad_scale=1024.0)))
    _assert_equal(*_both_paths(monkeypatch, lambda: _lamb_run(
        shapes, torch.bfloat16, LAMB_CASES[0], lr_as_tensor=True, grad_scale=256.0, clip_divisor=torch.tensor(2.5))))


# ---- and both match the float64 reference ----------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_fused_lars_matches_reference(monkeypatch, layout, dtype):
    monkeypatch.delenv(gpu_passes.TWO_PASS_ENV, raising=False)
    for hp in LARS_CASES:
        K.check_lars(T, CPU, LAYOUTS[layout], dtype, hp)
    K.check_lars(T, CPU, LAYOUTS[layout], dtype, LARS_CASES[1], lr_as_tensor=True, grad_scale=1024.0)


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_fused_lamb_matches_reference(monkeypatch, layout, dtype):
    monkeypatch.delenv(gpu_passes.TWO_PASS_ENV, raising=False)
    for hp in LAMB_CASES:
        K.check_lamb(T, CPU, LAYOUTS[layout], dtype, hp)
    K.check_lamb(T, CPU, LAYOUTS[layout], dtype, LAMB_CASES[0], grad_scale=256.0, clip_divisor=torch.tensor(2.5))


def test_skipped_step_changes_nothing_on_the_fused_path(monkeypatch):
    monkeypatch.delenv(gpu_passes.TWO_PASS_ENV, raising=False)
    K.check_skip_changes_nothing(T, CPU)  # its tensors (5, 33 elements) are all fused


# ---- the launches ----------------------------------------------------------------

class _Counted:
    """A Triton kernel whose launches (``kernel[grid](...)``) are noted by name."""

    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        self.log.append(self.name)
        return self.kernel[grid]


@pytest.fixture
def launches(monkeypatch):
    log = []
    for name in ("momentum_sgd_kernel", "lars_partials_kernel", "trust_ratio_kernel", "lamb_kernel"):
        monkeypatch.setattr(T, name, _Counted(getattr(T, name), name, log))
    return log


def _lars_once(shapes, **hp):
    params = K.make_tensors(shapes, torch.float32, CPU)
    T.lars_step(params, K.make_tensors(shapes, torch.float32, CPU, seed=1), [torch.zeros_like(p) for p in params],
                lr=0.1, momentum=0.9, first_step=True, **hp)


def _lamb_once(shapes, **hp):
    params = K.make_tensors(shapes, torch.float32, CPU)
    T.lamb_step(params, K.make_tensors(shapes, torch.float32, CPU, seed=1), [torch.zeros_like(p) for p in params],
                [torch.zeros_like(p) for p in params], [torch.zeros(()) for _ in params], lr=0.1, **hp)


@pytest.mark.parametrize("op,shapes,hp,fused,two_pass", [
    ("lars", ALL_FUSED, dict(weight_decay=1e-4), ["momentum_sgd_kernel"],
     ["lars_partials_kernel", "trust_ratio_kernel", "momentum_sgd_kernel"]),
    ("lars", ALL_FUSED + [(0,)], dict(weight_decay=1e-4), ["momentum_sgd_kernel"],  # empty: nothing to do
     ["lars_partials_kernel", "trust_ratio_kernel", "momentum_sgd_kernel"]),
    ("lars", MIXED, dict(weight_decay=1e-4), ["lars_partials_kernel", "trust_ratio_kernel", "momentum_sgd_kernel"],
     ["lars_partials_kernel", "trust_ratio_kernel", "momentum_sgd_kernel"]),
    ("lars", MIXED, dict(weight_decay=0.0), ["momentum_sgd_kernel"], ["momentum_sgd_kernel"]),  # nothing adapts
    ("lamb", ALL_FUSED, dict(weight_decay=0.01), ["lamb_kernel"],
     ["lamb_kernel", "trust_ratio_kernel", "lamb_kernel"]),
    ("lamb", ALL_FUSED, dict(weight_decay=0.0), ["lamb_kernel"], ["trust_ratio_kernel", "lamb_kernel"]),
    ("lamb", ALL_FUSED + [(0,)], dict(weight_decay=0.01), ["lamb_kernel", "trust_ratio_kernel", "lamb_kernel"],
     ["lamb_kernel", "trust_ratio_kernel", "lamb_kernel"]),  # an empty tensor's step count: 2-pass launches
    ("lamb", [(FUSED + 1,)], dict(weight_decay=0.01), ["lamb_kernel", "trust_ratio_kernel", "lamb_kernel"],
     ["lamb_kernel", "trust_ratio_kernel", "lamb_kernel"]),
], ids=["lars-fused", "lars-fused+empty", "lars-mixed", "lars-no-adapt", "lamb-fused", "lamb-no-adapt",
        "lamb-fused+empty", "lamb-one-past"])
def test_launches(monkeypatch, launches, op, shapes, hp, fused, two_pass):
    once = _lars_once if op == "lars" else _lamb_once
    monkeypatch.delenv(gpu_passes.TWO_PASS_ENV, raising=False)
    once(shapes, **hp)
    assert launches == fused
    launches.clear()
    monkeypatch.setenv(gpu_passes.TWO_PASS_ENV, "1")
    once(shapes, **hp)
    assert launches == two_pass


def test_fused_max_follows_the_environment(monkeypatch):
    monkeypatch.delenv(gpu_passes.TWO_PASS_ENV, raising=False)
    assert gpu_passes.fused_max(FUSED) == FUSED
    monkeypatch.setenv(gpu_passes.TWO_PASS_ENV, "0")
    assert gpu_passes.fused_max(FUSED) == FUSED
    monkeypatch.setenv(gpu_passes.TWO_PASS_ENV, "1")
    assert gpu_passes.fused_max(FUSED) == 0


def test_fused_max_cannot_exceed_the_chunk():
    """A fused tensor is one program's chunk: a larger fused_max is refused when the config is made."""
    with pytest.raises(ValueError, match="fused_max 129 must be within 0..chunk \\(128\\)"):
        T.common.LaunchConfig(block=64, chunk=128, reduce_block=4, num_warps=1, fused_max=129)
    assert T.common.GPU_CONFIG.fused_max <= T.common.GPU_CONFIG.chunk
