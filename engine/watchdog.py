"""Ends the process when a call on a mesh of accelerators stops answering.

When one device of a mesh fails (out of memory, say) the others wait for it in their next
collective, and the host thread that called or waits on the executable waits with them, inside
XLA, for ever: Ctrl-C cannot reach it and the process cannot exit cleanly either. Seen on two
H200s with GPU 0's free memory taken by another process: the first warm-up call never returned
(docs/BENCHMARKS.md, twenty-fifth session). A server would never become ready, or would stop
answering every request. `Watchdog` turns that into an exit with an error: a call guarded by
`guard` that has not returned within `timeout_s` logs what it was, dumps every thread's stack,
and ends the process with status 1 (`os._exit`: a normal exit would wait on the stuck device,
so `atexit` handlers do not run; what must be saved first goes in `before_exit`, as the step
trace's flush).
A server's engine process dying is reported to its clients (`EngineDeadError`, /health 503).
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator

logger = logging.getLogger(__name__)


def for_mesh(platform: str | None, timeout_s: float) -> Watchdog | None:
    """The watchdog for a mesh of `platform`'s devices (None: no mesh), if it gets one: on
    accelerators only, where a step takes well under a second and a first call a few (a CPU
    step of a large model may take minutes), and only with a finite, non-zero limit."""
    if platform in (None, "cpu") or timeout_s == 0 or math.isinf(timeout_s):
        return None
    return Watchdog(timeout_s)


class Watchdog:
    """One thread that checks, at least once a second (and 4 times a `timeout_s`), whether the
    call now guarded has run past its deadline. Guarding a call costs two attribute writes."""

    def __init__(self, timeout_s: float, *, exit_fn: Callable[[int], object] = os._exit):
        assert timeout_s > 0
        self.timeout_s = timeout_s
        self._exit_fn = exit_fn  # tests pass their own
        self._current: tuple[str, float] | None = None  # (what, deadline): read as one
        self.before_exit: list[Callable[[], object]] = []  # run before the exit, in order
        self._period = min(timeout_s / 4, 1.0)
        threading.Thread(target=self._watch, name="mesh-watchdog", daemon=True).start()

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Run the block under a deadline `timeout_s` from now; `what` names it in the log."""
        self._current = (what, time.monotonic() + self.timeout_s)
        try:
            yield
        finally:
            self._current = None

    def _watch(self) -> None:
        while True:
            time.sleep(self._period)
            current = self._current
            if current is None or time.monotonic() < current[1]:
                continue
            logger.critical(
                "%s has not returned in %g s: a device of the mesh stopped answering (one that "
                "failed leaves the others waiting in their collectives). Ending the process; "
                "each thread's stack follows. The limit is LoadConfig.mesh_timeout_s "
                "(PAGEJAX_MESH_TIMEOUT_S for the pagejax command; 0: no limit).",
                current[0], self.timeout_s,
            )  # fmt: skip
            for handler in logging.getLogger().handlers:
                handler.flush()
            with contextlib.suppress(AttributeError, ValueError, OSError):  # no real stderr
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            for fn in self.before_exit:
                try:
                    fn()
                except Exception:  # noqa: BLE001 - the exit must happen whatever this raises
                    logger.exception("before the exit")
            self._exit_fn(1)
            return
