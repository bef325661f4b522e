"""The executable cache: a warm start loads every executable untraced, and runs as well."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from engine import LLM, SamplingParams, executable_cache
from engine.executable_cache import ExecutableCache
from engine.executables import CompileJob
from tests.engine.test_engine import ENGINE_ARGS
from tests.hf_models import hf_greedy, write_checkpoint

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPTS = [[5, 9, 200, 17], list(range(3, 90))]  # a 16-token and a 64-token bucket


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_checkpoint("llama3", tmp_path_factory.mktemp("llama3"))


def _greedy(llm: LLM) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
    return [out.outputs[0].token_ids for out in outs]


def test_warm_start_loads_every_executable_and_matches_transformers(folder, tmp_path):
    """The first engine traces and stores every executable; the second traces none, and its
    greedy tokens are transformers'. A damaged file is dropped and rebuilt, not fatal."""
    cache_dir = str(tmp_path / "cache")
    expected = [hf_greedy(folder, p, GREEDY.max_tokens) for p in PROMPTS]
    cold = LLM(str(folder), num_pages=64, compilation_cache_dir=cache_dir, **ENGINE_ARGS)
    assert cold.engine.runner.num_loaded == 0
    assert not executable_cache.jax_persistent_cache_on()  # or nothing would be stored
    assert _greedy(cold) == expected
    files = sorted((tmp_path / "cache" / "executables").glob("*/*.jaxexe"))
    # 2 forward buckets, 3 sampler variants, 2 prompt-logprob buckets, the row writer.
    assert len(files) == 8

    warm = LLM(str(folder), num_pages=64, compilation_cache_dir=cache_dir, **ENGINE_ARGS)
    assert warm.engine.runner.num_loaded == len(files)
    assert _greedy(warm) == expected

    files[0].write_bytes(b"not an executable")
    mended = LLM(str(folder), num_pages=64, compilation_cache_dir=cache_dir, **ENGINE_ARGS)
    assert mended.engine.runner.num_loaded == len(files) - 1
    assert files[0].stat().st_size > 1000  # stored again
    assert _greedy(mended) == expected


def test_a_model_of_other_constants_but_the_same_shapes_traces_anew(folder, tmp_path):
    """Constants the trace bakes in (here rope_theta) are part of the key: a checkpoint that
    differs only there must not load the first one's executables."""
    cache_dir = str(tmp_path / "cache")
    LLM(str(folder), num_pages=64, compilation_cache_dir=cache_dir, **ENGINE_ARGS)
    other = write_checkpoint("llama3", tmp_path / "other", rope_theta=1234.0)
    llm = LLM(str(other), num_pages=64, compilation_cache_dir=cache_dir, **ENGINE_ARGS)
    assert llm.engine.runner.num_loaded == 0
    assert _greedy(llm) == [hf_greedy(other, p, GREEDY.max_tokens) for p in PROMPTS]


def _job(shape=(4, 8), dtype=jnp.float32, static=None, options=None) -> CompileJob:
    fn = jax.jit(lambda x, scale=1: x * scale, static_argnames=("scale",))
    args = (jax.ShapeDtypeStruct(shape, dtype),)
    return CompileJob({}, None, fn, args, static or {}, options)


def test_key_changes_with_every_part_of_the_signature():
    """Shapes, dtypes, static arguments and compile options each give a new file name."""
    jobs = [
        _job(),
        _job(shape=(4, 16)),
        _job(dtype=jnp.bfloat16),
        _job(static={"scale": 2}),
        _job(options={"xla_gpu_enable_triton_gemm": False}),
    ]
    keys = {ExecutableCache.key("model", job.signature()) for job in jobs}
    assert len(keys) == len(jobs)
    assert ExecutableCache.key("model", _job().signature()) in keys  # and it is deterministic
    assert ExecutableCache.key("other model", _job().signature()) not in keys


def test_folder_changes_with_kernel_switches_and_xla_flags(monkeypatch):
    """What the traced code reads from the environment picks the folder: a kernel switch or
    XLA_FLAGS must never load executables built under another value."""
    monkeypatch.delenv("PAGEJAX_GPU_ATTENTION", raising=False)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    base = executable_cache.platform_digest()
    monkeypatch.setenv("PAGEJAX_GPU_ATTENTION", "mgpu")
    attention = executable_cache.platform_digest()
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_command_buffer=")
    flags = executable_cache.platform_digest()
    monkeypatch.setenv("PAGEJAX_API_KEY", "secret")  # read by the server, not while tracing
    assert len({base, attention, flags}) == 3
    assert executable_cache.platform_digest() == flags


def test_folder_changes_with_the_runtime_packages(tmp_path, monkeypatch):
    """A CUDA plugin (or cuDNN, cuBLAS, libtpu) of another version picks another folder: the
    executables hold code built against it. Other packages leave the folder alone."""
    base = executable_cache.platform_digest()

    def install(name: str, version: str) -> None:
        info = tmp_path / f"{name}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")

    install("unrelated_tool", "1.0")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert executable_cache.platform_digest() == base
    install("jax_cuda12_plugin", "0.11.2")
    assert executable_cache.runtime_versions()["jax-cuda12-plugin"] == "0.11.2"
    plugin = executable_cache.platform_digest()
    install("nvidia_cudnn_cu12", "9.8.0")
    assert len({base, plugin, executable_cache.platform_digest()}) == 3


