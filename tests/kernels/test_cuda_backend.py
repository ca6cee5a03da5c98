"""backend="cuda": the CUDA C++ kernels of csrc/cuda/ through fastsgd.kernels.cuda.

Three kinds of tests:
- CPU-runnable (always): the backend says clearly why it is unavailable, the
  native module was built with CUDA when nvcc exists, the functional
  signatures match the reference, and the tensor table the kernels read is
  laid out as csrc/cuda/common.cuh expects (decoded here independently).
- Kernel correctness, parametrized by ``dev``: on "emulated" (always) the
  kernels' own source runs on CPU tensors through fastsgd._cuda_emu (see
  csrc/cuda_emu); on "gpu" (skipped without a CUDA device) the real kernels
  run. The shared kernel cases of tests/kernel_cases.py against the
  reference, torch.optim.SGD(fused=True), unaligned tensors (scalar path),
  mixed dtypes, bf16 momentum buffers with stochastic rounding, stacked trials.
- GPU only: launches per step counted by the profiler, CUDA graph capture and
  replay with a changing lr, a >2^31-element tensor, the optimizer classes.
"""
from __future__ import annotations

import glob
import os
import shutil

import kernel_cases as kc
import pytest
import requirements
import torch

from fastsgd import backends
from fastsgd._native import native
from fastsgd.kernels import cuda as ck
from fastsgd.kernels import reference

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HAS_GPU = torch.cuda.is_available() and ck.unavailable_reason() is None
gpu = pytest.mark.gpu(backend="cuda")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# =============================================================================
# CPU-runnable
# =============================================================================
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_unavailable_reason_is_precise_without_gpu():
    reason = ck.unavailable_reason()
    assert isinstance(reason, str) and reason
    expected = ("could not be imported", "built without its CUDA kernels", "has no CUDA support", "no CUDA device")
    assert any(e in reason for e in expected), reason
    with pytest.raises(backends.BackendUnavailable, match="'cuda' is not available"):
        backends.get_backend("cuda", torch.device("cuda"), [torch.float32])
    assert backends.available_backends()["cuda"] == reason


def _build_configured_without_cuda() -> bool:
    """True when this checkout's CMake build was configured with FASTSGD_WITH_CUDA=OFF
    (a development install that leaves the CUDA kernels out on purpose)."""
    for cache in glob.glob(os.path.join(REPO, "build", "*", "CMakeCache.txt")):
        with open(cache, errors="replace") as fh:
            if any(line.strip().startswith("FASTSGD_WITH_CUDA:BOOL=OFF") for line in fh):
                return True
    return False


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on PATH: CUDA kernels are not expected")
def test_native_module_built_with_cuda_when_nvcc_exists():
    mod = native()
    assert mod is not None, "fastsgd._C is missing although nvcc is installed"
    if not mod.has_cuda and _build_configured_without_cuda():
        requirements.missing("this checkout's build was configured with FASTSGD_WITH_CUDA=OFF")
    assert mod.has_cuda, "nvcc is installed but fastsgd._C was built without the CUDA kernels"
    assert mod.cuda_runtime_version() >= 12000
    for name in ("cuda_sgd_step", "cuda_lars_step", "cuda_lamb_step"):
        doc = getattr(mod, name).__doc__
        assert doc and "launch" in doc, f"{name} has no docstring"
    # Importing and querying must work without a GPU (static cudart, no driver needed), and agree with torch.
    assert mod.cuda_device_count() == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


def test_supports():
    assert ck.NAME == "cuda"
    for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        assert ck.supports(torch.device("cuda"), dt)
        assert not ck.supports(torch.device("cpu"), dt)
    assert not ck.supports(torch.device("cuda"), torch.int32)
    assert not ck.supports(torch.device("cuda"), torch.complex64)


def _decode(table: torch.Tensor, n: int):
    """Independent decoder of the layout documented in csrc/cuda/common.cuh."""
    w = table.tolist()
    entries = []
    for t in range(n):
        e = w[t * 8:(t + 1) * 8]
        flags = e[7]
        entries.append(dict(ptrs=e[:5], numel=e[5], row_len=e[6], first_block=flags & 0xFFFFFFFF,
                            kind=(flags >> 32) & 0xFF, first=bool((flags >> 40) & 1), vec=bool((flags >> 41) & 1)))
    blocks = [((b >> 32) & 0xFFFFFFFF, b & 0xFFFFFFFF) for b in w[n * 8:]]
    return entries, blocks


