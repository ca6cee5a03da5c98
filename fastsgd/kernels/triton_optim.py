"""The ``triton`` backend: sgd_step, lars_step and lamb_step as Triton kernels.

Same signatures and semantics as fastsgd/kernels/reference.py. CUDA tensors;
CPU tensors too when the kernels run in the Triton interpreter
(``TRITON_INTERPRET=1`` set before triton is first imported), which is how CI
tests them.

How many tensors per launch: all of them. A device-side table of addresses
(triton_table.py) lists every param/grad/state tensor of the call, and one
grid walks them in fixed-size chunks, so a step is one launch for 10 or
10,000 tensors. The table is cached, keyed on the tensors' addresses and
sizes, and rebuilt (one small asynchronous copy) only when they change.
Parameters are not moved into a flat buffer: the user's tensors stay as they
are. The element type is a compile-time constant, so tensors are grouped by
(param dtype, state dtype) and each group is one launch set; a model with one
dtype (the usual case) is one group.

Launches per group and call:
  sgd_step   1
  lars_step  1 without adaptation (weight_decay == 0 and not always_adapt),
             else 1 when every tensor fits one program (norms and update of
             each tensor in its program), else 3: norm partials, trust
             ratios (both for the larger tensors only), update
  lamb_step  1 when every tensor fits one program and none is empty, else
             3 with adaptation (norm partials, trust ratios + step counts,
             update), 2 without (step counts, update)
"Fits one program": 1..fused_max elements (triton_common.LaunchConfig);
FASTSGD_GPU_TWO_PASS=1 sends every tensor through the separate launches
(fastsgd/kernels/gpu_passes.py), with the same results bit for bit.
None of them reads anything back to the host: lr, grad_scale, found_inf and
LAMB's clip divisor may be device tensors, so a step can be captured in a
CUDA graph (the tables must exist before capture: run one eager step first).

Stochastic rounding (``stochastic_rounding=True``) rounds bfloat16 momentum
buffers stochastically: unbiased, and deterministic given the seed
(``manual_seed``). The seed and a call counter live on the device and the
counter advances inside the kernel, so replays of a captured step draw fresh
random bits. fp32 buffers need no rounding; fp16 buffers are refused.

Host work per call is one pass over the tensors to read their addresses,
sizes and dtypes (the table key); the full per-tensor checks (devices,
shapes, layouts) run once per distinct tensor set, not on every step.

torch.compile: the step functions are excluded from tracing
(torch.compiler.disable), so a compiled training step breaks the graph at
the optimizer call and runs these launches eagerly.

CUDA graphs: pass lr as a 0-dim device tensor to change it between replays;
a float lr is baked into the captured launch.

Not supported here (clear errors): stacked trials (1-D lr/momentum tensors),
float64 and complex tensors, strided views (use backend="reference").
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from operator import attrgetter
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

try:
    import triton  # noqa: F401
    _IMPORT_ERROR: Optional[str] = None
except ImportError as exc:  # the registry reports this through unavailable_reason()
    _IMPORT_ERROR = f"triton is not installed ({exc})"

if _IMPORT_ERROR is None:
    from fastsgd.kernels import triton_common as common
    from fastsgd.kernels import triton_table
    from fastsgd.kernels.triton_lamb import lamb_kernel
    from fastsgd.kernels.triton_norms import lars_partials_kernel, trust_ratio_kernel
    from fastsgd.kernels.triton_sgd import momentum_sgd_kernel
    from fastsgd.kernels.triton_table import TensorTable, addresses_of

from fastsgd.kernels import gpu_passes
from fastsgd.kernels.contract import Capabilities
from fastsgd.kernels.table_cache import TableCache
from fastsgd.kernels.tensors import device_guard, first_step_flags, grads_fit, is_dense, single_hparams

Scalar = Union[float, Tensor]

NAME = "triton"
CAPABILITIES = Capabilities(NAME, "CUDA tensors (CPU tensors under TRITON_INTERPRET=1)",
                            (torch.float32, torch.bfloat16, torch.float16), stochastic_rounding=True,
                            device_scalars=True)
STRIDED = CAPABILITIES.strided  # kernels walk each tensor as one flat range of memory

_DTYPES = CAPABILITIES.dtypes
_numel = Tensor.numel
_dtype = attrgetter("dtype")

# Tables of tensor addresses, shared by all calls (keyed on the tensors).
TABLES = triton_table.TritonTables() if _IMPORT_ERROR is None else None
# Stochastic-rounding state per (device, stream): int64 (seed, call counter,
# ticket). Per stream, because launches on one stream run one after the other:
# two launches on different streams sharing a state could interleave their
# tickets and bump the counter wrongly.
_RNG: Dict[Tuple[torch.device, int], Tensor] = {}
_SEEDS: Dict[torch.device, int] = {}  # manual_seed per device


def unavailable_reason() -> Optional[str]:
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    mode = common.kernel_mode()
    if mode == "mixed":
        return ("triton was imported without TRITON_INTERPRET=1 but fastsgd's kernels with it (or the other way "
                "round); set TRITON_INTERPRET=1 before triton is first imported")
    if mode == "interpreted" or torch.cuda.is_available():
        return None
    if common.interpret_requested():
        return ("TRITON_INTERPRET=1 was set after triton was imported; set it before the first import of triton "
                "to run the Triton kernels on CPU tensors")
    return "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU tensors)"


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    if _IMPORT_ERROR is not None or dtype not in _DTYPES:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return common.kernel_mode() == "compiled"
    return device.type == "cpu" and common.kernels_interpreted()


def manual_seed(seed: int, device: Union[str, torch.device] = "cuda") -> None:
    """Seed stochastic rounding on ``device`` (and restart its call counters).
    Without it the seed is drawn once per stream from torch's default
    generator, so ``torch.manual_seed`` makes runs repeatable too. Streams
    other than the default one derive their seed from ``seed`` and the stream."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # tensors report cuda:<index>
        device = torch.device("cuda", torch.cuda.current_device())
    _SEEDS[device] = int(seed)
    for key in [k for k in _RNG if k[0] == device]:
        del _RNG[key]
    stream = _stream_key(device)
    _RNG[(device, stream)] = _state_tensor(_stream_seed(int(seed), stream), device)


