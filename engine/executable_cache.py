"""Compiled executables kept on disk, so that a warm start skips tracing and lowering.

jax's persistent compilation cache keys on the lowered program, so every start still traces and
lowers each bucket before it can look the program up: 49 executables of the 8B model took ~15 s
of a 19 s warm start on an H100 (docs/BENCHMARKS.md, eleventh session). This cache keys on what
shapes a program instead, and a hit loads the executable itself
(`jax.experimental.serialize_executable`), untraced:

- the source of the packages whose code is traced (engine, models, pallas_kernels, sharding);
- the jax, jaxlib and flax versions, the devices and their runtime, jax's configuration;
- the environment the traced code and XLA read: `PAGEJAX_GPU_*` / `PAGEJAX_TPU_*` (kernel
  switches), `XLA_FLAGS`, `LIBTPU_INIT_ARGS`. A new switch read while tracing must take one of
  those prefixes, or it will not reach the key;
- per executable: the function, its static arguments, and every argument's shape, dtype and
  sharding (`executables.CompileJob.signature`), and the XLA options it compiles with.

Files live in `<compilation cache dir>/executables/<code and platform digest>/`: a code change
starts a new folder. Opening one (`ExecutableCache.under`) marks it used; the least recently
used folders beyond `KEEP_FOLDERS` are deleted then, with the temporary files of killed
stores. The engine no longer turns jax's persistent cache on: it would only help after a code
change, and an executable it returns does not always serialize again
(`ExecutableCache.compile`). Loading unpickles the files, like any cache of compiled code:
keep the folder private.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import logging
import os
import pickle
import platform
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import jax
from jax.experimental import serialize_executable

logger = logging.getLogger(__name__)

TRACED_PACKAGES = ("engine", "models", "pallas_kernels", "sharding")
ENV_PREFIXES = ("PAGEJAX_GPU_", "PAGEJAX_TPU_", "XLA_FLAGS", "LIBTPU_INIT_ARGS")
# Installed packages whose native code runs the executables (the CUDA plugin, cuDNN, cuBLAS,
# libtpu): their versions join the platform digest.
RUNTIME_PACKAGES = re.compile(
    r"^(jax[-_]cuda\d*[-_]\w+|libtpu.*|nvidia[-_](cudnn|cublas).*)$", re.I
)
KEEP_FOLDERS = 8  # code/platform digests kept (33-74 MB each for the 8B model)
STALE_TMP_S = 3600.0  # a temporary file this old belongs to a store that was killed
# jax options that name files and logs, not programs.
_CONFIG_SKIPPED = ("cache", "log", "dump", "traceback")


def _digest(parts: Iterable[object]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()


def code_digest(packages: Iterable[str] = TRACED_PACKAGES) -> str:
    """sha256 over every .py file of the packages (path and bytes), in path order."""
    root = Path(__file__).resolve().parent.parent
    parts = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts += [str(path.relative_to(root)), path.read_bytes()]
    return _digest(parts)


# The source as imported, before any model loads: what this process traces.
IMPORTED_CODE = code_digest()


def jax_persistent_cache_on() -> bool:
    """jax's persistent compilation cache is configured (then it may serve our compiles)."""
    return bool(jax.config.jax_compilation_cache_dir and jax.config.jax_enable_compilation_cache)


def _store_refusal() -> str | None:
    """Why compiled executables must not be stored now, or None. While jax's persistent cache
    is on: an executable it returns does not always serialize again (on the CPU, jaxlib 0.10.2
    and 0.11.2, the copy fails at run time with "Function wrapped_log not found"), and jax
    decides once per process whether it is on; the engine leaves it off. Once pagejax's source
    changed on disk since it was imported (the weights load in between): the key would name
    the new code, the executables hold the old."""
    if jax_persistent_cache_on():
        return "jax's persistent compilation cache is on"
    if code_digest() != IMPORTED_CODE:
        return "pagejax's source changed on disk since it was imported"
    return None


