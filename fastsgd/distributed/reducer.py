"""The engine behind BucketedDataParallel: gradient-ready hooks, in-order
bucket all-reduces, the optional per-bucket optimizer step, the end-of-backward
finalisation and the one-time bucket rebuild.

Life of one synchronised iteration:

1. ``prepare()`` (from the wrapper's forward): rebuild the buckets once if the
   first backward has been observed, reset the readiness counters.
2. Autograd calls ``_on_grad_ready(i)`` after accumulating param ``i``'s
   gradient (a post-accumulate-grad hook), which makes sure the gradient is
   the bucket view (``_keep_view``). When a bucket has all its grads,
   it and every following complete bucket are launched -- strictly in bucket
   order, because collectives must be issued in the same order on every rank
   even if gradients become ready in a different order.
   Launching a bucket takes its local squared norm, divides by the world size
   (``gradient_predivide``) and starts an async all_reduce. The last bucket
   carries a few extra elements, the step's statistics (see ``_write_stats``),
   so they cost no collective of their own.
3. ``_finalize()`` (queued on the autograd engine, runs when backward ends):
   unused parameters raise or are reduced as zeros, the last buckets are
   launched; then, until none is left in flight, every bucket whose
   all-reduce has finished gets its global squared norm and, with an
   optimizer attached, its fused update, and only when none has finished
   does it wait for the oldest. The statistics of the step are stored. When
   ``loss.backward()`` returns, gradients are reduced (and, with an
   optimizer, parameters are updated).

When to run a finished bucket's update: the backward pass, the update and
(on CPU) gloo's copies compete for the same cores (on GPU for the same
compute stream), so an update run in the middle of backward delays the
launch of the last buckets by as much as it takes. Run after the last launch,
it fills the time the host would otherwise spend waiting for the last
buckets' all-reduce: never slower, and faster whenever that wait is exposed.
``eager_step=True`` instead polls in every gradient hook and updates finished
buckets at once (kept for measurement; see bench/allreduce.py).

Everything runs on the thread that runs the backward pass: the collectives'
completion is polled, never handled in a communication thread, so the
optimizer never races with autograd.
"""
from __future__ import annotations

import weakref
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from fastsgd.distributed.buckets import Bucket, assign_buckets, make_buckets

StepFn = Callable[[List[Tensor]], None]


