"""CUDA C++ kernels (fastsgd._C, csrc/cuda/): SGD family, LARS, LAMB.

Same functions and signatures as fastsgd/kernels/reference.py (sgd_step and
lars_step also take ``stochastic_rounding`` for bfloat16 momentum buffers).
How a call runs:

1. Look up the *tensor table* for these params and state tensors, keyed on
   the device, their addresses, the params' numels and dtypes, the state
   dtypes and the first-step flags -- not on the grads, which autograd
   re-creates every step (``zero_grad(set_to_none=True)``) at addresses that
   may move (dynamic shapes change the allocation pattern). A hit costs one
   pass over the tensors in Python, the host cost that grows with the number
   of tensors. If the grads moved, a cheap check (contiguous, same device, numel and dtype as
   the param) stands in for the full one, and a copy of the table with the
   new grad addresses is uploaded (one small asynchronous copy).
2. On a miss: check what the native code cannot (one CUDA device, shapes,
   dense layouts shared by each param and its state, supported dtype pairs),
   build the table -- per tensor its pointers, numel, stacked-trial row
   length, dtype kind, first-step flag and whether all its pointers are
   16-byte aligned (then the kernel uses 16-byte vector loads); then one
   (tensor, chunk) entry per CUDA block -- and copy it to the device without
   a host sync. A step over any number of tensors is then ONE launch (SGD
   family) or at most three (LARS/LAMB: per-block norm partials, per-tensor
   reduction, update). A LARS/LAMB tensor that one block owns (up to
   CHUNK_SIZE elements) gets its norms from that block in the update launch,
   which then finds its data in cache; when every tensor is such a tensor
   (LAMB: and none is empty), the step is ONE launch.
   FASTSGD_GPU_TWO_PASS=1 (read per call; fastsgd/kernels/gpu_passes.py)
   sends every tensor through the three launches, with the same results bit
   for bit.
3. Call fastsgd._C.cuda_*_step with the table address, hyperparameters as
   (value, device_ptr, dtype_code, per_row) tuples and the current stream.

lr, grad_scale, found_inf (and LAMB's clip_divisor and step counters) are
read on the device, so a step never synchronises with the host and can be
captured in a CUDA graph; with many small tensors, capturing also removes the
per-tensor host cost of step 1. A table built during capture (e.g. gradients
in the graph's memory pool) is uploaded by a captured host-to-device copy and
kept for that graph only, never in the eager cache; tables read by a graph are
never evicted, so replays read valid memory (table_cache.py has the rules).
"""
from __future__ import annotations

import itertools
from operator import attrgetter
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from fastsgd._native import native, native_error
from fastsgd.kernels import gpu_passes
from fastsgd.kernels.contract import FLOATS, Capabilities
from fastsgd.kernels.table_cache import TableCache
from fastsgd.kernels.tensors import (
    device_guard,
    first_step_flags,
    grad_like_param,
    grads_fit,
    is_dense,
    single_hparams,
    trial_hparams,
)

Scalar = Union[float, Tensor]

NAME = "cuda"
CAPABILITIES = Capabilities(NAME, "CUDA tensors", FLOATS, stacked_trials=True, stochastic_rounding=True,
                            device_scalars=True)
STRIDED = CAPABILITIES.strided  # walks each tensor as flat memory: dense layouts only

# Elements per CUDA block (a multiple of every vector width, 8). 16K elements
# keep each block busy for a few dozen 16-byte loads per thread while leaving
# thousands of blocks for large models. It is also the LARS/LAMB fused size:
# a tensor of up to CHUNK_SIZE elements has one block on either path, so
# computing its norms in that block costs no parallelism and saves a second
# read of it from memory; a larger tensor's norm needs all of its blocks, so
# it keeps the 2-pass launches. (The GPU benchmark's fastsgd-cuda against
# fastsgd-cuda-2pass rows are to confirm it.)
CHUNK_SIZE = 16384
_ALIGN = 16  # bytes: vector loads need every pointer of a tensor 16-byte aligned

