"""The tensor-table cache every kernel backend uses, written once.

A fused step hands the kernels one table that lists every tensor of the call
(addresses, sizes, dtype codes, flags; each backend encodes its own rows).
Building it means checking every tensor (devices, shapes, layouts, dtypes),
which costs a Python-level attribute read per tensor and field (thousands of
them for a model with many small tensors), so the finished table is cached. The rules, the same for every backend:

- **Key without the grads.** The key holds what the table depends on apart
  from the gradients (the params' and state tensors' addresses, element
  counts, dtypes, flags). Autograd re-creates gradients every step with
  ``zero_grad(set_to_none=True)``, at addresses that move.
- **grads_fit fast path.** When only the grads moved and the entry allows it
  (every param contiguous), ``fits()`` (``tensors.grads_fit``: device, element
  count, dtype, contiguity) stands in for the full checks and ``patch()``
  writes the new grad addresses into a copy of the table: no rebuild.
- **Oldest first.** A hit costs one hash of the key and one comparison; the
  order is insertion order (no reordering on a hit) and the oldest entry is
  evicted first.
- **CUDA graphs.** A table a captured graph reads must outlive the graph. An
  entry used during capture is pinned (never evicted; when replaced, the old
  table is kept for the graph). A table built or patched during capture is
  kept for the graph only, never put in the eager cache: an eager step before
  the first replay would read its device copy before the graph wrote it.
- **Streams.** A table (or scratch held with it) dropped from the cache may
  still be read by a kernel queued on another stream than the one that
  allocated it; every stream it was used on is recorded and, when it is
  dropped, ``release`` marks its tensors for those streams
  (``Tensor.record_stream``) so the allocator does not hand the memory out
  before that work is done.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Generic, Hashable, Iterable, List, Optional, Tuple, TypeVar

from torch import Tensor

T = TypeVar("T")


class _Entry(Generic[T]):
    __slots__ = ("value", "grads", "patchable", "pinned", "streams")

    def __init__(self, value: T, grads: Hashable, patchable: bool):
        self.value = value
        self.grads = grads          # the grads' addresses written in ``value``
        self.patchable = patchable  # fits() may stand in for the full checks
        self.pinned = False         # a captured CUDA graph reads ``value``
        self.streams: set = set()   # streams ``value`` was used on


def record_streams(tensors: Iterable[Optional[Tensor]], streams: Iterable[Any]) -> None:
    """Marks each device tensor as used on each stream (see the module docstring)."""
    streams = [s for s in streams if s is not None]
    for t in tensors:
        if t is not None and t.is_cuda:
            for s in streams:
                t.record_stream(s)


class TableCache(Generic[T]):
    """key -> table, with the rules of the module docstring.

    ``tensors_of(table)`` lists the device tensors a table holds (the table
    itself, scratch), released with ``record_streams`` when it is dropped.
    ``builds`` and ``patches`` count tables built and grads patched (tests
    use them to check that a table is reused)."""

    def __init__(self, capacity: int, tensors_of: Callable[[T], Iterable[Optional[Tensor]]] = lambda t: ()):
        self.capacity = capacity
        self.builds = 0
        self.patches = 0
        self._tensors_of = tensors_of
        self._entries: "OrderedDict[Hashable, _Entry[T]]" = OrderedDict()
        self._graph_owned: List[T] = []  # tables captured graphs read that are not (or no longer) cached

    def __len__(self) -> int:
        return len(self._entries)

    def values(self) -> List[T]:
        """The cached tables, oldest first (not those kept only for graphs)."""
        return [e.value for e in self._entries.values()]

    def clear(self, graphs: bool = False) -> None:
        """Drops the cached tables; with ``graphs=True`` also those captured
        CUDA graphs read (only when no such graph will be replayed again)."""
        for entry in self._entries.values():
            if not entry.pinned:
                self._release(entry)
            elif not graphs:
                self._graph_owned.append(entry.value)
        self._entries.clear()
        if graphs:
            self._graph_owned.clear()

    def get(self, key: Hashable, grads: Hashable, build: Callable[[], Tuple[T, Optional[bool]]], *,
            patch: Optional[Callable[[T, Hashable], T]] = None, fits: Callable[[], bool] = lambda: True,
            capturing: bool = False, stream: Any = None) -> T:
        """The table for ``key`` whose grad addresses are ``grads``.

        ``build()`` checks the tensors and returns ``(table, patchable)``:
        ``patchable`` None means "use once, do not cache" (e.g. the table
        points at temporary copies), else whether a later call with other
        grads may ``patch(table, grads)`` after ``fits()`` says yes instead of
        building again. ``capturing``: a CUDA graph is being captured on the
        current stream. ``stream``: the stream the table is used on now."""
        entry = self._entries.get(key)  # one hash of every address; no reordering on a hit
        if entry is not None:
            if entry.grads == grads:
                return self._used(entry, capturing, stream)
            if patch is not None and entry.patchable and fits():
                self.patches += 1
                value = patch(entry.value, grads)
                if capturing:
                    self._graph_owned.append(value)  # for the graph only: the eager entry stays as it is
                    return value
                new = _Entry(value, grads, True)
                self._drop(entry)
                self._entries[key] = new  # same key: keeps its place in the eviction order
                return self._used(new, capturing, stream)
        value, patchable = build()
        self.builds += 1
        if capturing:
            self._graph_owned.append(value)  # read by the graph; the eager cache never sees it
            return value
        if patchable is None:
            return value
        new = _Entry(value, grads, bool(patchable))
        if entry is not None:
            self._drop(entry)
        self._entries[key] = new
        self._evict()
        return self._used(new, capturing, stream)

    def _used(self, entry: _Entry[T], capturing: bool, stream: Any) -> T:
        if capturing:
            entry.pinned = True
        if stream is not None:
            entry.streams.add(stream)
        return entry.value

    def _evict(self) -> None:
        while len(self._entries) > self.capacity:
            key = next((k for k, e in self._entries.items() if not e.pinned), None)
            if key is None:
                return  # everything is read by a captured graph
            self._release(self._entries.pop(key))

    def _drop(self, entry: _Entry[T]) -> None:
        if entry.pinned:
            self._graph_owned.append(entry.value)
        else:
            self._release(entry)

    def _release(self, entry: _Entry[T]) -> None:
        if entry.streams:
            record_streams(self._tensors_of(entry.value), entry.streams)
