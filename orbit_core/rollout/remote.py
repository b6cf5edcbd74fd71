"""The trainer's handle on a non-colocated engine process: submit prompts, push adapters, collect.

Everything the engine says arrives on a reader thread, so the engine never blocks on a trainer
that is busy training. Waiting never hangs: a dead engine (exit, kill, closed pipe) or one that
says nothing for ``timeout_s`` raises ``EngineCrashed`` with what the engine last reported.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import signal
import threading
import time
from collections import defaultdict

from orbit_core.errors import OrbitError
from orbit_core.rollout.types import Completion, SamplingParams
from orbit_core.rollout.worker import EngineSpec, serve


class EngineCrashed(OrbitError):
    """The engine process died or stopped answering."""


def _exit_text(code: int | None) -> str:
    if code is None:
        return "still running but silent"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class EngineProcess:
    name = "Orbit builtin engine (engine process)"

    def __init__(self, spec: EngineSpec, timeout_s: float = 600.0, start_timeout_s: float = 1800.0):
        self.timeout_s = timeout_s
        ctx = mp.get_context("spawn")
        cmd_read, self._commands = ctx.Pipe(duplex=False)
        self._events, event_write = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=serve, args=(spec, cmd_read, event_write), daemon=True, name="orbit-engine")
        self.process.start()
        cmd_read.close()
        event_write.close()  # so a dead engine reads as EOF here instead of blocking forever
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.results: dict[object, list[Completion]] = defaultdict(list)
        self.version = spec.version
        self.synced: dict[int, dict] = {}
        self.received: set[int] = set()
        """Versions the engine has copied out of their shared buffer."""
        self.failed: list[tuple[int, str]] = []
        self.stats: dict = {"busy_s": 0.0}
        self.info: dict = {}
        self.closed = False
        self.events_seen = 0
        # sends go through one thread, so a frozen engine (a full pipe) can be timed out, never hang us
        self._outbox: queue.Queue = queue.Queue()
        threading.Thread(target=self._write, daemon=True, name="orbit-engine-send").start()
        # loading the base sends nothing, and a large one takes minutes: the start has its own limit
        try:
            self._wait(lambda: bool(self.info), "loading its model", silent_s=start_timeout_s)
        except EngineCrashed:
            if self.process.is_alive():
                self.process.kill()
                self.process.join(timeout=5)
                raise EngineCrashed(f"rollout engine process (pid {self.process.pid}) did not finish loading its model "
                                    f"within {start_timeout_s:g} s; stopped it",
                                    "raise rollout.engine_start_timeout_s if loading the base takes longer") from None
            raise

    def _read(self) -> None:
        while True:
            try:
                self._queue.put(self._events.recv())
            except (EOFError, OSError):
                self._queue.put(("eof",))
                return

    # -- events ----------------------------------------------------------------------------
    def _crash(self, detail: str, settle_s: float = 5.0) -> EngineCrashed:
        self.process.join(timeout=settle_s)  # a dying process: wait for its exit code
        return EngineCrashed(f"rollout engine process (pid {self.process.pid}) {detail} [{_exit_text(self.process.exitcode)}]",
                             "the run stops after saving its last step; fix the cause and rerun to resume")

    def _handle(self, event) -> None:
        self.events_seen += 1
        kind = event[0]
        if kind == "done":
            for tag, completion in event[1]:
                self.results[tag].append(completion)
            self.stats = event[2]
        elif kind == "synced":
            self.version = event[1]
            self.synced[event[1]] = event[2]
            self.stats = event[3]
        elif kind == "received":
            self.received.add(event[1])
        elif kind == "sync_failed":
            self.failed.append((event[1], event[2]))
            self.stats = event[3]
        elif kind in ("status",):
            self.stats = event[1]
        elif kind == "ready":
            self.info = event[1]
        elif kind == "error":
            raise self._crash(f"failed: {event[1]}")
        elif kind == "eof":
            raise self._crash("exited")

    def pump(self, timeout: float = 0.0) -> None:
        """Handle every event that has arrived (waiting up to ``timeout`` for the first)."""
        try:
            event = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            if not self.process.is_alive():
                self._drain_after_death()
            return
        self._handle(event)
        while True:
            try:
                self._handle(self._queue.get_nowait())
            except queue.Empty:
                return

    def _drain_after_death(self) -> None:
        deadline = time.monotonic() + 2.0  # let the reader deliver a last error message
        while time.monotonic() < deadline:
            try:
                self._handle(self._queue.get(timeout=0.1))
            except queue.Empty:
                continue
        raise self._crash("exited")

    def _wait(self, done, what: str, silent_s: float | None = None) -> None:
        limit = self.timeout_s if silent_s is None else silent_s
        last_event, seen = time.monotonic(), self.events_seen
        while not done():
            self.pump(timeout=min(0.5, limit))
            if self.events_seen != seen:
                last_event, seen = time.monotonic(), self.events_seen
            elif time.monotonic() - last_event > limit:
                raise self._crash(f"sent nothing for {limit:g} s while {what}", settle_s=0)

    # -- requests --------------------------------------------------------------------------
    def submit(self, tag, prompts: list[list[int]], params: SamplingParams, reward_inputs: list | None = None) -> None:
        """``reward_inputs``: ``(prompt_text, label)`` per prompt, to have the engine score the samples."""
        self._send(("submit", tag, prompts, params, reward_inputs))

    def push(self, version: int, payload: bytes) -> None:
        self._send(("push", version, payload, time.time()))

    def push_shared(self, version: int, state: dict, sender) -> int:
        """Sync through ``sender``'s shared buffers (``orbit_core.rollout.shared_adapter``); returns the bytes."""
        message, nbytes = sender.message(version, state, self.wait_received)
        self._send(message)
        return nbytes

    def wait_received(self, version: int) -> None:
        self._wait(lambda: version in self.received, f"copying adapter v{version} out of its shared buffer")
        self.received.discard(version)

    def _write(self) -> None:
        while True:
            message, sent, errors = self._outbox.get()
            try:
                self._commands.send(message)
            except (BrokenPipeError, OSError, ValueError) as err:
                errors.append(err)
            sent.set()

    def _send(self, message, timeout_s: float | None = None) -> None:
        """Hand ``message`` to the engine's pipe; an engine that does not take it within the timeout
        is treated as crashed (and killed, which also frees the blocked writer thread)."""
        sent, errors = threading.Event(), []
        self._outbox.put((message, sent, errors))
        limit = self.timeout_s if timeout_s is None else timeout_s
        if not sent.wait(limit):
            if self.process.is_alive():
                self.process.kill()
            raise self._crash(f"did not take {message[0]!r} within {limit:.0f} s (frozen?)")
        if errors:
            self.pump()
            raise self._crash("closed its pipe") from None

    def collect(self, tag, count: int) -> list[Completion]:
        """Block until ``count`` completions of ``tag`` arrived; ordered by (prompt, sample)."""
        self._wait(lambda: len(self.results.get(tag, ())) >= count, f"generating batch {tag}")
        done = self.results.pop(tag)
        return sorted(done, key=lambda c: (c.prompt_index, c.sample_index))

    def wait_version(self, version: int) -> None:
        self._wait(lambda: self.version >= version or any(v == version for v, _ in self.failed), f"loading adapter v{version}")

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """The RolloutBackend protocol, synchronously (preflight, dynamic-sampling refills)."""
        tag = ("call", time.monotonic_ns())
        self.submit(tag, prompts, params)
        return self.collect(tag, len(prompts) * params.n)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._send(("shutdown",), timeout_s=min(self.timeout_s, 10.0))
        except OrbitError:
            pass
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)
