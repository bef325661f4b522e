"""Random ragged batches for the kernel tests (numpy; no kernel code beyond the reference's
K/V write)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from pallas_kernels.attention import AttentionMetadata
from pallas_kernels.reference import write_kv_reference


@dataclasses.dataclass(frozen=True)
class Batch:
    q: jnp.ndarray  # [T, N, H]
    k: jnp.ndarray  # [T, K, H] this step's keys
    v: jnp.ndarray  # [T, K, H]
    kv_cache: jnp.ndarray  # [2, K, num_pages, S, H], random history (new slots not yet written)
    meta: AttentionMetadata


def make_batch(
    seed: int,
    q_lens: list[int],
    kv_lens: list[int],
    *,
    num_tokens: int,
    num_requests: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    pages_per_request: int,
    dtype=jnp.float32,
    num_pages: int | None = None,
) -> Batch:
    """A batch of len(q_lens) real requests padded to num_tokens / num_requests.

    Pages are drawn at random (a permuted page table) from 1..num_pages-1; page 0 is padding.
    Padding requests have q_len = 0, kv_len = 0, and an all-zero page-table row.
    """
    rng = np.random.default_rng(seed)
    num_seqs = len(q_lens)
    assert num_seqs <= num_requests and sum(q_lens) <= num_tokens
    assert all(q <= kv for q, kv in zip(q_lens, kv_lens, strict=True))
    assert max(kv_lens) <= pages_per_request * page_size
    needed = sum(-(-kv // page_size) for kv in kv_lens)
    num_pages = num_pages or needed + 3
    perm = rng.permutation(np.arange(1, num_pages))
    page_table = np.zeros((num_requests, pages_per_request), np.int32)
    slot_ids = np.zeros((num_tokens,), np.int32)  # padding tokens write page 0
    query_start = np.zeros((num_requests + 1,), np.int32)
    lens = np.zeros((num_requests,), np.int32)
    used = 0
    for r, (q_len, kv_len) in enumerate(zip(q_lens, kv_lens, strict=True)):
        n = -(-kv_len // page_size)
        page_table[r, :n] = perm[used : used + n]
        used += n
        query_start[r + 1] = query_start[r] + q_len
        lens[r] = kv_len
        pos = np.arange(kv_len - q_len, kv_len)
        slot_ids[query_start[r] : query_start[r + 1]] = (
            page_table[r, pos // page_size] * page_size + pos % page_size
        )
    query_start[num_seqs + 1 :] = query_start[num_seqs]

    def rand(*shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)

    return Batch(
        q=rand(num_tokens, num_heads, head_dim),
        k=rand(num_tokens, num_kv_heads, head_dim),
        v=rand(num_tokens, num_kv_heads, head_dim),
        kv_cache=rand(2, num_kv_heads, num_pages, page_size, head_dim),
        meta=AttentionMetadata(
            slot_ids=jnp.asarray(slot_ids),
            page_table=jnp.asarray(page_table),
            kv_lens=jnp.asarray(lens),
            query_start=jnp.asarray(query_start),
            num_seqs=jnp.asarray([num_seqs], jnp.int32),
        ),
    )


def kernel_args(batch: Batch) -> tuple:
    """The attention kernels' arguments for `batch`, its new K/V written into the cache by the
    reference write: (q, kv_cache, kv_lens, page_table, query_start, num_seqs)."""
    m = batch.meta
    kv = write_kv_reference(batch.kv_cache, batch.k, batch.v, m.slot_ids)
    return (batch.q, kv, m.kv_lens, m.page_table, m.query_start, m.num_seqs)
