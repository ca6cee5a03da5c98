"""Fused C++ CPU kernels (fastsgd._C): one native call per functional call.

Same functions and signatures as ``fastsgd.kernels.reference``. Each call
checks its tensors, builds a table with one int64 row per tensor (data
pointers, element count, dtype codes, first-step flag) and hands it to a single
native call, which splits all tensors into work items and runs them on
``torch.get_num_threads()`` OpenMP threads. The native module never sees a
torch object, so everything that could make it touch the wrong memory is
checked here, before anything is modified:

- every tensor on the CPU, of a supported dtype (float32, float64, bfloat16,
  float16); grads with their param's shape and dtype; buffers/moments with
  the param's shape (any supported dtype: e.g. bfloat16 momentum for float32
  params, rounded to nearest even);
- each tensor dense (it covers its memory exactly once: contiguous,
  channels_last, ...) and laid out like its param, so one flat index walks
  all of them;
- ``lr``, ``grad_scale``, ``found_inf`` (and ``clip_divisor``) on the CPU;
  they are read on the host, which costs nothing on a CPU.

Math is float32 for float32/bfloat16/float16 tensors and float64 when the
param or its state is float64; norms (LARS, LAMB) accumulate in float64 in a
fixed order, so results do not depend on the thread count.

Host-side cost: the checks read tensor shapes through torch's Python API, a
cost per tensor that adds up over thousands of small params. The finished
table is therefore cached (``table_cache.TableCache``, 32 entries), keyed on
what it depends on apart from the gradients: the params' and state tensors'
addresses, element counts and dtypes, and the first-step flags. Gradients
move (autograd re-creates them every step with ``zero_grad(set_to_none=True)``),
so on a hit their addresses are written into a copy of the table after a cheap
check against the params (device, element count, dtype, contiguity): a few
attribute reads per param instead of the shape checks, which an identical key
means would pass again. Tensors that are not contiguous
(channels_last, ...) are checked on every call and never cached. One thing the
key cannot see: a tensor re-created at the same address with the same element
count but another shape passes as the old one (the kernels walk flat memory,
so this is a wrong-shape argument going unreported, never a wrong address).
"""
from __future__ import annotations

from operator import attrgetter
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from fastsgd._native import native, native_error
from fastsgd.kernels.contract import FLOATS, Capabilities
from fastsgd.kernels.table_cache import TableCache
from fastsgd.kernels.tensors import first_step_flags, grads_fit, is_dense, single_hparams, trial_hparams

Scalar = Union[float, Tensor]

NAME = "cpu"
CAPABILITIES = Capabilities(NAME, "CPU tensors", FLOATS, stacked_trials=True)
STRIDED = CAPABILITIES.strided  # flat kernels: dense tensors only (contiguous, channels_last, ...)

_SGD_FIELDS = ("param", "grad", "buf", "numel", "param_dtype", "buf_dtype", "first_step")
_LAMB_FIELDS = ("param", "grad", "exp_avg", "exp_avg_sq", "step", "numel", "param_dtype", "state_dtype",
                "step_dtype")
_S = {name: i for i, name in enumerate(_SGD_FIELDS)}  # column of each field in the SGD/LARS table
_L = {name: i for i, name in enumerate(_LAMB_FIELDS)}  # ... in the LAMB table
assert _S["grad"] == _L["grad"], "_cached refills one grad column for both layouts"
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
           "float16": torch.float16}

_size = Tensor.size
_numel = Tensor.numel
_data_ptr = Tensor.data_ptr
_is_contiguous = Tensor.is_contiguous
_dtype = attrgetter("dtype")
_is_cpu = attrgetter("is_cpu")
_codes: dict = {}  # torch dtype -> native dtype code, filled on first use

_CPU = torch.device("cpu")
# Native tables (numpy int64, read-only once cached) of recent tensor sets.
TABLES: "TableCache[np.ndarray]" = TableCache(capacity=32)


