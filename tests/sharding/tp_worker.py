"""Run the engine tensor-parallel on several CPU devices, in its own process: the device count
is fixed when jax starts (`--xla_force_host_platform_device_count`), so the test suite's
process, with one CPU device, runs this file as a child (test_tensor_parallel.py).

    python -m tests.sharding.tp_worker JOBS.json OUT.json

JOBS: a list of {"name", "folder" (null: the embedded default model), "tp", "backend",
"load_format", "orbax_dir", "cache_dir", "prompts"}.
OUT: per job name, what the engine did: each prompt's greedy tokens, the logprob of every
prompt token after the first and of every generated token, the decode matmul calls that
fused qkv (pallas-interpret-gpu), the shardings of the KV cache and the parameters, how much
of the forward's inputs its outputs alias, the executables loaded from the executable cache,
and (with "orbax_dir") what `save_orbax` says to a split model.
"""

from __future__ import annotations

import json
import os
import sys

NUM_DEVICES = 4  # tensor_parallel_size up to 4 (the first n devices)
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={NUM_DEVICES}"
)


def run(job: dict) -> dict:
    import jax

    from engine import LLM, SamplingParams
    from models.loader import load_model, save_orbax
    from pallas_kernels import decode_matmul

    folder = job["folder"]
    extra = {}
    if job.get("orbax_dir"):  # converted by a one-device model, loaded split
        save_orbax(load_model(folder, dtype="float32"), folder, job["orbax_dir"])
        split = load_model(folder, dtype="float32", tensor_parallel_size=job["tp"])
        try:
            save_orbax(split, folder, job["orbax_dir"] + "_split")
            extra["save_split_error"] = ""
        except ValueError as e:
            extra["save_split_error"] = str(e)
        folder = job["orbax_dir"]
    calls = []
    matmul = decode_matmul.matmul
    decode_matmul.matmul = lambda *a, **k: calls.append(k) or matmul(*a, **k)
    try:
        llm = LLM(
            folder,
            tensor_parallel_size=job["tp"],
            attention_backend=job.get("backend", "reference"),
            load_format=job.get("load_format", "auto"),
            skip_tokenizer_init=True,
            page_size=8,
            max_num_seqs=4,
            max_num_batched_tokens=32,
            max_model_len=128,
            num_pages=40,
            token_buckets=(32,),
            dtype="float32",
            compilation_cache_dir=job.get("cache_dir"),
        )
        params = SamplingParams(
            temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=1, prompt_logprobs=1
        )
        outs = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]], params)
        # Rows written before their step (logit bias, penalties, min_tokens' banned EOS):
        # on a mesh the launcher thread must make the write before the step reads the row.
        biased = SamplingParams(
            temperature=0.8,
            seed=5,
            max_tokens=6,
            min_tokens=4,
            repetition_penalty=1.5,
            logit_bias={7: 3.0, 11: 2.5},
        )
        biased_outs = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]], biased)
    finally:
        decode_matmul.matmul = matmul
    runner = llm.engine.runner
    state = jax.tree.unflatten(runner.model_def[1], runner.params)
    leaves = jax.tree_util.tree_leaves_with_path(state)
    kv = runner.kv_caches[0]
    return {
        "tokens": [o.outputs[0].token_ids for o in outs],
        "biased_tokens": [o.outputs[0].token_ids for o in biased_outs],
        "token_logprobs": [
            [
                e[t].logprob
                for t, e in zip(o.outputs[0].token_ids, o.outputs[0].logprobs, strict=True)
            ]
            for o in outs
        ],
        "prompt_logprobs": [
            [e[t].logprob for t, e in zip(p[1:], o.prompt_logprobs[1:], strict=True)]
            for p, o in zip(job["prompts"], outs, strict=True)
        ],
        "fused_qkv_calls": sum(k.get("qkv") is not None for k in calls),
        "matmul_calls": len(calls),
        "kv_spec": _spec(kv),
        "kv_shard_shape": list(kv.addressable_shards[0].data.shape),
        "kv_shape": list(kv.shape),
        "param_specs": {jax.tree_util.keystr(path): _spec(p) for path, p in leaves},
        "devices": len(jax.devices()),
        # The forward's buffers XLA updates in place (the donated cache and row state), and
        # the KV cache's bytes on one device.
        "forward_alias_bytes": min(
            exe.memory_analysis().alias_size_in_bytes for exe in runner._forward.values()
        ),
        "kv_bytes_per_device": sum(k.addressable_shards[0].data.nbytes for k in runner.kv_caches),
        "num_loaded": runner.num_loaded,  # executables found in the executable cache
        "num_executables": sum(
            len(t)
            for t in (runner._forward, runner._sampler, runner._prompt_lp, runner._row_writer)
        ),
        **extra,
    }


def _spec(array) -> list | None:
    """How `array` is split over the mesh (None: on one device)."""
    spec = getattr(array.sharding, "spec", None)
    return None if spec is None else list(spec)


def main() -> int:
    jobs_file, out_file = sys.argv[1:]
    with open(jobs_file) as f:
        jobs = json.load(f)
    results = {job["name"]: run(job) for job in jobs}
    with open(out_file, "w") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
