"""Bucket assignment and the flat gradient buffers.

A bucket is one contiguous gradient buffer (one dtype, one device) shared by
several parameters; each parameter's ``.grad`` is a view into it, so autograd
accumulates straight into the buffer and one collective reduces the whole
bucket without any copy in or out.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from fastsgd.kernels.tensors import is_dense


def assign_buckets(params: Sequence[Tensor], order: Sequence[int], first_cap_bytes: int,
                   cap_bytes: int) -> List[List[int]]:
    """Split parameter indices into buckets, taken in ``order``.

    Parameters of one dtype and device fill an open bucket until its size
    reaches the cap, then that bucket is closed (so a parameter larger than the
    cap gets a bucket of its own). The first bucket closed uses
    ``first_cap_bytes``: it is launched first, so keeping it small starts
    communication early in the backward pass. Buckets come out in the order
    they were closed, then the ones still open, which is the order in which
    their gradients are expected to be complete.
    """
    if sorted(order) != list(range(len(params))):
        raise ValueError(f"bucket order must be a permutation of 0..{len(params) - 1}, got {list(order)}")
    open_buckets: Dict[Tuple[torch.dtype, torch.device], Tuple[List[int], int]] = {}
    closed: List[List[int]] = []
    for i in order:
        p = params[i]
        key = (p.dtype, p.device)
        members, size = open_buckets.get(key, ([], 0))
        members.append(i)
        size += p.numel() * p.element_size()
        if size >= (first_cap_bytes if not closed else cap_bytes):
            closed.append(members)
            open_buckets.pop(key, None)
        else:
            open_buckets[key] = (members, size)
    # Open buckets in the order of their first member, so the result only depends on ``order``.
    position = {i: k for k, i in enumerate(order)}
    rest = sorted((m for m, _ in open_buckets.values()), key=lambda m: position[m[0]])
    return closed + rest


def grad_view(flat: Tensor, offset: int, p: Tensor) -> Tensor:
    """A view of ``flat[offset:offset + p.numel()]`` with ``p``'s shape and
    strides, so gradient and parameter share a memory layout (channels_last
    params get channels_last grads, as AccumulateGrad would make them)."""
    if p.is_contiguous():
        return flat[offset:offset + p.numel()].view(p.shape)
    return flat.as_strided(p.shape, p.stride(), flat.storage_offset() + offset)


@dataclass
class Bucket:
    """One flat gradient buffer and the parameters whose grads live in it.
    ``flat`` may end in a few extra elements after the gradients (the reducer
    sends its per-step statistics along with the last bucket)."""
    index: int
    members: List[int]            # indices into the reducer's parameter list
    params: List[Tensor]
    flat: Tensor
    numel: int                    # gradient elements at the start of ``flat``
    views: List[Tensor] = field(default_factory=list)

    @property
    def grads(self) -> Tensor:
        return self.flat[:self.numel]

    @property
    def tail(self) -> Tensor:
        return self.flat[self.numel:]


def make_buckets(params: Sequence[Tensor], assignment: List[List[int]], last_tail: int = 0) -> List[Bucket]:
    """Allocate zeroed flat buffers and the per-parameter grad views; the last
    bucket gets ``last_tail`` extra elements."""
    buckets = []
    for b, members in enumerate(assignment):
        ps = [params[i] for i in members]
        for i, p in zip(members, ps):
            if not is_dense(p):
                raise ValueError(f"BucketedDataParallel: parameter {i} has shape {tuple(p.shape)} and strides "
                                 f"{p.stride()}, which overlap or leave gaps; make it contiguous first")
        numel = sum(p.numel() for p in ps)
        tail = last_tail if b == len(assignment) - 1 else 0
        flat = torch.zeros(numel + tail, dtype=ps[0].dtype, device=ps[0].device)
        views, offset = [], 0
        for p in ps:
            views.append(grad_view(flat, offset, p))
            offset += p.numel()
        buckets.append(Bucket(b, list(members), ps, flat, numel, views))
    return buckets
