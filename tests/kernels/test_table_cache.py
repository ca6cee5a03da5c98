"""The one table cache every backend uses (fastsgd/kernels/table_cache.py)."""
from __future__ import annotations

import pytest

from fastsgd.kernels.table_cache import TableCache


class FakeTensor:
    """Stands in for a CUDA tensor: records the streams it is marked for."""
    is_cuda = True

    def __init__(self, name):
        self.name, self.streams = name, []

    def record_stream(self, stream):
        self.streams.append(stream)


def _builder(log, patchable=True):
    def build():
        value = FakeTensor(f"t{len(log)}")
        log.append(value)
        return value, patchable
    return build


def _patch(log):
    def patch(old, grads):
        value = FakeTensor(f"{old.name}+{grads}")
        log.append(value)
        return value
    return patch


def test_key_without_grads_hits_and_patches_only_when_the_grads_fit():
    cache, built, patched = TableCache(4, tensors_of=lambda t: (t,)), [], []
    a = cache.get("k", (1, 2), _builder(built), patch=_patch(patched))
    assert cache.get("k", (1, 2), _builder(built), patch=_patch(patched)) is a and cache.builds == 1
    b = cache.get("k", (3, 4), _builder(built), patch=_patch(patched), fits=lambda: True)
    assert b.name == "t0+(3, 4)" and cache.builds == 1 and cache.patches == 1
    c = cache.get("k", (5, 6), _builder(built), patch=_patch(patched), fits=lambda: False)
    assert c is built[-1] and cache.builds == 2 and len(cache) == 1  # grads that do not fit: full build


def test_unpatchable_and_uncached_builds():
    cache, built = TableCache(4), []
    cache.get("k", (1,), _builder(built, patchable=False), patch=_patch([]))
    cache.get("k", (2,), _builder(built, patchable=False), patch=_patch([]))
    assert cache.builds == 2 and cache.patches == 0
    cache.get("once", (1,), _builder(built, patchable=None))
    assert len(cache) == 1  # patchable None: used once, never cached


def test_oldest_entry_is_evicted_and_released_for_the_streams_that_used_it():
    cache, built = TableCache(2, tensors_of=lambda t: (t,)), []
    cache.get("a", (), _builder(built), stream="side")
    cache.get("a", (), _builder(built), stream="main")  # a hit on another stream
    cache.get("b", (), _builder(built))
    cache.get("a", (), _builder(built))  # hits do not reorder: "a" is still the oldest
    cache.get("c", (), _builder(built))
    assert [v.name for v in cache.values()] == ["t1", "t2"]
    assert sorted(built[0].streams) == ["main", "side"]  # evicted: marked for every stream it ran on


def test_tables_used_during_capture_are_pinned():
    cache, built = TableCache(1, tensors_of=lambda t: (t,)), []
    a = cache.get("a", (), _builder(built), stream="s")
    cache.get("a", (), _builder(built), capturing=True)
    cache.get("b", (), _builder(built))  # over capacity, but "a" is read by a graph
    assert a in cache.values() and not a.streams
    cache.clear()
    assert len(cache) == 0 and a in cache._graph_owned and not a.streams  # still alive for the graph
    cache.clear(graphs=True)
    assert not cache._graph_owned


def test_tables_built_or_patched_during_capture_stay_out_of_the_eager_cache():
    """An eager step before the first replay must not read a table whose
    device copy only the graph writes."""
    cache, built, patched = TableCache(4), [], []
    g = cache.get("k", (1,), _builder(built), patch=_patch(patched), capturing=True)
    assert len(cache) == 0 and g in cache._graph_owned
    eager = cache.get("k", (1,), _builder(built), patch=_patch(patched))
    assert eager is not g and cache.builds == 2 and len(cache) == 1
    p = cache.get("k", (2,), _builder(built), patch=_patch(patched), capturing=True)
    assert p in cache._graph_owned and cache.values() == [eager]
    assert cache.get("k", (1,), _builder(built), patch=_patch(patched)) is eager


def test_a_pinned_table_replaced_by_a_patch_is_kept_for_its_graph():
    cache, built, patched = TableCache(4), [], []
    a = cache.get("k", (1,), _builder(built), patch=_patch(patched))
    cache.get("k", (1,), _builder(built), patch=_patch(patched), capturing=True)
    b = cache.get("k", (2,), _builder(built), patch=_patch(patched))
    assert cache.values() == [b] and a in cache._graph_owned


@pytest.mark.parametrize("capacity", [0, 1])
def test_capacity(capacity):
    cache = TableCache(capacity)
    for k in range(3):
        cache.get(k, (), _builder([]))
    assert len(cache) == capacity