def test_table_layout_covers_every_chunk_once():
    chunk = 1024
    numels = [0, 1, 1023, 1024, 1025, 5000, (1 << 31) + 3]  # the last one needs 64-bit element offsets
    n = len(numels)
    base = 1 << 40
    cols = [[base + 4096 * i for i in range(n)],          # params: 16-byte aligned
            [base + 4096 * i + 8 for i in range(n)],      # grads: 8-byte aligned only
            [0] * n, [0] * n, [0] * n]
    cols[1][0] = base + 16  # tensor 0: all aligned
    kinds = list(range(n))
    first = [i % 2 == 0 for i in range(n)]
    rows = [1, 1, 1, 1, 1, 1000, 3]
    table, n_blocks = ck.build_host_table(cols, numels, kinds, first, rows, chunk)
    entries, blocks = _decode(table, n)
    assert n_blocks == len(blocks) == sum(-(-m // chunk) for m in numels)
    for t, e in enumerate(entries):
        assert e["ptrs"] == [c[t] for c in cols]
        assert (e["numel"], e["row_len"], e["kind"], e["first"]) == (numels[t], rows[t], kinds[t], first[t])
        assert e["vec"] == (t == 0), "vector loads only when every pointer is 16-byte aligned"
        mine = blocks[e["first_block"]:e["first_block"] + -(-numels[t] // chunk)]
        assert mine == [(t, c) for c in range(-(-numels[t] // chunk))]
    assert blocks[-1] == (n - 1, ((1 << 31) + 3 - 1) // chunk)


def test_table_of_no_tensors_is_empty():
    table, n_blocks = ck.build_host_table([[], [], [], [], []], [], [], [], [], 1024)
    assert n_blocks == 0 and table.numel() == 0


# =============================================================================
# CPU: the kernels' own source, emulated
# =============================================================================
# fastsgd._cuda_emu is csrc/cuda/*.cu compiled by the host compiler against a
# small emulation of the device language (csrc/cuda_emu: blocks one by one,
# each block's threads as fibers meeting at __syncthreads and shuffles). With
# fastsgd.kernels.cuda pointed at it, CPU tensors go through the whole path --
# checks, table, caching, bindings, and the kernels' arithmetic, vector and
# scalar paths and segmented reductions -- without a GPU. What it cannot show
# (races, the memory model, launches, streams, graphs) is left to the GPU tests.
try:
    from fastsgd import _cuda_emu
except ImportError as exc:  # built with FASTSGD_WITH_CUDA_EMULATION=OFF, or on Windows
    _cuda_emu, _CUDA_EMU_ERROR = None, str(exc)


class RecordingNative:
    """The emulated module, noting which entry points were called."""
    has_cuda = True

    def __init__(self, module):
        self.module, self.calls = module, []
        self.on_call = lambda: None  # tests may look around at the moment of a native call

    def __getattr__(self, name):
        fn = getattr(self.module, name)

        def call(**kw):
            self.calls.append(name[len("cuda_"):-len("_step")])
            self.on_call()
            return fn(**kw)
        return call


@pytest.fixture
def emulated(monkeypatch):
    """fastsgd.kernels.cuda running the emulated CUDA kernels on CPU tensors."""
    if _cuda_emu is None:
        if os.name == "nt":
            pytest.skip("the CUDA emulator needs POSIX ucontext")
        pytest.fail(f"fastsgd._cuda_emu is missing ({_CUDA_EMU_ERROR}); it is built by default")
    recorder = RecordingNative(_cuda_emu)
    monkeypatch.setattr(ck, "_native", lambda: recorder)
    monkeypatch.setattr(ck, "_require_cuda", lambda op, device: None)
    monkeypatch.setattr(ck, "_capturing", lambda: False)
    monkeypatch.setattr(ck, "_upload", lambda host, device, capturing: (host, host))
    monkeypatch.setattr(ck, "_stream", lambda device: 0)
    monkeypatch.setattr(ck, "_stream_object", lambda device: None)
    monkeypatch.setattr(ck, "CHUNK_SIZE", 1024)  # several blocks per tensor even for small shapes
    ck.clear_cache()
    yield recorder
    ck.clear_cache()


@pytest.fixture(params=["emulated", "gpu"])
def dev(request):
    """Where a kernel test runs: the emulated kernels on CPU tensors (always),
    and the real ones on a GPU (skipped without one). Returns the device."""
    if request.param == "gpu":
        requirements.gpu("cuda")
        return "cuda"
    request.getfixturevalue("emulated")
    return "cpu"


@pytest.mark.parametrize("op", ["sgd", "lars", "lamb"])
def test_emulated_one_native_call_per_step(emulated, op):
    """Each step is one call into the bindings, whatever the number of tensors."""
    shapes = [(3,), (1025,), (4, 7)] * 5
    params = kc.make_tensors(shapes, torch.float32, "cpu")
    grads = kc.make_tensors(shapes, torch.float32, "cpu", seed=1)
    states = [torch.zeros_like(p) for p in params]
    for _ in range(3):
        if op == "lamb":
            ck.lamb_step(params, grads, states, [s.clone() for s in states], [torch.zeros(()) for _ in params],
                         lr=0.01, weight_decay=0.01)
        else:
            getattr(ck, f"{op}_step")(params, grads, states, lr=0.1, momentum=0.9, weight_decay=1e-4)
    assert emulated.calls == [op] * 3


@pytest.mark.skipif(os.environ.get("FASTSGD_BIG_TESTS") != "1",
                    reason="set FASTSGD_BIG_TESTS=1 to run (allocates ~11 GB, takes ~3 minutes)")
def test_emulated_tensor_over_2_to_31_elements(emulated, monkeypatch):
    """The kernels' 64-bit element offsets, block words and chunk bounds past
    2^31 elements (odd size: vector body and scalar tail), in SGD and LARS."""
    monkeypatch.setattr(ck, "CHUNK_SIZE", 1 << 20)  # 2049 blocks instead of 2M
    n = (1 << 31) + 1029
    p = torch.zeros(n, dtype=torch.float16)
    g = torch.ones(n, dtype=torch.float16)
    g[-1] = 2.0
    ck.sgd_step([p], [g], None, lr=0.5)
    assert p[-1].item() == -1.0 and p[-2].item() == -0.5 and p[0].item() == -0.5
    assert torch.count_nonzero(p != -0.5).item() == 1
    # |p|^2 = (n - 1) / 4 + 1 and |g|^2 = (n - 1) + 4: the trust ratio is exactly 1/2.
    ck.lars_step([p], [g], None, lr=0.25, momentum=0.0, always_adapt=True, trust_coeff=1.0, eps=0.0)
    assert p[0].item() == -0.625 and p[(1 << 31) + 7].item() == -0.625 and p[-1].item() == -1.25


def test_emulated_stacked_trials_and_mixed_kinds(emulated):
    T = 3
    shapes = [(T, 5), (T, 1023), (T, 2, 700)]
    lr = torch.tensor([0.1, 0.05, 0.0])
    mu = torch.tensor([0.9, 0.0, 0.5], dtype=torch.float64)
    params = [kc.make_tensors([s], dt, "cpu", seed=i)[0]
              for i, (s, dt) in enumerate(zip(shapes, [torch.float32, torch.bfloat16, torch.float16]))]
    bufs = [torch.zeros_like(p, dtype=torch.float32) for p in params]  # fp32 buffers for 16-bit params
    ref_p, ref_b = [p.clone() for p in params], [b.clone() for b in bufs]
    for step in range(3):
        grads = [torch.randn_like(p) for p in params]
        kw = dict(lr=lr, momentum=mu, first_step=[step == 0, step < 2, False], stacked_trials=True)
        ck.sgd_step(params, grads, bufs, **kw)
        reference.sgd_step(ref_p, grads, ref_b, **kw)
    for a, e in zip(params + bufs, ref_p + ref_b):
        kc.assert_all_close([a], [e], a.dtype, "tensor")


def test_emulated_table_is_cached_and_rebuilt_on_change(emulated, monkeypatch):
    builds = []
    build = ck.build_host_table
    monkeypatch.setattr(ck, "build_host_table", lambda *a: builds.append(1) or build(*a))
    params = kc.make_tensors([(10,), (3000,)], torch.float32, "cpu")
    grads = kc.make_tensors([(10,), (3000,)], torch.float32, "cpu", seed=1)
    bufs = [torch.zeros_like(p) for p in params]
    for first in (True, False, False):
        ck.sgd_step(params, grads, bufs, lr=0.1, momentum=0.9, first_step=first)
    assert len(ck.TABLES) == 2 and len(builds) == 2  # first-step flags are part of the key
    params[0].data = torch.zeros(10)  # a param re-pointed: a new table
    ck.sgd_step(params, grads, bufs, lr=0.1, momentum=0.9)
    assert len(ck.TABLES) == 3 and len(builds) == 3
    decoded, blocks = _decode(next(reversed(ck.TABLES.values())).host, 2)
    assert decoded[0]["ptrs"][0] == params[0].data_ptr()
    assert blocks == [(0, 0), (1, 0), (1, 1), (1, 2)]  # CHUNK_SIZE 1024 in the emulation


def test_emulated_new_grads_patch_the_cached_table(emulated, monkeypatch):
    """Grads re-created at new addresses (zero_grad(set_to_none=True)) reuse
    the table: no rebuild, the grad words and vectorised bits are rewritten,
    and the step still matches the reference, also when a new grad is not
    16-byte aligned (scalar path)."""
    builds = []
    build = ck.build_host_table
    monkeypatch.setattr(ck, "build_host_table", lambda *a: builds.append(1) or build(*a))
    shapes = [(10,), (3000,)]
    params = kc.make_tensors(shapes, torch.float32, "cpu")
    ref_p = [p.clone() for p in params]
    bufs, ref_b = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    for step in range(4):
        grads = kc.make_tensors(shapes, torch.float32, "cpu", seed=10 + step)
        if step == 3:  # the second grad at an odd offset: same values, not 16-byte aligned
            storage = torch.empty(3001)
            storage[1:].copy_(grads[1])
            grads[1] = storage[1:]
        kw = dict(lr=0.1, momentum=0.9, nesterov=True, first_step=step == 0)
        ck.sgd_step(params, grads, bufs, **kw)
        reference.sgd_step(ref_p, grads, ref_b, **kw)
        entry = next(reversed(ck.TABLES.values()))
        decoded, _ = _decode(entry.host, 2)
        assert [d["ptrs"][1] for d in decoded] == [g.data_ptr() for g in grads]
        assert [d["vec"] for d in decoded] == [True, step != 3]
    assert len(builds) == 2  # first step, then one table whatever the grads
    kc.assert_all_close(params, ref_p, torch.float32, "param")
    kc.assert_all_close(bufs, ref_b, torch.float32, "momentum_buffer")


@pytest.mark.parametrize("op", ["sgd", "lars", "lamb"])
def test_emulated_native_calls_run_under_the_params_device(emulated, monkeypatch, op):
    """Every native call happens inside device_guard(params' device): on a GPU
    the module's set_device then finds the device current and changes
    nothing, so the caller's current device is the same after the step."""
    import contextlib
    inside = []

    @contextlib.contextmanager
    def guard(device):
        inside.append(device)
        yield
        inside.append(None)

    calls = []
    monkeypatch.setattr(ck, "device_guard", guard)
    emulated.on_call = lambda: calls.append(list(inside))
    params = kc.make_tensors([(10,), (3000,)], torch.float32, "cpu")
    grads = kc.make_tensors([(10,), (3000,)], torch.float32, "cpu", seed=1)
    states = [torch.zeros_like(p) for p in params]
    if op == "lamb":
        ck.lamb_step(params, grads, states, [s.clone() for s in states], [torch.zeros(()) for _ in params], lr=0.01)
    else:
        getattr(ck, f"{op}_step")(params, grads, states, lr=0.1, momentum=0.9, weight_decay=1e-4)
    assert emulated.calls == [op]
    assert calls and all(c == [torch.device("cpu")] for c in calls), calls


def test_emulated_table_built_during_capture_is_kept_for_the_graph_only(emulated, monkeypatch):
    """A table first built inside CUDA-graph capture is uploaded by a captured
    copy that only a replay performs: an eager step must not find it."""
    params = kc.make_tensors([(10,), (3000,)], torch.float32, "cpu")
    grads = kc.make_tensors([(10,), (3000,)], torch.float32, "cpu", seed=1)
    builds = ck.TABLES.builds
    monkeypatch.setattr(ck, "_capturing", lambda: True)
    ck.sgd_step(params, grads, None, lr=0.1)
    assert len(ck.TABLES) == 0 and len(ck.TABLES._graph_owned) == 1
    monkeypatch.setattr(ck, "_capturing", lambda: False)
    ck.sgd_step(params, grads, None, lr=0.1)
    assert len(ck.TABLES) == 1 and ck.TABLES.builds == builds + 2
    assert ck.TABLES.values()[0] is not ck.TABLES._graph_owned[0]


def test_emulated_grads_in_another_layout_are_copied_not_cached(emulated):
    p = torch.randn(4, 6, 5, 7).to(memory_format=torch.channels_last)
    g = torch.randn(4, 6, 5, 7)  # contiguous: another layout than p
    buf = torch.zeros_like(p)
    ref_p, ref_b = p.clone(), buf.clone()
    ck.sgd_step([p], [g], [buf], lr=0.1, momentum=0.9, first_step=True)
    reference.sgd_step([ref_p], [g], [ref_b], lr=0.1, momentum=0.9, first_step=True)
    kc.assert_all_close([p, buf], [ref_p, ref_b], torch.float32, "channels_last")
    assert len(ck.TABLES) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="relies on the native call failing for want of a device")
@pytest.mark.parametrize("op", ["sgd", "lars", "lamb"])
def test_real_bindings_accept_the_python_arguments(monkeypatch, op):
    """The real fastsgd._C functions receive exactly the keyword arguments the
    Python side builds (names and types); with no device the launch fails in
    cudaSetDevice, and the error names the op and the dtypes."""
    mod = native()
    if mod is None or not mod.has_cuda:
        requirements.missing("fastsgd._C was built without CUDA kernels")
    monkeypatch.setattr(ck, "_require_cuda", lambda op, device: None)
    monkeypatch.setattr(ck, "_capturing", lambda: False)
    monkeypatch.setattr(ck, "_upload", lambda host, device, capturing: (host, host))
    monkeypatch.setattr(ck, "_stream", lambda device: 0)
    monkeypatch.setattr(ck, "_stream_object", lambda device: None)
    ck.clear_cache()
    p, g = [torch.zeros(5), torch.zeros(3, dtype=torch.bfloat16)], [torch.ones(5), torch.ones(3, dtype=torch.bfloat16)]
    states = [torch.zeros(5), torch.zeros(3, dtype=torch.bfloat16)]
    lr = torch.tensor(0.1)
    with pytest.raises(RuntimeError, match=f"fastsgd cuda {op}_step: cudaSetDevice.*param/state dtypes"):
        if op == "sgd":
            ck.sgd_step(p, g, states, lr=lr, momentum=0.9, grad_scale=torch.tensor(2.0), stochastic_rounding=True)
        elif op == "lars":
            ck.lars_step(p, g, states, lr=0.1, weight_decay=1e-4, trust_clip=True)
        else:
            ck.lamb_step(p, g, states, [s.clone() for s in states], [torch.zeros(()), torch.zeros(())], lr=0.1,
                         clip_divisor=torch.tensor(2.0))
    ck.clear_cache()


def test_errors_name_the_problem(emulated):
    p = [torch.zeros(3)]
    with pytest.raises(TypeError, match="float32 with state dtype torch.float64 is not supported"):
        ck.sgd_step(p, [torch.zeros(3)], [torch.zeros(3, dtype=torch.float64)], lr=0.1, momentum=0.9)
    with pytest.raises(TypeError, match="grad 0 is torch.float16"):
        ck.sgd_step(p, [torch.zeros(3, dtype=torch.float16)], None, lr=0.1)
    with pytest.raises(RuntimeError, match="grad 0 has shape"):
        ck.sgd_step(p, [torch.zeros(4)], None, lr=0.1)
    with pytest.raises(TypeError, match="not dense"):
        ck.sgd_step([torch.zeros(3, 4)[:, :2]], [torch.zeros(3, 2)], None, lr=0.1)
    with pytest.raises(ValueError, match="lr has 2 values"):  # stacked trials are sgd_step's alone
        ck.lars_step([torch.zeros(2, 3)], [torch.zeros(2, 3)], None, lr=torch.tensor([0.1, 0.2]),
                     momentum=0.0, trust_clip=True, weight_decay=1e-4)
    with pytest.raises(ValueError, match="first dimension to be 2"):
        ck.sgd_step([torch.zeros(3, 3)], [torch.zeros(3, 3)], None, lr=torch.tensor([0.1, 0.2]), stacked_trials=True)


# =============================================================================
# GPU: correctness against the reference
# =============================================================================
DEV = "cuda"


def _lr_tensor_ok(dtype):
    # kernel_cases gives the backend a float32 lr tensor but the reference the
    # Python float, a ~1e-8 relative difference: beyond the float64 tolerance.
    return dtype != torch.float64


@pytest.mark.parametrize("dtype,hp", kc.sgd_cases(DTYPES + [torch.float64]))
def test_sgd_matches_reference(dev, dtype, hp):
    kc.check_sgd(ck, dev, kc.AWKWARD_SHAPES, dtype, hp)


@pytest.mark.parametrize("dtype,hp", kc.sgd_cases(DTYPES + [torch.float64]))
def test_sgd_lr_tensor_and_grad_scale(dev, dtype, hp):
    kc.check_sgd(ck, dev, kc.AWKWARD_SHAPES, dtype, hp, lr_as_tensor=_lr_tensor_ok(dtype), grad_scale=1024.0)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("hp", kc.LARS_HPARAMS)
def test_lars_matches_reference(dev, dtype, hp):
    kc.check_lars(ck, dev, kc.AWKWARD_SHAPES, dtype, hp)
    kc.check_lars(ck, dev, kc.AWKWARD_SHAPES, dtype, hp, lr_as_tensor=_lr_tensor_ok(dtype), grad_scale=512.0)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("hp", kc.LAMB_HPARAMS)
def test_lamb_matches_reference(dev, dtype, hp):
    kc.check_lamb(ck, dev, kc.AWKWARD_SHAPES, dtype, hp)
    kc.check_lamb(ck, dev, kc.AWKWARD_SHAPES, dtype, hp, lr_as_tensor=_lr_tensor_ok(dtype), grad_scale=256.0)


def test_lamb_clip_divisor_on_device(dev):
    div = torch.tensor(2.5, device=dev)
    kc.check_lamb(ck, dev, kc.AWKWARD_SHAPES, torch.float32, kc.LAMB_HPARAMS[0], clip_divisor=div)


@pytest.mark.parametrize("dtype", DTYPES)
def test_skip_changes_nothing(dev, dtype):
    kc.check_skip_changes_nothing(ck, dev, dtype)


def test_many_tensors_one_call_mixed_dtypes_and_first_steps(dev):
    """fp32, bf16, fp16 and fp64 params in ONE call, some on their first step."""
    shapes = [(3,), (1025,), (17, 33), (4096,), (1,), (65537,)] * 4
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64] * 6
    params = [kc.make_tensors([s], dt, dev, seed=i)[0] for i, (s, dt) in enumerate(zip(shapes, dtypes))]
    bufs = [torch.randn_like(p) for p in params]
    ref_p, ref_b = [p.clone() for p in params], [b.clone() for b in bufs]
    first = [i % 3 == 0 for i in range(len(params))]
    grads = [torch.randn_like(p) for p in params]
    hp = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True, maximize=False,
              lr_in_momentum=False, first_step=first)
    ck.sgd_step(params, grads, bufs, **hp)
    reference.sgd_step(ref_p, grads, ref_b, **hp)
    for a, e, b, eb in zip(params, ref_p, bufs, ref_b):
        kc.assert_all_close([a], [e], a.dtype, "param")
        kc.assert_all_close([b], [eb], b.dtype, "momentum_buffer")


@pytest.mark.parametrize("fn", ["sgd", "lars"])
def test_bf16_momentum_buffers_with_fp32_params(dev, fn):
    shapes = kc.AWKWARD_SHAPES
    params = kc.make_tensors(shapes, torch.float32, dev)
    ref_p = [p.clone() for p in params]
    bufs = [torch.zeros_like(p, dtype=torch.bfloat16) for p in params]
    ref_b = [b.clone() for b in bufs]
    for step in range(3):
        grads = kc.make_tensors(shapes, torch.float32, dev, seed=100 + step)
        kw = dict(lr=kc.LRS[step], momentum=0.9, weight_decay=1e-4, first_step=step == 0)
        getattr(ck, f"{fn}_step")(params, grads, bufs, **kw)
        getattr(reference, f"{fn}_step")(ref_p, grads, ref_b, **kw)
    kc.assert_all_close(bufs, ref_b, torch.bfloat16, "momentum_buffer")
    kc.assert_all_close(params, ref_p, torch.bfloat16, "param")  # buffers carry bf16 error into params


def test_stochastic_rounding_of_bf16_buffers_is_unbiased(dev):
    n = 1 << 20
    x = 1.0 + 2.0 ** -10  # between the bf16 neighbours 1 and 1 + 2^-7
    p = torch.zeros(n, device=dev)
    g = torch.full((n,), x, device=dev)
    buf = torch.zeros(n, dtype=torch.bfloat16, device=dev)
    ck.sgd_step([p], [g], [buf], lr=0.0, momentum=0.9, first_step=True, stochastic_rounding=True)
    vals = buf.float()
    assert set(torch.unique(vals).tolist()) <= {1.0, 1.0 + 2.0 ** -7}
    assert abs(vals.mean().item() - x) < 2e-4, vals.mean().item()  # round-to-nearest would give exactly 1.0
    buf2 = torch.zeros_like(buf)
    ck.sgd_step([p], [g], [buf2], lr=0.0, momentum=0.9, first_step=True, stochastic_rounding=False)
    assert torch.all(buf2.float() == 1.0)


@pytest.mark.parametrize("op", ["sgd", "lars"])
def test_emulated_stochastic_rounding_mixes_a_device_step_counter(emulated, monkeypatch, op):
    """The host seed is frozen in a captured launch; the device-side counter,
    advanced after every launch, still gives each step fresh bits. A fixed
    seed and counter replay exactly."""
    monkeypatch.setattr(ck, "_seed", lambda: 12345)  # what a graph replay sees: the same host seed
    ck._SR_COUNTERS.clear()
    x = 1.0 + 0.3 * 2.0 ** -7
    p = torch.zeros(4096)
    g = torch.full((4096,), x)

    def rounded():
        buf = torch.zeros(4096, dtype=torch.bfloat16)
        getattr(ck, f"{op}_step")([p], [g], [buf], lr=0.0, momentum=0.9, first_step=True, stochastic_rounding=True)
        return buf.float()

    first, second = rounded(), rounded()
    counter = next(iter(ck._SR_COUNTERS.values()))
    assert int(counter) == 2
    assert not torch.equal(first, second)  # same host seed, fresh bits
    counter.zero_()
    assert torch.equal(rounded(), first)  # same seed and counter: the same bits
    ck._SR_COUNTERS.clear()


def test_stacked_trials_per_row_lr_and_momentum(dev):
    T = 4
    shapes = [(T, 5), (T, 1023), (T, 3, 7)]
    lr = torch.tensor([0.1, 0.05, 0.2, 0.0], device=dev)
    mu = torch.tensor([0.9, 0.5, 0.0, 0.99], device=dev)
    params = kc.make_tensors(shapes, torch.float32, dev)
    ref_p = [p.clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    ref_b = [b.clone() for b in bufs]
    for step in range(3):
        grads = kc.make_tensors(shapes, torch.float32, dev, seed=7 + step)
        kw = dict(lr=lr, momentum=mu, nesterov=False, first_step=step == 0, stacked_trials=True)
        ck.sgd_step(params, grads, bufs, **kw)
        reference.sgd_step(ref_p, grads, ref_b, **kw)
    kc.assert_all_close(params, ref_p, torch.float32, "param")
    kc.assert_all_close(bufs, ref_b, torch.float32, "momentum_buffer")


@pytest.mark.parametrize("nesterov,wd,maximize", [(False, 0.0, False), (True, 1e-4, False), (False, 5e-4, True)])
def test_matches_torch_fused_sgd(dev, nesterov, wd, maximize):
    torch.manual_seed(0)
    shapes = [(64, 3, 7, 7), (64,), (1000, 2048), (1000,), (13,)]
    ours = [torch.nn.Parameter(torch.randn(s, device=dev)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = torch.optim.SGD(theirs, lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=wd, maximize=maximize,
                          fused=True)
    bufs = [torch.zeros_like(p) for p in ours]
    for step in range(4):
        grads = [torch.randn_like(p) for p in ours]
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        opt.step()
        ck.sgd_step([p.data for p in ours], grads, bufs, lr=0.1, momentum=0.9, nesterov=nesterov,
                    weight_decay=wd, maximize=maximize, first_step=step == 0)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unaligned_tensors_take_the_scalar_path(dev, dtype):
    """A param that is a slice at an odd offset: its pointer is not 16-byte
    aligned, so the kernel must not use vector loads for it."""
    storage = kc.make_tensors([(1 + 4097 + 1 + 1025,)], dtype, dev)[0]
    p1, p2 = storage[1:4098], storage[4099:]  # offsets 1 and 4099 elements
    gstore = kc.make_tensors([(3 + 4097 + 1025,)], dtype, dev, seed=5)[0]
    g1, g2 = gstore[3:4100], gstore[4100:]
    assert p1.data_ptr() % 16 and g1.data_ptr() % 16
    ref = [p1.clone(), p2.clone()]
    bufs = [torch.zeros_like(p1), torch.zeros_like(p2)]
    ref_b = [b.clone() for b in bufs]
    before = storage.clone()
    kw = dict(lr=0.1, momentum=0.9, first_step=True)
    ck.sgd_step([p1, p2], [g1, g2], bufs, **kw)
    reference.sgd_step(ref, [g1, g2], ref_b, **kw)
    kc.assert_all_close([p1, p2], ref, dtype, "param")
    # The elements around the slices are untouched.
    assert torch.equal(storage[0], before[0]) and torch.equal(storage[4098], before[4098])
    entries = [e for e in ck.TABLES.values() if e.n_tensors == 2]
    assert entries, "table not cached"
    decoded, _ = _decode(entries[-1].host.cpu(), 2)
    assert not decoded[0]["vec"]


# =============================================================================
# LARS/LAMB fused path: a tensor that one block owns (1..CHUNK_SIZE elements)
# gets norms, trust ratio (LAMB: step) and update in the update launch;
# FASTSGD_GPU_TWO_PASS=1 sends every tensor through the 2-pass launches.
# Emulated (CHUNK_SIZE 1024 there) and on a GPU (16384).
# =============================================================================
from fastsgd.kernels import gpu_passes  # noqa: E402

FUSED_LARS = [dict(momentum=0.9, weight_decay=1e-4),
              dict(momentum=0.9, weight_decay=1e-4, nesterov=True, trust_clip=True),
              dict(momentum=0.0, weight_decay=0.0, always_adapt=True, trust_coeff=0.02)]
FUSED_LAMB = [dict(weight_decay=0.01), dict(weight_decay=0.0),
              dict(weight_decay=0.0, always_adapt=True, trust_clip=True),
              dict(weight_decay=0.1, bias_correction=False, beta1=0.8, beta2=0.99, eps=1e-3)]


def _fused_layout(kind):
    """Shapes around the fused size (= the chunk of the table the test uses)."""
    c = ck.CHUNK_SIZE
    fused = [(1,), (7,), (3, 5, 7), (c - 1,), (c,)]
    return fused if kind == "all_fused" else fused + [(c + 1,), (0,), (2 * c + 5,)]


def _lars_steps(dev, shapes, dtype, hp, steps=3):
    params = kc.make_tensors(shapes, dtype, dev)
    bufs = [torch.zeros_like(p) for p in params] if hp["momentum"] else None
    for step in range(steps):
        grads = kc.make_tensors(shapes, dtype, dev, seed=100 + step)
        ck.lars_step(params, grads, bufs, lr=kc.LRS[step], first_step=step == 0, **hp)
    return params + (bufs or [])


def _lamb_steps(dev, shapes, dtype, hp, steps=3):
    params = kc.make_tensors(shapes, dtype, dev)
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    counts = [torch.zeros((), device=dev) for _ in params]
    for step in range(steps):
        grads = kc.make_tensors(shapes, dtype, dev, seed=100 + step)
        ck.lamb_step(params, grads, m, v, counts, lr=kc.LRS[step], **hp)
    return params + m + v + counts


def _fused_and_two_pass(monkeypatch, run):
    monkeypatch.delenv(gpu_passes.TWO_PASS_ENV, raising=False)
    fused = run()
    monkeypatch.setenv(gpu_passes.TWO_PASS_ENV, "1")
    two_pass = run()
    monkeypatch.delenv(gpu_passes.TWO_PASS_ENV)
    for i, (a, b) in enumerate(zip(fused, two_pass)):
        assert torch.equal(a, b), f"tensor {i} {tuple(a.shape)}: fused and 2-pass differ"


@pytest.mark.parametrize("layout", ["all_fused", "mixed"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_fused_lars_equals_two_pass_and_matches_reference(dev, monkeypatch, layout, dtype):
    shapes = _fused_layout(layout)
    for hp in FUSED_LARS:
        _fused_and_two_pass(monkeypatch, lambda: _lars_steps(dev, shapes, dtype, hp))
        kc.check_lars(ck, dev, shapes, dtype, hp)
    kc.check_lars(ck, dev, shapes, dtype, FUSED_LARS[1], lr_as_tensor=_lr_tensor_ok(dtype), grad_scale=512.0)


@pytest.mark.parametrize("layout", ["all_fused", "mixed"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_fused_lamb_equals_two_pass_and_matches_reference(dev, monkeypatch, layout, dtype):
    shapes = _fused_layout(layout)
    for hp in FUSED_LAMB:
        _fused_and_two_pass(monkeypatch, lambda: _lamb_steps(dev, shapes, dtype, hp))
        kc.check_lamb(ck, dev, shapes, dtype, hp)
    kc.check_lamb(ck, dev, shapes, dtype, FUSED_LAMB[0], lr_as_tensor=_lr_tensor_ok(dtype), grad_scale=256.0,
                  clip_divisor=torch.tensor(2.5, device=dev))


def _launches(dev, fn) -> int:
    """Kernel launches of one call of ``fn``: counted by the emulator, or by the profiler on a GPU."""
    if dev == "cuda":
        return len(_kernel_launches(fn))
    before = _cuda_emu.grids_run()
    fn()
    return _cuda_emu.grids_run() - before


@pytest.mark.parametrize("op,layout,hp,fused,two_pass", [
    ("lars", "all_fused", dict(weight_decay=1e-4), 1, 3),
    ("lars", "mixed", dict(weight_decay=1e-4), 3, 3),
    ("lars", "all_fused", dict(weight_decay=0.0), 1, 1),  # nothing adapts
    ("lamb", "all_fused", dict(weight_decay=0.01), 1, 3),
    ("lamb", "all_fused", dict(weight_decay=0.0), 1, 2),  # step counts only
    ("lamb", "mixed", dict(weight_decay=0.01), 3, 3),
    ("lamb", "all_fused+empty", dict(weight_decay=0.01), 3, 3),  # an empty tensor's step: the 2-pass launches
])
def test_fused_path_launches(dev, monkeypatch, op, layout, hp, fused, two_pass):
    shapes = _fused_layout(layout.split("+")[0]) + ([(0,)] if layout.endswith("+empty") else [])
    params = kc.make_tensors(shapes, torch.float32, dev)
    grads = kc.make_tensors(shapes, torch.float32, dev, seed=1)
    states = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    counts = [torch.zeros((), device=dev) for _ in params]
    if op == "lars":
        def step():
            ck.lars_step(params, grads, states[0], lr=0.1, momentum=0.9, **hp)
    else:
        def step():
            ck.lamb_step(params, grads, *states, counts, lr=0.01, **hp)
    monkeypatch.delenv(gpu_passes.TWO_PASS_ENV, raising=False)
    assert _launches(dev, step) == fused
    monkeypatch.setenv(gpu_passes.TWO_PASS_ENV, "1")
    assert _launches(dev, step) == two_pass


# =============================================================================
# GPU: launches, CUDA graphs, large tensors
# =============================================================================
def _kernel_launches(fn) -> list:
    fn()  # warm-up: builds and caches the tensor table
    return kc.cuda_kernel_launches(fn)


@gpu
def test_one_launch_per_sgd_step_for_many_tensors():
    shapes = [(37,), (1000, 3)] * 150 + [(1 << 20,)]
    params = kc.make_tensors(shapes, torch.float32, DEV)
    grads = kc.make_tensors(shapes, torch.float32, DEV, seed=1)
    bufs = [torch.zeros_like(p) for p in params]
    launches = _kernel_launches(lambda: ck.sgd_step(params, grads, bufs, lr=0.1, momentum=0.9, nesterov=True))
    assert len(launches) == 1 and "sgd_kernel" in launches[0], launches


@gpu
def test_at_most_three_launches_for_lars_and_lamb():
    shapes = [(37,), (1000, 3)] * 150
    params = kc.make_tensors(shapes, torch.float32, DEV)
    grads = kc.make_tensors(shapes, torch.float32, DEV, seed=1)
    bufs = [torch.zeros_like(p) for p in params]
    lars = _kernel_launches(lambda: ck.lars_step(params, grads, bufs, lr=0.1, weight_decay=1e-4))
    assert len(lars) <= 3, lars
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    steps = [torch.zeros((), device=DEV) for _ in params]
    lamb = _kernel_launches(lambda: ck.lamb_step(params, grads, m, v, steps, lr=0.1, weight_decay=0.01))
    assert len(lamb) <= 3, lamb


@gpu
@pytest.mark.parametrize("op", ["sgd", "lars", "lamb"])
def test_cuda_graph_capture_and_replay_with_changing_lr(op):
    shapes = [(7,), (1025,), (33, 17)]
    params = kc.make_tensors(shapes, torch.float32, DEV)
    ref_p = [p.clone() for p in params]
    grads = kc.make_tensors(shapes, torch.float32, DEV, seed=3)
    st = [torch.zeros_like(p) for p in params]
    ref_st = [s.clone() for s in st]
    st2 = [torch.zeros_like(p) for p in params]
    ref_st2 = [s.clone() for s in st2]
    steps = [torch.zeros((), device=DEV) for _ in params]
    ref_steps = [s.clone() for s in steps]
    lr = torch.tensor(0.1, device=DEV)
    scale = torch.tensor(4.0, device=DEV)
    found = torch.zeros((), device=DEV)

    def run(kern, p, s, s2, stp, lr_value, first):
        if op == "sgd":
            kern.sgd_step(p, grads, s, lr=lr_value, momentum=0.9, nesterov=True, first_step=first,
                          grad_scale=scale, found_inf=found)
        elif op == "lars":
            kern.lars_step(p, grads, s, lr=lr_value, momentum=0.9, weight_decay=1e-4, first_step=first,
                           grad_scale=scale, found_inf=found)
        else:
            kern.lamb_step(p, grads, s, s2, stp, lr=lr_value, weight_decay=0.01, grad_scale=scale,
                           found_inf=found)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # eager warm-up steps: create the state, cache the table
        run(ck, params, st, st2, steps, lr, True)
        run(ck, params, st, st2, steps, lr, False)
    torch.cuda.current_stream().wait_stream(side)
    run(reference, ref_p, ref_st, ref_st2, ref_steps, 0.1, True)
    run(reference, ref_p, ref_st, ref_st2, ref_steps, 0.1, False)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(ck, params, st, st2, steps, lr, False)
    for value in (0.05, 0.2, 0.01):
        lr.fill_(value)
        graph.replay()
        run(reference, ref_p, ref_st, ref_st2, ref_steps, value, False)
    torch.cuda.synchronize()
    kc.assert_all_close(params, ref_p, torch.float32, "param")
    kc.assert_all_close(st, ref_st, torch.float32, "state0")
    if op == "lamb":
        assert [float(s) for s in steps] == [float(s) for s in ref_steps] == [5.0] * len(steps)
    found.fill_(1.0)  # a replay with found_inf set changes nothing
    before = [p.clone() for p in params]
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(params, before))


@gpu
def test_table_built_during_capture_survives_replays():
    """Gradients allocated inside the capture (as in whole-network capture)
    have new addresses, so the table is built and uploaded during capture."""
    shapes = [(5,), (4097,)]
    params = kc.make_tensors(shapes, torch.float32, DEV)
    ref_p = [p.clone() for p in params]
    src = kc.make_tensors(shapes, torch.float32, DEV, seed=9)
    bufs = [torch.zeros_like(p) for p in params]
    ref_b = [b.clone() for b in bufs]
    lr = torch.tensor(0.1, device=DEV)
    ck.sgd_step(params, src, bufs, lr=lr, momentum=0.9, first_step=True)
    reference.sgd_step(ref_p, src, ref_b, lr=0.1, momentum=0.9, first_step=True)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        grads = [s * 1.0 for s in src]  # new tensors in the graph's pool
        ck.sgd_step(params, grads, bufs, lr=lr, momentum=0.9, first_step=False)
    for value in (0.05, 0.2):
        lr.fill_(value)
        graph.replay()
        reference.sgd_step(ref_p, src, ref_b, lr=value, momentum=0.9, first_step=False)
    torch.cuda.synchronize()
    kc.assert_all_close(params, ref_p, torch.float32, "param")


@gpu
def test_tensor_over_2_to_31_elements():
    n = (1 << 31) + 1029  # odd size: vector body, scalar tail, chunk indices past 2^31 elements
    need = 2 * n * 2 + n + (1 << 30)  # p, g (fp16), one bool temporary, slack
    if torch.cuda.mem_get_info()[0] < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory")
    p = torch.zeros(n, dtype=torch.float16, device=DEV)
    g = torch.ones(n, dtype=torch.float16, device=DEV)
    g[-1] = 2.0
    ck.sgd_step([p], [g], None, lr=0.5)
    torch.cuda.synchronize()
    assert p[-1].item() == -1.0 and p[-2].item() == -0.5 and p[0].item() == -0.5
    assert torch.count_nonzero(p != -0.5).item() == 1
    del p, g
    torch.cuda.empty_cache()


@gpu
def test_optimizer_classes_run_on_cuda_backend():
    from fastsgd.optim import LAMB, LARS, SGD
    for cls, kw in ((SGD, dict(lr=0.1, momentum=0.9, nesterov=True)), (LARS, dict(lr=0.1, weight_decay=1e-4)),
                    (LAMB, dict(lr=0.01))):
        model = torch.nn.Sequential(torch.nn.Linear(17, 33), torch.nn.ReLU(), torch.nn.Linear(33, 3)).to(DEV)
        opt = cls(model.parameters(), backend="cuda", **kw)
        for _ in range(3):
            model.zero_grad()
            model(torch.randn(8, 17, device=DEV)).square().mean().backward()
            opt.step()
        assert all(torch.isfinite(p).all() for p in model.parameters())
