"""Bucket ladders: the step shapes compiled at start-up."""

from __future__ import annotations

from engine.config import bucket_ladder


def test_bucket_ladder_doubles_up_to_the_largest():
    assert bucket_ladder(16, 256) == (16, 32, 64, 128, 256)
    assert bucket_ladder(16, 200) == (16, 32, 64, 128, 200)
    assert bucket_ladder(16, 1024, 4) == (16, 64, 256, 1024)


def test_bucket_ladder_midpoints_from_a_rung():
    assert bucket_ladder(16, 8192, midpoints_from=2048) == (
        16, 32, 64, 128, 256, 512, 1024, 2048, 3072, 4096, 6144, 8192,
    )  # fmt: skip
    # A midpoint at or past the largest rung is left out.
    assert bucket_ladder(16, 5000, midpoints_from=2048) == (
        16, 32, 64, 128, 256, 512, 1024, 2048, 3072, 4096, 5000,
    )  # fmt: skip
    assert bucket_ladder(16, 6144, midpoints_from=2048)[-3:] == (3072, 4096, 6144)
