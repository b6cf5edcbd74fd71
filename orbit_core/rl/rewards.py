"""Reward functions: math answers via math-verify, or a user's ``module:function`` / ``file.py:function``.

A user function is called as ``fn(prompt: str, response: str, label) -> float``. One that raises,
exceeds the timeout, or returns something that is not a finite number (NaN, inf, the string
``"1.0"``) scores 0 for that sample; the run goes on and the failures are counted. A batch of
which no sample scored stops the run (``require_a_score``).
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import logging
import math
import numbers
import os
import re
import sys
import threading
import time
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from typing import Any, Callable

from orbit_core.errors import OrbitError

RewardFn = Callable[[str, str, Any], float]

_BOXED = "\\boxed{"


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``, braces balanced; None when there is none."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, i = 1, start + len(_BOXED)
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def math_reward(prompt: str, response: str, label: Any) -> float:
    """1.0 when the response's answer equals the label under math-verify, else 0.0.

    Only a boxed answer counts when the response has one; otherwise the whole response is parsed.
    Runs in worker threads, so math-verify's signal-based timeouts are off (ours applies instead).
    """
    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    boxed = extract_boxed(response)
    candidate = f"${boxed}$" if boxed is not None else response
    if not candidate.strip():
        return 0.0
    gold = parse(f"${label}$", parsing_timeout=None)
    answer = parse(candidate, parsing_timeout=None)
    if not gold or not answer:
        return 0.0
    return 1.0 if verify(gold, answer, timeout_seconds=None) else 0.0


_EXITS_FIX = "put the script's own run (argument parsing, main()) under `if __name__ == '__main__':`"
"""A script given as a reward module runs its top level on import: argparse or ``sys.exit``
there would end the trainer with the script's own message."""


class _Said:
    def __init__(self):
        self.out, self.err = io.StringIO(), io.StringIO()

    def last(self) -> str:
        lines = [line.strip() for line in (self.out.getvalue() + self.err.getvalue()).splitlines() if line.strip()]
        return f"; it printed: {lines[-1][:160]}" if lines else ""


@contextmanager
def _held_output():
    """What a user module prints while importing is held back: passed on if the import returns,
    folded into the one error line if the module exits (argparse prints its usage first)."""
    said, exited = _Said(), False
    try:
        with redirect_stdout(said.out), redirect_stderr(said.err):
            yield said
    except SystemExit:
        exited = True
        raise
    finally:
        if not exited:
            sys.stdout.write(said.out.getvalue())
            sys.stderr.write(said.err.getvalue())


def load_reward_fn(spec: str) -> RewardFn:
    """``math``, ``package.module:function`` or ``path/to/file.py:function``."""
    if spec == "math":
        # imported here, not on the first sample: a broken install would otherwise score every
        # sample 0 (a per-sample reward error) and train the whole run on nothing
        try:
            importlib.import_module("math_verify")
        except ImportError as err:
            raise OrbitError(f"rl.reward=math needs math-verify, which cannot be imported ({err})",
                             "pip install 'math-verify>=0.7' (an orbit-rl dependency), or use "
                             "rl.reward=module:function") from err
        return math_reward
    module_name, sep, func_name = spec.rpartition(":")
    if not sep or not module_name or not func_name:
        raise OrbitError(f"rl.reward={spec!r} is not a reward", "use math, module:function or file.py:function")
    if module_name.endswith(".py") or os.sep in module_name:
        if not os.path.isfile(module_name):
            raise OrbitError(f"reward file not found: {module_name}", "check rl.reward's path")
        loader_spec = importlib.util.spec_from_file_location(f"orbit_user_reward_{abs(hash(module_name))}", module_name)
        module = importlib.util.module_from_spec(loader_spec)
        try:
            with _held_output() as said:
                loader_spec.loader.exec_module(module)
        except SystemExit as err:
            raise OrbitError(f"reward file {module_name} exits while importing (SystemExit: {err}{said.last()})",
                             _EXITS_FIX) from err
        except Exception as err:
            raise OrbitError(f"reward file {module_name} failed to import: {type(err).__name__}: {err}", "fix the file") from err
    else:
        try:
            with _held_output() as said:
                module = importlib.import_module(module_name)
        except ImportError as err:
            raise OrbitError(f"cannot import reward module {module_name!r} ({err})", "install it or put it on PYTHONPATH") from err
        except SystemExit as err:
            raise OrbitError(f"reward module {module_name!r} exits while importing (SystemExit: {err}{said.last()})",
                             _EXITS_FIX) from err
        except Exception as err:  # the module itself raised while importing
            raise OrbitError(f"reward module {module_name!r} failed to import: {type(err).__name__}: {err}",
                             "fix the module") from err
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise OrbitError(f"{module_name} has no function {func_name!r}", "check rl.reward's function name")
    return fn


