"""`engine.watchdog`: a guarded call that does not return in time ends the process, with what it
was and every thread's stack; one that returns leaves it be."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from engine import watchdog
from engine.watchdog import Watchdog


def test_a_call_past_its_deadline_ends_the_process_and_says_which(caplog):
    ended = threading.Event()
    codes = []
    dog = Watchdog(0.2, exit=lambda code: codes.append(code) or ended.set())
    with caplog.at_level(logging.CRITICAL, logger="engine.watchdog"), dog.guard("a step of 64"):
        assert ended.wait(5.0)
    assert codes == [1]
    assert "a step of 64 has not returned in 0.2 s" in caplog.text
    assert watchdog.TIMEOUT_ENV in caplog.text


def test_calls_that_return_in_time_are_left_alone():
    codes = []
    dog = Watchdog(0.3, exit=codes.append)
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


def test_the_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(watchdog.TIMEOUT_ENV, raising=False)
    assert watchdog.timeout_from_env() == watchdog.DEFAULT_TIMEOUT_S
    monkeypatch.setenv(watchdog.TIMEOUT_ENV, "0")
    assert watchdog.timeout_from_env() == 0.0
    monkeypatch.setenv(watchdog.TIMEOUT_ENV, "30")
    assert watchdog.timeout_from_env() == 30.0
    for bad in ("soon", "-1"):
        monkeypatch.setenv(watchdog.TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=watchdog.TIMEOUT_ENV):
            watchdog.timeout_from_env()
