"""Ends the process when a call on a mesh of accelerators stops answering.

When one device of a mesh fails (out of memory, say) the others wait for it in their next
collective, and the host thread that called or waits on the executable waits with them, inside
XLA, for ever: Ctrl-C cannot reach it and the process cannot exit cleanly either. Seen on two
H200s with GPU 0's free memory taken by another process: the first warm-up call never returned
(docs/BENCHMARKS.md, twenty-fifth session). A server would never become ready, or would stop
answering every request. `Watchdog` turns that into an exit with an error: a call guarded by
`guard` that has not returned within `timeout_s` logs what it was, dumps every thread's stack,
and ends the process with status 1 (`os._exit`: a normal exit would wait on the stuck device).
A server's engine process dying is reported to its clients (`EngineDeadError`, /health 503).
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator

logger = logging.getLogger(__name__)

TIMEOUT_ENV = "PAGEJAX_MESH_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 120.0  # a step takes well under a second; a first call, a few


def timeout_from_env() -> float:
    """`PAGEJAX_MESH_TIMEOUT_S` (seconds; 0 turns the watchdog off), else the default."""
    value = os.environ.get(TIMEOUT_ENV, "")
    try:
        timeout = float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, not {value!r}") from None
    if timeout < 0:
        raise ValueError(f"{TIMEOUT_ENV} must be >= 0 (0 turns it off), not {value!r}")
    return timeout


class Watchdog:
    """One thread that checks, about every `timeout_s / 4` (at most every second), whether the
    call now guarded has run past its deadline. Guarding a call costs two attribute writes."""

    def __init__(self, timeout_s: float, *, exit=os._exit):
        assert timeout_s > 0
        self.timeout_s = timeout_s
        self._exit = exit  # tests pass their own
        self._what: str | None = None
        self._deadline: float | None = None
        self._period = min(timeout_s / 4, 1.0)
        threading.Thread(target=self._watch, name="mesh-watchdog", daemon=True).start()

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        self._what, self._deadline = what, time.monotonic() + self.timeout_s
        try:
            yield
        finally:
            self._deadline = None

    def _watch(self) -> None:
        while True:
            time.sleep(self._period)
            deadline, what = self._deadline, self._what
            if deadline is None or time.monotonic() < deadline:
                continue
            logger.critical(
                "%s has not returned in %g s: a device of the mesh stopped answering (one that "
                "failed leaves the others waiting in their collectives). Ending the process; "
                "each thread's stack follows. %s sets the limit (0: no limit).",
                what, self.timeout_s, TIMEOUT_ENV,
            )  # fmt: skip
            for handler in logging.getLogger().handlers:
                handler.flush()
            with contextlib.suppress(AttributeError, ValueError, OSError):  # no real stderr
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            self._exit(1)
            return