# Must match csrc/cuda/ops.h (ScalarDType) and common.cuh (dispatch_kind).
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_KINDS = {
    (torch.float32, torch.float32): 0,
    (torch.float32, torch.bfloat16): 1,
    (torch.float32, torch.float16): 2,
    (torch.float16, torch.float16): 3,
    (torch.float16, torch.float32): 4,
    (torch.bfloat16, torch.bfloat16): 5,
    (torch.bfloat16, torch.float32): 6,
    (torch.float64, torch.float64): 7,
}

_seed_counter = itertools.count()
_NONE = (0.0, 0, 0, False)  # an absent device scalar (found_inf)


# ---- availability -------------------------------------------------------------
def unavailable_reason() -> Optional[str]:
    mod = native()
    if mod is None:
        return native_error()
    if not getattr(mod, "has_cuda", False):
        return ("fastsgd._C was built without its CUDA kernels (no nvcc was found when it was built, or "
                "FASTSGD_WITH_CUDA=OFF); install the CUDA toolkit and reinstall with `pip install .`")
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    if not torch.cuda.is_available():
        return "no CUDA device: torch.cuda.is_available() is False"
    if mod.cuda_device_count() == 0:
        return (f"fastsgd._C's CUDA runtime {mod.cuda_runtime_version()} sees no device although torch does; "
                "the NVIDIA driver is probably older than that runtime needs")
    return None


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    return torch.device(device).type == "cuda" and dtype in _DTYPE_CODES


# ---- checks -----------------------------------------------------------------------
def _check(op: str, params: Sequence[Tensor], grads: Sequence[Tensor],
           states: Sequence[Optional[Sequence[Tensor]]]) -> List[Tensor]:
    """Validates everything the kernels cannot; returns the grads, copied into
    their param's layout where it differs (grads are only read)."""
    device = params[0].device
    out_grads = []
    for i, (p, g) in enumerate(zip(params, grads)):
        for what, t in (("param", p), ("grad", g)) + tuple((f"state{k}", s[i]) for k, s in enumerate(states)
                                                          if s is not None):
            if t.device != device:
                raise RuntimeError(f"fastsgd cuda {op}: {what} {i} is on {t.device}, param 0 on {device}")
            if t.shape != p.shape:
                raise RuntimeError(f"fastsgd cuda {op}: {what} {i} has shape {tuple(t.shape)}, "
                                   f"param has {tuple(p.shape)}")
        if g.dtype != p.dtype:
            raise TypeError(f"fastsgd cuda {op}: grad {i} is {g.dtype} but its param is {p.dtype}")
        if not is_dense(p):
            raise TypeError(f"fastsgd cuda {op}: param {i} (shape {tuple(p.shape)}, stride {p.stride()}) is not "
                            "dense; use backend='reference' for strided views")
        for k, s in enumerate(states):
            if s is not None and s[i].stride() != p.stride():
                raise RuntimeError(f"fastsgd cuda {op}: state{k} {i} has stride {s[i].stride()} but its param "
                                   f"{p.stride()}; create state with torch.zeros_like(p)")
        out_grads.append(grad_like_param(g, p) if p.numel() > 1 else g)
    return out_grads


def _kind(op: str, p: Tensor, state: Optional[Tensor]) -> int:
    key = (p.dtype, state.dtype if state is not None else p.dtype)
    kind = _KINDS.get(key)
    if kind is None:
        supported = ", ".join(f"{a}/{b}" for a, b in _KINDS)
        raise TypeError(f"fastsgd cuda {op}: param dtype {key[0]} with state dtype {key[1]} is not supported "
                        f"(param/state pairs: {supported})")
    return kind