# ---- checks: everything is validated before any tensor is touched -----------

def _stacked_error(name: str) -> NotImplementedError:
    """The error for per-trial (1-D) hyperparameters, naming the backends available here
    whose Capabilities record says they take stacked trials."""
    from fastsgd import backends  # here, not at import: backends loads the backend modules
    able = [repr(b) for b in backends.stacked_trial_backends()]
    choice = " or ".join([", ".join(able[:-1]), able[-1]] if len(able) > 1 else able)
    return NotImplementedError(f"fastsgd backend 'triton' does not support stacked trials (1-D {name} tensors); "
                               f"use backend={choice} for per-trial hyperparameters")


def _check_device(device: torch.device) -> None:
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"fastsgd backend 'triton' is not available: {reason}")
    if device.type == "cuda" and common.kernels_interpreted():
        raise RuntimeError("fastsgd backend 'triton': the kernels were imported with TRITON_INTERPRET=1 and run "
                           "on CPU tensors only; import without it to run on CUDA")
    if device.type not in ("cuda", "cpu") or (device.type == "cpu" and not common.kernels_interpreted()):
        raise RuntimeError(f"fastsgd backend 'triton' runs on CUDA tensors (CPU tensors only under "
                           f"TRITON_INTERPRET=1); got tensors on {device}")


@dataclass(frozen=True)
class _Tensors:
    """What a call needs from its tensors, read once: with thousands of small
    tensors the per-tensor Python work is the fixed cost of a step."""
    addresses: Tuple[Optional[Tuple[int, ...]], ...]  # per column (params first), see triton_table.addresses_of
    numels: Tuple[int, ...]
    dtypes: Tuple[Optional[Tuple[torch.dtype, ...]], ...]  # per column

    def group(self, idx: List[int]) -> Tuple[tuple, Tuple[int, ...]]:
        """Addresses and sizes of the tensors ``idx`` (a dtype group)."""
        if len(idx) == len(self.numels):
            return self.addresses, self.numels
        return (tuple(tuple(col[i] for i in idx) if col is not None else None for col in self.addresses),
                tuple(self.numels[i] for i in idx))


