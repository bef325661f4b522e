"""`pagejax bench throughput|latency` on a tiny checkpoint, and the pure arithmetic of the three
benchmarks (serve metrics, latency summary, arrivals, random prompts) against hand-computed
values. The serve client against live servers is in `test_bench_serve.py`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from api.bench.datasets import random_lengths, sample_random_requests
from api.bench.latency import latency_result
from api.bench.serve import StreamTimer, arrival_offsets
from api.bench.serve_metrics import (
    RequestResult,
    calculate_metrics,
    parse_goodput,
    result_dict,
)
from api.cli import main
from tests.hf_models import write_checkpoint

# One compiled bucket (T=32, R=4) keeps each engine start-up to ~15 s on the CPU.
SMALL_ENGINE = [
    "--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--max-model-len", "128",
    "--num-pages", "64", "--page-size", "8", "--token-buckets", "32", "--disable-tqdm",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama with no tokenizer (vocab 320)."""
    return write_checkpoint("llama2_tied", tmp_path_factory.mktemp("tiny") / "model")


def test_throughput_cli_writes_vllm_keys_with_consistent_counts(tiny_model, tmp_path):
    out = tmp_path / "throughput.json"
    argv = ["bench", "throughput", "--model", str(tiny_model), "--num-prompts", "6"]
    argv += ["--input-len", "16", "--output-len", "8", "--output-json", str(out), *SMALL_ENGINE]
    assert main(argv) == 0
    r = json.loads(out.read_text())
    vllm_keys = {
        "elapsed_time",
        "num_requests",
        "total_num_tokens",
        "requests_per_second",
        "tokens_per_second",
    }
    assert vllm_keys | {"output_tokens_per_second", "startup_time"} <= r.keys()
    assert r["num_requests"] == 6
    assert (r["num_prompt_tokens"], r["num_output_tokens"]) == (6 * 16, 6 * 8)
    assert r["total_num_tokens"] == 6 * (16 + 8)
    assert r["requests_per_second"] == pytest.approx(6 / r["elapsed_time"])
    assert r["tokens_per_second"] == pytest.approx(6 * 24 / r["elapsed_time"])
    assert r["output_tokens_per_second"] == pytest.approx(6 * 8 / r["elapsed_time"])
    assert r["startup_time"] > 0 and r["device"] and r["jax_version"]


def test_latency_cli_writes_vllm_keys_with_consistent_summary(tiny_model, tmp_path):
    out = tmp_path / "latency.json"
    argv = ["bench", "latency", "--model", str(tiny_model), "--batch-size", "3"]
    argv += ["--input-len", "12", "--output-len", "6", "--num-iters-warmup", "1"]
    argv += ["--num-iters", "4", "--output-json", str(out), *SMALL_ENGINE]
    assert main(argv) == 0
    r = json.loads(out.read_text())
    lat = r["latencies"]
    assert len(lat) == 4 and all(x > 0 for x in lat)
    assert r["avg_latency"] == pytest.approx(np.mean(lat))
    assert list(r["percentiles"]) == ["10", "25", "50", "75", "90", "99"]
    assert r["percentiles"]["50"] == pytest.approx(np.median(lat))
    assert list(r["percentiles"].values()) == sorted(r["percentiles"].values())
    assert 0 < r["avg_ttft"] < r["avg_latency"]
    assert r["avg_ms_per_output_token"] == pytest.approx(r["avg_latency"] * 1000 / 6)
    assert r["output_tokens_per_second"] == pytest.approx(3 * 6 / r["avg_latency"])


def test_offline_bench_rejects_requests_longer_than_max_model_len(tiny_model, capsys):
    argv = ["bench", "throughput", "--model", str(tiny_model), "--num-prompts", "1"]
    argv += ["--input-len", "100", "--output-len", "40", *SMALL_ENGINE]
    assert main(argv) == 2
    assert "exceeds max_model_len 128" in capsys.readouterr().err


