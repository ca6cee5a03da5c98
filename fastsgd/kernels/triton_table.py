"""The Triton backend's device-side tables: one kernel launch walks many tensors.

A fused optimizer step touches every parameter, its gradient and its state
tensors. Instead of one launch per tensor (or torch's multi_tensor_apply,
which passes at most a few dozen addresses as kernel arguments and so needs
several launches for a ResNet-50), fastsgd writes the addresses into an int64
tensor on the device once and launches a single grid over all of them:

``tensors`` -- (T, TABLE_WIDTH) int64, one row per tensor:
    columns 0..4  addresses (data_ptr) of up to five tensors of the same shape
                  that are walked together (param, grad, buffer, ...; 0 if unused)
    COL_NUMEL     number of elements
    COL_FIRST_PROGRAM, COL_NUM_PROGRAMS
                  the range of programs (rows of ``programs``) that cover it
    COL_FLAG      a per-tensor flag (the SGD kernel's "first step" bit)

``programs`` -- (P, 2) int64, one row per program of the grid: the tensor it
    works on and the first element of its chunk (chunk = ``chunk`` elements,
    the last chunk of a tensor may be short; an empty tensor has no program).
    Element offsets are 64-bit, so a tensor may pass 2^31 elements.

``aligned`` records whether every address is a multiple of 16 bytes, so that
kernels may promise the compiler aligned (vectorisable) accesses.

Both tables are cached (``table_cache.TableCache``, whose rules every
backend shares) and rebuilt only when what they describe changes: the
program table is keyed on the element counts (it survives new gradient
tensors), the address table on the addresses, counts and flags -- except a
``volatile`` column (the grads): with ``zero_grad(set_to_none=True)``
gradients are re-allocated each step; the caching allocator usually hands
back the same addresses, and when it does not, the cached rows get the new
addresses and are uploaded again, one small asynchronous host-to-device copy
from pinned memory (no host synchronisation, no rebuild). During CUDA graph
capture nothing may be copied from the host, so a table missing at capture
time raises; a table used during capture is kept for good (a replay reads
it), never evicted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from fastsgd.kernels import table_cache

ADDRESS_COLUMNS = 5
COL_NUMEL = 5
COL_FIRST_PROGRAM = 6
COL_NUM_PROGRAMS = 7
COL_FLAG = 8
TABLE_WIDTH = 9


@dataclass(frozen=True)
class TensorTable:
    tensors: Tensor   # (T, TABLE_WIDTH) int64 on the tensors' device
    programs: Tensor  # (max(P, 1), 2) int64 on the tensors' device
    num_tensors: int
    num_programs: int
    aligned: bool     # every address is a multiple of 16 bytes (kernels may use vector loads)
    max_numel: int    # of the largest tensor (0 for no tensors): whether LARS/LAMB need the 2-pass launches
    has_empty: bool   # some tensor has no elements (no program; LAMB advances its step in the 2-pass launch)


def _to_device(host: Tensor, device: torch.device) -> Tensor:
    """Copy a small host table to ``device`` without making the host wait."""
    if device.type != "cuda":
        return host.to(device)
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError("fastsgd: the Triton tensor table must be built before CUDA graph capture "
                           "(the parameters, gradients or state changed since the last eager step); run one "
                           "eager step with the same tensors first")
    # Pinned memory from torch's caching host allocator: the copy is
    # asynchronous and the staging block is not reused before it completes.
    return host.pin_memory().to(device, non_blocking=True)


def addresses_of(tensors: Optional[Sequence[Tensor]]) -> Optional[Tuple[int, ...]]:
    return None if tensors is None else tuple(map(Tensor.data_ptr, tensors))


def _aligned(addresses: Tuple[int, ...]) -> bool:
    return all(a % 16 == 0 for a in addresses)


class _Rows(NamedTuple):
    table: TensorTable
    rows: Tensor          # the host copy of table.tensors
    static_aligned: bool  # every address outside the volatile column is 16-byte aligned


def _device_tensors(entry: "_Rows | Tensor"):
    if isinstance(entry, Tensor):
        return (entry,)
    return entry.table.tensors, entry.table.programs


class TritonTables:
    """The Triton backend's TensorTables, in two ``table_cache.TableCache``s:
    address tables and program tables. ``builds`` counts address tables
    built (tests use it to check that a table is reused)."""

    def __init__(self, capacity: int = 64):
        self._tables: "table_cache.TableCache[_Rows]" = table_cache.TableCache(capacity, _device_tensors)
        self._programs: "table_cache.TableCache[Tensor]" = table_cache.TableCache(capacity, _device_tensors)

    @property
    def builds(self) -> int:
        return self._tables.builds

    def clear(self) -> None:
        """Drops the cached tables, not those captured CUDA graphs read."""
        self._tables.clear()
        self._programs.clear()

    def get(self, addresses: Sequence[Optional[Tuple[int, ...]]], numels: Tuple[int, ...], chunk: int,
            device: torch.device, flags: Optional[Sequence[bool]] = None,
            volatile: Optional[int] = None) -> TensorTable:
        """The table for tensors whose i-th row holds the addresses
        ``addresses[c][i]`` (see ``addresses_of``; a column may be None:
        address 0) and ``numels[i]`` elements. Column ``volatile`` (the
        grads, re-created by autograd at moving addresses) is not part of the
        key: when only it changed, a copy of the cached rows with the new
        addresses is uploaded instead of a rebuild (the caller has checked
        the new tensors)."""
        if len(addresses) > ADDRESS_COLUMNS:
            raise ValueError(f"at most {ADDRESS_COLUMNS} address columns, got {len(addresses)}")
        addresses = tuple(addresses)
        moving = addresses[volatile] if volatile is not None else None
        static = addresses[:volatile] + (None,) + addresses[volatile + 1:] if volatile is not None else addresses
        flags = tuple(bool(f) for f in flags) if flags is not None else None
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None

        def build() -> Tuple[_Rows, bool]:
            first, counts, programs = self._program_table(numels, chunk, device, capturing, stream)
            rows = torch.zeros((len(numels), TABLE_WIDTH), dtype=torch.int64)
            for c, col in enumerate(addresses):
                if col is not None:
                    rows[:, c] = torch.tensor(col, dtype=torch.int64)
            rows[:, COL_NUMEL] = torch.tensor(numels, dtype=torch.int64)
            rows[:, COL_FIRST_PROGRAM] = first
            rows[:, COL_NUM_PROGRAMS] = counts
            if flags is not None:
                rows[:, COL_FLAG] = torch.tensor(flags, dtype=torch.int64)
            static_aligned = all(_aligned(col) for col in static if col is not None)
            table = TensorTable(_to_device(rows, device), programs, len(numels), int(counts.sum()),
                                static_aligned and (moving is None or _aligned(moving)), max(numels, default=0),
                                0 in numels)
            return _Rows(table, rows, static_aligned), True

        def patch(entry: _Rows, moved: Tuple[int, ...]) -> _Rows:
            rows = entry.rows.clone()
            rows[:, volatile] = torch.tensor(moved, dtype=torch.int64)
            table = entry.table
            return _Rows(TensorTable(_to_device(rows, device), table.programs, table.num_tensors,
                                     table.num_programs, entry.static_aligned and _aligned(moved), table.max_numel,
                                     table.has_empty),
                         rows, entry.static_aligned)

        key = (device, chunk, static, numels, flags)
        return self._tables.get(key, moving, build, patch=patch, capturing=capturing, stream=stream).table

    def _program_table(self, numels: tuple, chunk: int, device: torch.device, capturing: bool = False,
                       stream=None):
        n = torch.tensor(numels, dtype=torch.int64)
        counts = (n + chunk - 1) // chunk
        first = torch.cumsum(counts, 0) - counts

        def build() -> Tuple[Tensor, bool]:
            total = int(counts.sum())
            owner = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
            start = (torch.arange(total, dtype=torch.int64) - first[owner]) * chunk
            host = torch.stack([owner, start], dim=1) if total else torch.zeros((1, 2), dtype=torch.int64)
            return _to_device(host.contiguous(), device), False

        programs = self._programs.get((device, chunk, numels), None, build, capturing=capturing, stream=stream)
        return first, counts, programs
