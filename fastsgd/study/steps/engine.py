"""Trial-batched training engine: the trials of one batch size as one model whose
first dimension is the trial.

Every trial has the same architecture and its own weights. :class:`TrialEngine`
keeps all trials' parameters of one dtype in ONE flat buffer of shape
(trials, params per trial); each layer's weights are views into it (no copies),
the momentum buffers and gradients are flat buffers of the same shape, and the
optimizer step is one stacked-trials call of the fused kernel over them
(per-trial lr and momentum as 1-D tensors; per-trial weight decay folded into
the flat gradient with one op first).

Activations carry the trials folded into the batch dimension: a tensor of
shape (trials * batch, ...) where rows [t*batch, (t+1)*batch) belong to trial t.
Per-sample operations (activations, flatten, pooling, residual additions, ...)
then run unchanged, and only layers with weights are replaced:

  Linear       one ``baddbmm`` over (trials, batch, in) x (trials, in, out)
  Conv1d/2d    one grouped convolution (groups = trials x the layer's groups)
  LayerNorm    normalisation per sample, then per-trial scale and shift
  BatchNorm    per-trial batch statistics; per-trial running statistics (eval uses them)
  Embedding    one gather from the (trials, vocabulary, dim) table
  Dropout      masks drawn per trial from a counter-based hash (:class:`KeyedDropout`),
               so a trial's masks do not depend on the trials beside it

Conversion (:func:`convert`) traces the model with ``torch.fx`` and checks
every operation of the graph: calls of the layers above and of parameter-free
per-sample modules (activations, Flatten/Unflatten, pooling, Identity,
Softmax), and per-sample functions and tensor methods (element-wise math,
``flatten``/``unsqueeze``/``view``/``reshape``/``mean``/... over dimensions
other than the batch dimension). Residual blocks and custom ``forward`` code
made of such operations therefore convert without help. Anything else raises
:class:`NotConvertible`, naming the module or operation and why; the study
then falls back to the vmap path.

Batches: :func:`batch_indices` draws every trial's batch indices in one op
from a counter-based hash of (trial key, step, position), so trial t's batch
at step s is the same whatever else runs beside it, and the one-at-a-time
reference path draws the very same indices.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

# ---------------------------------------------------------------- counter-based random numbers

_M32 = 0xFFFFFFFF
_MUL = 0x45D9F3B  # < 2**27: products of 32-bit values stay below 2**59, so int64 never overflows
_GOLDEN = 0x9E3779B9


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (two multiply-xorshift rounds) on int64 tensors holding values in [0, 2**32)."""
    x = (((x >> 16) ^ x) * _MUL) & _M32
    x = (((x >> 16) ^ x) * _MUL) & _M32
    return (x >> 16) ^ x


def trial_keys(data_seeds: Sequence[int], device=None) -> Tensor:
    """Per-trial keys (trials, 2) int64 (low and high 32 bits of each data seed)."""
    s = [int(d) % (2 ** 64) for d in data_seeds]
    return torch.tensor([[v & _M32, (v >> 32) & _M32] for v in s], dtype=torch.int64, device=device)


def counter_bits(keys: Tensor, stream: int, counter: int, n: int) -> Tensor:
    """(trials, n) uniform 32-bit values (as int64) that depend only on each trial's key,
    ``stream``, ``counter`` and the position 0..n-1: a stateless (counter-based) generator.
    Not cryptographic; built for independent-looking draws from integer ops that any device runs."""
    return counter_bits_block(keys, stream, int(counter), 1, n)[:, 0]


def counter_bits_block(keys: Tensor, stream: int, first_counter: int, counters: int, n: int) -> Tensor:
    """(trials, counters, n): :func:`counter_bits` for ``counters`` consecutive counters from
    ``first_counter`` at once (the same values; one set of ops instead of one per counter)."""
    k = _mix32(keys[:, 0] ^ _mix32(keys[:, 1] ^ (int(stream) * _GOLDEN & _M32)))
    c = torch.arange(int(first_counter), int(first_counter) + counters, dtype=torch.int64, device=keys.device)
    k = _mix32(k[:, None] ^ (c & _M32)) ^ _mix32((c >> 32) & _M32)  # (trials, counters)
    pos = torch.arange(n, dtype=torch.int64, device=keys.device) * _GOLDEN & _M32
    return _mix32(_mix32((k[..., None] + pos) & _M32) ^ k[..., None])