def test_latency_result_hand_computed():
    r = latency_result([1.0, 2.0, 3.0, 4.0], [0.1, 0.2, 0.3, 0.4], batch_size=2, output_len=11)
    assert r["avg_latency"] == 2.5
    assert r["percentiles"][50] == 2.5 and r["percentiles"][10] == pytest.approx(1.3)
    assert r["avg_ttft"] == pytest.approx(0.25)
    # (latency - ttft) / 10 decode steps: 90, 180, 270, 360 ms -> mean 225 ms.
    assert r["avg_ms_per_decode_step"] == pytest.approx(225.0)
    assert r["avg_ms_per_output_token"] == pytest.approx(2500 / 11)
    assert r["output_tokens_per_second"] == pytest.approx(22 / 2.5)


# Two successful requests and one failure over a 2 s run (times in seconds).
# A: sent at 0.0, first chunk at 0.1, then gaps .05 .05 .1 .1 -> ends at 0.4, 5 tokens.
# B: sent at 0.4 (the instant A ends), one token at 0.6.
REQUEST_A = RequestResult(True, 10, 5, ttft=0.1, itl=(0.05, 0.05, 0.1, 0.1), latency=0.4)
REQUEST_B = RequestResult(True, 20, 1, ttft=0.2, latency=0.2, start_time=0.4)
FAILED = RequestResult(False, 30, error="HTTP 500")


def test_serve_metrics_hand_computed():
    m = calculate_metrics([REQUEST_A, REQUEST_B, FAILED], 2.0, [50, 99], {})
    assert (m.completed, m.failed, m.total_input, m.total_output) == (2, 1, 30, 6)
    assert m.output_lens == (5, 1, 0)
    assert m.request_throughput == 1.0
    assert m.output_throughput == 3.0
    assert m.total_token_throughput == 18.0
    ttft, tpot, itl, e2el = (m.stats[k] for k in ("ttft", "tpot", "itl", "e2el"))
    assert (ttft.mean, ttft.median, ttft.std) == pytest.approx((150, 150, 50))
    assert ttft.percentiles[1] == (99, pytest.approx(199.0))  # linear: 100 + .99 * 100
    # TPOT only over requests with > 1 token: (0.4 - 0.1) / 4 = 75 ms.
    assert (tpot.mean, tpot.std) == pytest.approx((75, 0))
    assert (itl.mean, itl.median) == pytest.approx((75, 75))
    assert (e2el.mean, e2el.std) == pytest.approx((300, 100))
    # A's chunks at .1 .15 .2 .3 .4 and B's at .6 all fall in second 0; A ends as B starts.
    assert (m.max_output_tokens_per_s, m.max_concurrent_requests) == (6.0, 1)


@pytest.mark.parametrize(
    ("slos", "num_good"),
    [
        ({"ttft": 150}, 1),  # A (100 ms) meets it, B (200 ms) does not
        ({"ttft": 100}, 1),  # equal to the SLO counts as met
        ({"ttft": 250, "tpot": 80}, 2),  # B's single token counts as TPOT 0
        ({"ttft": 250, "tpot": 70}, 1),  # A's TPOT is 75 ms
        ({"e2el": 300}, 1),  # A 400 ms, B 200 ms
        ({"ttft": 50}, 0),
    ],
)
def test_goodput_counts_requests_meeting_every_slo(slos, num_good):
    m = calculate_metrics([REQUEST_A, REQUEST_B, FAILED], 2.0, [99], slos)
    assert m.request_goodput == num_good / 2.0


def test_serve_result_has_vllm_keys():
    results = [REQUEST_A, REQUEST_B, FAILED]
    m = calculate_metrics(results, 2.0, [50, 99.9], {})
    r = result_dict(m, results, 2.0, ["ttft", "tpot", "itl", "e2el"], goodput_given=False)
    assert r["request_goodput"] is None
    for name in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std", "p50", "p99.9"):
            assert f"{stat}_{name}_ms" in r
    assert r["mean_ttft_ms"] == pytest.approx(150)
    assert r["input_lens"] == [10, 20, 30] and r["output_lens"] == [5, 1, 0]
    assert r["errors"] == ["", "", "HTTP 500"]
    assert r["itls"][0] == [0.05, 0.05, 0.1, 0.1]
    assert json.loads(json.dumps(r)) == r
    only_ttft = result_dict(m, results, 2.0, ["ttft"], goodput_given=True)
    assert "mean_tpot_ms" not in only_ttft and only_ttft["request_goodput"] == 0.0


