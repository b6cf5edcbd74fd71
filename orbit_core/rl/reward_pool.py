"""Reward scoring in a pool of worker processes, started once per run (``rl.reward_workers``).

Each worker is ``python -m orbit_core.rl.reward_worker SPEC``: it loads the reward function once
and answers one sample at a time over its stdin/stdout (length-prefixed pickles). Samples go to
whichever worker is free. A sample that runs past ``timeout_s`` scores 0 as a timeout and its
worker is killed and replaced, so a hung reward leaks neither a thread nor a process. A worker
that dies mid-sample is replaced the same way and that sample counts as an error.
"""

from __future__ import annotations

import os
import pickle
import selectors
import struct
import subprocess
import sys
import time
from collections import deque
from typing import Any

from orbit_core.config.schema import RLSection
from orbit_core.errors import OrbitError
from orbit_core.rl.rewards import RewardRunner, RewardStats, load_reward_fn, outcome_labels, summarize

HEADER = struct.Struct("<I")


def frame(message: Any) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(body)) + body


class _Worker:
    def __init__(self, spec: str):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.proc = subprocess.Popen([sys.executable, "-m", "orbit_core.rl.reward_worker", spec],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.fd = self.proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.buffer = b""
        self.ready = False
        self.task: int | None = None
        self.started = 0.0
        self.spawned = time.monotonic()

    def send(self, message: Any) -> None:
        self.proc.stdin.write(frame(message))
        self.proc.stdin.flush()

    def receive(self) -> list[Any] | None:
        """Every complete message that has arrived; None when the worker closed its end."""
        try:
            chunk = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return []
        if not chunk:
            return None
        self.buffer += chunk
        messages = []
        while len(self.buffer) >= HEADER.size:
            (size,) = HEADER.unpack_from(self.buffer)
            if len(self.buffer) < HEADER.size + size:
                break
            messages.append(pickle.loads(self.buffer[HEADER.size:HEADER.size + size]))
            self.buffer = self.buffer[HEADER.size + size:]
        return messages

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


class RewardPool:
    """Same interface as ``RewardRunner``; ``close()`` ends the workers."""

    def __init__(self, spec: str, workers: int, timeout_s: float = 10.0, start_timeout_s: float = 120.0):
        self.spec, self.timeout_s = spec, timeout_s
        self.start_timeout_s = start_timeout_s
        self.workers = [_Worker(spec) for _ in range(max(1, workers))]
        self.restarts = 0

    def score(self, prompts: list[str], responses: list[str], labels: list[Any]) -> tuple[list[float], RewardStats]:
        scores, outcomes = self.score_each(prompts, responses, labels)
        return scores, summarize(outcomes)

    def _replace(self, index: int) -> None:
        self.workers[index].kill()
        self.workers[index] = _Worker(self.spec)
        self.restarts += 1

    def score_each(self, prompts: list[str], responses: list[str], labels: list[Any]) -> tuple[list[float], list[str]]:
        todo = deque(range(len(prompts)))
        outcome: list[tuple[str, Any] | None] = [None] * len(prompts)
        remaining = len(prompts)
        while remaining:
            now = time.monotonic()
            for w in self.workers:
                if w.ready and w.task is None and todo:
                    w.task, w.started = todo.popleft(), now
                    w.send((w.task, prompts[w.task], responses[w.task], labels[w.task]))
            deadlines = [w.started + self.timeout_s - now for w in self.workers if w.task is not None]
            wait = max(0.0, min(deadlines + [0.5]))
            with selectors.DefaultSelector() as selector:
                for w in self.workers:
                    selector.register(w.fd, selectors.EVENT_READ, w)
                ready = [key.data for key, _ in selector.select(wait)]
            for w in ready:
                messages = w.receive()
                if messages is None:  # the worker died (a reward that exits or crashes the interpreter)
                    if w.task is not None:
                        try:
                            code = w.proc.wait(timeout=5)
                        except subprocess.TimeoutExpired:
                            code = None
                        outcome[w.task] = ("error", f"reward worker exited with code {code}")
                        remaining -= 1
                    self._replace(self.workers.index(w))
                    continue
                for message in messages:
                    if message[0] == "ready":
                        w.ready = True
                    elif message[0] == "fatal":
                        self.close()
                        raise OrbitError(f"reward worker failed to start: {message[1]}", "fix rl.reward")
                    else:
                        index, result = message
                        outcome[index], w.task = result, None
                        remaining -= 1
            now = time.monotonic()
            # judged after the pipes are read: workers start while the model loads, and a load
            # longer than the limit leaves their "ready" unread until the first score
            if not any(w.ready for w in self.workers) and now - min(w.spawned for w in self.workers) > self.start_timeout_s:
                self.close()
                raise OrbitError(f"no reward worker started within {self.start_timeout_s:g} s",
                                 "check that the reward module imports quickly, or set rl.reward_workers=0")
            for i, w in enumerate(self.workers):
                if w.task is not None and now - w.started > self.timeout_s:
                    outcome[w.task] = ("timeout", None)
                    remaining -= 1
                    self._replace(i)
        return outcome_labels(outcome)

    def close(self) -> None:
        for w in self.workers:
            w.kill()


def build_rewards(rl_cfg: RLSection) -> RewardRunner | RewardPool:
    """The reward function is loaded here first, so a bad ``rl.reward`` fails with one line before any worker starts."""
    fn = load_reward_fn(rl_cfg.reward)
    if rl_cfg.reward_workers == 0:
        return RewardRunner(fn, timeout_s=rl_cfg.reward_timeout_s)
    workers = rl_cfg.reward_workers if rl_cfg.reward_workers > 0 else (os.cpu_count() or 1)
    return RewardPool(rl_cfg.reward, workers, timeout_s=rl_cfg.reward_timeout_s)
