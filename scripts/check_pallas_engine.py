"""Engine output with the Pallas attention backend against the reference backend, on the current
device: greedy tokens of a tiny random Llama (fp32) and, with --big, Llama-3.1-8B-shaped dummy
bf16 weights, teacher-forced over the reference's first 64 tokens of 8 prompts, against float32 (see
`_teacher_forced`), and over 16 tokens of 4 prompts of 300-2,100 tokens in 4,096-token steps
(under `PAGEJAX_GPU_ATTENTION=auto`, the default, set here in case the caller's environment
says otherwise: the Mosaic GPU kernel on Hopper, dispatch.py). Prints
one JSON line per case; exits 1 on a mismatch.

    python scripts/check_pallas_engine.py [--big scripts/configs/llama-3.1-8b]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np


def _run(model: str, backend: str, prompts, max_tokens: int, **kw) -> list[list[int]]:
    from engine import LLM, SamplingParams

    llm = LLM(model, attention_backend=backend, skip_tokenizer_init=True, **kw)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    del llm
    return [o.outputs[0].token_ids for o in outs]


def _compare(name: str, model: str, prompts, max_tokens: int, **kw) -> bool:
    ref = _run(model, "reference", prompts, max_tokens, **kw)
    got = _run(model, "pallas", prompts, max_tokens, **kw)
    same = [a == b for a, b in zip(ref, got, strict=True)]
    first_diff = [
        next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
        for a, b in zip(ref, got, strict=True)
    ]
    print(
        json.dumps(
            {"case": name, "identical": sum(same), "of": len(same), "first_divergence": first_diff}
        ),
        flush=True,
    )
    return all(same)


def _prompt_logprobs(model: str, backend: str, seqs, **kw):
    """Per position: (logprob of the actual next token, top-1 id, top-1 logprob)."""
    from engine import LLM, SamplingParams

    llm = LLM(model, attention_backend=backend, skip_tokenizer_init=True, **kw)
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
    outs = llm.generate([{"prompt_token_ids": s} for s in seqs], params)
    del llm
    rows = []
    for seq, out in zip(seqs, outs, strict=True):
        for pos, entry in enumerate(out.prompt_logprobs[1:], start=1):
            top_id, top = min(entry.items(), key=lambda kv: kv[1].rank)
            rows.append((entry[seq[pos]].logprob, top_id, top.logprob))
    return np.asarray(rows)


def _teacher_forced(name: str, model: str, prompts, max_tokens: int, **kw) -> bool:
    """Random bf16 weights give near-tied logits, so free-running greedy sequences diverge
    between two correct attention implementations. Instead: run the reference's greedy
    continuation through both backends and compare every position's next-token logprob, and
    the top-1 token wherever the reference's top-1 wins by more than bf16 noise."""
    seqs = [
        p + t
        for p, t in zip(prompts, _run(model, "reference", prompts, max_tokens, **kw), strict=True)
    ]
    ref = _prompt_logprobs(model, "reference", seqs, **kw)
    got = _prompt_logprobs(model, "pallas", seqs, **kw)
    # The noise floor: the same jnp reference in float32. Pallas passes if it is no farther
    # from float32 than the bf16 reference itself is (bf16 error grows through 32 layers of
    # random weights, whose logits are nearly flat).
    truth = _prompt_logprobs(model, "reference", seqs, **{**kw, "dtype": "float32"})
    ref_err = np.abs(ref[:, 0] - truth[:, 0])
    got_err = np.abs(got[:, 0] - truth[:, 0])
    diff = np.abs(ref[:, 0] - got[:, 0])
    ok = float(np.median(got_err)) <= 1.5 * float(np.median(ref_err)) + 1e-3
    print(
        json.dumps(
            {
                "case": name,
                "positions": len(diff),
                "pallas_vs_reference_median": round(float(np.median(diff)), 5),
                "bf16_reference_vs_fp32_median": round(float(np.median(ref_err)), 5),
                "bf16_pallas_vs_fp32_median": round(float(np.median(got_err)), 5),
                "bf16_pallas_vs_fp32_max": round(float(got_err.max()), 5),
                "top1_pallas_eq_fp32": round(float(np.mean(got[:, 1] == truth[:, 1])), 4),
                "top1_reference_eq_fp32": round(float(np.mean(ref[:, 1] == truth[:, 1])), 4),
                "ok": ok,
            }
        ),
        flush=True,
    )
    return ok


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--big", help="config folder for a full-size dummy-weight check")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    small = dict(
        page_size=16,
        max_num_seqs=8,
        max_num_batched_tokens=256,
        max_model_len=512,
        token_buckets=(16, 256),
        request_buckets=(8,),
        num_pages=256,
        dtype="float32",
    )
    ok = True
    with tempfile.TemporaryDirectory() as d:
        from tests.hf_models import write_checkpoint

        write_checkpoint("llama3", d)
        prompts = [rng.integers(3, 320, size=n).tolist() for n in (1, 5, 17, 40, 100, 200, 3, 64)]
        ok &= _compare("tiny-llama3-fp32", d, prompts, 32, **small)
    if args.big:
        big = dict(
            page_size=16,
            max_num_seqs=8,
            max_num_batched_tokens=512,
            max_model_len=1024,
            token_buckets=(16, 512),
            request_buckets=(8,),
            load_format="dummy",
            dtype="bfloat16",
            num_pages=2048,
        )
        prompts = [
            rng.integers(100, 30000, size=n).tolist() for n in (8, 30, 64, 100, 128, 200, 300, 500)
        ]
        ok &= _teacher_forced("llama-3.1-8b-dummy-bf16", args.big, prompts, 64, **big)
        # Steps of 4,096 tokens of at most 8 requests: under `auto` they run on the Mosaic GPU
        # kernel on Hopper (dispatch.py), which the case above (512-token steps) never reaches.
        long_steps = dict(
            big, max_num_batched_tokens=4096, max_model_len=4096, token_buckets=(16, 4096)
        )
        prompts = [rng.integers(100, 30000, size=n).tolist() for n in (2100, 900, 1500, 300)]
        os.environ["PAGEJAX_GPU_ATTENTION"] = "auto"  # read when each step is traced
        ok &= _teacher_forced(
            "llama-3.1-8b-dummy-bf16-prompt-steps", args.big, prompts, 16, **long_steps
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
