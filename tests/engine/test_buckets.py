"""engine/buckets.py: which request buckets each token bucket compiles with, and which
kernel twin a step runs on."""

from __future__ import annotations

from engine import LLM, SamplingParams, buckets
from engine.buckets import Buckets
from engine.config import CompileConfig, EngineConfig, SchedulerConfig, bucket_ladder
from engine.step_input import StepLayout
from pallas_kernels import attention
from tests.engine.test_engine import ENGINE_ARGS
from tests.hf_models import hf_greedy, write_checkpoint


def test_small_token_buckets_compile_one_request_bucket():
    """Below SPLIT_REQUESTS_FROM tokens, one R bucket holds every request a step can have;
    from it on, also the rungs within [T / 4, T]."""

    def plan(max_num_seqs: int, request_buckets: tuple[int, ...] = ()) -> Buckets:
        config = EngineConfig(
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs),
            compile=CompileConfig(request_buckets=request_buckets),
        )
        return Buckets(config, platform="gpu", pages_per_request=4, kernel_twins=False)

    gpu = plan(256)
    assert gpu.request_buckets == bucket_ladder(8, 256)  # the GPU's default ladder
    split = {t: gpu.request_buckets_for(t) for t in (16, 32, 64, 128, 512, 8192)}
    assert split == {
        16: (16,),
        32: (32,),
        64: (64,),
        128: (32, 64, 128),
        512: (128, 256),
        8192: (256,),
    }
    assert plan(8).request_buckets_for(16) == (8,)
    # A sparse ladder of the user's, whose one holding rung is past T, keeps its small rungs.
    assert plan(256, (8, 256)).request_buckets_for(16) == (8, 256)


def test_twinned_buckets_pick_the_kernel_by_the_steps_requests(monkeypatch, tmp_path):
    """With kernel twins (auto on Hopper), every bucket of MGPU_MIN_STEP_TOKENS tokens or more
    compiles once per GPU attention kernel, and each step gets the Mosaic GPU one when it is
    long prompt chunks (at most one request per 16 tokens), counted on its actual requests,
    not its bucket's padded R. Here with the reference attention, which ignores the pick,
    the threshold lowered to 32 tokens (the 64-token bucket): the greedy tokens still match
    transformers."""
    monkeypatch.setattr(buckets, "wants_kernel_twins", lambda *a: True)
    monkeypatch.setattr(attention, "MGPU_MIN_STEP_TOKENS", 32)
    folder = write_checkpoint("llama3", tmp_path / "llama3")
    args = dict(ENGINE_ARGS, attention_backend="reference")  # the kernels' on no platform
    llm = LLM(str(folder), num_pages=64, compilation_cache_dir=False, **args)
    runner = llm.engine.runner
    assert sorted(runner._forward, key=str) == sorted(
        [StepLayout(16, 8, 64), StepLayout(64, 8, 64, "mgpu"), StepLayout(64, 8, 64, "triton")],
        key=str,
    )
    # Lowering the Mosaic kernel is slow: its twins are lowered after every other executable.
    assert [job.key for job in runner._jobs()][-1:] == [StepLayout(64, 8, 64, "mgpu")]
    picked = []
    layout_for = runner.buckets.layout_for
    monkeypatch.setattr(
        runner.buckets, "layout_for", lambda s: picked.append(layout_for(s)) or picked[-1]
    )
    greedy = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    prompt = list(range(3, 63))
    assert llm.generate([prompt], greedy)[0].outputs[0].token_ids == hf_greedy(folder, prompt, 3)
    assert [lay.attention for lay in picked] == ["mgpu", None, None]  # the prompt, 2 decodes
    picked.clear()
    prompts = [list(range(3 + i, 13 + i)) for i in range(5)]  # 50 tokens of 5 requests
    outs = llm.generate(prompts, greedy)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(folder, p, 3) for p in prompts]
    assert picked[0].attention == "triton"
