"""Gradient noise scale (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training").

For a gradient averaged over a batch of B examples, ``E|G_B|^2 = |G|^2 + tr(Sigma)/B``
(``G`` the true gradient, ``Sigma`` the per-example gradient covariance). Two squared
norms taken at the *same parameters* with batch sizes ``b < B`` give unbiased estimates

    |G|^2      ~  (B |G_B|^2 - b |G_b|^2) / (B - b)
    tr(Sigma)  ~  (|G_b|^2 - |G_B|^2) / (1/b - 1/B)

and the simple noise scale ``B_simple = tr(Sigma) / |G|^2``. A single estimate of
``|G|^2`` is often negative, so -- as in the paper's appendix A.1 -- the two estimates are
averaged separately (exponential moving averages, bias-corrected) and divided only
when read.

Where the two norms come from
-----------------------------
* Data parallel: the local gradient of one rank (batch ``b``) and the all-reduced
  gradient (batch ``B = b x world_size``) come for free:
  :meth:`GradientNoiseScale.update_from_distributed` (plain torch.distributed values, works
  with any DDP) and :meth:`GradientNoiseScale.update_from_ddp` (reads
  ``BucketedDataParallel.last_grad_sq_norms``).
* One process with gradient accumulation: :class:`NoiseScaleAccumulator` hooks every
  parameter's incoming gradient, so each micro-batch's own squared norm costs one
  reduction per parameter, and compares their mean with the accumulated batch gradient.

Cost: everything stays on the gradients' device as 0-dim tensors; nothing synchronises
with the host until you read a value (``float(...)``, :meth:`GradientNoiseScale.read`,
:func:`to_floats`). The cost per step is a fixed few dozen small tensor ops plus one pass
over the gradients (``bench/noise_scale_overhead.py`` measures it): negligible for a model
whose step is dominated by compute, but a noticeable share for a tiny model whose micro-batch
takes well under a millisecond, where the fixed op count dominates -- measure every k-th step
there.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Union

import torch
from torch import Tensor, nn

__all__ = ["GradientNoiseScale", "NoiseScaleAccumulator", "two_batch_estimates", "to_floats"]

Number = Union[float, int, Tensor]


def _check_batches(small_batch: float, big_batch: float) -> None:
    for name, v in (("small_batch", small_batch), ("big_batch", big_batch)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a positive finite number of examples, got {v!r}")
    if not small_batch < big_batch:
        raise ValueError(f"the two batch sizes must satisfy small_batch < big_batch, got small_batch="
                         f"{small_batch!r}, big_batch={big_batch!r} (equal sizes carry no noise information)")


def two_batch_estimates(small_sq_norm: Number, small_batch: float, big_sq_norm: Number, big_batch: float):
    """Unbiased single-step estimates ``(|G|^2, tr(Sigma))`` from squared gradient norms at
    batch sizes ``small_batch < big_batch`` taken at the same parameters."""
    _check_batches(small_batch, big_batch)
    b, B = float(small_batch), float(big_batch)
    g2 = (B * big_sq_norm - b * small_sq_norm) / (B - b)
    trace = (small_sq_norm - big_sq_norm) / (1.0 / b - 1.0 / B)
    return g2, trace


def to_floats(d: Dict[str, object]) -> Dict[str, object]:
    """A copy of an :meth:`GradientNoiseScale.update` dict with tensors turned into floats
    (this is the one place that synchronises with the device)."""
    return {k: (float(v) if isinstance(v, Tensor) else v) for k, v in d.items()}


class GradientNoiseScale:
    """Running estimate of ``|G|^2``, ``tr(Sigma)`` and ``B_simple = tr(Sigma)/|G|^2``.

    decay:  EMA decay per update (0 <= decay < 1; e.g. 0.95 averages over ~20 steps), or
            ``None`` for a plain mean over all updates. The EMAs are bias-corrected
            (divided by the sum of their weights), so early reads are not pulled to 0.

    ``update(...)`` returns a dict for logging: ``step``, ``g2``, ``trace``, ``b_simple``
    (the running estimates) and ``g2_raw``, ``trace_raw`` (this step's single estimates),
    values as 0-dim float64 tensors on the input's device (:func:`to_floats` to print).
    """

    def __init__(self, decay: Optional[float] = 0.95):
        if decay is not None and not (0.0 <= decay < 1.0):
            raise ValueError(f"decay must be in [0, 1) or None (plain mean), got {decay!r}")
        self.decay = decay
        self.step = 0
        # [EMA of |G|^2 estimates, EMA of tr(Sigma) estimates, sum of EMA weights], float64
        self._sums: Optional[Tensor] = None
        self._coeffs: Dict[tuple, Tensor] = {}

    # ---- updating -----------------------------------------------------------------------------
    def _coefficients(self, small_batch: float, big_batch: float, device: torch.device) -> Tensor:
        """The 2x2 matrix mapping (|G_b|^2, |G_B|^2) to the estimates (|G|^2, tr(Sigma)), cached per
        (b, B, device) so an update is a handful of tensor ops and no host-to-device copy."""
        key = (small_batch, big_batch, device)
        m = self._coeffs.get(key)
        if m is None:
            _check_batches(small_batch, big_batch)
            b, B = float(small_batch), float(big_batch)
            m = torch.tensor([[-b / (B - b), B / (B - b)],
                              [1.0 / (1.0 / b - 1.0 / B), -1.0 / (1.0 / b - 1.0 / B)]],
                             dtype=torch.float64, device=device)
            if len(self._coeffs) > 64:   # batch sizes that keep changing: do not grow without bound
                self._coeffs.clear()
            self._coeffs[key] = m
        return m

    def update(self, small_sq_norm: Number, small_batch: float, big_sq_norm: Number,
               big_batch: float) -> Dict[str, object]:
        """Add one pair of squared gradient norms ``|G_b|^2`` (batch ``small_batch``) and
        ``|G_B|^2`` (batch ``big_batch``), taken at the same parameters."""
        device = next((v.device for v in (small_sq_norm, big_sq_norm) if isinstance(v, Tensor)), torch.device("cpu"))
        small, big = (v.detach() if isinstance(v, Tensor) else torch.full((), float(v), device=device)
                      for v in (small_sq_norm, big_sq_norm))   # full(): no host-to-device copy, no sync
        if small.numel() != 1 or big.numel() != 1:
            raise ValueError(f"squared norms must be scalars, got shapes {tuple(small.shape)} and {tuple(big.shape)}")
        norms = torch.stack([small.reshape(1), big.reshape(1)])
        raw = self._coefficients(small_batch, big_batch, norms.device) @ norms.reshape(2).double()  # (g2, trace)
        if self._sums is None:
            self._sums = torch.zeros(3, dtype=torch.float64, device=raw.device)
        elif self._sums.device != raw.device:
            raise ValueError(f"squared norms on {raw.device}, but earlier updates were on {self._sums.device}")
        keep, add = (1.0, 1.0) if self.decay is None else (self.decay, 1.0 - self.decay)
        self._sums.mul_(keep).add_(torch.cat([raw, raw.new_ones(1)]), alpha=add)
        self.step += 1
        means = self._sums[:2] / self._sums[2]
        return {"step": self.step, "g2": means[0], "trace": means[1], "b_simple": means[1] / means[0],
                "g2_raw": raw[0], "trace_raw": raw[1]}

    def update_from_distributed(self, local_sq_norm: Number, global_sq_norm: Number, local_batch: int,
                                world_size: int) -> Dict[str, object]:
        """Data-parallel source: ``local_sq_norm`` is this rank's squared norm of its own
        mean gradient (``local_batch`` examples), ``global_sq_norm`` that of the all-reduced
        mean gradient (``local_batch * world_size`` examples). Each rank may keep its own
        estimate; averaging ``local_sq_norm`` over ranks first (one scalar all-reduce) lowers
        the variance by up to ``world_size``."""
        if not isinstance(world_size, int) or world_size < 2:
            raise ValueError(f"world_size must be an integer >= 2 to estimate the noise scale, got {world_size!r}")
        if not isinstance(local_batch, int) or local_batch < 1:
            raise ValueError(f"local_batch must be a positive integer, got {local_batch!r}")
        return self.update(local_sq_norm, local_batch, global_sq_norm, local_batch * world_size)

    def update_from_ddp(self, ddp, local_batch: Optional[int] = None, *, grad_scale: Number = 1.0,
                        use_local_mean: bool = True) -> Dict[str, object]:
        """Update from ``ddp.last_grad_sq_norms`` as exposed by
        ``fastsgd.distributed.BucketedDataParallel(track_grad_norms=True)`` after a
        synchronised backward: ``{"local", "local_mean", "global", "world_size",
        "local_batch_size", ...}``.

        local_batch:     examples per rank in the step; default: the wrapper's
                         ``local_batch_size`` (reading it synchronises with the device)
        grad_scale:      the accumulated gradient divided by the mean gradient over
                         ``local_batch`` examples: 1 for the ``loss / k`` accumulation
                         convention (or no accumulation), k for summed micro-batch means
        use_local_mean:  use the local norm averaged over ranks (``local_mean``, lower
                         variance, same on every rank) when the wrapper provides it
        """
        norms = getattr(ddp, "last_grad_sq_norms", None)
        if norms is None:
            raise ValueError(f"{type(ddp).__name__} exposes no last_grad_sq_norms (run a synchronised backward "
                             "pass first, with track_grad_norms=True for BucketedDataParallel)")
        missing = {"local", "global", "world_size"} - set(norms)
        if missing:
            raise ValueError(f"last_grad_sq_norms lacks {sorted(missing)}; got keys {sorted(norms)}")
        if local_batch is None:
            local_batch = norms.get("local_batch_size")
            if local_batch is None:
                raise ValueError("the wrapper does not know its local batch size: pass local_batch=")
            local_batch = int(local_batch)
        local = norms["local_mean"] if use_local_mean and norms.get("local_mean") is not None else norms["local"]
        scale2 = grad_scale * grad_scale
        return self.update_from_distributed(local / scale2, norms["global"] / scale2, local_batch,
                                            int(norms["world_size"]))

    # ---- reading ------------------------------------------------------------------------------
    def _require(self) -> None:
        if self._sums is None:
            raise RuntimeError("GradientNoiseScale has no updates yet: call update(...) first")

    @property
    def g2(self) -> float:
        """Running estimate of the true gradient's squared norm ``|G|^2`` (host sync)."""
        return self.read()["g2"]

    @property
    def trace(self) -> float:
        """Running estimate of ``tr(Sigma)`` (host sync)."""
        return self.read()["trace"]

    @property
    def b_simple(self) -> float:
        """``tr(Sigma) / |G|^2`` from the running estimates (host sync). Can be negative or
        huge while ``|G|^2``'s running estimate is near zero: average over more steps."""
        return self.read()["b_simple"]

    def read(self) -> Dict[str, float]:
        """``{"step", "g2", "trace", "b_simple"}`` as floats (one host sync)."""
        self._require()
        g2_sum, trace_sum, weight = self._sums.tolist()
        return {"step": self.step, "g2": g2_sum / weight, "trace": trace_sum / weight,
                "b_simple": trace_sum / g2_sum if g2_sum != 0 else math.nan}

    def state_dict(self) -> Dict[str, object]:
        return {"decay": self.decay, "step": self.step, "sums": None if self._sums is None else self._sums.clone()}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        self.decay, self.step = state["decay"], int(state["step"])
        self._sums = None if state["sums"] is None else state["sums"].clone()

    def __repr__(self) -> str:
        if self._sums is None:
            return f"GradientNoiseScale(decay={self.decay}, no updates)"
        r = self.read()
        return (f"GradientNoiseScale(decay={self.decay}, step={r['step']}, g2={r['g2']:.4g}, "
                f"trace={r['trace']:.4g}, b_simple={r['b_simple']:.4g})")


class NoiseScaleAccumulator:
    """Noise scale from gradient accumulation in one process.

    Two ways to get the small-batch norm, both at the parameters of the current step:

    * ``mode="each"``: a hook on every parameter's incoming gradient adds each
      micro-batch's own squared norm during its backward pass (one small reduction per
      parameter per micro-batch, no extra memory). All k micro-batches are samples of
      ``|G_b|^2``, so the estimate converges fastest per step.
    * ``mode="first"`` (default): one ``_foreach_norm`` of the accumulated ``.grad`` right after the
      first micro-batch, which is then that micro-batch's gradient. Cheapest (two fused
      norms per step whatever k is; no hooks), one small-batch sample per step. Needs the
      gradients zeroed (or None) before each step's first micro-batch.

    :meth:`finish` reads the accumulated gradient's squared norm and updates ``noise`` with
    (mean micro-batch norm, harmonic-mean micro size) vs (accumulated norm, total size).
    Needs at least two micro-batches per step.

    Usage::

        noise = GradientNoiseScale()
        acc = NoiseScaleAccumulator(model, noise)
        for xb, yb in micro_batches:                     # k micro-batches of one step
            (loss_fn(model(xb), yb) * len(xb) / batch).backward()
            acc.micro_step(len(xb))                      # marks the end of a micro-batch
        stats = acc.finish()                             # before optimizer.step()/zero_grad()
        optimizer.step(); optimizer.zero_grad()

    Loss convention: the accumulated gradient must equal ``grad_scale`` x the mean
    gradient over the whole batch, i.e. micro-batch i's mean loss weighted by
    ``grad_scale * b_i / B``. The usual ``loss / k`` with equal micro-batches is
    ``grad_scale=1``; summing un-divided micro-batch means is ``grad_scale=k``; with an
    AMP ``GradScaler`` multiply by ``scaler.get_scale()``.
    """

    MODES = ("each", "first")

    def __init__(self, model: Union[nn.Module, Iterable[Tensor]], noise: GradientNoiseScale, mode: str = "first"):
        if not isinstance(noise, GradientNoiseScale):
            raise TypeError(f"noise must be a GradientNoiseScale, got {type(noise).__name__}")
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        params = list(model.parameters()) if isinstance(model, nn.Module) else list(model)
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError("NoiseScaleAccumulator needs at least one parameter with requires_grad=True")
        self.noise = noise
        self.mode = mode
        self.params: List[Tensor] = params
        self._pending: List[Tensor] = []     # "each": norms of the running micro-batch's gradients
        self._norms: List[List[Tensor]] = []  # per finished micro-batch (one entry in "first" mode)
        self._micro_sizes: List[int] = []
        self._handles = [p.register_hook(self._hook) for p in params] if mode == "each" else []

    def _hook(self, grad: Tensor) -> None:
        # one reduction per parameter, no temporary the size of the gradient; half precision is
        # reduced in float32 (it would overflow/underflow). Squared and summed in finish().
        acc_dtype = torch.float32 if grad.dtype in (torch.float16, torch.bfloat16) else None
        self._pending.append(torch.linalg.vector_norm(grad.detach(), dtype=acc_dtype))

    def _grads(self) -> List[Tensor]:
        return [p.grad for p in self.params if p.grad is not None]

    def micro_step(self, batch_size: int) -> None:
        """Mark the end of one micro-batch's backward pass of ``batch_size`` examples."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"micro-batch size must be a positive integer, got {batch_size!r}")
        if self.mode == "each":
            if not self._pending:
                raise RuntimeError("micro_step() called but no gradient reached the parameters since the last "
                                   "micro-batch: call it after loss.backward()")
            self._norms.append(self._pending)
            self._pending = []
        elif not self._micro_sizes:
            grads = self._grads()
            if not grads:
                raise RuntimeError("micro_step() called but the parameters have no gradient: call it after "
                                   "loss.backward()")
            self._norms.append(list(torch._foreach_norm(grads)))
        self._micro_sizes.append(batch_size)

    def finish(self, grad_scale: Number = 1.0) -> Dict[str, object]:
        """End of an accumulation step: update the noise scale and return its dict."""
        if self._pending:
            raise RuntimeError("a backward pass ran after the last micro_step(): call micro_step(size) after "
                               "every micro-batch's backward")
        sizes, norms = self._micro_sizes, self._norms
        self._norms, self._micro_sizes = [], []
        if len(sizes) < 2:
            raise ValueError(f"the noise scale needs at least 2 micro-batches per step, got {len(sizes)}")
        grads = self._grads()
        if not grads:
            raise RuntimeError("no accumulated gradients found (was zero_grad() called before finish()?)")
        total = sum(sizes)
        used = sizes[:len(norms)]
        big_sq = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).square()
        # micro-batch i's gradient is seen as grad_scale * (b_i / B) * G_{b_i}; average the k
        # rescaled squared norms. Grouped by micro-batch size so the weights stay Python floats
        # (a weight tensor would be a host-to-device copy).
        groups: Dict[int, List[Tensor]] = {}
        for b, ns in zip(used, norms):
            groups.setdefault(b, []).extend(ns)
        small_sq = None
        for b, ns in groups.items():
            part = torch.stack(ns).square().sum() * ((total / b) ** 2 / len(used))
            small_sq = part if small_sq is None else small_sq + part
        if not (isinstance(grad_scale, (int, float)) and grad_scale == 1):
            small_sq, big_sq = small_sq / grad_scale ** 2, big_sq / grad_scale ** 2
        # E[mean_i |G_{b_i}|^2] = |G|^2 + tr(Sigma) * mean(1/b_i): the harmonic mean is the effective size
        small = len(used) / sum(1.0 / b for b in used)
        return self.noise.update(small_sq, small, big_sq, total)

    def discard(self) -> None:
        """Forget the micro-batches seen since the last finish() (e.g. a skipped step)."""
        self._pending, self._norms, self._micro_sizes = [], [], []

    def remove(self) -> None:
        """Remove the gradient hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []
