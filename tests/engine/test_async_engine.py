"""`AsyncEngine` with its engine in a thread, on a tiny random Llama: request ids, aborts from
another task, shutdown; and a failed start of the engine process."""

from __future__ import annotations

import asyncio

import pytest

from engine.async_engine import AsyncEngine, EngineDeadError
from engine.engine_core import EngineStartError
from engine.llm import build_engine_config
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.hf_models import write_checkpoint

LONG = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    folder = write_checkpoint("llama3", tmp_path_factory.mktemp("model"))
    config = build_engine_config(
        str(folder), skip_tokenizer_init=True, max_num_seqs=4, max_num_batched_tokens=32,
        max_model_len=128, token_buckets=(16, 32), num_pages=64, page_size=8, dtype="float32",
        compilation_cache_dir=None,
    )  # fmt: skip
    engine = AsyncEngine(engine=LLMEngine(config))
    yield engine
    engine.shutdown()


def test_duplicate_request_id_is_refused_and_the_first_runs_on(engine):
    async def scenario():
        first = engine.generate([5, 6, 7], LONG, "same")
        out = await anext(first)
        with pytest.raises(ValueError, match="already in use"):
            await anext(engine.generate([8, 9], LONG, "same"))
        tokens = list(out.outputs[0].token_ids)
        async for out in first:
            tokens += out.outputs[0].token_ids
        return tokens, out.outputs[0].finish_reason

    tokens, reason = asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    assert len(tokens) == 60 and reason == "length"


def test_abort_from_another_task_ends_the_stream(engine):
    """The stream gets the final "abort" output instead of waiting forever."""

    async def scenario():
        stream = engine.generate([5, 6, 7], LONG, "to-abort")
        await anext(stream)
        engine.abort("to-abort")
        outs = [out async for out in stream]
        return outs[-1]

    last = asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    assert last.finished and last.outputs[0].finish_reason == "abort"
    assert engine.stats().num_running == 0 and engine.stats().page_usage == 0.0


def test_shutdown_fails_new_requests(tmp_path):
    folder = write_checkpoint("llama3", tmp_path / "model")
    config = build_engine_config(
        str(folder), skip_tokenizer_init=True, max_num_seqs=2, max_num_batched_tokens=16,
        max_model_len=64, token_buckets=(16,), num_pages=16, page_size=8, dtype="float32",
        compilation_cache_dir=None,
    )  # fmt: skip
    engine = AsyncEngine(engine=LLMEngine(config))
    engine.shutdown()
    assert not engine.is_alive

    async def scenario():
        await anext(engine.generate([5], SamplingParams(max_tokens=2)))

    with pytest.raises(EngineDeadError):
        asyncio.run(asyncio.wait_for(scenario(), timeout=30))


def test_engine_process_start_failure_is_reported(tmp_path):
    with pytest.raises(EngineStartError, match="no-such-model"):
        AsyncEngine.in_process(
            str(tmp_path / "no-such-model"), {"skip_tokenizer_init": True, "max_model_len": 64}
        )
