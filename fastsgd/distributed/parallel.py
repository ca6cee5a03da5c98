"""The public wrapper: BucketedDataParallel."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from fastsgd.distributed.overlap import OptimizerOverlap, check_optimizer
from fastsgd.distributed.reducer import Reducer
from fastsgd.distributed.sync import broadcast_from_rank0, check_same_model
from fastsgd.optim.base import FusedOptimizer


class BucketedDataParallel(nn.Module):
    r"""Data-parallel training with bucketed gradient all-reduce overlapped with
    backward and, optionally, the optimizer step fused per bucket.

    Wrap the model after ``torch.distributed.init_process_group`` (gloo or
    NCCL), exactly like ``torch.nn.parallel.DistributedDataParallel``::

        model = BucketedDataParallel(model, optimizer=opt)   # opt: a fastsgd optimizer
        for x, y in loader:
            loss = loss_fn(model(x), y)
            loss.backward()      # reduces gradients and, with optimizer=, updates the parameters
            opt.step()           # steps only what backward has not stepped
            opt.zero_grad()

    What it does:

    * **Construction** checks that every rank has the same parameter and
      buffer names/shapes/dtypes (all ranks raise together otherwise) and
      broadcasts parameters and buffers from rank 0.
    * **Gradients** live in flat per-bucket buffers; each parameter's ``.grad``
      is a view into its bucket once its gradient is accumulated
      (``zero_grad(set_to_none=True)`` is fine: the next backward copies the
      fresh gradient into the view and puts the view back, as DDP does). Buckets hold
      ``bucket_cap_mb`` MiB (the first ``first_bucket_mb``) of one dtype, in
      reverse registration order at first; after the first backward they are
      rebuilt once in the order gradients actually became ready, using rank
      0's order on every rank.
    * **Reduction**: when a bucket's gradients are all accumulated, its
      all-reduce starts asynchronously (buckets are launched strictly in
      order). With ``gradient_predivide`` each rank divides by the world size
      before the sum (no fp16 overflow), otherwise after. The result is the
      mean over ranks, like DDP. When ``loss.backward()`` returns, every
      gradient is reduced.
    * **Per-bucket optimizer step** (``optimizer=`` a fastsgd optimizer): each
      bucket whose all-reduce has finished is updated by
      ``optimizer.step_subset`` while the last buckets are still being
      reduced, so the update hides behind the communication that ends the
      backward pass (``eager_step=True``: already during backward, as soon
      as a gradient hook sees the all-reduce finished; see
      ``fastsgd/distributed/reducer.py`` for why that is not the default).
      LARS and LAMB are exact this way (their trust ratios are per tensor).
      ``optimizer.step`` is replaced on the instance by a version that steps
      only what the backward did not (so the training loop is unchanged).
      Consequences: anything that changes gradients between ``backward()``
      and ``step()`` (clipping, ``GradScaler``) cannot take effect --
      ``GradScaler`` raises a clear error at ``step()``; LAMB with
      ``max_grad_norm`` needs every gradient first, so it is stepped once in
      ``step()`` (``per_bucket_step`` is then False). A parameter must not be
      read by a backward node that runs after its own gradient is complete
      (e.g. through ``p.detach()`` saved for backward); autograd reports that
      as an in-place modification. Create LR schedulers after wrapping
      (they wrap ``optimizer.step`` too).
    * ``no_sync()``: gradient accumulation; backward passes of forwards run
      inside it only accumulate locally. The first forward outside it
      reduces the accumulated sum (mean over ranks) and steps per bucket.
      With ``optimizer=`` every synchronised backward is an optimizer step,
      so accumulate with ``no_sync()``, not by skipping ``step()``.
    * **Unused parameters**: a parameter that got no gradient raises, at the
      end of backward, an error naming it; with ``find_unused_parameters=True``
      it contributes zeros, and a parameter no rank used ends with
      ``.grad = None`` (so the optimizer skips it, as in single-process
      training).
    * **Buffers** (``broadcast_buffers=True``): rank 0's buffers (BatchNorm
      running statistics) are broadcast before every forward in training mode
      with grad enabled, except inside ``no_sync()``. Forwards under
      ``torch.no_grad()`` or in eval mode run no collective, so ranks may
      evaluate independently.
    * **Failures**: a collective that fails or exceeds the process group's
      timeout raises a RuntimeError saying which bucket and rank; after that
      (or after an unused-parameter error) the wrapper refuses to continue.
    * **Gradient noise statistics** (``track_grad_norms``): see
      :attr:`last_grad_sq_norms`.
    * **Checkpoints**: ``state_dict()``/``load_state_dict()`` are the wrapped
      module's, without DDP's ``"module."`` prefix, so checkpoints load into
      the unwrapped model and back. (``named_parameters()`` still shows the
      ``module.`` prefix, as for any wrapper.) The optimizer's state dict is
      untouched.

    Args:
        module: the model; all parameters that require grad on one device.
        optimizer: a fastsgd optimizer over (a superset or subset of) the
            module's parameters, to step per bucket during backward.
        bucket_cap_mb: bucket size in MiB (DDP's default 25).
        first_bucket_mb: size of the first bucket in MiB (DDP's default 1).
        process_group: the group to reduce over; default: the world.
        gradient_predivide: divide by the world size before the all-reduce.
        find_unused_parameters: reduce zeros for parameters without a gradient
            instead of raising.
        broadcast_buffers: broadcast rank 0's buffers before each training forward.
        track_grad_norms: compute the local and global squared gradient norms
            (:attr:`last_grad_sq_norms`); costs two extra reads of the gradients
            per step, hence off by default.
        eager_step: with ``optimizer=``, update finished buckets from the
            gradient hooks during backward rather than after the last launch.
    """

    def __init__(self, module: nn.Module, *, optimizer: Optional[FusedOptimizer] = None,
                 bucket_cap_mb: float = 25, first_bucket_mb: float = 1,
                 process_group: Optional[dist.ProcessGroup] = None, gradient_predivide: bool = True,
                 find_unused_parameters: bool = False, broadcast_buffers: bool = True,
                 track_grad_norms: bool = False, eager_step: bool = False):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"BucketedDataParallel wraps an nn.Module, got {type(module).__name__}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("BucketedDataParallel needs torch.distributed.init_process_group(...) first")
        for name, value in (("bucket_cap_mb", bucket_cap_mb), ("first_bucket_mb", first_bucket_mb)):
            if not value > 0:
                raise ValueError(f"Invalid {name}: {value} (must be > 0)")
        if optimizer is not None:
            check_optimizer(optimizer)
        self.module = module
        self.process_group = process_group if process_group is not None else dist.group.WORLD
        self.broadcast_buffers = broadcast_buffers
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("BucketedDataParallel: the module has no parameter that requires grad")
        devices = {p.device for _, p in named}
        if len(devices) > 1:
            raise ValueError(f"BucketedDataParallel: parameters are on several devices ({sorted(map(str, devices))}); "
                             "use one device per process")
        check_same_model(list(module.named_parameters()) + list(module.named_buffers()), self.process_group)
        broadcast_from_rank0([p.detach() for p in module.parameters()] + list(module.buffers()),
                             self.process_group)
        self._reducer = Reducer([p for _, p in named], [n for n, _ in named], self.process_group,
                                bucket_cap_bytes=int(bucket_cap_mb * 2**20),
                                first_bucket_bytes=int(first_bucket_mb * 2**20),
                                gradient_predivide=gradient_predivide,
                                find_unused_parameters=find_unused_parameters,
                                track_grad_norms=track_grad_norms, eager_step=eager_step)
        self._overlap = OptimizerOverlap(optimizer, self._reducer) if optimizer is not None else None
        self._sync = True

    # ---- training ---------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            self._reducer.prepare(self._sync, _batch_size(args, kwargs), rebuild=self.training)
            if self.training and self.broadcast_buffers and self._sync:
                buffers = list(self.module.buffers())
                if buffers:
                    broadcast_from_rank0(buffers, self.process_group)
        return self.module(*args, **kwargs)

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally: backward passes of forwards run inside
        this context neither reduce nor step."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    # ---- introspection --------------------------------------------------------
    @property
    def per_bucket_step(self) -> bool:
        """True when the optimizer is stepped bucket by bucket during backward."""
        return self._overlap is not None and self._overlap.per_bucket

    @property
    def buckets(self) -> List[List[str]]:
        """Parameter names of each bucket, in launch order."""
        return self._reducer.bucket_summary()

    @property
    def last_grad_sq_norms(self) -> Optional[Dict[str, Any]]:
        """Squared gradient norms of the last synchronised backward, for the
        gradient noise scale (McCandlish et al. 2018), with
        ``track_grad_norms=True``; None before the first one or without it:

        * ``local``: |g_local|^2 of this rank's gradient before the all-reduce
          (batch ``local_batch_size``), a float64 0-dim tensor;
        * ``local_mean``: the mean of ``local`` over the ranks;
        * ``global``: |g|^2 of the all-reduced (averaged) gradient (batch
          ``global_batch_size``);
        * ``world_size``;
        * ``local_batch_size``/``global_batch_size``: samples seen since the
          previous synchronised step (dim 0 of the first tensor argument of
          each forward; the global one summed over ranks), None if unknown;
        * ``accumulation_steps``: forwards accumulated into this step
          (``no_sync`` micro-batches + 1). The norms are of the accumulated
          gradients, which are sums over micro-batches, as reduced (so still
          multiplied by the loss scale under a ``GradScaler``).

        Reading the batch sizes synchronises with the device; the norms do not.
        """
        s = self._reducer.last_stats
        if s is None:
            return None
        samples = float(s["samples"])
        return {
            "local": s["local"], "local_mean": s["local_mean"], "global": s["global"],
            "world_size": self._reducer.world_size,
            "local_batch_size": s["local_samples"],
            "global_batch_size": None if samples != samples else int(round(samples)),
            "accumulation_steps": s["accumulation_steps"],
        }

    # ---- checkpoints ------------------------------------------------------------
    def state_dict(self, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        """The wrapped module's state dict (no ``"module."`` prefix)."""
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load into the wrapped module (keys without ``"module."``), in place."""
        if assign:
            raise ValueError("BucketedDataParallel.load_state_dict(assign=True) would replace the parameters "
                             "the gradient buckets are attached to; load into the module before wrapping it")
        return self.module.load_state_dict(state_dict, strict=strict)


def _batch_size(args, kwargs) -> Optional[int]:
    """Dim 0 of the first tensor argument, the usual batch dimension."""
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            return int(a.shape[0]) if a.dim() > 0 else None
    return None
