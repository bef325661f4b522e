"""`pagejax bench {throughput,latency,serve}`: vLLM's benchmark commands, with vLLM's flag names,
metric definitions and result JSON keys, so pagejax and vLLM figures compare line by line.

Modules: `offline` (engine start-up and the step loop shared by `throughput` and `latency`),
`serve` (the async HTTP client), `serve_metrics` (pure metric arithmetic), `datasets` (random
prompts). Each imports JAX only inside the functions that run an engine, so `--help` is fast.
"""
