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
    configs = [dm.DecodeMatmulConfig(block_n=b, block_k=128) for b in (16, 32, 80)]
    for name in ("qkv", "gate_up", "down"):  # 80 columns divide none of them
        rows = bench.bench(name, 16, configs, args)
        got = sorted(r["config"] for r in rows)
        assert got == ["bn16/bk128/w4/st4", "bn32/bk128/w4/st4", "xla"]
        assert all(r["matmul"] == name and r["rows"] == 16 and r["device_us"] > 0 for r in rows)
    # Without --sweep: the engine's tiles (decode_matmul.config_for).
    rows = bench.bench("down", 16, None, args)
    assert sorted(r["config"] for r in rows) == ["bn16/bk128/w4/st6", "xla"]