def test_parse_goodput():
    assert parse_goodput(["ttft:500", "tpot:12.5"]) == {"ttft": 500.0, "tpot": 12.5}
    assert parse_goodput(None) == {}
    for bad in ("itl:5", "ttft", "ttft:-1", "ttft:fast"):
        with pytest.raises(ValueError, match="--goodput"):
            parse_goodput([bad])


def test_stream_timer_times_content_chunks_and_reads_usage():
    timer = StreamTimer(start=10.0)
    chunk = lambda text: "data: " + json.dumps({"choices": [{"index": 0, "text": text}]})
    usage = {"prompt_tokens": 9, "completion_tokens": 3}
    lines = [(": ping", 10.1), (chunk("a"), 10.5), ("", 10.6), (chunk("b"), 10.7)]
    lines += [(chunk("c"), 11.0), ("data: " + json.dumps({"choices": [], "usage": usage}), 11.5)]
    lines += [("data: [DONE]", 11.6)]
    for line, now in lines:
        timer.feed(line, now)
    r = timer.result(prompt_len=8, tokenizer=None)
    assert r.success and r.generated_text == "abc"
    assert r.ttft == pytest.approx(0.5) and r.latency == pytest.approx(1.0)  # last content chunk
    assert r.itl == pytest.approx((0.2, 0.3))
    assert (r.prompt_len, r.output_tokens) == (9, 3)
    no_usage = StreamTimer(start=0.0)
    no_usage.feed(chunk("x"), 1.0)
    no_usage.feed(chunk("y"), 2.0)
    assert no_usage.result(4, tokenizer=None).output_tokens == 2  # one chunk per token
    assert not StreamTimer(start=0.0).result(4, tokenizer=None).success


def test_arrival_offsets():
    rng = np.random.default_rng(0)
    assert arrival_offsets(rng, 5, math.inf, 1.0).tolist() == [0.0] * 5
    offsets = arrival_offsets(rng, 2000, 50.0, 1.0)
    assert offsets[-1] == pytest.approx(2000 / 50.0)  # rescaled to n / rate, as vLLM
    gaps = np.diff(offsets)
    assert (gaps >= 0).all()
    # Exponential gaps (Poisson arrivals): the standard deviation equals the mean.
    assert np.std(gaps) == pytest.approx(np.mean(gaps), rel=0.1)
    uniform = np.diff(arrival_offsets(rng, 2000, 50.0, 100.0))
    assert np.std(uniform) < 0.2 * np.mean(uniform)  # high burstiness: near-even spacing


def test_random_requests_lengths_and_ids():
    rng = np.random.default_rng(0)
    lengths = random_lengths(rng, 100, 0.25, 5000)
    assert min(lengths) == 75 and max(lengths) == 125
    assert random_lengths(rng, 7, 0.0, 3) == [7, 7, 7]
    with pytest.raises(ValueError, match="range-ratio"):
        random_lengths(rng, 7, 1.0, 3)
    reqs = sample_random_requests(rng, num_prompts=4, input_len=16, output_len=8, vocab_size=50)
    assert [(len(r.prompt), r.prompt_len, r.expected_output_len) for r in reqs] == [(16, 16, 8)] * 4
    assert all(0 <= t < 50 for r in reqs for t in r.prompt)


def test_random_text_prompts_reencode_to_their_length():
    from models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(None)  # the default model's (SmolLM2, vocab 49152)
    rng = np.random.default_rng(0)
    reqs = sample_random_requests(
        rng, num_prompts=8, input_len=40, output_len=8, range_ratio=0.5, tokenizer=tokenizer
    )
    for r in reqs:
        assert isinstance(r.prompt, str) and 20 <= r.prompt_len <= 60
        assert len(tokenizer.encode(r.prompt, add_special_tokens=False)) == r.prompt_len