def unavailable_reason() -> Optional[str]:
    """None when the fused CPU kernels can run, else why not."""
    err = native_error()
    if err:
        return err
    mod = native()
    if not hasattr(mod, "cpu_sgd_step"):
        return "fastsgd._C was built without the CPU kernels (csrc/cpu); rebuild with `pip install .`"
    if tuple(mod.cpu_sgd_table_fields) != _SGD_FIELDS or tuple(mod.cpu_lamb_table_fields) != _LAMB_FIELDS:
        return ("fastsgd._C does not match fastsgd/kernels/cpu.py (table layouts differ); "
                "rebuild with `pip install .`")
    return None


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    return torch.device(device).type == "cpu" and dtype in CAPABILITIES.dtypes


def _native():
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"fastsgd cpu backend is not available: {reason}")
    mod = native()
    if not _codes:
        _codes.update({_DTYPES[k]: v for k, v in mod.cpu_dtype_codes.items()})
    return mod


# ---- checks -------------------------------------------------------------------
def _first_bad(flags: Sequence[bool]) -> int:
    return next(i for i, ok in enumerate(flags) if not ok)


def _check_length(what: str, name: str, ts: Sequence, n: int) -> None:
    if len(ts) != n:
        raise ValueError(f"{what}: {name} has {len(ts)} tensors but params has {n}")


def _check_cpu(what: str, name: str, ts: Sequence[Tensor]) -> None:
    flags = list(map(_is_cpu, ts))
    if not all(flags):
        i = _first_bad(flags)
        raise ValueError(f"{what}: {name}[{i}] is on {ts[i].device}; the cpu backend takes CPU tensors only")


def _dtype_codes(what: str, name: str, ts: Sequence[Tensor]) -> List[int]:
    dtypes = list(map(_dtype, ts))
    try:
        return [_codes[d] for d in dtypes]
    except KeyError:
        i = _first_bad([d in _codes for d in dtypes])
        raise TypeError(f"{what}: {name}[{i}] has dtype {dtypes[i]}; the cpu backend supports float32, "
                        "float64, bfloat16 and float16 (use backend='reference' for others)") from None


def _check_layouts(what: str, params: Sequence[Tensor], others: Sequence[tuple]) -> None:
    """Every tensor dense and strided like its param (so a flat index walks them all)."""
    tensors = list(params) + [t for _, ts in others for t in ts if t is not None]
    if all(map(_is_contiguous, tensors)):
        return
    for i, p in enumerate(params):
        if p.numel() > 1 and not is_dense(p):
            raise ValueError(f"{what}: params[{i}] is a strided view with gaps (strides {p.stride()}); the cpu "
                             "backend needs dense tensors (use backend='reference' for views)")
        for name, ts in others:
            t = ts[i]
            if t is not None and t.numel() > 1 and t.stride() != p.stride():
                raise ValueError(f"{what}: {name}[{i}] has strides {t.stride()} but its param has "
                                 f"{p.stride()}; they must share one memory layout")


def _check_like_params(what: str, name: str, ts: Sequence[Optional[Tensor]], sizes: list,
                       same_dtype_codes: Optional[List[int]] = None) -> List[int]:
    """CPU, same shapes as the params (None entries allowed); returns dtype codes (-1 for None)."""
    present = [t for t in ts if t is not None]
    if len(present) == len(ts):
        _check_cpu(what, name, ts)
        got = list(map(_size, ts))
        if got != sizes:
            i = _first_bad([a == b for a, b in zip(got, sizes)])
            raise ValueError(f"{what}: {name}[{i}] has shape {tuple(got[i])} but its param has {tuple(sizes[i])}")
        codes = _dtype_codes(what, name, ts)
    else:
        for i, t in enumerate(ts):
            if t is not None and not t.is_cpu:
                raise ValueError(f"{what}: {name}[{i}] is on {t.device}; the cpu backend takes CPU tensors only")
            if t is not None and t.shape != sizes[i]:
                raise ValueError(f"{what}: {name}[{i}] has shape {tuple(t.shape)} but its param has "
                                 f"{tuple(sizes[i])}")
        present_codes = iter(_dtype_codes(what, name, present))
        codes = [-1 if t is None else next(present_codes) for t in ts]
    if same_dtype_codes is not None and codes != same_dtype_codes:
        i = _first_bad([a == b for a, b in zip(codes, same_dtype_codes)])
        raise ValueError(f"{what}: {name}[{i}] has dtype {ts[i].dtype}, not its param's dtype")
    return codes


