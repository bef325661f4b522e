"""The query-block table against a hand-worked batch."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from pallas_kernels import ragged_blocks as rb

# Request 0: 1 token at position 9; request 1: 5 tokens at positions 3..7; requests 2, 3 are
# padding; tokens 6, 7 are padding. block_q = block_kv = 4.
QUERY_START = jnp.array([0, 1, 6, 6, 6], jnp.int32)
KV_LENS = jnp.array([10, 8, 0, 0], jnp.int32)
NUM_SEQS = jnp.array([2], jnp.int32)


def _table(window):
    return np.asarray(
        rb.query_blocks(
            QUERY_START,
            KV_LENS,
            NUM_SEQS,
            num_tokens=8,
            block_q=4,
            block_kv=4,
            sliding_window=window,
        )
    )


def test_query_blocks_causal():
    table = _table(None)
    assert table.shape == (rb.num_query_blocks(8, 4, 4), rb.NUM_FIELDS) == (7, 6)
    cols = [rb.REQ, rb.TOK_START, rb.TOK_END, rb.KV_BLK_LO, rb.KV_BLK_HI]
    expected = [
        [0, 0, 1, 0, 3],  # keys 0..9: KV blocks 0, 1, 2
        [1, 1, 5, 0, 2],  # positions 3..6: keys 0..6
        [1, 5, 6, 0, 2],  # position 7
        [0, 6, 8, 0, 0],  # padding tokens: written as zeros, no KV
    ] + [[0, 0, 0, 0, 0]] * 3  # surplus blocks
    np.testing.assert_array_equal(table[:, cols], expected)
    np.testing.assert_array_equal(table[:3, rb.POS_START], [9, 3, 7])


def test_query_blocks_sliding_window_skips_old_kv_blocks():
    table = _table(3)
    # position 9 sees keys 7..9 (blocks 1, 2); position 3 sees 1..3; position 7 sees 5..7.
    np.testing.assert_array_equal(table[:3, rb.KV_BLK_LO], [1, 0, 1])
    np.testing.assert_array_equal(table[:3, rb.KV_BLK_HI], [3, 2, 2])


def test_token_rows_inverts_query_blocks():
    block, offset, valid = rb.token_rows(QUERY_START, NUM_SEQS, num_tokens=8, block_q=4)
    np.testing.assert_array_equal(block, [0, 1, 1, 1, 1, 2, 0, 0])
    np.testing.assert_array_equal(offset, [0, 0, 1, 2, 3, 0, 0, 0])
    np.testing.assert_array_equal(valid, [True] * 6 + [False] * 2)
