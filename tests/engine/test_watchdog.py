"""`engine.watchdog`: a guarded call that does not return in time ends the process, with what it
was and every thread's stack; one that returns leaves it be; only accelerator meshes get one."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from engine.config import LoadConfig
from engine.watchdog import Watchdog, for_mesh

REPO = Path(__file__).resolve().parents[2]


def test_a_call_past_its_deadline_ends_the_process_and_says_which(caplog):
    ended = threading.Event()
    codes = []
    dog = Watchdog(0.2, exit_fn=lambda code: codes.append(code) or ended.set())
    with caplog.at_level(logging.CRITICAL, logger="engine.watchdog"), dog.guard("a step of 64"):
        assert ended.wait(5.0)
    assert codes == [1]
    assert "a step of 64 has not returned in 0.2 s" in caplog.text
    assert "PAGEJAX_MESH_TIMEOUT_S" in caplog.text


def test_what_must_be_saved_runs_before_the_exit():
    """`before_exit` (the step trace's flush) runs, in order, before the exit; one that raises
    does not keep the process alive."""
    ended = threading.Event()
    events = []
    dog = Watchdog(0.2, exit_fn=lambda code: events.append("exit") or ended.set())

    def broken():
        raise OSError("disk full")

    dog.before_exit += [lambda: events.append("flush"), broken, lambda: events.append("more")]
    with dog.guard("a step"):
        assert ended.wait(5.0)
    assert events == ["flush", "more", "exit"]


def test_calls_that_return_in_time_are_left_alone():
    codes = []
    dog = Watchdog(0.3, exit_fn=codes.append)
    for _ in range(8):  # 0.4 s of calls, each well within 0.3 s
        with dog.guard("a step"):
            time.sleep(0.05)
    time.sleep(0.5)  # idle between calls: nothing is guarded
    assert codes == []


def test_a_process_blocked_in_a_guarded_call_exits_with_its_stacks():
    """The real exit: the main thread sleeps inside the guarded call (as it would wait inside
    XLA), and the process still ends, with status 1, within a few periods."""
    code = textwrap.dedent(
        """
        import logging, time
        from engine.watchdog import Watchdog
        logging.basicConfig()

        def wait_for_the_mesh():
            time.sleep(60)

        with Watchdog(0.5).guard("the warm-up of bucket 16"):
            wait_for_the_mesh()
        """
    )
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and time.monotonic() - t0 < 20
    assert "the warm-up of bucket 16 has not returned" in done.stderr
    assert "wait_for_the_mesh" in done.stderr  # the stuck thread's stack


def test_only_accelerator_meshes_with_a_limit_get_one():
    """A CPU step of a large model may take minutes, and one device has no collectives."""
    assert isinstance(for_mesh("gpu", 120.0), Watchdog)
    assert isinstance(for_mesh("tpu", 5.0), Watchdog)
    assert for_mesh("cpu", 120.0) is None
    assert for_mesh(None, 120.0) is None  # no mesh
    assert for_mesh("gpu", 0.0) is None and for_mesh("gpu", math.inf) is None


def test_the_limit_must_be_a_duration():
    assert LoadConfig().mesh_timeout_s == 120.0
    for bad in (-1.0, math.nan):
        with pytest.raises(ValueError, match="mesh_timeout_s"):
            LoadConfig(mesh_timeout_s=bad)