def _host_scalar(what: str, name: str, x: Optional[Scalar], default: float) -> float:
    if x is None:
        return default
    if isinstance(x, Tensor):
        if x.device.type != "cpu" or x.numel() != 1:
            raise ValueError(f"{what}: {name} must be a float or a 1-element CPU tensor, got a tensor of shape "
                             f"{tuple(x.shape)} on {x.device}")
        return float(x.item())
    return float(x)


def _skipped(what: str, found_inf: Optional[Tensor]) -> bool:
    return found_inf is not None and _host_scalar(what, "found_inf", found_inf, 0.0) != 0.0


def _no_stochastic_rounding(what: str, stochastic_rounding: bool) -> None:
    if stochastic_rounding:
        raise ValueError(f"{what}: stochastic_rounding=True is implemented only in the GPU backends "
                         "(triton, cuda); the cpu backend rounds to nearest")


def _threads() -> int:
    return max(1, torch.get_num_threads())


# ---- stacked trials -------------------------------------------------------------
def _trial_values(what: str, name: str, x: Scalar) -> Optional[List[float]]:
    """A 1-D per-trial tensor as a list of floats, else None."""
    if isinstance(x, Tensor) and x.ndim == 1:
        if x.device.type != "cpu":
            raise ValueError(f"{what}: {name} (one value per trial) must be a CPU tensor for the cpu backend, "
                             f"got one on {x.device}")
        return x.double().tolist()
    return None


# Expanded tables by (table bytes, trials, fields): the same few every step of a study. The
# table bytes hold every address and size, so a hit is the very table a rebuild would give.
_expanded: dict = {}
_EXPANDED_MAX = 64


def _expand_trials(what: str, rows: np.ndarray, params: Sequence[Tensor], trials: int, lrs: List[float],
                   mus: List[float], ptr_fields: Sequence[int], dtype_fields: Sequence[int]):
    """Row i of every tensor becomes its own entry with lr[i] and momentum[i]."""
    for i, p in enumerate(params):
        if p.ndim == 0 or p.shape[0] != trials:
            raise ValueError(f"{what}: lr/momentum hold {trials} values (stacked trials), so every param needs "
                             f"{trials} as its first dimension; params[{i}] has shape {tuple(p.shape)}")
        if p.numel() > 0 and trials > 1 and p.stride(0) * trials != p.numel():
            raise ValueError(f"{what}: params[{i}] (stacked trials) must keep each trial's row contiguous "
                             f"(strides {p.stride()})")
    key = (rows.tobytes(), rows.shape, trials, tuple(ptr_fields), tuple(dtype_fields))
    out = _expanded.get(key)
    if out is None:
        elem_size = np.zeros(len(_codes), dtype=np.int64)
        for d, c in _codes.items():
            elem_size[c] = torch.empty((), dtype=d).element_size()
        out = np.repeat(rows, trials, axis=0)
        row = np.tile(np.arange(trials, dtype=np.int64), len(params))
        row_numel = out[:, _S["numel"]] // trials
        out[:, _S["numel"]] = row_numel
        for ptr_field, dtype_field in zip(ptr_fields, dtype_fields):
            elem = elem_size[out[:, dtype_field]]
            nonzero = out[:, ptr_field] != 0
            out[nonzero, ptr_field] += (row * row_numel * elem)[nonzero]
        out = np.ascontiguousarray(out)
        out.setflags(write=False)  # shared by every later call with the same layout
        if len(_expanded) >= _EXPANDED_MAX:  # a study keeps a few layouts at a time (trials leave, groups)
            _expanded.pop(next(iter(_expanded)), None)
        _expanded[key] = out
    hparams = np.empty((len(params) * trials, 2), dtype=np.float64)
    hparams[:, 0] = np.tile(lrs, len(params))
    hparams[:, 1] = np.tile(mus, len(params))
    return out, hparams