def batch_indices(keys: Tensor, step: int, batch_size: int, n: int) -> Tensor:
    """(trials, batch_size) indices in [0, n), drawn with replacement for update ``step``."""
    return batch_indices_block(keys, step, 1, batch_size, n)[:, 0]


def batch_indices_block(keys: Tensor, first_step: int, steps: int, batch_size: int, n: int) -> Tensor:
    """(trials, steps, batch_size): :func:`batch_indices` of ``steps`` consecutive updates at once."""
    if not 0 < n < 2 ** 31:
        raise ValueError(f"batch_indices: need 0 < n < 2**31 examples, got {n}")
    return (counter_bits_block(keys, 0, first_step, steps, batch_size) * n) >> 32


class StepContext:
    """What the per-trial random layers read: the trials' keys and the current update."""

    def __init__(self, keys: Tensor):
        self.keys = keys
        self.step = 0
        self.calls = 0  # random layers called so far in this forward (each draws its own stream)

    def start(self, step: int) -> None:
        self.step, self.calls = int(step), 0


class KeyedDropout(nn.Module):
    """Dropout whose mask for trial t comes from :func:`counter_bits` with that trial's key
    (input folded as (trials * batch, ...)). The one-at-a-time path uses it with one key, so
    both paths drop the same units."""

    def __init__(self, p: float, ctx: StepContext):
        super().__init__()
        self.p, self.ctx = float(p), ctx

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        trials = self.ctx.keys.shape[0]
        bits = counter_bits(self.ctx.keys, 1 + self.ctx.calls, self.ctx.step, x.numel() // trials)
        self.ctx.calls += 1
        keep = (bits >= int(self.p * 2 ** 32)).to(x.dtype) * (1.0 / (1.0 - self.p))
        return (x.reshape(trials, -1) * keep).reshape(x.shape)


# ---------------------------------------------------------------- batched layers

class _Layer(nn.Module):
    """A layer whose tensors live in the engine (``tensors[name]``, trials first)."""

    def __init__(self, tensors: Dict[str, Tensor], prefix: str, ctx: StepContext):
        super().__init__()
        self.tensors, self.prefix, self.ctx = tensors, prefix, ctx

    @property
    def trials(self) -> int:
        return self.ctx.keys.shape[0]

    def t(self, name: str) -> Optional[Tensor]:
        return self.tensors.get(f"{self.prefix}{name}")


class _Linear(_Layer):
    def forward(self, x: Tensor) -> Tensor:
        w, b = self.t("weight"), self.t("bias")  # (T, out, in), (T, out)
        xs = x.reshape(w.shape[0], -1, x.shape[-1])
        y = torch.bmm(xs, w.transpose(1, 2)) if b is None else torch.baddbmm(b.unsqueeze(1), xs, w.transpose(1, 2))
        return y.reshape(x.shape[:-1] + (w.shape[1],))


class _Conv(_Layer):
    def __init__(self, tensors, prefix, ctx, conv: nn.Module):
        super().__init__(tensors, prefix, ctx)
        self.fn = F.conv1d if isinstance(conv, nn.Conv1d) else F.conv2d
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.t("weight"), self.t("bias")  # (T, out, in/groups, *k), (T, out)
        trials = w.shape[0]
        xs = x.reshape((trials, -1) + x.shape[1:]).transpose(0, 1)  # (B, T, C, *S): trials side by side as groups
        xs = xs.reshape((xs.shape[0], -1) + x.shape[2:])
        y = self.fn(xs, w.reshape((-1,) + w.shape[2:]), None if b is None else b.reshape(-1), self.stride,
                    self.padding, self.dilation, trials * self.groups)
        y = y.reshape((y.shape[0], trials, w.shape[1]) + y.shape[2:]).transpose(0, 1)
        return y.reshape((-1,) + y.shape[2:])


class _LayerNorm(_Layer):
    def __init__(self, tensors, prefix, ctx, ln: nn.LayerNorm):
        super().__init__(tensors, prefix, ctx)
        self.shape, self.eps = tuple(ln.normalized_shape), ln.eps

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(x, self.shape, None, None, self.eps)
        w, b = self.t("weight"), self.t("bias")
        if w is None and b is None:
            return y
        trials = self.trials
        ys = y.reshape((trials, -1) + self.shape)
        per_trial = (trials, 1) + self.shape
        if w is not None:
            ys = ys * w.reshape(per_trial)
        if b is not None:
            ys = ys + b.reshape(per_trial)
        return ys.reshape(x.shape)


class _BatchNorm(_Layer):
    """Per-trial batch statistics over (batch, spatial dims); running statistics per trial."""

    def __init__(self, tensors, prefix, ctx, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__(tensors, prefix, ctx)
        self.eps, self.momentum = bn.eps, bn.momentum

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.t("weight"), self.t("bias")
        rm, rv, nbt = self.t("running_mean"), self.t("running_var"), self.t("num_batches_tracked")
        trials = self.trials
        xs = x.reshape((trials, -1) + x.shape[1:])  # (T, B, C, *S)
        shape = (trials, 1, x.shape[1]) + (1,) * (x.ndim - 2)
        if self.training or rm is None:
            dims = (1,) + tuple(range(3, xs.ndim))
            var, mean = torch.var_mean(xs, dims, correction=0, keepdim=True)
            if self.training and rm is not None:
                with torch.no_grad():
                    nbt.add_(1)
                    m = 1.0 / nbt.to(torch.float64) if self.momentum is None else torch.full_like(
                        nbt, self.momentum, dtype=torch.float64)
                    m = m.to(rm.dtype).reshape(-1, 1)
                    n = xs.numel() // (trials * x.shape[1])
                    rm.mul_(1 - m).add_(m * mean.reshape(trials, -1))
                    rv.mul_(1 - m).add_(m * var.reshape(trials, -1) * (n / max(n - 1, 1)))
        else:
            mean, var = rm.reshape(shape), rv.reshape(shape)
        y = (xs - mean) * torch.rsqrt(var + self.eps)
        if w is not None:
            y = y * w.reshape(shape) + b.reshape(shape)
        return y.reshape(x.shape)


class _Embedding(_Layer):
    def forward(self, idx: Tensor) -> Tensor:
        w = self.t("weight")  # (T, V, D)
        trials = w.shape[0]
        rows = idx.reshape(trials, -1)
        out = w[torch.arange(trials, device=w.device)[:, None], rows]  # (T, B*S, D)
        return out.reshape(idx.shape + (w.shape[2],))


# ---------------------------------------------------------------- conversion

class NotConvertible(Exception):
    """The model holds something the engine cannot batch; ``where`` names it, ``reason`` says why."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason


_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Softplus,
                nn.Hardtanh, nn.Mish, nn.Identity, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
                nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
_ELEMENTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
    torch.add, torch.sub, torch.mul, torch.div, torch.relu, torch.tanh, torch.sigmoid, torch.exp, torch.square,
    torch.sqrt, torch.abs, torch.clamp, F.relu, F.relu6, F.gelu, F.silu, F.leaky_relu, F.elu, F.softplus,
    F.hardtanh, F.mish, F.tanh, F.sigmoid}
_ELEMENTWISE_METHODS = {"relu", "tanh", "sigmoid", "exp", "sqrt", "abs", "square", "clamp", "add", "sub", "mul",
                        "div", "neg", "pow", "contiguous", "float", "double", "to", "size", "dim", "type_as"}
_DIM_FUNCTIONS = {torch.flatten: ("start_dim", 1), torch.unsqueeze: ("dim", 1), torch.squeeze: ("dim", 1),
                  torch.cat: ("dim", 1), torch.stack: ("dim", 1), torch.mean: ("dim", 1), torch.sum: ("dim", 1),
                  torch.softmax: ("dim", 1), torch.log_softmax: ("dim", 1), F.softmax: ("dim", 1),
                  F.log_softmax: ("dim", 1), torch.transpose: ("dims", 1)}
_DIM_METHODS = {"flatten": ("start_dim", 0), "unsqueeze": ("dim", 0), "squeeze": ("dim", 0), "mean": ("dim", 0),
                "sum": ("dim", 0), "amax": ("dim", 0), "softmax": ("dim", 0), "log_softmax": ("dim", 0),
                "chunk": ("dim", 1), "split": ("dim", 1), "transpose": ("dims", 0)}


def _touches_batch_dim(dim) -> bool:
    """True when ``dim`` may be the batch dimension: 0, None (all dims) or not a plain int."""
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    return not dims or any(not isinstance(d, int) or d == 0 for d in dims)


def _check_node(node: torch.fx.Node, modules: Dict[str, nn.Module]) -> None:
    """Raise NotConvertible unless ``node`` acts on each sample alone (folded trials stay apart)."""
    where = f"operation {node.format_node()!r}"
    if node.op in ("placeholder", "output"):
        return
    if node.op == "get_attr":
        raise NotConvertible(node.target, "its forward uses this parameter or buffer directly (not through a layer "
                                          "the engine knows)")
    if node.op == "call_module":
        _check_leaf(node.target, modules[node.target])
        return
    if node.op == "call_function":
        fn = node.target
        if fn in _ELEMENTWISE_FUNCTIONS or fn in (getattr, ):
            return
        if fn is operator.getitem:
            idx = node.args[1]
            src = node.args[0]
            on_shape = isinstance(src, torch.fx.Node) and (
                (src.op == "call_function" and src.target is getattr) or (src.op == "call_method" and
                                                                          src.target == "size"))
            first = idx[0] if isinstance(idx, tuple) and idx else idx
            if on_shape or first == slice(None):
                return
            raise NotConvertible(where, "indexing that may select along the batch dimension")
        if fn in _DIM_FUNCTIONS:
            name, pos = _DIM_FUNCTIONS[fn]
            dim = (tuple(node.args[1:3]) if name == "dims" else
                   node.kwargs.get(name, node.args[pos] if len(node.args) > pos else None))
            if fn is torch.flatten and dim is None:
                dim = 0
            if not _touches_batch_dim(dim):
                return
            raise NotConvertible(where, f"{getattr(fn, '__name__', fn)} over the batch dimension ({name}={dim})")
        raise NotConvertible(where, f"function {getattr(fn, '__name__', fn)} is not known to act per sample")
    if node.op == "call_method":
        m = node.target
        if m in _ELEMENTWISE_METHODS:
            return
        if m in _DIM_METHODS:
            name, pos = _DIM_METHODS[m]
            dim = (tuple(node.args[1:3]) if name == "dims" else
                   node.kwargs.get(name, node.args[1 + pos] if len(node.args) > 1 + pos else None))
            if m == "flatten" and dim is None:
                dim = 0
            if not _touches_batch_dim(dim):
                return
            raise NotConvertible(where, f".{m}() over the batch dimension ({name}={dim})")
        if m in ("view", "reshape"):
            sizes = node.args[1:]
            sizes = sizes[0] if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)) else sizes
            if sizes and isinstance(sizes[0], torch.fx.Node):
                return  # e.g. x.view(x.size(0), -1): the batch dimension is kept
            raise NotConvertible(where, f".{m}() with a fixed first dimension (use x.size(0) or flatten(1))")
        if m == "permute":
            dims = node.args[1:]
            dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
            if dims and dims[0] == 0:
                return
            raise NotConvertible(where, ".permute() that moves the batch dimension")
        raise NotConvertible(where, f"tensor method .{m}() is not known to act per sample")
    raise NotConvertible(where, f"unsupported graph node kind {node.op!r}")


def _check_leaf(path: str, m: nn.Module) -> None:
    kind = type(m)
    if kind in (nn.Linear, nn.LayerNorm, nn.Dropout):
        return
    if kind in (nn.Conv1d, nn.Conv2d):
        if m.padding_mode != "zeros":
            raise NotConvertible(f"{path} ({kind.__name__})", f"padding_mode {m.padding_mode!r} (only 'zeros')")
        return
    if kind in (nn.BatchNorm1d, nn.BatchNorm2d):
        return
    if kind is nn.Embedding:
        bad = [n for n, v in (("padding_idx", m.padding_idx), ("max_norm", m.max_norm)) if v is not None]
        bad += [n for n in ("sparse", "scale_grad_by_freq") if getattr(m, n)]
        if bad:
            raise NotConvertible(f"{path} (Embedding)", f"option(s) {', '.join(bad)} are not supported")
        return
    if kind in _ACTIVATIONS:
        return
    if kind is nn.Flatten and not _touches_batch_dim(m.start_dim):
        return
    if kind is nn.Unflatten and not _touches_batch_dim(m.dim):
        return
    if kind in (nn.Softmax, nn.LogSoftmax) and not _touches_batch_dim(m.dim):
        return
    raise NotConvertible(f"{path or 'model'} ({kind.__name__})", "no trial-batched version of this layer "
                                                                 "(supported: Linear, Conv1d/2d, LayerNorm, "
                                                                 "BatchNorm1d/2d, Embedding, Dropout, activations, "
                                                                 "pooling, Flatten)")


def _batched_layer(m: nn.Module, path: str, tensors: Dict[str, Tensor], ctx: StepContext) -> Optional[nn.Module]:
    prefix = f"{path}." if path else ""
    if isinstance(m, nn.Linear):
        return _Linear(tensors, prefix, ctx)
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        return _Conv(tensors, prefix, ctx, m)
    if isinstance(m, nn.LayerNorm):
        return _LayerNorm(tensors, prefix, ctx, m)
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return _BatchNorm(tensors, prefix, ctx, m)
    if isinstance(m, nn.Embedding):
        return _Embedding(tensors, prefix, ctx)
    if isinstance(m, nn.Dropout):
        return KeyedDropout(m.p, ctx)
    return None


def convert(model: nn.Module, tensors: Dict[str, Tensor], ctx: StepContext) -> torch.fx.GraphModule:
    """The trial-batched program of ``model``: its traced graph with every layer that holds
    weights (or draws random numbers) replaced by its batched version, reading its tensors
    from ``tensors`` by qualified name. Raises NotConvertible naming what is not supported."""
    root = model
    if type(model) in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d,
                       nn.Embedding):
        root = nn.Sequential(model)  # a bare layer: trace it as a one-layer model
    try:
        gm = torch.fx.symbolic_trace(copy.deepcopy(root))
    except Exception as exc:  # data-dependent control flow, unsupported Python, ...
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise NotConvertible(f"model ({type(model).__name__})",
                             f"torch.fx cannot trace its forward ({type(exc).__name__}: {first})") from exc
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        _check_node(node, modules)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            path = str(node.target)
            name = "" if root is not model else path  # the engine's tensors carry the original model's names
            new = _batched_layer(modules[path], name, tensors, ctx)
            if new is not None:
                parent, _, attr = path.rpartition(".")
                setattr(gm.get_submodule(parent) if parent else gm, attr, new)
    gm.train()
    return gm


# ---------------------------------------------------------------- the engine

def _per_trial_loss(loss_fn: Callable) -> Callable[[Tensor, Tensor, int], Tensor]:
    """(outputs (T*B, ...), targets (T*B, ...), T) -> (T,) losses, each the workload's mean over its batch."""
    if loss_fn is F.cross_entropy:  # the common case without vmap's overhead
        return lambda out, y, trials: F.cross_entropy(out, y, reduction="none").reshape(trials, -1).mean(1)
    batched = vmap(loss_fn)
    return lambda out, y, trials: batched(out.reshape((trials, -1) + out.shape[1:]),
                                          y.reshape((trials, -1) + y.shape[1:]))


@dataclass
class _Group:
    """All trials' parameters of one dtype: flat (trials, numel per trial) buffers and the slots in them."""

    flat: Tensor
    grad: Tensor
    buf: Optional[Tensor]
    slots: List[Tuple[str, int, int, torch.Size]] = field(default_factory=list)  # name, offset, numel, shape


class TrialEngine:
    """The live trials of one batch size as one batched model (see the module docstring).

    ``models``: one freshly initialised model per trial (same architecture); their
    weights are copied in once. ``keys``: :func:`trial_keys` of the trials (dropout masks).

    On a CPU, trials run in groups of rows whose largest activation stays within
    ``GROUP_BYTES`` (about two cores' L2 caches): element-wise ops on activations far
    larger than the cache run at memory speed, and fewer, larger ops keep the thread
    synchronisation per step low. A trial's arithmetic does not depend on the group it
    runs in, so grouping changes no result.
    """

    EVAL_CHUNK = 1024  # evaluation examples per forward pass; fixed so a trial's results do not depend on T
    GROUP_BYTES = {"cpu": 2 << 20}  # largest activation of a group; other devices: all trials in one group

    def __init__(self, workload, models: Sequence[nn.Module], *, momentum: bool, keys: Tensor,
                 device: torch.device):
        base = models[0]
        self.workload, self.device = workload, torch.device(device)
        self.keys = keys.to(self.device)
        self.ctx = StepContext(self.keys)
        self.tensors: Dict[str, Tensor] = {}
        self.program = convert(base, self.tensors, self.ctx)
        for i, m in enumerate(models[1:], 1):
            if [(n, p.shape) for n, p in m.named_parameters()] != [(n, p.shape) for n, p in base.named_parameters()]:
                raise ValueError(f"trial {i}'s model has other parameters than trial 0's: the trials of one "
                                 "batch size must share one architecture")
        trials = len(models)
        self.groups: Dict[torch.dtype, _Group] = {}
        for name, p in base.named_parameters():
            g = self.groups.setdefault(p.dtype, _Group(torch.empty(0), torch.empty(0), None))
            offset = g.slots[-1][1] + g.slots[-1][2] if g.slots else 0
            g.slots.append((name, offset, p.numel(), p.shape))
        for dtype, g in self.groups.items():
            numel = g.slots[-1][1] + g.slots[-1][2]
            g.flat = torch.empty(trials, numel, dtype=dtype, device=self.device)
            with torch.no_grad():
                for t, m in enumerate(models):
                    params = dict(m.named_parameters())
                    torch.cat([params[n].detach().reshape(-1) for n, *_ in g.slots], out=g.flat[t])
            g.grad = torch.zeros_like(g.flat)
            g.buf = torch.zeros_like(g.flat) if momentum else None
        self.buffers = {n: torch.stack([dict(m.named_buffers())[n].detach() for m in models]).to(self.device)
                        for n, _ in base.named_buffers()}
        self.param_names = [n for n, _ in base.named_parameters()]
        self.models = models  # kept for workloads that evaluate one plain model at a time
        self._shapes_of = copy.deepcopy(base).to("meta")  # to size the trial groups from activation shapes
        self._width: Dict[Tuple, int] = {}
        self._loss = _per_trial_loss(workload.loss)
        self._metrics = vmap(workload.metrics, in_dims=(0, None)) if getattr(workload, "metrics", None) else None

    @property
    def trials(self) -> int:
        return self.keys.shape[0]

    def flat_params(self) -> List[Tensor]:
        return [g.flat for g in self.groups.values()]

    # -- trial groups
    def _group_size(self, sample: Tensor, rows: int) -> int:
        """Trials per group for inputs like ``sample`` (one example) and ``rows`` examples per trial."""
        budget = self.GROUP_BYTES.get(self.device.type)
        if budget is None:
            return self.trials
        key = (tuple(sample.shape), sample.dtype)
        if key not in self._width:  # elements per example of the largest intermediate tensor
            from torch.fx.passes.shape_prop import ShapeProp
            try:
                with torch.no_grad():
                    gm = torch.fx.symbolic_trace(self._shapes_of)
                    ShapeProp(gm).propagate(sample.to("meta"))
                self._width[key] = max([n.meta["tensor_meta"].shape.numel() for n in gm.graph.nodes
                                        if hasattr(n.meta.get("tensor_meta"), "shape")] + [1])
            except Exception:  # shapes not traceable with one example: assume a wide model
                self._width[key] = 4096
        per_trial = rows * self._width[key] * 4
        return max(1, min(self.trials, budget // per_trial))

    def _bind(self, lo: int, hi: int, grad: bool) -> List[Tuple[_Group, List[Tensor]]]:
        """Point the batched layers at trials lo..hi-1: row slices of the flat buffers (leaves that
        collect gradients when ``grad``) and of the buffers; returns the leaves per dtype."""
        self.tensors.clear()
        leaves = []
        for g in self.groups.values():
            views = []
            for name, offset, numel, shape in g.slots:
                v = g.flat[lo:hi, offset:offset + numel].view((-1,) + tuple(shape))
                if grad:
                    v.requires_grad_(True)
                self.tensors[name] = v
                views.append(v)
            leaves.append((g, views))
        self.tensors.update({k: v[lo:hi] for k, v in self.buffers.items()})
        self.ctx.keys = self.keys[lo:hi]
        return leaves

    def _spans(self, size: int):
        return [(lo, min(lo + size, self.trials)) for lo in range(0, self.trials, size)]

    # -- training
    def losses_and_grads(self, x: Tensor, y: Tensor, step: int) -> Tensor:
        """Forward and backward of every trial on its batch (x: (T, B, ...)); gradients land in the
        flat gradient buffers. Returns the (T,) losses."""
        losses = []
        for lo, hi in self._spans(self._group_size(x[0, :1], x.shape[1])):
            leaves = self._bind(lo, hi, grad=True)
            self.ctx.start(step)
            with torch.enable_grad():
                out = self.program(x[lo:hi].reshape((-1,) + x.shape[2:]))
                loss = self._loss(out, y[lo:hi].reshape((-1,) + y.shape[2:]), hi - lo)
                flat_leaves = [v for _, views in leaves for v in views]
                grads = torch.autograd.grad(loss.sum(), flat_leaves)  # trials are independent: d(sum)/d(row t)
            grads = iter(grads)
            for g, _ in leaves:
                for (_, offset, numel, shape), gr in zip(g.slots, grads):
                    # one copy per tensor, straight into its place in the flat gradient (any layout)
                    g.grad[lo:hi, offset:offset + numel].view((-1,) + tuple(shape)).copy_(gr)
            losses.append(loss.detach())
        return torch.cat(losses)

    def update(self, backend, *, lr: Tensor, momentum: Tensor, weight_decay: Tensor, nesterov: bool,
               first_step: bool) -> None:
        """One fused stacked-trials optimizer call per dtype over the flat buffers."""
        hp_device = torch.device("cpu") if backend.NAME == "cpu" else self.device
        for g in self.groups.values():
            if bool(weight_decay.any()):
                g.grad.addcmul_(g.flat, weight_decay.to(device=g.flat.device, dtype=g.flat.dtype).reshape(-1, 1))
            backend.sgd_step([g.flat], [g.grad], None if g.buf is None else [g.buf], lr=lr.to(hp_device),
                             momentum=momentum.to(hp_device), nesterov=nesterov, first_step=first_step,
                             stacked_trials=True)

    def keep(self, idx: Tensor) -> None:
        """Keep only the trials at rows ``idx`` (one gather per flat buffer; the kept rows' values are
        copied bit for bit, so the remaining trials continue exactly as before)."""
        idx = idx.to(self.device)
        for g in self.groups.values():
            g.flat, g.grad = g.flat[idx], g.grad[idx]
            g.buf = None if g.buf is None else g.buf[idx]
        self.buffers = {k: v[idx] for k, v in self.buffers.items()}
        self.keys = self.keys[idx]
        self.models = [self.models[i] for i in idx.tolist()]

    # -- evaluation
    @torch.no_grad()
    def evaluate(self) -> List[Dict[str, float]]:
        """Every live trial's metrics: batched passes over groups of trials and chunks of
        evaluation examples when the workload has ``eval_data``/``metrics``, else one plain
        model at a time."""
        if self._metrics is None:
            return self._evaluate_one_by_one()
        self.program.eval()
        try:
            per_metric: Dict[str, List[float]] = {}
            for set_name, (x, y) in self.workload.eval_data.items():
                x, y = x.to(self.device), y.to(self.device)
                outs = []
                for lo, hi in self._spans(self._group_size(x[:1], min(len(x), self.EVAL_CHUNK))):
                    self._bind(lo, hi, grad=False)
                    chunks = []
                    for s in range(0, len(x), self.EVAL_CHUNK):
                        xc = x[s:s + self.EVAL_CHUNK]
                        out = self.program(xc.unsqueeze(0).expand((hi - lo,) + xc.shape).reshape((-1,) + xc.shape[1:]))
                        chunks.append(out.reshape((hi - lo, len(xc)) + out.shape[1:]))
                    outs.append(torch.cat(chunks, 1))
                for name, values in self._metrics(torch.cat(outs), y).items():
                    per_metric[f"{set_name}_{name}"] = values.tolist()
        finally:
            self.program.train()
        return [{k: v[i] for k, v in per_metric.items()} for i in range(self.trials)]

    def _evaluate_one_by_one(self) -> List[Dict[str, float]]:
        out = []
        self._bind(0, self.trials, grad=False)
        for i, model in enumerate(self.models):
            model.to(self.device)
            for name in self.param_names:
                model.get_parameter(name).data.copy_(self.tensors[name][i])
            for name, b in self.buffers.items():
                model.get_buffer(name).copy_(b[i])
            model.eval()
            out.append(self.workload.evaluate(model, self.device))
            model.train()
        return out
