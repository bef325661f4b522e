"""Where `AsyncEngine`'s engine loop runs: a thread of this process (`ThreadCore`) or a process
of its own (`ProcessCore`, what `pagejax serve` uses).

Both take the same messages, ("add", request_id, prompt, params, priority) and ("abort",
request_id), drained before each step, and report to a `CoreSink` from a thread of theirs.

In a thread, the engine's host work (scheduling, batch building, output processing) shares the
GIL with the server's event loop, which streams every token to every client: at 200 streams the
GPU waited on the host (BENCHMARKS.md). In its own process the engine has a GIL to itself; the
two talk through pipes, outputs pickled once per step.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import threading
import traceback
from typing import TYPE_CHECKING, Any, Protocol

from engine.config import EngineConfig
from engine.outputs import OutputKind, RequestOutput
from engine.scheduler import QueueFullError, SchedulerStats

if TYPE_CHECKING:  # the server process imports this module without JAX
    from engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)

# Adds and aborts applied between two steps at most: a steady stream of them must not keep
# the requests already running from stepping.
_MAX_MESSAGES_PER_STEP = 256


class CoreSink(Protocol):
    """What a core reports to (called from the core's thread, never the event loop's)."""

    def added(self, request_id: str, error: BaseException | None) -> None: ...

    def deliver(self, outputs: list[RequestOutput]) -> None: ...

    def died(self, error: BaseException) -> None: ...


class EngineStartError(RuntimeError):
    """The engine process failed while loading or compiling."""


def _handle(engine: LLMEngine, message: tuple) -> tuple[BaseException | None, list]:
    """Apply one message. Returns the error an add's caller should get (None: added), and
    the final outputs of an aborted request (for a consumer still iterating, if any)."""
    if message[0] == "abort":
        return None, engine.abort_request(message[1])
    _, request_id, prompt, params, priority = message
    try:
        engine.add_request(request_id, prompt, params, priority=priority)
    except Exception as e:  # bad input or a full queue: the caller's error
        return e, []
    return None, []


def _portable(error: BaseException | None) -> tuple[str, str] | None:
    """An add's error as (kind, message): any exception pickles that way, and the server
    only needs to tell bad input (400) and a full queue (503) from the rest."""
    if error is None:
        return None
    kind = "queue_full" if isinstance(error, QueueFullError) else (
        "value" if isinstance(error, ValueError) else "other"
    )  # fmt: skip
    return kind, str(error)


def _rebuild(error: tuple[str, str] | None) -> BaseException | None:
    if error is None:
        return None
    kind, message = error
    return {"queue_full": QueueFullError, "value": ValueError}.get(kind, RuntimeError)(message)


class ThreadCore:
    """The engine loop in a thread of this process."""

    def __init__(self, engine: LLMEngine, sink: CoreSink):
        self.engine = engine
        self._sink = sink
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pagejax-engine", daemon=True)
        self._thread.start()

    def post(self, message: tuple) -> None:
        self._inbox.put(message)
        self._wake.set()

    def stats(self) -> SchedulerStats:
        """Read without stopping the engine (counts may be one step apart from each other)."""
        return self.engine.scheduler.stats()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        """Ask the loop to stop, without waiting (`shutdown` waits)."""
        self._stop.set()
        self._wake.set()

    def shutdown(self) -> None:
        self.stop()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        engine = self.engine
        try:
            while not self._stop.is_set():
                for _ in range(_MAX_MESSAGES_PER_STEP):
                    try:
                        message = self._inbox.get_nowait()
                    except queue.Empty:
                        break
                    error, final = _handle(engine, message)
                    if message[0] == "add":
                        self._sink.added(message[1], error)
                    elif final:
                        self._sink.deliver(final)
                if not engine.has_unfinished_requests():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                self._sink.deliver(engine.step(kind=OutputKind.DELTA))
        except Exception as e:  # a bug: fail every request in flight, loudly
            logger.exception("engine step failed")
            self._sink.died(e)
            return
        self._sink.died(RuntimeError("the engine was shut down"))


class ProcessCore:
    """The engine in a child process (spawned: a fresh interpreter, since a forked JAX runtime
    is unsafe). The child builds its `EngineConfig` and loads the model itself, so this
    process never initialises a JAX backend and leaves the accelerator to the child.

    Messages go out through a sender thread (a burst of adds must not block the event loop on
    a full pipe while the child is in a step); a reader thread hands back what comes in."""

    def __init__(
        self,
        model: str | None,
        engine_kwargs: dict[str, Any],
        sink: CoreSink,
        *,
        env: dict[str, str] | None = None,
        name: str = "pagejax-engine-core",
    ):
        """`env`: variables the child sets before JAX starts (a data-parallel engine's
        devices, `data_parallel_env`)."""
        ctx = multiprocessing.get_context("spawn")
        requests_recv, self._requests = ctx.Pipe(duplex=False)
        self._outputs, outputs_send = ctx.Pipe(duplex=False)
        self._process = ctx.Process(
            target=run_engine_process,
            args=(model, engine_kwargs, requests_recv, outputs_send,
                  logging.getLogger("engine").getEffectiveLevel(), env or {}),
            name=name,
            daemon=True,
        )  # fmt: skip
        self._process.start()
        requests_recv.close()  # the child's ends
        outputs_send.close()
        self._sink = sink
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._dead = threading.Event()
        self.config: EngineConfig | None = None
        self.vocab_size = 0
        self.platform = ""  # the child's JAX backend ("gpu", "tpu", "cpu")
        self._stats: SchedulerStats | None = None
        self._stopping = False

    @property
    def startup_connection(self):
        """What to `multiprocessing.connection.wait` on for `receive_startup`."""
        return self._outputs

    def receive_startup(self) -> bool:
        """Take the child's next start-up message (blocking): its platform, sent as soon as
        JAX is up (False), or ready, once it has loaded and compiled (True). Raise
        EngineStartError if it failed. Once ready, `start()` the message threads (once the
        sink can take reports)."""
        try:
            message = self._outputs.recv()
        except (EOFError, OSError):
            message = ("failed", f"the engine process exited (code {self._process.exitcode})")
        if message[0] == "failed":
            self._process.join(timeout=10)
            raise EngineStartError(message[1])
        if message[0] == "platform":
            self.platform = message[1]
            return False
        _, self.config, self.vocab_size, self._stats = message
        return True

    def start(self) -> None:
        for target, name in ((self._read, "reader"), (self._send, "sender")):
            threading.Thread(target=target, name=f"pagejax-core-{name}", daemon=True).start()

    def post(self, message: tuple) -> None:
        self._outbox.put(message)

    def stats(self) -> SchedulerStats:
        """The counts the child sent with its latest step or message."""
        return self._stats

    def is_alive(self) -> bool:
        return not self._dead.is_set() and self._process.is_alive()

    def stop(self) -> None:
        """Ask the child to stop, without waiting (`shutdown` waits)."""
        if not self._stopping:
            self._stopping = True
            self.post(("stop",))

    def shutdown(self) -> None:
        self.stop()
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=5)
        self._die("the engine was shut down")
        self._outbox.put(None)  # ends the sender

    def terminate(self) -> None:
        """Stop a child that was never `start`ed (another engine of the server failed)."""
        self._process.terminate()
        self._process.join(timeout=10)

    def _die(self, reason: str) -> None:
        if not self._dead.is_set():
            self._dead.set()
            self._sink.died(RuntimeError(reason))

    def _send(self) -> None:
        while (message := self._outbox.get()) is not None:
            try:
                self._requests.send(message)
            except (OSError, ValueError) as e:  # the child is gone (or the pipe closed)
                self._die(f"the engine process is gone: {e}")
                return

    def _read(self) -> None:
        try:
            while True:
                try:
                    message = self._outputs.recv()
                except (EOFError, OSError):
                    code = self._process.exitcode
                    message = ("dead", f"the engine process exited (code {code})")
                kind = message[0]
                if kind == "outputs":
                    self._stats = message[2]
                    self._sink.deliver(message[1])
                elif kind == "added":
                    self._sink.added(message[1], _rebuild(message[2]))
                elif kind == "stats":
                    self._stats = message[1]
                elif kind == "stopped":
                    return
                else:  # "dead"
                    self._die(message[1])
                    return
        except BaseException as e:  # a bug here would leave every request waiting
            logger.exception("reading the engine process's messages failed")
            self._die(f"lost the engine process: {e}")
            self._process.terminate()


def run_engine_process(model, engine_kwargs, requests, outputs, log_level, env) -> None:
    """The child's main: set `env`, build the engine, report ready, then loop: drain messages,
    step, send the step's outputs with the scheduler's counts. Exits on "stop" or when the
    parent's end of the pipe closes (the server died)."""
    os.environ.update(env)  # before JAX starts its backend, which reads them
    from models.tokenizer import block_torch_import

    block_torch_import()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("engine", "models"):
        logging.getLogger(name).setLevel(log_level)
    try:
        import jax

        # Where JAX came up, at once: a data-parallel server checks it before the long load.
        outputs.send(("platform", jax.default_backend()))
        from engine.llm import build_engine_config
        from engine.llm_engine import LLMEngine, freeze_heap

        engine = LLMEngine(build_engine_config(model, usage="server", **engine_kwargs))
        freeze_heap()
    except Exception as e:
        logger.exception("the engine failed to start")
        outputs.send(("failed", f"{type(e).__name__}: {e}"))
        return
    outputs.send(("ready", engine.config, engine.inputs.vocab_size, engine.scheduler.stats()))
    try:
        _serve(engine, requests, outputs)
    except (EOFError, OSError):  # the server went away
        return
    except Exception as e:  # a bug: tell the server, which fails the requests in flight
        logger.exception("engine step failed")
        with contextlib.suppress(OSError):  # the server may be gone too
            outputs.send(("dead", "".join(traceback.format_exception_only(e)).strip()))


def _serve(engine: LLMEngine, requests, outputs) -> None:
    engine.outputs.prompt_once = True  # see OutputProcessor: the server puts prompts back
    while True:
        busy = engine.has_unfinished_requests()
        handled = 0
        # Idle: block for a message. Busy: take what is there, a bounded number, then step.
        while handled < _MAX_MESSAGES_PER_STEP and requests.poll(0 if busy or handled else None):
            message = requests.recv()
            if message[0] == "stop":
                outputs.send(("stopped",))
                return
            error, final = _handle(engine, message)
            if message[0] == "add":
                outputs.send(("added", message[1], _portable(error)))
            elif final:
                outputs.send(("outputs", final, engine.scheduler.stats()))
            handled += 1
        if engine.has_unfinished_requests():
            step_outputs = engine.step(kind=OutputKind.DELTA)
            outputs.send(("outputs", step_outputs, engine.scheduler.stats()))
        elif handled:  # e.g. the last abort: the counts changed without a step
            outputs.send(("stats", engine.scheduler.stats()))