# ---- table cache -------------------------------------------------------------------
def _cached(tag: str, flags: Sequence[bool], params: Sequence[Tensor], grads: Sequence[Tensor],
            states: Sequence[Optional[Sequence[Tensor]]], build: Callable[[], np.ndarray]) -> np.ndarray:
    """``build()``'s table, or the one built before for the same params and
    state tensors with this call's gradient addresses filled in (see
    ``table_cache``). The grad column is the same in both table layouts.
    Tensors that are not contiguous (channels_last, ...) are checked on every
    call and never cached."""
    if not all(map(_is_contiguous, params)):
        return build()  # other layouts: checked every time
    numels, dtypes = tuple(map(_numel, params)), tuple(map(_dtype, params))
    key: list = [tag, tuple(flags), tuple(map(_data_ptr, params)), numels, dtypes]
    try:
        for ts in states:
            if ts is None:
                key.append(None)
            elif all(map(_is_contiguous, ts)):
                key += (tuple(map(_data_ptr, ts)), tuple(map(_numel, ts)), tuple(map(_dtype, ts)))
            else:
                return build()
    except TypeError:  # a None inside a list (a param without a buffer)
        return build()

    def build_shared() -> Tuple[np.ndarray, bool]:
        table = build()
        table.setflags(write=False)  # shared between calls from now on
        return table, True

    return TABLES.get(tuple(key), tuple(map(_data_ptr, grads)), build_shared, patch=_with_grads,
                      fits=lambda: grads_fit(grads, numels, dtypes, _CPU))


def _with_grads(table: np.ndarray, grad_addresses: Tuple[int, ...]) -> np.ndarray:
    table = table.copy()
    table[:, _S["grad"]] = grad_addresses
    table.setflags(write=False)
    return table


def clear_cache() -> None:
    """Drops the cached tables (they hold raw addresses, never tensors)."""
    TABLES.clear(graphs=True)
    _expanded.clear()


# ---- SGD / LARS ------------------------------------------------------------------
def _sgd_table(what: str, params, grads, bufs, first_step) -> np.ndarray:
    n = len(params)
    _check_length(what, "grads", grads, n)
    if bufs is not None:
        _check_length(what, "bufs", bufs, n)
    firsts = first_step_flags(what, first_step, n)
    return _cached("sgd", firsts, params, grads, (bufs,), lambda: _build_sgd_table(what, params, grads, bufs, firsts))


def _build_sgd_table(what: str, params, grads, bufs, firsts: List[bool]) -> np.ndarray:
    n = len(params)
    _check_cpu(what, "params", params)
    sizes = list(map(_size, params))
    p_codes = _dtype_codes(what, "params", params)
    _check_like_params(what, "grads", grads, sizes, p_codes)
    others = [("grads", grads)]
    table = np.empty((n, len(_SGD_FIELDS)), dtype=np.int64)
    if bufs is None:
        table[:, _S["buf"]] = 0
        table[:, _S["buf_dtype"]] = 0
    else:
        b_codes = _check_like_params(what, "bufs", bufs, sizes)
        others.append(("bufs", bufs))
        if -1 in b_codes:  # some params without a buffer: plain SGD for them
            table[:, _S["buf"]] = [0 if b is None else b.data_ptr() for b in bufs]
            table[:, _S["buf_dtype"]] = [max(c, 0) for c in b_codes]
        else:
            table[:, _S["buf"]] = list(map(_data_ptr, bufs))
            table[:, _S["buf_dtype"]] = b_codes
    _check_layouts(what, params, others)
    table[:, _S["param"]] = list(map(_data_ptr, params))
    table[:, _S["grad"]] = list(map(_data_ptr, grads))
    table[:, _S["numel"]] = [s.numel() for s in sizes]
    table[:, _S["param_dtype"]] = p_codes
    table[:, _S["first_step"]] = firsts
    return table


