"""PagePool (kvjax/engine/pages.py), the engine's page allocator and prefix cache, on the host
alone: no model, no JAX arrays, milliseconds.

Oracle: the pool's own contract, checked after every operation by `check`: each page is in
exactly one state (free, in use with refs >= 1, cached with refs 0 in the LRU), counters
agree with the states, the prefix-cache maps are one bijection, and a pending page is never
lent; plus a shadow model of who holds which page (the references the caller took), which
the pool's counts must equal. Hand-worked cases pin the LRU order (tails of a prefix before
its head), pending pages and duplicate registration.
"""
from collections import Counter

import pytest
from hypothesis import given, settings, strategies as st

from kvjax.engine.pages import PagePool


def check(pool: PagePool, held: list | None = None):
    """Every invariant of the pool; `held`: the page lists the caller holds (one reference
    per occurrence), which must be exactly the pool's reference counts."""
    P = pool.num_pages
    free, lru = pool.free, list(pool.lru)
    in_use = [p for p in range(P) if pool.refs[p] > 0]
    assert min(pool.refs) >= 0
    assert len(set(free)) == len(free) and set(free).isdisjoint(lru) and set(free).isdisjoint(in_use)
    assert set(lru).isdisjoint(in_use)
    assert sorted(free + lru + in_use) == list(range(P))          # one state per page
    assert pool.in_use == len(in_use) and pool.used == P - len(free)
    assert pool.available == len(free) + len(lru)
    assert pool.peak >= pool.in_use and pool.held_peak >= pool.used
    # the prefix cache: one bijection key <-> page, node ids unique, cached pages off the free list
    assert set(pool.key_of_page) == set(pool.node_of_page)
    assert {pool.page_of_key[k]: k for k in pool.page_of_key} == pool.key_of_page
    assert len(set(pool.node_of_page.values())) == len(pool.node_of_page)
    assert set(lru) <= set(pool.node_of_page) and set(free).isdisjoint(pool.node_of_page)
    assert pool.pending <= set(pool.node_of_page) and pool.pending.isdisjoint(lru)
    assert pool.cached == len(pool.node_of_page)
    if not pool.prefix_cache:
        assert not pool.node_of_page and not lru
    if held is not None:
        counts = Counter(p for pages in held for p in pages)
        assert all(pool.refs[p] == counts.get(p, 0) for p in range(P))


def register_all(pool, pages, tokens, written=True, parent=0):
    """Register a sequence's full pages (tokens: page_size per page) from the root; node ids."""
    Z, nodes = pool.page_size, []
    for i, page in enumerate(pages):
        parent = pool.register(page, parent, tokens[i * Z:(i + 1) * Z], written)
        nodes.append(parent)
    return nodes


def test_alloc_and_release():
    pool = PagePool(4, 2)
    a = pool.alloc(3)
    assert a == [0, 1, 2] and pool.in_use == 3 and pool.available == 1
    assert pool.alloc(2) is None and pool.in_use == 3                   # nothing taken on failure
    check(pool, [a])
    pool.release(a)
    assert pool.in_use == 0 and pool.used == 0 and pool.peak == 3
    check(pool, [])
    with pytest.raises(AssertionError, match="released more often"):
        pool.release([0])


def test_prefix_hit_shares_pages_and_keys_include_the_parent():
    pool = PagePool(8, 2)
    toks = [1, 2, 3, 4, 5, 6]
    a = pool.alloc(3)
    nodes = register_all(pool, a, toks)
    hits, node, pending = pool.lookup(toks + [7], 3)
    assert (hits, node, pending) == (a, nodes[-1], False)
    assert [pool.refs[p] for p in a] == [2, 2, 2]
    check(pool, [a, hits])
    # the same page of tokens after another prefix is another key: no hit
    assert pool.lookup([9, 9, 3, 4], 2)[0] == []
    # a lookup stops at the first miss, and at max_pages
    more, _, _ = pool.lookup([1, 2, 3, 9, 5, 6], 3)
    assert more == a[:1]
    capped, _, _ = pool.lookup(toks, 2)
    assert capped == a[:2]
    pool.release(a)
    pool.release(hits)
    pool.release(more)
    pool.release(capped)
    assert pool.in_use == 0 and pool.cached == 3 and list(pool.lru) == [a[2], a[1], a[0]]
    check(pool, [])