# Tensor sets that passed _check_tensors, keyed on everything but the grads'
# addresses (column 1), which autograd moves from step to step; new grads of
# a contiguous set pass grads_fit instead of the full checks (table_cache.py).
_CHECKED: "TableCache[bool]" = TableCache(capacity=64)
_GRADS = 1  # the grads' column in every table


def _described(op: str, params: Sequence[Tensor], columns: Dict[str, Optional[Sequence[Tensor]]],
               extra_check=None, unchecked: Tuple[str, ...] = ()) -> _Tensors:
    """The call's tensors (params, then ``columns`` in table-column order, the
    grads first), checked by _check_tensors (except the ``unchecked`` columns,
    which ``extra_check`` covers) the first time this set is seen."""
    n = len(params)
    for name, ts in columns.items():
        if ts is not None and len(ts) != n:
            raise ValueError(f"{op}: {len(ts)} {name} for {n} params")
    device = params[0].device
    _check_device(device)
    cols = [params, *columns.values()]
    described = _Tensors(tuple(addresses_of(ts) for ts in cols), tuple(map(_numel, params)),
                         tuple(tuple(map(_dtype, ts)) if ts is not None else None for ts in cols))
    key = (op, device, described.addresses[:_GRADS] + described.addresses[_GRADS + 1:], described.numels,
           described.dtypes)

    def check() -> Tuple[bool, bool]:
        _check_tensors(op, params, **{k: v for k, v in columns.items() if k not in unchecked})
        if extra_check is not None:
            extra_check()
        contiguous = all(map(Tensor.is_contiguous, params))
        return contiguous, contiguous

    _CHECKED.get(key, described.addresses[_GRADS], check, patch=lambda contiguous, grads: contiguous,
                 fits=lambda: grads_fit(cols[_GRADS], described.numels, described.dtypes[0], device))
    return described


def _check_tensors(op: str, params: Sequence[Tensor], **others: Optional[Sequence[Tensor]]) -> None:
    """One device; supported dtypes; every other tensor laid out exactly like
    its param (the kernels walk them with one flat index)."""
    device = params[0].device
    for i, p in enumerate(params):
        if p.device != device:
            raise RuntimeError(f"{op}: params[{i}] is on {p.device}, params[0] on {device}; one device per call")
        if p.dtype not in _DTYPES:
            raise TypeError(f"{op}: fastsgd backend 'triton' supports {', '.join(map(str, _DTYPES))} params; "
                            f"params[{i}] is {p.dtype} (use backend='reference')")
        if p.numel() and not is_dense(p):
            raise TypeError(f"{op}: params[{i}] is a strided view with gaps; the triton backend needs dense "
                            "tensors (use backend='reference')")
        for name, ts in others.items():
            t = ts[i] if ts is not None else None
            if t is None:
                continue
            if t.device != device or t.shape != p.shape or (p.numel() > 1 and t.stride() != p.stride()):
                raise ValueError(f"{op}: {name}[{i}] has shape {tuple(t.shape)}, strides {t.stride()}, device "
                                 f"{t.device}; its param has {tuple(p.shape)}, {p.stride()}, {device}")
            if name == "grads" and t.dtype != p.dtype:
                raise TypeError(f"{op}: grads[{i}] is {t.dtype} but params[{i}] is {p.dtype}")
            if t.dtype not in _DTYPES:
                raise TypeError(f"{op}: {name}[{i}] is {t.dtype}; the triton backend supports "
                                f"{', '.join(map(str, _DTYPES))}")


def _check_scalar(op: str, name: str, value, device: torch.device, *, allow_none: bool = False) -> None:
    if value is None:
        if allow_none:
            return
        raise ValueError(f"{op}: {name} is required")
    if isinstance(value, Tensor):
        if value.ndim == 1 and value.numel() > 1:
            raise _stacked_error(name)
        if value.numel() != 1:
            raise ValueError(f"{op}: {name} must be a float or a 1-element tensor, got shape {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{op}: {name} is on {value.device} but the params are on {device}; keep it on the "
                             "params' device (read there without a host sync)")
        if not (value.dtype.is_floating_point or name == "found_inf"):
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {value.dtype}")