@torch.no_grad()
def sgd_step(params: Sequence[Tensor], grads: Sequence[Tensor], bufs: Optional[Sequence[Optional[Tensor]]], *,
             lr: Scalar, momentum: Scalar = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
             nesterov: bool = False, maximize: bool = False, lr_in_momentum: bool = False,
             first_step: Union[bool, Sequence[bool]] = False,
             grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
             stochastic_rounding: bool = False, stacked_trials: bool = False) -> None:
    """torch.optim.SGD's update (see ``reference.sgd_step``) for all tensors in
    one native pass. With ``stacked_trials=True``, ``lr``/``momentum`` may be
    1-D CPU tensors of length T (every param has T as its first dimension)."""
    what = "fastsgd cpu sgd_step"
    mod = _native()
    _no_stochastic_rounding(what, stochastic_rounding)
    lr, momentum = trial_hparams(what, stacked_trials, lr=lr, momentum=momentum)
    lrs, mus = _trial_values(what, "lr", lr), _trial_values(what, "momentum", momentum)
    if lrs is not None and mus is not None and len(lrs) != len(mus):
        raise ValueError(f"{what}: lr has {len(lrs)} values but momentum has {len(mus)}")
    lr_f = 0.0 if lrs is not None else _host_scalar(what, "lr", lr, 0.0)
    mu_f = 0.0 if mus is not None else _host_scalar(what, "momentum", momentum, 0.0)
    scale = _host_scalar(what, "grad_scale", grad_scale, 1.0)
    table = _sgd_table(what, params, grads, bufs, first_step)
    hparams = None
    if lrs is not None or mus is not None:
        trials = len(lrs if lrs is not None else mus)
        table, hparams = _expand_trials(what, table, params, trials, lrs or [lr_f] * trials,
                                        mus or [mu_f] * trials, ptr_fields=(_S["param"], _S["grad"], _S["buf"]),
                                        dtype_fields=(_S["param_dtype"], _S["param_dtype"], _S["buf_dtype"]))
    if _skipped(what, found_inf):
        return
    mod.cpu_sgd_step(table.ctypes.data, table.shape[0], 0 if hparams is None else hparams.ctypes.data,
                     lr_f, mu_f, float(dampening), float(weight_decay), scale, bool(maximize), bool(nesterov),
                     bool(lr_in_momentum), _threads())


@torch.no_grad()
def lars_step(params: Sequence[Tensor], grads: Sequence[Tensor], bufs: Optional[Sequence[Optional[Tensor]]], *,
              lr: Scalar, momentum: Scalar = 0.9, dampening: float = 0.0, weight_decay: float = 0.0,
              nesterov: bool = False, trust_coeff: float = 0.001, eps: float = 1e-8,
              trust_clip: bool = False, always_adapt: bool = False, lr_in_momentum: bool = False,
              first_step: Union[bool, Sequence[bool]] = False,
              grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
              stochastic_rounding: bool = False) -> None:
    """timm's Lars rule (see ``reference.lars_step``): per-tensor norms and
    the momentum update in one native call (two passes over memory when
    adapting, one otherwise)."""
    what = "fastsgd cpu lars_step"
    mod = _native()
    _no_stochastic_rounding(what, stochastic_rounding)
    lr, momentum = single_hparams(what, lr=lr, momentum=momentum)
    lr_f = _host_scalar(what, "lr", lr, 0.0)
    mu_f = _host_scalar(what, "momentum", momentum, 0.0)
    scale = _host_scalar(what, "grad_scale", grad_scale, 1.0)
    table = _sgd_table(what, params, grads, bufs, first_step)
    if _skipped(what, found_inf):
        return
    mod.cpu_lars_step(table.ctypes.data, table.shape[0], lr_f, mu_f, float(dampening), float(weight_decay), scale,
                      bool(nesterov), float(trust_coeff), float(eps), bool(trust_clip), bool(always_adapt),
                      bool(lr_in_momentum), _threads())


