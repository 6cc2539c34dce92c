"""The page allocator and the prefix cache (host side; the pools themselves live on device).

Plain Python, no JAX (scheduler.py and the host-only tests load it without JAX). Pages are
ints in [0, num_pages); Z (page_size) tokens per page.

A page is in one of three states:
  free     on the free list, holds nothing anyone will read;
  in use   reference count >= 1: in the page table of that many running requests;
  cached   reference count 0 but registered in the prefix cache: kept, evictable (LRU).

A registered page is *pending* until its K/V are written (a prompt's pages are registered
when the request is admitted, so a second request with the same prefix waits for them
instead of computing them again); a pending page is never lent out, and one whose owner
leaves before writing it is dropped from the cache.

Prefix cache: a full page (page_size tokens) is keyed by (its parent's node id, its own
tokens), where the parent is the page holding the previous page_size tokens of the same
sequence (node 0 is the empty prefix). Keys compare tokens exactly, so a hit is never a
hash collision, and a key identifies the whole prefix up to that page. A request's prompt
is looked up page by page from the root; every hit is shared by reference count. Pages
are released last page first, so the LRU order evicts the tails of cached prefixes
before their heads (a head outliving its tail is still useful; the reverse is not).
"""
from __future__ import annotations

from collections import OrderedDict


class PagePool:
    def __init__(self, num_pages: int, page_size: int, prefix_cache: bool = True):
        self.num_pages, self.page_size, self.prefix_cache = num_pages, page_size, prefix_cache
        self.free = list(range(num_pages - 1, -1, -1))    # pop() hands out page 0 first
        self.refs = [0] * num_pages
        self.lru: OrderedDict = OrderedDict()             # cached pages with refs 0, oldest first
        self.node_of_page: dict = {}                      # cached page -> its node id
        self.page_of_key: dict = {}                       # (parent node, tokens) -> page
        self.key_of_page: dict = {}
        self.pending: set = set()                         # registered, not written yet
        self._next_node = 1
        self.in_use = 0                                   # pages with refs >= 1
        self.peak = 0                                     # most pages in use at once
        self.held_peak = 0                                # most pages in use or cached at once
        self.evictions = 0

    # ------------------------------------------------------------------ accounting
    @property
    def used(self) -> int:
        """Pages holding data: in use or cached."""
        return self.num_pages - len(self.free)

    @property
    def cached(self) -> int:
        """Pages registered in the prefix cache (in use or not)."""
        return len(self.node_of_page)

    @property
    def available(self) -> int:
        """Pages an allocation can get now: free ones plus evictable cached ones."""
        return len(self.free) + len(self.lru)

    # ------------------------------------------------------------------ allocation
    def alloc(self, n: int) -> list | None:
        """n pages (reference count 1 each), evicting least recently used cached pages when the
        free list runs out; None (and nothing taken) when even that is not enough."""
        if n > self.available:
            return None
        out = []
        for _ in range(n):
            if not self.free:
                self._evict()
            p = self.free.pop()
            self.refs[p] = 1
            out.append(p)
        self.in_use += n
        self.peak, self.held_peak = max(self.peak, self.in_use), max(self.held_peak, self.used)
        return out

    def _evict(self):
        page, _ = self.lru.popitem(last=False)
        self._unregister(page)
        self.free.append(page)
        self.evictions += 1

    def _unregister(self, page: int):
        del self.page_of_key[self.key_of_page.pop(page)]
        del self.node_of_page[page]
        self.pending.discard(page)

    def release(self, pages: list):
        """Drop one reference to each page, last page first (see the module docstring)."""
        for p in reversed(pages):
            self.refs[p] -= 1
            assert self.refs[p] >= 0, f"page {p} released more often than taken"
            if self.refs[p] == 0:
                self.in_use -= 1
                if p in self.pending:             # never written: nothing to keep
                    self._unregister(p)
                if p in self.node_of_page:
                    self.lru[p] = None
                    self.lru.move_to_end(p)
                else:
                    self.free.append(p)

    # ------------------------------------------------------------------ prefix cache
    def lookup(self, tokens, max_pages: int) -> tuple[list, int, bool]:
        """The cached pages that hold `tokens`' first full pages (at most max_pages), each
        taken (one more reference); returns (pages, node id of the last hit (0 for none),
        whether the next page is pending: being computed by a running request)."""
        if not self.prefix_cache:
            return [], 0, False
        Z, parent, pages = self.page_size, 0, []
        for i in range(max_pages):
            page = self.page_of_key.get((parent, tuple(tokens[i * Z:(i + 1) * Z])))
            if page is None:
                break
            if page in self.pending:
                return pages, parent, True
            if self.refs[page] == 0:
                del self.lru[page]
                self.in_use += 1
                self.peak = max(self.peak, self.in_use)
            self.refs[page] += 1
            pages.append(page)
            parent = self.node_of_page[page]
        return pages, parent, False

    def register(self, page: int, parent: int, tokens, written: bool = True) -> int:
        """Offer a full page (its page_size tokens follow prefix node `parent`) to the cache,
        pending until `mark_written` when not `written`. Returns the node id of that prefix:
        this page's, or that of an equal page already cached (then this page stays private
        and is freed with its request)."""
        if not self.prefix_cache:
            return 0
        key = (parent, tuple(tokens))
        have = self.page_of_key.get(key)
        if have is not None:
            return self.node_of_page[have]
        if page in self.node_of_page:        # already cached under another key: keep the first
            return self.node_of_page[page]
        node, self._next_node = self._next_node, self._next_node + 1
        self.page_of_key[key], self.key_of_page[page], self.node_of_page[page] = page, key, node
        if not written:
            self.pending.add(page)
        return node

    def mark_written(self, page: int):
        """The page's K/V are written (by a program already dispatched): it may be lent."""
        self.pending.discard(page)