def checked_score(value: Any) -> tuple[str, Any]:
    """A reward function's return value as an outcome: ``("ok", float)`` or ``("error", why)``.

    Only real numbers count (bool and numpy scalars included); a string such as ``"1.0"`` is a bug
    in the reward, not a score, and NaN/inf would poison the advantages and then the adapter.
    """
    if not isinstance(value, numbers.Real):
        return "error", f"reward returned {type(value).__name__} {value!r:.40}, expected a number"
    value = float(value)
    if not math.isfinite(value):
        return "error", f"reward returned {value}, expected a finite number"
    return "ok", value


def call_reward(fn: RewardFn, prompt: str, response: str, label: Any) -> tuple[str, Any]:
    try:
        return checked_score(fn(prompt, response, label))
    except Exception as err:  # a user's reward bug must not stop the run
        return "error", re.sub(r"\s+", " ", f"{type(err).__name__}: {err}")[:200]


@dataclass
class RewardStats:
    errors: int = 0
    timeouts: int = 0
    last_error: str = ""


def require_a_score(stats: RewardStats, count: int) -> None:
    """Stop when not one of ``count`` samples could be scored. A single failure scores 0 and the
    run goes on, but a batch that failed whole is a broken reward or environment (a missing
    import, a renamed field, a timeout shorter than any call): its rewards are all 0, its group
    advantages all 0, and the run would go on learning nothing while it looked healthy."""
    if count and stats.errors + stats.timeouts == count:
        last = f"the last error: {stats.last_error}" if stats.last_error else "all ran past rl.reward_timeout_s"
        raise OrbitError(f"no reward of a batch of {count} could be scored ({stats.errors} errors, "
                         f"{stats.timeouts} timeouts; {last})",
                         "fix the reward function named by rl.reward (return 0.0 for a response it cannot "
                         "score), or raise rl.reward_timeout_s")


def outcome_labels(outcome: list[tuple[str, Any]]) -> tuple[list[float], list[str]]:
    """Scores (failures score 0) and per sample ``ok``, ``timeout`` or ``error: <message>``."""
    scores = [value if kind == "ok" else 0.0 for kind, value in outcome]
    return scores, [kind if kind != "error" else f"error: {value}" for kind, value in outcome]


class RewardRunner:
    """Scores samples on daemon threads in this process, at most ``workers`` at a time (``rl.reward_workers=0``).

    A call that hangs is abandoned and its worker slot handed back, so one stuck sample cannot
    stall the batch; the abandoned thread itself runs on until the function returns, which is
    why the default is the process pool (``RewardPool``), where a stuck worker is killed.
    """

    def __init__(self, fn: RewardFn, timeout_s: float = 10.0, workers: int = 4):
        self.fn = fn
        self.timeout_s = timeout_s
        self.workers = workers

    def score(self, prompts: list[str], responses: list[str], labels: list[Any]) -> tuple[list[float], RewardStats]:
        scores, outcomes = self.score_each(prompts, responses, labels)
        return scores, summarize(outcomes)

    def score_each(self, prompts: list[str], responses: list[str], labels: list[Any]) -> tuple[list[float], list[str]]:
        count = len(prompts)
        slots = threading.Semaphore(self.workers)
        lock = threading.Lock()
        started: list[float | None] = [None] * count
        outcome: list[tuple[str, Any] | None] = [None] * count

        def run(i: int) -> None:
            slots.acquire()
            with lock:
                started[i] = time.monotonic()
            result = call_reward(self.fn, prompts[i], responses[i], labels[i])
            with lock:
                if outcome[i] is None:
                    outcome[i] = result
                    slots.release()

        for i in range(count):
            threading.Thread(target=run, args=(i,), daemon=True, name=f"orbit-reward-{i}").start()
        while True:
            with lock:
                now = time.monotonic()
                for i in range(count):
                    if outcome[i] is None and started[i] is not None and now - started[i] > self.timeout_s:
                        outcome[i] = ("timeout", None)
                        slots.release()
                if all(o is not None for o in outcome):
                    break
            time.sleep(0.002)
        return outcome_labels(outcome)

    def close(self) -> None:
        pass


def summarize(outcomes: list[str]) -> RewardStats:
    stats = RewardStats()
    for outcome in outcomes:
        if outcome == "timeout":
            stats.timeouts += 1
        elif outcome != "ok":
            stats.errors += 1
            stats.last_error = outcome[len("error: "):]
    return stats
