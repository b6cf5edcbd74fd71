"""Entry point of one reward worker process: ``python -m orbit_core.rl.reward_worker SPEC``.

Reads ``(index, prompt, response, label)`` frames on stdin and answers ``(index, outcome)`` on
stdout. The protocol keeps the original stdout; anything the reward prints goes to stderr.
"""

from __future__ import annotations

import os
import pickle
import sys

from orbit_core.errors import OrbitError
from orbit_core.rl.reward_pool import HEADER, frame
from orbit_core.rl.rewards import call_reward, load_reward_fn


def _read_exactly(stream, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def main(spec: str) -> None:
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(message) -> None:
        channel.write(frame(message))
        channel.flush()

    try:
        fn = load_reward_fn(spec)
    except OrbitError as err:
        reply(("fatal", str(err)))
        return
    reply(("ready",))
    stdin = sys.stdin.buffer
    while True:
        header = _read_exactly(stdin, HEADER.size)
        if header is None:  # the trainer is gone or closed the pool
            return
        body = _read_exactly(stdin, HEADER.unpack(header)[0])
        if body is None:
            return
        index, prompt, response, label = pickle.loads(body)
        reply((index, call_reward(fn, prompt, response, label)))


if __name__ == "__main__":
    main(sys.argv[1])
