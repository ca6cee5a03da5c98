"""Collectives on whole modules: check that every rank holds the same model,
and broadcast parameters/buffers from rank 0 in a few large messages."""
from __future__ import annotations

import zlib
from typing import Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

# Broadcast at most this many bytes per message: large enough to amortise the
# per-collective latency, small enough not to double the memory of a big model.
_CHUNK_BYTES = 256 * 2**20


def check_same_model(named: Sequence[Tuple[str, Tensor]], group: dist.ProcessGroup) -> None:
    """Raise on every rank when the ranks' parameter/buffer names, shapes or
    dtypes differ. A MAX all-reduce of (signature, -signature) tells every rank
    whether all signatures are equal, so all ranks raise together instead of
    one raising and the others hanging in the next broadcast."""
    text = ";".join(f"{n}:{tuple(t.shape)}:{t.dtype}" for n, t in named)
    sig = zlib.crc32(text.encode())
    device = named[0][1].device if named else torch.device("cpu")
    if dist.get_backend(group) == "gloo":
        device = torch.device("cpu")
    probe = torch.tensor([sig, -sig, len(named)], dtype=torch.int64, device=device)
    dist.all_reduce(probe, op=dist.ReduceOp.MAX, group=group)
    hi, neg_lo = int(probe[0]), int(probe[1])
    if hi != -neg_lo:
        raise RuntimeError(
            f"BucketedDataParallel: the ranks' models differ (rank {dist.get_rank(group)} has {len(named)} "
            f"parameters and buffers, signature {sig}; the signatures across ranks range from {-neg_lo} to {hi}); "
            "every rank must build the same module with the same parameter names, shapes and dtypes")


def broadcast_from_rank0(tensors: Sequence[Tensor], group: dist.ProcessGroup) -> None:
    """Overwrite ``tensors`` with rank 0's values, one broadcast per dtype and
    device (chunked), copying through a flat buffer."""
    by_key: Dict[Tuple[torch.dtype, torch.device], List[Tensor]] = {}
    for t in tensors:
        by_key.setdefault((t.dtype, t.device), []).append(t)
    for ts in by_key.values():
        chunk: List[Tensor] = []
        size = 0
        for t in ts:
            chunk.append(t)
            size += t.numel() * t.element_size()
            if size >= _CHUNK_BYTES:
                _broadcast_flat(chunk, group)
                chunk, size = [], 0
        if chunk:
            _broadcast_flat(chunk, group)


@torch.no_grad()
def _broadcast_flat(tensors: List[Tensor], group: dist.ProcessGroup) -> None:
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    dist.broadcast(flat, src=dist.get_global_rank(group, 0), group=group)
    if dist.get_rank(group) != 0:
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view(t.shape))
            offset += t.numel()