def _host_isa() -> str:
    """The host CPU's instruction-set flags (XLA:CPU code is built for them), where known."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def runtime_versions() -> dict[str, str]:
    """Versions of the installed runtime packages (`RUNTIME_PACKAGES`), by normalised name;
    of two copies on sys.path, the first, as import takes it."""
    found = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"] or ""
        if RUNTIME_PACKAGES.match(name):
            found.setdefault(name.lower().replace("_", "-"), dist.version)
    return dict(sorted(found.items()))


def platform_digest() -> str:
    """What the compiled code depends on besides pagejax's source: versions, devices, the
    runtime (CUDA or libtpu version), jax's configuration and the environment above."""
    versions = {p: importlib.metadata.version(p) for p in ("jax", "jaxlib", "flax")}
    versions |= runtime_versions()
    devices = [(d.platform, d.device_kind, d.id) for d in jax.devices()]
    client = jax.devices()[0].client
    config = sorted(
        (k, repr(v))
        for k, v in jax.config.values.items()
        if not any(word in k for word in _CONFIG_SKIPPED)
    )
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(ENV_PREFIXES))
    host = (platform.machine(), _host_isa())
    return _digest([versions, devices, client.platform, client.platform_version, config, env, host])


class ExecutableCache:
    """`load(key)` / `store(key, compiled)` of `jax.stages.Compiled` under one folder."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.refusal = _store_refusal()  # checked once, as the cache opens
        if self.refusal:
            logger.warning("executable cache: storing nothing, %s", self.refusal)

    def _tidy(self) -> None:
        """Mark this folder used; delete the least recently used sibling folders beyond
        `KEEP_FOLDERS`, and this folder's temporary files older than `STALE_TMP_S`."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            os.utime(self.folder)
            siblings = [p for p in self.folder.parent.iterdir() if p.is_dir()]
            siblings.sort(key=lambda p: p.stat().st_mtime, reverse=True)
            for old in siblings[KEEP_FOLDERS:]:
                if old != self.folder:
                    logger.info("executable cache: deleting unused %s", old.name)
                    shutil.rmtree(old, ignore_errors=True)
            now = time.time()
            for tmp in self.folder.glob("*.tmp"):
                if now - tmp.stat().st_mtime > STALE_TMP_S:
                    tmp.unlink(missing_ok=True)
        except OSError as e:  # a cache that cannot tidy is only bigger
            logger.warning("executable cache: cannot tidy %s: %r", self.folder.parent, e)

    @classmethod
    def under(cls, cache_dir: str | os.PathLike) -> ExecutableCache:
        """The cache of this code on this platform, below a compilation cache folder."""
        digest = _digest([IMPORTED_CODE, platform_digest()])
        cache = cls(Path(cache_dir) / "executables" / digest[:32])
        cache._tidy()
        return cache

    @staticmethod
    def key(*parts: object) -> str:
        """A file name for an executable: the digest of the reprs of `parts`."""
        return _digest(parts)

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.jaxexe"

    def load(self, key: str, devices: Sequence[jax.Device]) -> jax.stages.Compiled | None:
        """The executable stored under `key`, loaded onto `devices` (in the order it was
        compiled for), or None. A file that fails to load (truncated, or from an incompatible
        runtime) is logged and removed; the caller compiles anew."""
        path = self._path(key)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:  # unreadable: compile it, as if absent
            logger.warning("executable cache: cannot read %s: %r", path.name, e)
            return None
        try:
            serialized, in_tree, out_tree = pickle.loads(blob)
            return serialize_executable.deserialize_and_load(
                serialized, in_tree, out_tree, execution_devices=devices
            )
        except Exception as e:  # noqa: BLE001 - any failure means "compile it again"
            logger.warning("executable cache: dropping %s, it failed to load: %r", path.name, e)
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
            return None

    def compile(
        self, lowered: jax.stages.Lowered, key: str, options: dict | None = None
    ) -> tuple[jax.stages.Compiled, float]:
        """XLA-compile `lowered` and store it under `key`, unless storing is refused
        (`_store_refusal`): (the executable, seconds spent storing it)."""
        compiled = lowered.compile(compiler_options=options)
        t0 = time.perf_counter()
        if self.refusal is None:
            self.store(key, compiled)
        return compiled, time.perf_counter() - t0

    def store(self, key: str, compiled: jax.stages.Compiled) -> bool:
        """Write `compiled` under `key` (atomically: concurrent starts may race). False when
        the backend cannot serialize it or the folder is not writable (logged, not raised)."""
        tmp = None
        try:
            blob = pickle.dumps(serialize_executable.serialize(compiled))
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, self._path(key))
            return True
        except Exception as e:  # noqa: BLE001 - a cache that cannot write is only slower
            logger.warning("executable cache: not storing %s: %r", key[:16], e)
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            return False
