"""KV-cache page allocator: free list, reference counts, prefix cache (no JAX).

Every page except page 0 (the padding page, never handed out) is in exactly one of three sets:
  used       refcount > 0, owned by that many requests;
  cached     refcount 0 but holding a full page of known tokens, findable by its hash and
             reusable until evicted (least recently freed first);
  free       refcount 0 and holding nothing worth keeping.
A full page's hash chains the hash of the page before it with the page's tokens, so equal
hashes mean equal whole prefixes, not just equal pages.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence

from engine.types import Request

PAD_PAGE_ID = 0
_ROOT_HASH = b""


def hash_page(parent_hash: bytes, token_ids: Sequence[int]) -> bytes:
    """Chained hash of one full page: 128-bit blake2b of the parent hash and the page's tokens.

    A cryptographic digest rather than Python's `hash` because a collision would silently serve
    another prompt's KV; 128 bits make that negligible at any cache size.
    """
    data = parent_hash + array("q", token_ids).tobytes()
    return hashlib.blake2b(data, digest_size=16).digest()


class PageAllocator:
    """Owns the page ids of the KV cache (like nano-vllm's BlockManager, vLLM's KVCacheManager).

    The scheduler calls `get_computed_pages` then `allocate_slots` to admit a request,
    `allocate_slots` for each later step, `cache_full_pages` after a step computed tokens,
    and `free` when the request finishes or is preempted.
    """

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True) -> None:
        assert num_pages >= 2, "need the padding page and at least one usable page"
        assert page_size >= 1, f"page_size must be positive, got {page_size}"
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_pages
        self._free: deque[int] = deque(range(1, num_pages))
        self._cached: OrderedDict[int, None] = OrderedDict()  # LRU order, oldest first
        self._hash_to_page: dict[bytes, int] = {}
        self._page_hash: dict[int, bytes] = {}
        # Per request: chained hashes of its full pages so far (tokens never change, so these
        # stay valid) and how many of its leading pages are already registered in the cache.
        self._request_hashes: dict[str, list[bytes]] = {}
        self._num_registered: dict[str, int] = {}

    @property
    def num_usable_pages(self) -> int:
        """All pages but the padding page."""
        return self.num_pages - 1

    @property
    def num_free_pages(self) -> int:
        """Pages that can be handed out now: free plus cached-but-unreferenced."""
        return len(self._free) + len(self._cached)

    @property
    def num_cached_pages(self) -> int:
        """Unreferenced pages still findable by prefix hash."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of usable pages held by requests, in [0, 1]."""
        return 1.0 - self.num_free_pages / self.num_usable_pages

    def get_computed_pages(self, request: Request) -> tuple[list[int], int]:
        """Longest cached prefix of the request's tokens, as (page_ids, num_computed_tokens).

        Never covers every token: the last one is always left to compute, so its logits exist.
        Takes no references; pass the pages to `allocate_slots` in the same scheduling step.
        """
        if not self.enable_prefix_caching:
            return [], 0
        max_pages = (request.num_tokens - 1) // self.page_size
        hashes = self._hashes(request, max_pages)
        page_ids = []
        for page_hash in hashes[:max_pages]:
            page_id = self._hash_to_page.get(page_hash)
            if page_id is None:
                break
            page_ids.append(page_id)
        return page_ids, len(page_ids) * self.page_size

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        computed_page_ids: Sequence[int] = (),
        reserve: int = 0,
    ) -> bool:
        """Give the request pages for `num_new_tokens` more tokens; False (no change) if short.

        computed_page_ids: prefix hits from `get_computed_pages`, only when admitting a request
        that holds no pages yet; they are referenced and prepended to `request.page_ids`.
        reserve: pages that must stay free afterwards (False if they would not).
        """
        assert not computed_page_ids or not request.page_ids, "prefix hits only on admission"
        if not computed_page_ids and (
            request.num_computed_tokens + num_new_tokens <= len(request.page_ids) * self.page_size
        ):
            return True  # the pages held cover them (most decode steps): nothing to do
        num_computed = max(request.num_computed_tokens, len(computed_page_ids) * self.page_size)
        num_total_pages = -(-(num_computed + num_new_tokens) // self.page_size)
        num_needed = num_total_pages - len(request.page_ids) - len(computed_page_ids)
        # Touching an unreferenced cached hit takes it out of the pool that new pages come from.
        num_hits_in_pool = sum(1 for p in computed_page_ids if self._ref_counts[p] == 0)
        if num_needed + reserve > self.num_free_pages - num_hits_in_pool:
            return False
        for page_id in computed_page_ids:
            if self._ref_counts[page_id] == 0:
                del self._cached[page_id]
            self._ref_counts[page_id] += 1
        request.page_ids.extend(computed_page_ids)
        if computed_page_ids:
            self._num_registered[request.request_id] = len(computed_page_ids)
        for _ in range(num_needed):
            page_id = self._take_page()
            self._ref_counts[page_id] = 1
            request.page_ids.append(page_id)
        return True

    def cache_full_pages(self, request: Request) -> None:
        """Register the request's pages whose tokens are all computed, so others can reuse them.

        Call after `request.num_computed_tokens` advanced. A page whose hash is already cached
        (another request computed the same prefix at the same time) stays unregistered.
        """
        if not self.enable_prefix_caching:
            return
        # Only tokens the host knows can be hashed: not those still in flight on the device.
        num_known = min(request.num_computed_tokens, request.num_tokens)
        num_full = min(num_known // self.page_size, len(request.page_ids))
        start = self._num_registered.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = self._hashes(request, num_full)
        for index in range(start, num_full):
            page_id, page_hash = request.page_ids[index], hashes[index]
            if page_hash not in self._hash_to_page and page_id not in self._page_hash:
                self._hash_to_page[page_hash] = page_id
                self._page_hash[page_id] = page_hash
        self._num_registered[request.request_id] = num_full

    def free(self, request: Request) -> None:
        """Drop the request's references; its pages become free or cached. Clears page_ids.

        Pages are released last page first, so under LRU eviction a prompt's tail goes before its
        head, which more requests share.
        """
        for page_id in reversed(request.page_ids):
            assert self._ref_counts[page_id] > 0, f"double free of page {page_id}"
            self._ref_counts[page_id] -= 1
            if self._ref_counts[page_id] == 0:
                if page_id in self._page_hash:
                    self._cached[page_id] = None
                else:
                    self._free.append(page_id)
        request.page_ids.clear()
        self._request_hashes.pop(request.request_id, None)
        self._num_registered.pop(request.request_id, None)

    def reset_prefix_cache(self) -> None:
        """Forget every cached page (e.g. after new weights are loaded)."""
        for page_id in self._cached:
            self._free.append(page_id)
        self._cached.clear()
        self._hash_to_page.clear()
        self._page_hash.clear()
        self._num_registered.clear()

    def check_invariants(self, requests: Iterable[Request]) -> None:
        """Assert the page sets partition the pages and refcounts match `requests`' page lists.

        requests: every request currently holding pages (the scheduler's running ones).
        """
        owners = [0] * self.num_pages
        for request in requests:
            assert len(set(request.page_ids)) == len(request.page_ids), (
                f"request {request.request_id} holds a page twice: {request.page_ids}"
            )
            for page_id in request.page_ids:
                owners[page_id] += 1
        assert owners == self._ref_counts, "refcounts differ from the number of owning requests"
        assert self._ref_counts[PAD_PAGE_ID] == 0, "the padding page was handed out"
        free, cached = set(self._free), set(self._cached)
        used = {p for p in range(self.num_pages) if self._ref_counts[p] > 0}
        assert len(free) == len(self._free), "a page is twice in the free list"
        assert not (free & cached or free & used or cached & used), "page sets overlap"
        assert free | cached | used == set(range(1, self.num_pages)), "a page leaked"
        assert cached <= self._page_hash.keys(), "a cached page has no hash"
        assert all(self._hash_to_page[h] == p for p, h in self._page_hash.items()), "hash maps"
        assert len(self._hash_to_page) == len(self._page_hash), "hash maps differ in size"

    def _take_page(self) -> int:
        """A page for new content: from the free list, else evict the least recently used."""
        if self._free:
            return self._free.popleft()
        page_id, _ = self._cached.popitem(last=False)
        del self._hash_to_page[self._page_hash.pop(page_id)]
        return page_id

    def _hashes(self, request: Request, num_pages: int) -> list[bytes]:
        """Chained hashes of the request's first `num_pages` full pages (extends the memo)."""
        hashes = self._request_hashes.setdefault(request.request_id, [])
        size = self.page_size
        while len(hashes) < num_pages:
            index = len(hashes)
            tokens = request.token_ids_slice(index * size, (index + 1) * size)
            assert len(tokens) == size, "hashing a page that is not full"
            hashes.append(hash_page(hashes[-1] if hashes else _ROOT_HASH, tokens))
        return hashes