def test_lru_evicts_tails_before_heads_and_hits_refresh():
    pool = PagePool(6, 2)
    x, y = pool.alloc(3), pool.alloc(3)
    register_all(pool, x, [1, 1, 2, 2, 3, 3])
    register_all(pool, y, [4, 4, 5, 5, 6, 6])
    pool.release(x)                     # x's pages cached: tail first in the LRU
    pool.release(y)
    assert list(pool.lru) == [x[2], x[1], x[0], y[2], y[1], y[0]]
    # a hit on x's head takes it out of the LRU; released again it is the most recent
    h, _, _ = pool.lookup([1, 1, 9, 9], 1)
    assert h == [x[0]]
    pool.release(h)
    assert list(pool.lru)[-1] == x[0]
    # allocating past the free list evicts the oldest cached pages: x's tail, then y's
    got = pool.alloc(3)
    assert set(got) == {x[2], x[1], y[2]} and pool.evictions == 3
    assert pool.lookup([1, 1, 2, 2], 2)[0] == [x[0]]          # x's head survives its tail
    check(pool, [got, [x[0]]])


def test_pending_pages_are_not_lent_and_dropped_when_unwritten():
    pool = PagePool(6, 2)
    a = pool.alloc(2)
    register_all(pool, a, [1, 2, 3, 4], written=False)
    hits, node, pending = pool.lookup([1, 2, 3, 4, 5], 2)
    assert (hits, node, pending) == ([], 0, True)
    pool.mark_written(a[0])
    hits, _, pending = pool.lookup([1, 2, 3, 4, 5], 2)
    assert hits == [a[0]] and pending                         # the written head, then a pending page
    check(pool, [a, hits])
    pool.release(hits)
    pool.release(a)                                           # a[1] never written: not kept
    assert a[1] in pool.free and a[1] not in pool.node_of_page and pool.cached == 1
    check(pool, [])


def test_duplicate_registration_keeps_the_first_page():
    pool = PagePool(4, 2)
    a, b = pool.alloc(1), pool.alloc(1)
    n1 = pool.register(a[0], 0, [7, 7])
    assert pool.register(b[0], 0, [7, 7]) == n1             # the same prefix node
    assert pool.register(a[0], 0, [8, 8]) == n1             # a page keeps its first key
    pool.release(b)
    pool.release(a)
    assert b[0] in pool.free and list(pool.lru) == a
    check(pool, [])


def test_without_prefix_cache_nothing_is_kept():
    pool = PagePool(4, 2, prefix_cache=False)
    a = pool.alloc(2)
    assert pool.register(a[0], 0, [1, 2]) == 0
    assert pool.lookup([1, 2, 3], 1) == ([], 0, False)
    pool.release(a)
    assert pool.used == 0 and pool.cached == 0
    check(pool, [])


OPS = st.lists(st.tuples(st.sampled_from(["alloc", "release", "lookup", "register", "write"]),
                         st.integers(0, 7), st.lists(st.integers(0, 2), min_size=1, max_size=12)),
               max_size=40)


@settings(derandomize=True, max_examples=300, deadline=None)
@given(num_pages=st.integers(1, 10), page_size=st.integers(1, 3), prefix_cache=st.booleans(), ops=OPS)
def test_random_operations_keep_every_invariant_and_leak_nothing(num_pages, page_size, prefix_cache, ops):
    """Random alloc / release / lookup / register / mark_written over a tiny alphabet (so
    prefixes repeat); after each, the invariants and the shadow references hold; at the end,
    releasing everything leaves only cached pages, and a full allocation evicts them all."""
    pool = PagePool(num_pages, page_size, prefix_cache)
    held = []                                   # (pages, their tokens) the caller holds
    for op, i, toks in ops:
        if op == "alloc":
            got = pool.alloc(i % 4)
            if got is not None:
                held.append((got, toks))
        elif op == "lookup":
            pages, _, _ = pool.lookup(toks, len(toks) // page_size)
            held.append((pages, toks))
        elif held and op == "release":
            pool.release(held.pop(i % len(held))[0])
        elif held and op in ("register", "write"):
            pages, t = held[i % len(held)]
            full = min(len(pages), len(t) // page_size)
            register_all(pool, pages[:full], t, written=op == "write")
            if op == "write":
                for p in pages[:full]:
                    pool.mark_written(p)
        check(pool, [p for p, _ in held])
    for pages, _ in held:
        pool.release(pages)
    check(pool, [])
    assert pool.in_use == 0 and pool.used == pool.cached and not pool.pending
    everything = pool.alloc(num_pages)
    assert sorted(everything) == list(range(num_pages)) and pool.cached == 0
    pool.release(everything)
    assert pool.used == 0
    check(pool, [])
