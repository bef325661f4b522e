"""`scripts/bench_decode_matmul.py` end to end on the CPU, shrunk: each matmul's entries (XLA's
fusion and the Pallas kernel, here in interpret mode) compile, run on rotating weights and give
one row each."""

from __future__ import annotations

import argparse
import functools

from pallas_kernels import gpu_decode_matmul as dm
from tests.scripts import SCRIPTS, load_script


def test_bench_rows(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))  # it imports bench_kernels as a sibling
    bench = load_script("bench_decode_matmul")
    monkeypatch.setattr(
        bench,
        "SHAPES",
        {"qkv": (256, 192, True, False, False), "gate_up": (256, 256, True, False, True),
         "down": (512, 128, False, True, False)},
    )  # fmt: skip
    monkeypatch.setattr(
        bench.dm, "decode_matmul", functools.partial(dm.decode_matmul, interpret=True)
    )
    args = argparse.Namespace(inner=2, reps=1, sweep=False)
    cfg = dm.DecodeMatmulConfig(block_n=32, block_k=128)
    for name, label in (("qkv", "bn32/bk128"), ("gate_up", "bn128/bk128"), ("down", "bn32/bk128")):
        # The gate/up pair fixes the columns: two configs differing in block_n are one.
        configs = [cfg, dm.DecodeMatmulConfig(block_n=16, block_k=128)]
        rows = bench.bench(name, 16, configs, args)
        got = sorted(r["config"] for r in rows)
        want = ["bn16/bk128/w4/st4", "bn32/bk128/w4/st4"] if name != "gate_up" else []
        assert got == sorted([*(want or [f"{label}/w4/st4"]), "xla"])
        assert all(r["matmul"] == name and r["rows"] == 16 and r["device_us"] > 0 for r in rows)
    # Without --sweep: the engine's tiles (decode_matmul.config_for).
    rows = bench.bench("down", 16, None, args)
    assert sorted(r["config"] for r in rows) == ["bn32/bk256/w4/st4", "xla"]