def _host_float(op: str, name: str, value) -> float:
    """Hyperparameters compiled into the launch as floats (not lr)."""
    if isinstance(value, Tensor):
        if value.ndim == 1 and value.numel() > 1:
            raise _stacked_error(name)
        return float(value.item())
    return float(value)


# ---- launch helpers ----------------------------------------------------------

def _scalar_arg(value, dummy: Tensor) -> Tuple[Tensor, float, bool]:
    """(pointer argument, float argument, is-a-tensor flag) for a hyperparameter."""
    if isinstance(value, Tensor):
        return value, 0.0, True
    return dummy, (0.0 if value is None else float(value)), False


def _group_by(keys: Sequence) -> Dict[object, List[int]]:
    if keys and keys.count(keys[0]) == len(keys):  # the usual case: one dtype group
        return {keys[0]: list(range(len(keys)))}
    groups: Dict[object, List[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    return groups


def _state_tensor(seed: int, device: torch.device) -> Tensor:
    host = torch.tensor([seed, 0, 0], dtype=torch.int64)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("fastsgd: stochastic rounding state must exist before CUDA graph capture; run one "
                           "eager step first (or call fastsgd.kernels.triton_optim.manual_seed before capture)")
    return host.to(device)


def _stream_key(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def _stream_seed(seed: int, stream: int) -> int:
    """The default stream (0) keeps ``seed``; other streams get distinct seeds."""
    return (seed + 0x9E3779B97F4A7C15 * stream) % (1 << 62)


def _rng_state(device: torch.device) -> Tensor:
    stream = _stream_key(device)
    state = _RNG.get((device, stream))
    if state is None:
        seed = _SEEDS.get(device)
        seed = int(torch.randint(0, 2 ** 62, ()).item()) if seed is None else _stream_seed(seed, stream)
        state = _RNG[(device, stream)] = _state_tensor(seed, device)
    return state


def _rounding_flag(op: str, stochastic_rounding: bool, buf_dtypes: Optional[Sequence[torch.dtype]]) -> bool:
    """Stochastic rounding happens for bf16 buffers; fp32 buffers are stored
    exactly (nothing to round); fp16 buffers are refused."""
    if not stochastic_rounding or buf_dtypes is None:
        return False
    if torch.float16 in buf_dtypes:
        raise NotImplementedError(f"{op}: stochastic_rounding is implemented for bfloat16 momentum buffers; "
                                  f"bufs[{list(buf_dtypes).index(torch.float16)}] is float16")
    return True


def _outside_compiled_graphs(fn):
    """The public entry of an op: under its params' CUDA device (launches go
    to that device and its current stream; the caller's device is restored),
    and not traced by torch.compile (raw addresses, cached tables and Triton
    launches are host-side work that a graph cannot hold): a compiled training
    step breaks the graph here and runs the launches eagerly, which is what
    the step costs anyway (1-3 launches)."""
    @functools.wraps(fn)
    def on_params_device(params, *args, **kwargs):
        if not len(params):
            return fn(params, *args, **kwargs)
        with device_guard(params[0].device):
            return fn(params, *args, **kwargs)
    return torch.compiler.disable(on_params_device, recursive=True)


# ---- SGD family and LARS -----------------------------------------------------

@_outside_compiled_graphs
@torch.no_grad()
def sgd_step(params: Sequence[Tensor], grads: Sequence[Tensor], bufs: Optional[Sequence[Optional[Tensor]]], *,
             lr: Scalar, momentum: Scalar = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
             nesterov: bool = False, maximize: bool = False, lr_in_momentum: bool = False,
             first_step: Union[bool, Sequence[bool]] = False,
             grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
             stochastic_rounding: bool = False, stacked_trials: bool = False) -> None:
    """torch.optim.SGD's update for all tensors in one launch per dtype group."""
    if stacked_trials:
        raise _stacked_error("lr/momentum")
    _momentum_step("sgd_step", params, grads, bufs, lr=lr, momentum=momentum, dampening=dampening,
                   weight_decay=weight_decay, nesterov=nesterov, maximize=maximize, lr_in_momentum=lr_in_momentum,
                   first_step=first_step, grad_scale=grad_scale, found_inf=found_inf,
                   stochastic_rounding=stochastic_rounding, lars=None)


@_outside_compiled_graphs
@torch.no_grad()
def lars_step(params: Sequence[Tensor], grads: Sequence[Tensor], bufs: Optional[Sequence[Optional[Tensor]]], *,
              lr: Scalar, momentum: Scalar = 0.9, dampening: float = 0.0, weight_decay: float = 0.0,
              nesterov: bool = False, trust_coeff: float = 0.001, eps: float = 1e-8,
              trust_clip: bool = False, always_adapt: bool = False, lr_in_momentum: bool = False,
              first_step: Union[bool, Sequence[bool]] = False,
              grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
              stochastic_rounding: bool = False) -> None:
    """timm's Lars rule: per-tensor trust ratios by a segmented reduction,
    then the SGD momentum update, in at most 3 launches per dtype group."""
    lr, momentum = single_hparams("fastsgd triton lars_step", lr=lr, momentum=momentum)
    lars = dict(trust_coeff=float(trust_coeff), eps=float(eps), trust_clip=bool(trust_clip),
                adapt=weight_decay != 0 or always_adapt)
    _momentum_step("lars_step", params, grads, bufs, lr=lr, momentum=momentum, dampening=dampening,
                   weight_decay=weight_decay, nesterov=nesterov, maximize=False, lr_in_momentum=lr_in_momentum,
                   first_step=first_step, grad_scale=grad_scale, found_inf=found_inf,
                   stochastic_rounding=stochastic_rounding, lars=lars)


def _momentum_step(op, params, grads, bufs, *, lr, momentum, dampening, weight_decay, nesterov, maximize,
                   lr_in_momentum, first_step, grad_scale, found_inf, stochastic_rounding, lars) -> None:
    if len(params) == 0:
        return
    if bufs is not None and any(b is None for b in bufs):
        raise ValueError(f"{op}: bufs must be None (no momentum) or a buffer for every param")
    tensors = _described(op, params, dict(grads=grads, bufs=bufs))
    device = params[0].device
    for name, value, optional in (("lr", lr, False), ("grad_scale", grad_scale, True),
                                  ("found_inf", found_inf, True)):
        _check_scalar(op, name, value, device, allow_none=optional)
    momentum = _host_float(op, "momentum", momentum)
    weight_decay = _host_float(op, "weight_decay", weight_decay)
    one_minus_dampening = 1.0 - _host_float(op, "dampening", dampening)
    flags = first_step_flags(op, first_step, len(params))
    rounding = _rounding_flag(op, stochastic_rounding, tensors.dtypes[2])
    rng = _rng_state(device) if rounding else None
    cfg = common.launch_config(device)
    # ---- checked: from here on tensors change ----
    p_dtypes, _, b_dtypes = tensors.dtypes
    for (p_dtype, b_dtype), idx in _group_by(list(zip(p_dtypes, b_dtypes or [None] * len(p_dtypes)))).items():
        g_flags = [flags[i] for i in idx]
        mixed = len(set(g_flags)) > 1
        addresses, numels = tensors.group(idx)
        table = TABLES.get(addresses, numels, cfg.chunk, device, flags=g_flags if mixed else None,
                           volatile=_GRADS)
        dummy = table.tensors
        lr_ptr, lr_value, lr_is_tensor = _scalar_arg(lr, dummy)
        ratios = dummy
        fused_max = 0
        if lars is not None and lars["adapt"]:
            fused_max = gpu_passes.fused_max(cfg.fused_max)
            ratios = torch.empty((table.num_tensors,), dtype=torch.float32, device=device)
            if fused_max == 0 or table.max_numel > fused_max:  # some tensor spans several programs
                _trust_ratios(table, cfg, ratios, fused_max, params_dtype=p_dtype, lr=lr,
                              weight_decay=weight_decay, grad_scale=grad_scale, found_inf=found_inf, **lars)
        if table.num_programs == 0:
            continue
        momentum_sgd_kernel[(table.num_programs,)](
            table.tensors, table.programs, ratios, lr_ptr,
            grad_scale if grad_scale is not None else dummy,
            found_inf if found_inf is not None else dummy,
            rng if rng is not None and b_dtype == torch.bfloat16 else dummy,
            lr_value, momentum, one_minus_dampening, weight_decay, int(all(g_flags)),
            lars["trust_coeff"] if lars is not None else 0.0, lars["eps"] if lars is not None else 0.0,
            PARAM_DTYPE=common.TORCH_TO_TRITON[p_dtype],
            BUF_DTYPE=common.TORCH_TO_TRITON[b_dtype or p_dtype],
            HAS_MOMENTUM=bufs is not None, NESTEROV=bool(nesterov), MAXIMIZE=bool(maximize),
            LR_IN_MOMENTUM=bool(lr_in_momentum), HAS_WEIGHT_DECAY=weight_decay != 0,
            HAS_RATIO=ratios is not dummy, LR_IS_TENSOR=lr_is_tensor, HAS_SCALE=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None,
            STOCHASTIC_ROUNDING=rounding and b_dtype == torch.bfloat16, ALIGNED=table.aligned,
            BLOCK=cfg.block, CHUNK=cfg.chunk, TRUST_CLIP=lars is not None and lars["trust_clip"],
            FUSED_MAX=fused_max, num_warps=cfg.num_warps)


def _trust_ratios(table: TensorTable, cfg, ratios: Tensor, fused_max: int, *, params_dtype, lr, weight_decay,
                  trust_coeff, eps, trust_clip, adapt, grad_scale, found_inf) -> None:
    """LARS trust ratios into ``ratios`` (2 launches) for the tensors of
    ``table`` not fused into the update kernel (all when fused_max is 0)."""
    device = table.tensors.device
    dummy = table.tensors
    partials = torch.empty((max(table.num_programs, 1), 2), dtype=torch.float32, device=device)
    if table.num_programs:
        lars_partials_kernel[(table.num_programs,)](
            table.tensors, table.programs, partials,
            grad_scale if grad_scale is not None else dummy, found_inf if found_inf is not None else dummy,
            PARAM_DTYPE=common.TORCH_TO_TRITON[params_dtype], HAS_SCALE=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None, ALIGNED=table.aligned, BLOCK=cfg.block, CHUNK=cfg.chunk,
            FUSED_MAX=fused_max, num_warps=cfg.num_warps)
    lr_ptr, lr_value, lr_is_tensor = _scalar_arg(lr, dummy)
    trust_ratio_kernel[(table.num_tensors,)](
        table.tensors, partials, ratios, lr_ptr, found_inf if found_inf is not None else dummy,
        lr_value, weight_decay, trust_coeff, eps,
        LAMB=False, ADAPT=True, TRUST_CLIP=trust_clip, LR_IS_TENSOR=lr_is_tensor,
        HAS_FOUND_INF=found_inf is not None, BLOCK=cfg.reduce_block, FUSED_MAX=fused_max)


# ---- LAMB --------------------------------------------------------------------

def _log(beta: float) -> float:
    return math.log(beta) if beta > 0 else -math.inf


@_outside_compiled_graphs
@torch.no_grad()
def lamb_step(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
              exp_avg_sqs: Sequence[Tensor], steps: Sequence[Tensor], *,
              lr: Scalar, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-6,
              weight_decay: float = 0.01, bias_correction: bool = True, trust_clip: bool = False,
              always_adapt: bool = False, clip_divisor: Optional[Scalar] = None,
              grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None) -> None:
    """LAMB in 1-3 launches per dtype group; ``steps`` advance on the device."""
    op = "lamb_step"
    lr, clip_divisor = single_hparams("fastsgd triton lamb_step", lr=lr, clip_divisor=clip_divisor)
    if len(params) == 0:
        return
    device = params[0].device

    def check_steps_and_moments():
        for i, (s, m, v) in enumerate(zip(steps, exp_avgs, exp_avg_sqs)):
            if s.numel() != 1 or s.dtype != torch.float32 or s.device != device:
                raise TypeError(f"{op}: steps[{i}] must be a 1-element float32 tensor on {device}, got shape "
                                f"{tuple(s.shape)}, {s.dtype} on {s.device}")
            if m.dtype != v.dtype:
                raise TypeError(f"{op}: exp_avgs[{i}] is {m.dtype} but exp_avg_sqs[{i}] is {v.dtype}")

    tensors = _described(op, params, dict(grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, steps=steps),
                         extra_check=check_steps_and_moments, unchecked=("steps",))
    for name, value, optional in (("lr", lr, False), ("clip_divisor", clip_divisor, True),
                                  ("grad_scale", grad_scale, True), ("found_inf", found_inf, True)):
        _check_scalar(op, name, value, device, allow_none=optional)
    beta1, beta2 = float(beta1), float(beta2)
    weight_decay = float(weight_decay)
    adapt = weight_decay != 0 or always_adapt
    cfg = common.launch_config(device)
    fused_max = gpu_passes.fused_max(cfg.fused_max)
    # ---- checked: from here on tensors change ----
    for (p_dtype, s_dtype), idx in _group_by(list(zip(tensors.dtypes[0], tensors.dtypes[2]))).items():
        addresses, numels = tensors.group(idx)
        table = TABLES.get(addresses, numels, cfg.chunk, device, volatile=_GRADS)
        dummy = table.tensors
        lr_ptr, lr_value, lr_is_tensor = _scalar_arg(lr, dummy)
        clip_ptr, clip_value, clip_is_tensor = _scalar_arg(clip_divisor, dummy)
        partials = torch.empty((max(table.num_programs, 1), 2), dtype=torch.float32, device=device)
        ratios = torch.empty((table.num_tensors,), dtype=torch.float32, device=device)
        lamb_args = dict(
            PARAM_DTYPE=common.TORCH_TO_TRITON[p_dtype], STATE_DTYPE=common.TORCH_TO_TRITON[s_dtype],
            LR_IS_TENSOR=lr_is_tensor, HAS_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
            HAS_CLIP=clip_divisor is not None, CLIP_IS_TENSOR=clip_is_tensor,
            HAS_WEIGHT_DECAY=weight_decay != 0, BIAS_CORRECTION=bool(bias_correction), ALIGNED=table.aligned,
            BLOCK=cfg.block, CHUNK=cfg.chunk, ADAPT=adapt, TRUST_CLIP=bool(trust_clip), FUSED_MAX=fused_max,
            num_warps=cfg.num_warps)

        def launch_lamb(norms_only: bool) -> None:
            lamb_kernel[(table.num_programs,)](
                table.tensors, table.programs, partials, ratios, lr_ptr,
                grad_scale if grad_scale is not None else dummy, found_inf if found_inf is not None else dummy,
                clip_ptr, lr_value, clip_value, beta1, 1.0 - beta1, beta2, 1.0 - beta2, _log(beta1), _log(beta2),
                float(eps), weight_decay, NORMS_ONLY=norms_only, **lamb_args)

        # Empty tensors have no program: trust_ratio_kernel advances their steps.
        if fused_max == 0 or table.max_numel > fused_max or table.has_empty:
            if adapt and table.num_programs:
                launch_lamb(norms_only=True)
            trust_ratio_kernel[(table.num_tensors,)](
                table.tensors, partials, ratios, lr_ptr, found_inf if found_inf is not None else dummy,
                lr_value, weight_decay, 0.0, float(eps),
                LAMB=True, ADAPT=adapt, TRUST_CLIP=bool(trust_clip), LR_IS_TENSOR=lr_is_tensor,
                HAS_FOUND_INF=found_inf is not None, BLOCK=cfg.reduce_block, FUSED_MAX=fused_max)
        if table.num_programs:
            launch_lamb(norms_only=False)
