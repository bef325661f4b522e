"""Unit tests of the page allocator: counts, refcounts, prefix cache, LRU eviction."""

from __future__ import annotations

import pytest

from engine.page_allocator import PAD_PAGE_ID, PageAllocator
from engine.sampling_params import SamplingParams
from engine.types import Request

PAGE_SIZE = 4


def make_request(request_id: str, prompt: list[int]) -> Request:
    return Request(request_id, list(prompt), SamplingParams(), arrival_time=0.0)


def compute_all(allocator: PageAllocator, request: Request) -> None:
    """Admit the request with its prefix hits and compute every token, as the scheduler would."""
    page_ids, num_hit = allocator.get_computed_pages(request)
    assert allocator.allocate_slots(request, request.num_tokens - num_hit, page_ids)
    request.num_computed_tokens = request.num_tokens
    allocator.cache_full_pages(request)


def test_allocate_slots_takes_ceil_pages() -> None:
    allocator = PageAllocator(num_pages=10, page_size=PAGE_SIZE)
    request = make_request("a", list(range(10)))
    assert allocator.allocate_slots(request, 10)
    assert len(request.page_ids) == 3  # ceil(10 / 4)
    request.num_computed_tokens = 10
    assert allocator.allocate_slots(request, 2)
    assert len(request.page_ids) == 3  # 12 tokens still fit in 3 pages
    request.num_computed_tokens = 12
    assert allocator.allocate_slots(request, 1)
    assert len(request.page_ids) == 4
    assert allocator.num_free_pages == 9 - 4
    allocator.check_invariants([request])


def test_padding_page_never_handed_out() -> None:
    allocator = PageAllocator(num_pages=5, page_size=PAGE_SIZE)
    request = make_request("a", list(range(16)))
    assert allocator.allocate_slots(request, 16)
    assert sorted(request.page_ids) == [1, 2, 3, 4]
    assert PAD_PAGE_ID not in request.page_ids
    assert allocator.usage == 1.0


def test_allocate_fails_without_change() -> None:
    allocator = PageAllocator(num_pages=4, page_size=PAGE_SIZE)
    a, b = make_request("a", list(range(8))), make_request("b", list(range(8)))
    assert allocator.allocate_slots(a, 8)
    assert not allocator.allocate_slots(b, 8)  # needs 2 pages, 1 left
    assert b.page_ids == []
    assert allocator.num_free_pages == 1
    allocator.check_invariants([a, b])


def test_free_returns_pages_and_double_free_asserts() -> None:
    allocator = PageAllocator(num_pages=6, page_size=PAGE_SIZE, enable_prefix_caching=False)
    request = make_request("a", list(range(9)))
    assert allocator.allocate_slots(request, 9)
    stale = list(request.page_ids)
    allocator.free(request)
    assert request.page_ids == [] and allocator.num_free_pages == 5 and allocator.usage == 0.0
    allocator.check_invariants([])
    request.page_ids = stale
    with pytest.raises(AssertionError, match="double free"):
        allocator.free(request)


def test_prefix_hit_on_full_pages_and_shared_refcount() -> None:
    allocator = PageAllocator(num_pages=10, page_size=PAGE_SIZE)
    a = make_request("a", list(range(10)))
    compute_all(allocator, a)
    b = make_request("b", list(range(8)) + [99, 98, 97])
    page_ids, num_hit = allocator.get_computed_pages(b)
    assert page_ids == a.page_ids[:2] and num_hit == 8
    assert allocator.allocate_slots(b, b.num_tokens - num_hit, page_ids)
    assert b.page_ids[:2] == a.page_ids[:2] and b.page_ids[2] not in a.page_ids
    allocator.check_invariants([a, b])  # shared pages have refcount 2
    allocator.free(a)
    allocator.check_invariants([b])
    assert set(b.page_ids[:2]).isdisjoint(allocator._cached)  # still used by b, not evictable


def test_hit_never_covers_whole_prompt() -> None:
    allocator = PageAllocator(num_pages=10, page_size=PAGE_SIZE)
    compute_all(allocator, make_request("a", list(range(8))))
    page_ids, num_hit = allocator.get_computed_pages(make_request("b", list(range(8))))
    assert num_hit == 4 and len(page_ids) == 1  # the last page is recomputed for logits


def test_hash_chains_the_prefix() -> None:
    allocator = PageAllocator(num_pages=10, page_size=PAGE_SIZE)
    compute_all(allocator, make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    # Same second page, different first page: no hit at all.
    assert allocator.get_computed_pages(make_request("b", [0, 2, 3, 4, 5, 6, 7, 8, 9])) == ([], 0)


def test_freed_pages_stay_reusable_until_evicted_lru() -> None:
    allocator = PageAllocator(num_pages=5, page_size=PAGE_SIZE)
    a, b = make_request("a", [1] * 4 + [0]), make_request("b", [2] * 4 + [0])
    compute_all(allocator, a)  # 2 pages, the first full
    compute_all(allocator, b)
    allocator.free(a)
    allocator.free(b)
    assert allocator.num_cached_pages == 2 and allocator.num_free_pages == 4
    # 3 fresh pages: 2 from the free list, then the least recently freed cached page (a's).
    c = make_request("c", [3] * 12)
    assert allocator.allocate_slots(c, 12)
    allocator.check_invariants([c])
    assert allocator.get_computed_pages(make_request("a2", [1] * 4 + [0]))[1] == 0
    assert allocator.get_computed_pages(make_request("b2", [2] * 4 + [0]))[1] == 4


def test_hit_on_cached_page_is_taken_out_of_the_pool() -> None:
    allocator = PageAllocator(num_pages=3, page_size=PAGE_SIZE)
    a = make_request("a", [1] * 4 + [0])
    compute_all(allocator, a)
    allocator.free(a)
    b = make_request("b", [1] * 4 + [5] * 5)
    page_ids, num_hit = allocator.get_computed_pages(b)
    assert num_hit == 4
    # Needs 2 new pages; 2 are "free" but one of them is the hit itself.
    assert not allocator.allocate_slots(b, 5, page_ids)
    assert allocator.allocate_slots(b, 4, page_ids)
    allocator.check_invariants([b])


def test_same_prefix_computed_twice_registers_once() -> None:
    allocator = PageAllocator(num_pages=10, page_size=PAGE_SIZE)
    a, b = make_request("a", list(range(6))), make_request("b", list(range(6)))
    for request in (a, b):  # both admitted before either computed: no hits
        assert allocator.allocate_slots(request, 6)
    for request in (a, b):
        request.num_computed_tokens = 6
        allocator.cache_full_pages(request)
    allocator.free(a)
    allocator.free(b)
    allocator.check_invariants([])
    assert allocator.num_cached_pages == 1 and allocator.num_free_pages == 9


def test_prefix_caching_off_never_hits() -> None:
    allocator = PageAllocator(num_pages=10, page_size=PAGE_SIZE, enable_prefix_caching=False)
    a = make_request("a", list(range(9)))
    compute_all(allocator, a)
    allocator.free(a)
    assert allocator.get_computed_pages(make_request("b", list(range(9)))) == ([], 0)
    assert allocator.num_cached_pages == 0


def test_reset_prefix_cache() -> None:
    allocator = PageAllocator(num_pages=10, page_size=PAGE_SIZE)
    a = make_request("a", list(range(9)))
    compute_all(allocator, a)
    allocator.free(a)
    allocator.reset_prefix_cache()
    allocator.check_invariants([])
    assert allocator.get_computed_pages(make_request("b", list(range(9)))) == ([], 0)