# ---- LAMB ----------------------------------------------------------------------
def _build_lamb_table(what: str, params, grads, exp_avgs, exp_avg_sqs, steps) -> np.ndarray:
    n = len(params)
    _check_cpu(what, "params", params)
    sizes = list(map(_size, params))
    p_codes = _dtype_codes(what, "params", params)
    _check_like_params(what, "grads", grads, sizes, p_codes)
    m_codes = _check_like_params(what, "exp_avgs", exp_avgs, sizes)
    v_codes = _check_like_params(what, "exp_avg_sqs", exp_avg_sqs, sizes)
    if m_codes != v_codes:
        i = _first_bad([a == b for a, b in zip(m_codes, v_codes)])
        raise ValueError(f"{what}: exp_avgs[{i}] is {exp_avgs[i].dtype} but exp_avg_sqs[{i}] is "
                         f"{exp_avg_sqs[i].dtype}; both moments must share a dtype")
    _check_cpu(what, "steps", steps)
    for i, s in enumerate(steps):
        if s.numel() != 1 or s.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{what}: steps[{i}] must be a 1-element float32/float64 tensor, got shape "
                             f"{tuple(s.shape)} {s.dtype}")
    _check_layouts(what, params, [("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)])
    table = np.empty((n, len(_LAMB_FIELDS)), dtype=np.int64)
    table[:, _L["param"]] = list(map(_data_ptr, params))
    table[:, _L["grad"]] = list(map(_data_ptr, grads))
    table[:, _L["exp_avg"]] = list(map(_data_ptr, exp_avgs))
    table[:, _L["exp_avg_sq"]] = list(map(_data_ptr, exp_avg_sqs))
    table[:, _L["step"]] = list(map(_data_ptr, steps))
    table[:, _L["numel"]] = [s.numel() for s in sizes]
    table[:, _L["param_dtype"]] = p_codes
    table[:, _L["state_dtype"]] = m_codes
    table[:, _L["step_dtype"]] = [_codes[s.dtype] for s in steps]
    return table


@torch.no_grad()
def lamb_step(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
              exp_avg_sqs: Sequence[Tensor], steps: Sequence[Tensor], *,
              lr: Scalar, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-6,
              weight_decay: float = 0.01, bias_correction: bool = True, trust_clip: bool = False,
              always_adapt: bool = False, clip_divisor: Optional[Scalar] = None,
              grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None) -> None:
    """LAMB as timm computes it (see ``reference.lamb_step``) in one native
    call: moments and norms in pass 1, the trust-ratio update in pass 2.
    ``steps[i]`` (0-dim float32/float64 CPU tensor) is incremented."""
    what = "fastsgd cpu lamb_step"
    mod = _native()
    lr, clip_divisor = single_hparams(what, lr=lr, clip_divisor=clip_divisor)
    lr_f = _host_scalar(what, "lr", lr, 0.0)
    divisor = _host_scalar(what, "grad_scale", grad_scale, 1.0) * _host_scalar(what, "clip_divisor",
                                                                               clip_divisor, 1.0)
    n = len(params)
    for name, ts in (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs), ("steps", steps)):
        _check_length(what, name, ts, n)
    table = _cached("lamb", (), params, grads, (exp_avgs, exp_avg_sqs, steps),
                    lambda: _build_lamb_table(what, params, grads, exp_avgs, exp_avg_sqs, steps))
    if _skipped(what, found_inf):
        return
    mod.cpu_lamb_step(table.ctypes.data, n, lr_f, float(beta1), float(beta2), float(eps), float(weight_decay),
                      bool(bias_correction), bool(trust_clip), bool(always_adapt), divisor, _threads())