class Reducer:
    """Gradient buckets, hooks and collectives of one BucketedDataParallel
    (see the module docstring for the life of an iteration)."""

    def __init__(self, params: Sequence[Tensor], names: Sequence[str], group: dist.ProcessGroup, *,
                 bucket_cap_bytes: int, first_bucket_bytes: int, gradient_predivide: bool,
                 find_unused_parameters: bool, track_grad_norms: bool, eager_step: bool):
        self.params = list(params)
        self.names = list(names)
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.cap = bucket_cap_bytes
        self.first_cap = first_bucket_bytes
        self.predivide = gradient_predivide
        self.find_unused = find_unused_parameters
        self.track_norms = track_grad_norms
        self.eager_step = eager_step
        # Statistics reduced with the last bucket: mean local squared norm,
        # sample count, and with find_unused_parameters one used-flag per param.
        self._n_stats = (2 + (len(self.params) if find_unused_parameters else 0)
                         if track_grad_norms or find_unused_parameters else 0)
        # Set by the optimizer overlap: called with a finished bucket's params.
        self.step_bucket: Optional[StepFn] = None
        # Indices of the params stepped in this iteration (read by the overlap's step()).
        self.stepped: set = set()

        self._install(assign_buckets(self.params, list(reversed(range(len(self.params)))),
                                     self.first_cap, self.cap))
        self.rebuilt = False
        self._ready_order: List[int] = []     # first backward only
        self._rebuild_due = False
        self._broken: Optional[str] = None
        self._armed = False                   # a forward prepared a backward that has not finished
        self._started = False                 # that backward's first hook has run
        self._sync = True
        self._samples: Optional[int] = 0      # local samples since the last synchronised step
        self._micro_batches = 0
        self.last_stats: Optional[Dict[str, object]] = None
        self._stats: Optional[Tensor] = None
        self._hooks = [p.register_post_accumulate_grad_hook(self._make_hook(i)) for i, p in enumerate(self.params)]
        self._reset_iteration()

    # ---- buckets --------------------------------------------------------------
    def _install(self, assignment: List[List[int]]) -> None:
        # The statistics ride in the last bucket when its dtype holds them
        # exactly enough; otherwise (fp16/bf16) they get their own float64 all-reduce.
        last_dtype = self.params[assignment[-1][0]].dtype
        self._stats_in_bucket = self._n_stats > 0 and last_dtype in (torch.float32, torch.float64)
        self.buckets: List[Bucket] = make_buckets(self.params, assignment,
                                                  self._n_stats if self._stats_in_bucket else 0)
        self.bucket_of = [0] * len(self.params)
        self.slot_of = [0] * len(self.params)
        for b in self.buckets:
            for k, i in enumerate(b.members):
                self.bucket_of[i] = b.index
                self.slot_of[i] = k
        device = self.buckets[0].flat.device
        self._local_sq = torch.zeros(len(self.buckets), dtype=torch.float64, device=device)
        self._global_sq = torch.zeros(len(self.buckets), dtype=torch.float64, device=device)

    def _rebuild(self) -> None:
        """Re-bucket once in the gradient-ready order seen in the first backward,
        rank 0's order for everyone, keeping the current gradient values."""
        seen = set(self._ready_order)
        order = self._ready_order + [i for i in reversed(range(len(self.params))) if i not in seen]
        device = self.buckets[0].flat.device if dist.get_backend(self.group) != "gloo" else torch.device("cpu")
        order_t = torch.tensor(order, dtype=torch.int64, device=device)
        dist.broadcast(order_t, src=dist.get_global_rank(self.group, 0), group=self.group)
        grads = [p.grad for p in self.params]
        self._install(assign_buckets(self.params, order_t.tolist(), self.first_cap, self.cap))
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(self.params, grads)):
                if g is not None:
                    view = self.buckets[self.bucket_of[i]].views[self.slot_of[i]]
                    view.copy_(g)
                    p.grad = view
        self.rebuilt = True
        self._rebuild_due = False

    def bucket_summary(self) -> List[List[str]]:
        """Parameter names per bucket, in launch order."""
        return [[self.names[i] for i in b.members] for b in self.buckets]

    # ---- per iteration ------------------------------------------------------
    def _reset_iteration(self) -> None:
        self._ready = [False] * len(self.params)
        self._pending = [len(b.members) for b in self.buckets]
        self._works: List[Optional[dist.Work]] = [None] * len(self.buckets)
        self._next_launch = 0
        self._inflight: List[int] = []
        self._defer_step: set = set()
        self._locally_unused: List[int] = []
        self._stats = None
        self._started = False

    def prepare(self, sync: bool, samples: Optional[int], rebuild: bool = True) -> None:
        """Called by the wrapper's forward when a backward may follow.
        ``rebuild=False`` (eval-mode forwards) postpones the one-time bucket
        rebuild, a broadcast, so that ranks may evaluate independently."""
        if self._broken:
            raise RuntimeError(f"BucketedDataParallel cannot continue after an earlier failure: {self._broken}")
        if self._armed and self._started and self._sync:
            self._fail("the previous backward pass stopped before it finished (an exception inside backward?), "
                       "so this rank's collectives are out of step with the other ranks'")
        if self._rebuild_due and rebuild:
            self._rebuild()
        self._reset_iteration()
        self.stepped.clear()
        self._armed, self._sync = True, sync
        self._micro_batches += 1
        if self._samples is not None:
            self._samples = None if samples is None else self._samples + samples

    # ---- hooks ----------------------------------------------------------------
    def _make_hook(self, i: int):
        # A weak reference: a discarded wrapper must not keep reducing (or
        # raising) when its module is later used on its own.
        ref = weakref.ref(self)

        def hook(p: Tensor) -> None:
            reducer = ref()
            if reducer is not None:
                reducer._on_grad_ready(i, p)
        return hook

    def _on_grad_ready(self, i: int, p: Tensor) -> None:
        if not self._armed:
            raise RuntimeError(
                f"BucketedDataParallel: the gradient of '{self.names[i]}' arrived in a backward pass that no "
                "forward through the wrapper prepared; run one forward through BucketedDataParallel per "
                "backward (backward through a retained graph twice is not supported)")
        if not self._started:
            self._started = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finalize)
        self._keep_view(i, p)
        if not self.rebuilt and not self._rebuild_due:
            self._ready_order.append(i)
        if not self._sync:
            return
        self._ready[i] = True
        b = self.bucket_of[i]
        self._pending[b] -= 1
        if self._pending[b] == 0:
            self._launch_ready()
        if self.eager_step:
            for k in [k for k in self._inflight if self._works[k].is_completed()]:
                self._complete(k)

    def _keep_view(self, i: int, p: Tensor) -> None:
        """Make the bucket view param ``i``'s ``.grad``. Once it is, autograd
        accumulates into it in place (same object: the fast path). After
        ``zero_grad(set_to_none=True)`` autograd hands over a fresh gradient
        (usually the backward op's own output buffer), which is copied in
        once -- one read and one write, where zeroing the view up front and
        accumulating into it would cost twice that. A gradient the user
        assigned, or one ``create_graph=True`` made out of place, is copied
        in the same way."""
        g = p.grad
        v = self.buckets[self.bucket_of[i]].views[self.slot_of[i]]
        if g is v:
            return
        if g is None:
            v.zero_()
        elif g.is_sparse:
            self._fail(f"parameter '{self.names[i]}' got a sparse gradient; BucketedDataParallel reduces dense "
                       "gradients only (use nn.Embedding(sparse=False))")
        else:
            with torch.no_grad():
                v.copy_(g.detach())
        p.grad = v

    # ---- collectives ----------------------------------------------------------
    def _launch_ready(self) -> None:
        while self._next_launch < len(self.buckets) and self._pending[self._next_launch] == 0:
            self._launch(self.buckets[self._next_launch])
            self._next_launch += 1

    # Backward runs with grad mode off, and the flat buffers never require
    # grad, so the collective path needs no torch.no_grad() (which costs time).
    def _launch(self, b: Bucket) -> None:
        if self.track_norms:  # before the all-reduce overwrites the local gradient
            self._local_sq[b.index] = torch.linalg.vector_norm(b.grads, dtype=torch.float32).square()
        if self.predivide:
            b.flat.div_(self.world_size)
        if b.tail.numel():
            self._write_stats(b.tail, divided_after=not self.predivide)
        self._works[b.index] = dist.all_reduce(b.flat, group=self.group, async_op=True)
        self._inflight.append(b.index)

    def _complete(self, index: int) -> None:
        self._wait(self._works[index], f"the all-reduce of gradient bucket {index} "
                                       f"({len(self.buckets[index].members)} parameters)")
        self._inflight.remove(index)
        b = self.buckets[index]
        if not self.predivide:
            b.flat.div_(self.world_size)
        if self.track_norms:
            self._global_sq[index] = torch.linalg.vector_norm(b.grads, dtype=torch.float32).square()
        if b.tail.numel():
            self._stats = b.tail.to(torch.float64, copy=True)
        if index not in self._defer_step:
            self._step(b.members)

    def _step(self, members: List[int]) -> None:
        if self.step_bucket is not None:
            self.step_bucket([self.params[i] for i in members])
            self.stepped.update(members)

    def _wait(self, work: dist.Work, what: str) -> None:
        try:
            work.wait()
        except Exception as exc:  # noqa: BLE001 -- re-raised with context below
            self._fail(f"{what} failed on rank {self.rank} of {self.world_size}: {exc}. Another rank probably "
                       "raised, died, diverged (a different model or number of backward passes) or stayed "
                       "behind for longer than the process group's timeout", exc)

    def _fail(self, message: str, cause: Optional[BaseException] = None) -> None:
        """Raise, and refuse further iterations: after a failed or skipped
        collective this rank can no longer be matched with the others."""
        self._broken = message
        self._armed = False
        raise RuntimeError(f"BucketedDataParallel: {message}") from cause

    # ---- end of backward ------------------------------------------------------
    def _finalize(self) -> None:
        self._armed = False
        if not self.rebuilt:
            self._rebuild_due = True
        if not self._sync:
            return
        unused = [i for i, r in enumerate(self._ready) if not r]
        if unused and not self.find_unused:
            names = ", ".join(f"'{self.names[i]}'" for i in unused)
            self._fail(f"{len(unused)} parameter(s) got no gradient in this backward pass on rank {self.rank}: "
                       f"{names}. Every parameter that requires grad must contribute to the loss on every rank; "
                       "freeze unused ones with requires_grad_(False) or pass find_unused_parameters=True")
        self._locally_unused = unused
        for i in unused:  # reduced with no new gradient: zeros, or what was accumulated before
            self._keep_view(i, self.params[i])
            self._ready[i] = True
            self._pending[self.bucket_of[i]] -= 1
            self._defer_step.add(self.bucket_of[i])
        self._launch_ready()
        stats_work = None
        if self._n_stats and not self._stats_in_bucket:
            self._stats = torch.empty(self._n_stats, dtype=torch.float64, device=self._local_sq.device)
            self._write_stats(self._stats, divided_after=False)
            stats_work = dist.all_reduce(self._stats, group=self.group, async_op=True)
        while self._inflight:  # finished buckets first; wait only when none has finished
            done = [b for b in self._inflight if self._works[b].is_completed()]
            for b in done or self._inflight[:1]:
                self._complete(b)
        if stats_work is not None:
            self._wait(stats_work, "the all-reduce of the gradient statistics")
        if self.find_unused:
            self._drop_globally_unused(self._stats[2:])
        for b in sorted(self._defer_step):
            self._step(self.buckets[b].members)
        self._store_stats()
        self._samples, self._micro_batches = 0, 0

    def _write_stats(self, out: Tensor, divided_after: bool) -> None:
        """Fill ``out`` so that, summed over ranks (and divided by the world
        size afterwards when not predividing, like the gradients it travels
        with), it holds [mean local squared norm, total samples, per-param
        "used on some rank" (> 0) flags]. Called when every bucket has been
        launched, so every local norm is known."""
        scale = float(self.world_size) if divided_after else 1.0
        samples = float("nan") if self._samples is None else float(self._samples)
        out[0] = self._local_sq.sum() * (scale / self.world_size)
        out[1] = samples * scale
        if self.find_unused:
            out[2:].fill_(1.0)
            if self._locally_unused:
                out[2:][torch.tensor(self._locally_unused, device=out.device)] = 0.0

    def _drop_globally_unused(self, used: Tensor) -> None:
        """A parameter no rank used keeps no gradient (like DDP), so the
        optimizer leaves it alone as it would in single-process training."""
        for i in torch.nonzero(used == 0).flatten().tolist():
            self.params[i].grad = None

    def _store_stats(self) -> None:
        self.last_stats = None if not self.track_norms else {
            "local": self._local_sq.sum(),
            "local_mean": self._stats[0],
            "global": self._global_sq.sum(),
            "samples": self._stats[1],
            "local_samples": self._samples,
            "accumulation_steps": self._micro_batches,
        }

    def __del__(self):
        for h in getattr(self, "_hooks", []):
            h.remove()