def _scalar(op: str, name: str, x, device: torch.device, keep: list, *,
            rows_ok: bool = False, default: float = 0.0) -> Tuple[float, int, int, bool]:
    """(value, device_ptr, dtype_code, per_row) for the native call. Device
    tensors are read by the kernel; 0-dim CPU tensors are read here (no sync).
    None becomes the host value ``default``."""
    if x is None:
        return (float(default), 0, 0, False)
    if not isinstance(x, Tensor):
        return (float(x), 0, 0, False)
    if x.device.type == "cpu" and x.ndim == 0:
        return (float(x.item()), 0, 0, False)
    if x.device != device:
        raise RuntimeError(f"fastsgd cuda {op}: {name} is on {x.device}, the params on {device}")
    if x.ndim > 1 or (x.ndim == 1 and not rows_ok):
        raise ValueError(f"fastsgd cuda {op}: {name} must be a float or a 0-dim tensor"
                         + (" (or 1-D, one entry per stacked trial)" if rows_ok else "") +
                         f", got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPE_CODES or not x.is_contiguous():
        x = x.to(torch.float32).contiguous()
    keep.append(x)  # alive until the launch is queued
    return (0.0, x.data_ptr(), _DTYPE_CODES[x.dtype], x.ndim == 1)


def _n_trials(op: str, hps) -> Optional[int]:
    """T when some hyperparameter is a 1-D per-trial tensor (stacked trials), else None."""
    trials = {int(h.shape[0]) for h in hps if isinstance(h, Tensor) and h.ndim == 1}
    if len(trials) > 1:
        raise ValueError(f"fastsgd cuda {op}: per-trial hyperparameters have different lengths {sorted(trials)}")
    return trials.pop() if trials else None


def _row_lens(op: str, params: Sequence[Tensor], n_trials: Optional[int]) -> List[int]:
    """Elements per stacked-trial row of each param (1 when nothing is per-row)."""
    if n_trials is None:
        return [1] * len(params)
    out = []
    for i, p in enumerate(params):
        if p.ndim == 0 or p.shape[0] != n_trials:
            raise ValueError(f"fastsgd cuda {op}: stacked trials need every param's first dimension to be "
                             f"{n_trials}; param {i} has shape {tuple(p.shape)}")
        out.append(max(1, p.numel() // n_trials))
    return out


# ---- the tensor table -----------------------------------------------------------------
class _Table:
    """The device-side tensor table of one set of tensors, plus the scratch
    that LARS/LAMB need (allocated on first use)."""

    __slots__ = ("dev", "host", "n_tensors", "n_blocks", "chunk_size", "max_numel", "has_empty", "partials",
                 "per_tensor", "grads", "static_aligned")

    def __init__(self, dev, host, n_tensors, n_blocks, chunk_size, max_numel, has_empty):
        self.dev, self.host = dev, host
        self.n_tensors, self.n_blocks, self.chunk_size = n_tensors, n_blocks, chunk_size
        self.max_numel, self.has_empty = max_numel, has_empty  # which LARS/LAMB launches a step needs
        self.partials: Optional[Tensor] = None
        self.per_tensor: Optional[Tensor] = None
        self.grads: Optional[List[Tensor]] = None     # temporary grad copies the table points at
        self.static_aligned: Optional[Tensor] = None  # per tensor: param and state pointers 16-byte aligned

    def scratch(self, device) -> Tuple[int, int]:
        if self.partials is None:
            self.partials = torch.empty(max(1, 2 * self.n_blocks), dtype=torch.float64, device=device)
            self.per_tensor = torch.empty(max(1, 4 * self.n_tensors), dtype=torch.float64, device=device)
        return self.partials.data_ptr(), self.per_tensor.data_ptr()


def _device_tensors(table: _Table):
    return table.dev, table.partials, table.per_tensor


# Tensor tables (with their LARS/LAMB scratch) of recent tensor sets.
TABLES: "TableCache[_Table]" = TableCache(capacity=32, tensors_of=_device_tensors)

_data_ptr = Tensor.data_ptr
_numel = Tensor.numel
_is_contiguous = Tensor.is_contiguous
_dtype = attrgetter("dtype")


def _ptrs(ts: Optional[Sequence[Tensor]], n: int) -> Tuple[int, ...]:
    return tuple(map(_data_ptr, ts)) if ts is not None else (0,) * n


def build_host_table(ptr_cols: Sequence[Sequence[int]], numels: Sequence[int], kinds: Sequence[int],
                     first: Sequence[bool], row_lens: Sequence[int],
                     chunk_size: int = CHUNK_SIZE) -> Tuple[Tensor, int]:
    """The tensor table as a CPU int64 tensor, and the number of CUDA blocks.

    ``ptr_cols``: five columns of addresses (param, grad, state0, state1, step;
    0 where absent). Layout (read by csrc/cuda/common.cuh): per tensor 8 words
    -- the five pointers, numel, row_len, flags = first_block | kind << 32 |
    first_step << 40 | vectorised << 41 -- then one word per block,
    tensor << 32 | chunk. Blocks of a tensor are consecutive."""
    n = len(numels)
    chunks = [-(-m // chunk_size) for m in numels]
    first_block = list(itertools.accumulate([0] + chunks[:-1]))[:n]
    rows = []
    for i in range(n):
        ptrs = [int(c[i]) for c in ptr_cols]
        # Absent (0) pointers count as aligned; the step pointer is never vector-loaded.
        aligned = all(q % _ALIGN == 0 for q in ptrs[:4])
        flags = first_block[i] | (kinds[i] << 32) | (int(bool(first[i])) << 40) | (int(aligned) << 41)
        rows.append(ptrs + [int(numels[i]), int(row_lens[i]), flags])
    words = torch.tensor(rows, dtype=torch.int64).reshape(-1) if n else torch.empty(0, dtype=torch.int64)
    counts = torch.tensor(chunks, dtype=torch.int64)
    n_blocks = int(counts.sum())
    tensor_ids = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), counts)
    chunk_ids = torch.arange(n_blocks, dtype=torch.int64) - torch.tensor(first_block, dtype=torch.int64)[tensor_ids]
    return torch.cat([words, (tensor_ids << 32) | chunk_ids]), n_blocks


# ---- the only places that touch the CUDA runtime (tests emulate them on CPU) ----
def _native():
    return native()


def _require_cuda(op: str, device: torch.device) -> None:
    if device.type != "cuda":
        raise TypeError(f"fastsgd cuda {op}: tensors must be on a CUDA device, got {device}")


def _capturing() -> bool:
    return torch.cuda.is_current_stream_capturing()


def _upload(host: Tensor, device: torch.device, capturing: bool) -> Tuple[Tensor, Tensor]:
    """(host table kept alive, device copy). non_blocking: no host sync; during
    capture the copy becomes a graph node that rereads `host` at every replay."""
    if not capturing:
        host = host.pin_memory()  # pin_memory() is not allowed during capture
    dev = torch.empty(host.shape, dtype=torch.int64, device=device)
    try:
        dev.copy_(host, non_blocking=True)
    except RuntimeError as exc:
        if not capturing:
            raise
        raise RuntimeError("fastsgd cuda: uploading the tensor table during CUDA graph capture failed "
                           f"({exc}); run one eager step with the same parameter, gradient and state tensors "
                           "before capturing, so that the table is cached") from exc
    return host, dev


def _stream_object(device: torch.device):
    """The stream this call's kernels are queued on (recorded by the table cache)."""
    return torch.cuda.current_stream(device)


def _stream(device: torch.device) -> int:
    return _stream_object(device).cuda_stream


def _prepare(op: str, params: List[Tensor], grads: List[Tensor], s0: Optional[List[Tensor]],
             s1: Optional[List[Tensor]], steps: Optional[List[Tensor]], first: Sequence[bool],
             hps) -> Tuple[torch.device, _Table]:
    """The device and the uploaded table for these tensors (see table_cache).

    Fast path (every step of a training loop): the cache key -- device,
    param and state addresses, param numels and dtypes, state dtypes,
    first-step flags -- is found; the grads are either those in the table or
    pass grads_fit. Only on a miss are shapes, devices, layouts and dtype
    pairs checked (a tensor at the same address with the same size, dtype and
    a different layout is not detected; the optimizer classes never pass one)."""
    n = len(params)
    device = params[0].device
    _require_cuda(op, device)
    if len(grads) != n or any(s is not None and len(s) != n for s in (s0, s1, steps)):
        raise ValueError(f"fastsgd cuda {op}: params, grads and state lists must have the same length")
    n_trials = _n_trials(op, hps)
    cols = (_ptrs(params, n), _ptrs(grads, n), _ptrs(s0, n), _ptrs(s1, n), _ptrs(steps, n))
    numels, dtypes = tuple(map(_numel, params)), tuple(map(_dtype, params))
    key = (device.index, CHUNK_SIZE, n_trials, tuple(first), numels, dtypes,
           tuple(map(_dtype, s0)) if s0 is not None else None,
           tuple(map(_dtype, s1)) if s1 is not None else None, cols[0]) + cols[2:]
    capturing = _capturing()

    def build() -> Tuple[_Table, Optional[bool]]:
        return _build(op, params, grads, s0, s1, steps, first, cols, numels, n_trials, device, capturing)

    table = TABLES.get(key, cols[1], build, patch=lambda old, ptrs: _with_grads(old, ptrs, device, capturing),
                       fits=lambda: grads_fit(grads, numels, dtypes, device), capturing=capturing,
                       stream=_stream_object(device))
    return device, table


def _build(op, params, grads, s0, s1, steps, first, cols, numels, n_trials, device,
           capturing) -> Tuple[_Table, Optional[bool]]:
    """Checks the tensors and uploads a new table; (table, patchable) as
    TableCache.get expects (None: temporary grad copies, use once)."""
    n = len(params)
    checked = _check(op, params, grads, [s0, s1])
    if steps is not None:
        for i, st in enumerate(steps):
            if st.device != device or st.dtype != torch.float32 or st.numel() != 1:
                raise TypeError(f"fastsgd cuda {op}: step {i} must be a one-element float32 tensor on {device}, "
                                f"got {st.dtype} shape {tuple(st.shape)} on {st.device}")
    copied = any(a is not b for a, b in zip(checked, grads))
    if copied:  # grads in another layout than their params: this call uses temporary copies
        cols = (cols[0], _ptrs(checked, n)) + cols[2:]
    kinds = [_kind(op, p, s0[i] if s0 is not None else None) for i, p in enumerate(params)]
    if s1 is not None:
        for i, (m, v) in enumerate(zip(s0, s1)):
            if v.dtype != m.dtype:
                raise TypeError(f"fastsgd cuda {op}: exp_avg {i} is {m.dtype} but exp_avg_sq {i} is {v.dtype}")
    host, n_blocks = build_host_table(cols, numels, kinds, first, _row_lens(op, params, n_trials), CHUNK_SIZE)
    host, dev = _upload(host, device, capturing)
    entry = _Table(dev, host, n, n_blocks, CHUNK_SIZE, max(numels, default=0), 0 in numels)
    if copied:
        # Not cached (the copies are temporary); alive until the launch is
        # queued, or for good when a graph being captured will read them.
        entry.grads = checked
        return entry, None
    if all(map(_is_contiguous, params)):  # then grads_fit (contiguous grads) may stand in for _check
        entry.static_aligned = torch.tensor([c0 % _ALIGN == 0 and c2 % _ALIGN == 0 and c3 % _ALIGN == 0
                                             for c0, c2, c3 in zip(cols[0], cols[2], cols[3])], dtype=torch.bool)
    return entry, entry.static_aligned is not None


def _with_grads(old: _Table, grad_ptrs: Tuple[int, ...], device: torch.device, capturing: bool) -> _Table:
    """``old``'s table with new grad addresses (word 1 of each tensor's entry)
    and the vectorised bits recomputed for them: one small asynchronous
    upload instead of the full checks and rebuild."""
    n = old.n_tensors
    host = old.host.clone()
    g = torch.tensor(grad_ptrs, dtype=torch.int64)
    host[1:n * 8:8] = g
    vec = (old.static_aligned & (g % _ALIGN == 0)).to(torch.int64)
    host[7:n * 8:8] = (host[7:n * 8:8] & ~(1 << 41)) | (vec << 41)
    host, dev = _upload(host, device, capturing)
    entry = _Table(dev, host, n, old.n_blocks, old.chunk_size, old.max_numel, old.has_empty)
    entry.static_aligned = old.static_aligned
    return entry


def clear_cache() -> None:
    """Drops every cached tensor table, those read by captured CUDA graphs
    included: call it only when no such graph will be replayed again."""
    TABLES.clear(graphs=True)


# Stochastic rounding: a step counter on the device per (device, stream),
# mixed into the kernel's hash and advanced after every launch that rounds,
# on the same stream. A captured graph bakes the host seed into its launch;
# the counter makes every replay draw fresh bits.
_SR_COUNTERS: Dict[Tuple[int, int], Tensor] = {}


def _sr_counter(device: torch.device) -> Tensor:
    key = (device.index or 0, _stream(device))
    counter = _SR_COUNTERS.get(key)
    if counter is None:
        if _capturing():
            raise RuntimeError("fastsgd cuda: stochastic rounding keeps a step counter on the device that must exist "
                               "before CUDA graph capture; run one eager step on this stream first")
        counter = _SR_COUNTERS[key] = torch.zeros((), dtype=torch.int64, device=device)
    return counter


def _seed() -> int:
    return hash((torch.initial_seed(), next(_seed_counter))) & ((1 << 63) - 1)


def _launch(op: str, fn, params, states, **kw) -> None:
    """Calls the native launcher; a failure is re-raised with the dtype pairs involved."""
    try:
        fn(**kw)
    except RuntimeError as exc:
        pairs = sorted({f"{p.dtype}/{states[i].dtype}" if states is not None else str(p.dtype)
                        for i, p in enumerate(params)})
        raise RuntimeError(f"{exc} [param/state dtypes: {', '.join(pairs)}]") from exc


# ---- the ops ------------------------------------------------------------------------------
@torch.no_grad()
def sgd_step(params: Sequence[Tensor], grads: Sequence[Tensor], bufs: Optional[Sequence[Optional[Tensor]]], *,
             lr: Scalar, momentum: Scalar = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
             nesterov: bool = False, maximize: bool = False, lr_in_momentum: bool = False,
             first_step: Union[bool, Sequence[bool]] = False,
             grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
             stochastic_rounding: bool = False, stacked_trials: bool = False) -> None:
    """torch.optim.SGD's update in one launch (see reference.sgd_step).
    ``stochastic_rounding`` rounds bfloat16 momentum buffers stochastically
    (other buffer dtypes round to nearest as always)."""
    lr, momentum = trial_hparams("fastsgd cuda sgd_step", stacked_trials, lr=lr, momentum=momentum)
    _sgd_like("sgd_step", params, grads, bufs, lr=lr, momentum=momentum, dampening=dampening,
              weight_decay=weight_decay, nesterov=nesterov, maximize=maximize, lr_in_momentum=lr_in_momentum,
              first_step=first_step, grad_scale=grad_scale, found_inf=found_inf,
              stochastic_rounding=stochastic_rounding, lars=None)


@torch.no_grad()
def lars_step(params: Sequence[Tensor], grads: Sequence[Tensor], bufs: Optional[Sequence[Optional[Tensor]]], *,
              lr: Scalar, momentum: Scalar = 0.9, dampening: float = 0.0, weight_decay: float = 0.0,
              nesterov: bool = False, trust_coeff: float = 0.001, eps: float = 1e-8,
              trust_clip: bool = False, always_adapt: bool = False, lr_in_momentum: bool = False,
              first_step: Union[bool, Sequence[bool]] = False,
              grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
              stochastic_rounding: bool = False) -> None:
    """timm's Lars rule in at most three launches (see reference.lars_step)."""
    lr, momentum = single_hparams("fastsgd cuda lars_step", lr=lr, momentum=momentum)
    _sgd_like("lars_step", params, grads, bufs, lr=lr, momentum=momentum, dampening=dampening,
              weight_decay=weight_decay, nesterov=nesterov, maximize=False, lr_in_momentum=lr_in_momentum,
              first_step=first_step, grad_scale=grad_scale, found_inf=found_inf,
              stochastic_rounding=stochastic_rounding,
              lars=dict(trust_coeff=float(trust_coeff), eps=float(eps), trust_clip=bool(trust_clip),
                        adapt=bool(weight_decay != 0 or always_adapt)))


def _sgd_like(op, params, grads, bufs, *, lr, momentum, dampening, weight_decay, nesterov, maximize,
              lr_in_momentum, first_step, grad_scale, found_inf, stochastic_rounding, lars) -> None:
    params, grads = list(params), list(grads)
    if not params:
        return
    if bufs is not None:
        bufs = list(bufs)
        if any(b is None for b in bufs):
            raise ValueError(f"fastsgd cuda {op}: bufs must be all tensors or None (got a None entry)")
    device = params[0].device
    keep: list = []  # converted hyperparameter tensors, alive until the launch is queued
    found = _scalar(op, "found_inf", found_inf, device, keep)
    if found[1] == 0 and found[0] != 0:  # found_inf given as a set CPU tensor: skipped step
        return
    lr_t = _scalar(op, "lr", lr, device, keep, rows_ok=True)  # rows: sgd_step's stacked trials
    flags = first_step_flags(f"fastsgd cuda {op}", first_step, len(params))
    device, table = _prepare(op, params, grads, bufs, None, None, flags, (lr, momentum))
    counter = _sr_counter(device) if stochastic_rounding and bufs is not None else None
    common = dict(table=table.dev.data_ptr(), n_tensors=table.n_tensors, n_blocks=table.n_blocks,
                  chunk_size=table.chunk_size, lr=lr_t,
                  momentum=_scalar(op, "momentum", momentum, device, keep, rows_ok=True),
                  dampening=float(dampening), weight_decay=float(weight_decay), nesterov=bool(nesterov),
                  lr_in_momentum=bool(lr_in_momentum), has_buf=bufs is not None,
                  grad_scale=_scalar(op, "grad_scale", grad_scale, device, keep, default=1.0),
                  found_inf=found if found[1] else _NONE,
                  stochastic_rounding=bool(stochastic_rounding), seed=_seed() if stochastic_rounding else 0,
                  seed_counter=counter.data_ptr() if counter is not None else 0,
                  stream=_stream(device), device=device.index or 0)
    mod = _native()
    with device_guard(device):  # the native set_device then changes nothing the caller sees
        if lars is None:
            _launch(op, mod.cuda_sgd_step, params, bufs, maximize=bool(maximize), **common)
        else:
            partials, ratio = table.scratch(device)
            fused_max = gpu_passes.fused_max(table.chunk_size)
            _launch(op, mod.cuda_lars_step, params, bufs, trust_coeff=lars["trust_coeff"], eps=lars["eps"],
                    trust_clip=lars["trust_clip"], adapt=lars["adapt"], fused_max=fused_max,
                    all_fused=0 < table.max_numel <= fused_max, partials=partials, ratio=ratio, **common)
        if counter is not None:
            counter.add_(1)  # queued after the launch on the same stream (a graph node when capturing)


@torch.no_grad()
def lamb_step(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
              exp_avg_sqs: Sequence[Tensor], steps: Sequence[Tensor], *,
              lr: Scalar, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-6,
              weight_decay: float = 0.01, bias_correction: bool = True, trust_clip: bool = False,
              always_adapt: bool = False, clip_divisor: Optional[Scalar] = None,
              grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None) -> None:
    """LAMB (timm's rule) in at most three launches (see reference.lamb_step).
    ``steps`` are 0-dim float32 tensors on the params' device, incremented on the device."""
    op = "lamb_step"
    lr, clip_divisor = single_hparams("fastsgd cuda lamb_step", lr=lr, clip_divisor=clip_divisor)
    params, grads, exp_avgs, exp_avg_sqs, steps = map(list, (params, grads, exp_avgs, exp_avg_sqs, steps))
    if not params:
        return
    device = params[0].device
    keep: list = []
    found = _scalar(op, "found_inf", found_inf, device, keep)
    if found[1] == 0 and found[0] != 0:  # found_inf given as a set CPU tensor: skipped step
        return
    device, table = _prepare(op, params, grads, exp_avgs, exp_avg_sqs, steps, (False,) * len(params),
                             (lr, clip_divisor))
    partials, per_tensor = table.scratch(device)
    fused_max = gpu_passes.fused_max(table.chunk_size)
    with device_guard(device):  # the native set_device then changes nothing the caller sees
        _launch(op, _native().cuda_lamb_step, params, exp_avgs,
                table=table.dev.data_ptr(), n_tensors=table.n_tensors, n_blocks=table.n_blocks,
                chunk_size=table.chunk_size, lr=_scalar(op, "lr", lr, device, keep),
                beta1=float(beta1), beta2=float(beta2), eps=float(eps), weight_decay=float(weight_decay),
                bias_correction=bool(bias_correction), trust_clip=bool(trust_clip),
                adapt=bool(weight_decay != 0 or always_adapt),
                clip_divisor=_scalar(op, "clip_divisor", clip_divisor, device, keep, default=1.0),
                has_clip_divisor=clip_divisor is not None,
                grad_scale=_scalar(op, "grad_scale", grad_scale, device, keep, default=1.0),
                found_inf=found if found[1] else _NONE, fused_max=fused_max,
                all_fused=table.max_numel <= fused_max and not table.has_empty, partials=partials,
                per_tensor=per_tensor, stream=_stream(device), device=device.index or 0)
