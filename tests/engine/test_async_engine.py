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
    assert engine.stats()[0].num_running == 0 and engine.stats()[0].page_usage == 0.0


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


@pytest.mark.parametrize(
    ("visible", "rank", "per_engine", "want"),
    [
        (None, 0, 1, "0"),
        (None, 1, 2, "2,3"),
        ("4,5,6,7", 1, 2, "6,7"),
        ("GPU-a,GPU-b", 1, 1, "GPU-b"),
    ],
)
def test_each_data_parallel_engine_gets_its_own_gpus(visible, rank, per_engine, want):
    from engine.async_engine import data_parallel_env

    environ = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    assert data_parallel_env(rank, per_engine, environ) == {"CUDA_VISIBLE_DEVICES": want}


def test_too_few_visible_gpus_for_data_parallelism_is_a_clear_error():
    from engine.async_engine import data_parallel_env

    with pytest.raises(ValueError, match="needs GPUs 4-5 of CUDA_VISIBLE_DEVICES='0,1,2,3'"):
        data_parallel_env(2, 2, {"CUDA_VISIBLE_DEVICES": "0,1,2,3"})


@pytest.mark.parametrize(
    ("platforms", "error"),
    [
        ({0: "gpu", 1: "gpu"}, None),
        ({1: "gpu"}, None),  # engine 1 named its platform first
        ({0: "gpu", 1: "cpu"}, "engine 1 runs on cpu, engine 0 on gpu"),
        ({1: "cpu", 2: "gpu"}, "engine 2 runs on gpu, engine 1 on cpu"),
        ({0: "tpu"}, "not built for TPUs"),  # said as soon as engine 0 names it
    ],
)
def test_data_parallel_engines_must_share_a_platform(platforms, error):
    from engine.async_engine import _check_platforms

    if error is None:
        _check_platforms(platforms, 3)
    else:
        with pytest.raises(EngineStartError, match=error):
            _check_platforms(platforms, 3)
    _check_platforms({0: "tpu"}, 1)  # one engine runs anywhere


@pytest.mark.parametrize(
    "environ",
    [
        {"JAX_PLATFORMS": "cpu"},
        {"CUDA_VISIBLE_DEVICES": ""},
        {"CUDA_VISIBLE_DEVICES": "-1", "JAX_PLATFORMS": "cuda,cpu"},
    ],
)
def test_data_parallel_engines_off_the_gpus_keep_their_environment(environ):
    """GPUs hidden, or JAX kept off them: nothing to hand out (and no error)."""
    from engine.async_engine import data_parallel_env

    assert data_parallel_env(3, 2, environ) == {}