def test_opening_a_folder_deletes_the_least_recently_used_and_stale_temporaries(tmp_path):
    """`ExecutableCache.under` marks its folder used and keeps KEEP_FOLDERS in all: the
    others least recently used go, as do its own temporary files left by killed stores."""
    root = tmp_path / "executables"
    current = ExecutableCache.under(tmp_path).folder
    now = time.time()
    for i in range(executable_cache.KEEP_FOLDERS + 3):  # d0 used most recently
        (root / f"d{i}").mkdir(parents=True)
        os.utime(root / f"d{i}", (now - 100 * (i + 1), now - 100 * (i + 1)))
    os.utime(current, (now - 10**6, now - 10**6))  # this code's folder, unused for long
    stale, fresh = current / "a.tmp", current / "b.tmp"
    for tmp, age in ((stale, 2 * executable_cache.STALE_TMP_S), (fresh, 10)):
        tmp.write_bytes(b"x")
        os.utime(tmp, (now - age, now - age))
    assert ExecutableCache.under(tmp_path).folder == current
    kept = sorted(p.name for p in root.iterdir())
    newest = [f"d{i}" for i in range(executable_cache.KEEP_FOLDERS - 1)]
    assert kept == sorted([current.name, *newest])
    assert fresh.exists() and not stale.exists()
    ExecutableCache(tmp_path / "elsewhere")  # a folder of the caller's: its siblings stay
    assert sorted(p.name for p in tmp_path.iterdir()) == ["executables"]


def test_store_and_load_round_trip_a_jitted_function(tmp_path):
    """A stored executable computes what the function does, and still donates its input."""
    cache = ExecutableCache(tmp_path)
    fn = jax.jit(lambda x, y: (x * 2 + y, y.sum()), donate_argnames=("x",))
    compiled = fn.lower(jnp.ones((3, 5)), jnp.ones(5)).compile()
    assert cache.store("k", compiled)
    loaded = cache.load("k", jax.devices()[:1])
    x, y = jnp.arange(15.0).reshape(3, 5), jnp.arange(5.0)
    want = (x * 2 + y, y.sum())
    got = loaded(x, y)
    assert all(jnp.array_equal(a, b) for a, b in zip(got, want, strict=True))
    assert x.is_deleted()  # donated, as the function asked
    assert cache.load("missing", jax.devices()[:1]) is None


SECOND_DEVICE = """
import sys, jax, jax.numpy as jnp
from engine.executable_cache import ExecutableCache
second = jax.devices()[1]
x = jax.ShapeDtypeStruct((4,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(second))
cache = ExecutableCache(sys.argv[1])
assert cache.store("k", jax.jit(lambda x: x + 1).lower(x).compile())
out = cache.load("k", [second])(jax.device_put(jnp.arange(4.0), second))
print(out.tolist(), [d.id for d in out.devices()])
"""


def test_load_onto_the_device_it_was_compiled_for(tmp_path):
    """On a host of several devices (two CPU devices here), an executable of the second one
    loads and runs there: loading onto every device would fail at the first call."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    out = subprocess.run(
        [sys.executable, "-c", SECOND_DEVICE, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[2],
    )
    assert out.stdout.split("\n")[-2] == "[1.0, 2.0, 3.0, 4.0] [1]"


JAX_CACHE_ON = """
import sys, jax, jax.numpy as jnp
jax.config.update("jax_compilation_cache_dir", sys.argv[1] + "/jax")
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
from engine.executable_cache import ExecutableCache
jax.jit(lambda x: x + 1)(jnp.ones(3))  # jax decides here, once, that its cache is on
cache = ExecutableCache(sys.argv[1] + "/executables")
f = jax.jit(lambda x: jax.nn.log_softmax(x).max() + jnp.log(x).sum())
x = jax.ShapeDtypeStruct((100,), jnp.float32)
compiled, _ = cache.compile(f.lower(x), "k")
print(cache.load("k", jax.devices()[:1]) is None, float(compiled(jnp.full(100, 2.0))))
"""


def test_nothing_is_stored_while_jax_persistent_cache_is_on(tmp_path):
    """An executable that jax's persistent cache returned fails, re-serialized, at run time
    on the CPU ("Function wrapped_log not found"), and jax decides once per process whether its
    cache serves compiles: with it on, the executable cache compiles but stores nothing."""
    out = subprocess.run(
        [sys.executable, "-c", JAX_CACHE_ON, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    assert out.returncode == 0, out.stderr[-2000:]
    missing, value = out.stdout.split()[-2:]
    assert missing == "True"
    want = 100 * math.log(2.0) - math.log(100)  # log_softmax of equal values: -log(100)
    assert float(value) == pytest.approx(want, rel=1e-5)


def test_nothing_is_stored_once_the_source_changed_on_disk(tmp_path, monkeypatch):
    """The key names the source as imported; after an edit on disk the executable in hand
    is the old code's, so it is not stored under either."""
    monkeypatch.setattr(executable_cache, "code_digest", lambda: "edited")
    cache = ExecutableCache(tmp_path)
    fn = jax.jit(lambda x: x * 3)
    compiled, _ = cache.compile(fn.lower(jax.ShapeDtypeStruct((2,), jnp.float32)), "k")
    assert float(compiled(jnp.ones(2))[0]) == 3.0
    assert not list(tmp_path.glob("*.jaxexe"))
