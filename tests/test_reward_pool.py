"""Reward scoring: the process pool against the in-process thread runner, timeouts, bad return values."""

from __future__ import annotations

import select
import threading
import time

import pytest

from orbit_core.config.schema import RLSection
from orbit_core.errors import OrbitError
from orbit_core.rl.reward_pool import RewardPool, build_rewards
from orbit_core.rl.rewards import RewardRunner, load_reward_fn

REWARD = """
import math, time, os
def score(prompt, response, label):
    if response == "hang":
        time.sleep(60)
    if response == "nan":
        return float("nan")
    if response == "inf":
        return math.inf
    if response == "str":
        return "1.0"
    if response == "exit":
        os._exit(3)
    if response == "raise":
        raise ValueError("bad sample")
    print("user output goes to stderr, not into the protocol")
    return float(len(response)) + (label or 0)
"""


@pytest.fixture()
def reward_spec(tmp_path):
    path = tmp_path / "reward.py"
    path.write_text(REWARD)
    return f"{path}:score"


def test_pool_scores_equal_the_thread_runner(reward_spec):
    responses = ["a" * i for i in range(40)] + ["nan", "inf", "str", "raise"]
    labels = list(range(len(responses)))
    threads = RewardRunner(load_reward_fn(reward_spec), timeout_s=5.0)
    pool = RewardPool(reward_spec, workers=2, timeout_s=5.0)
    try:
        assert pool.score_each(["p"] * len(responses), responses, labels) == \
            threads.score_each(["p"] * len(responses), responses, labels)
    finally:
        pool.close()


def test_non_finite_and_non_numeric_rewards_are_errors_scoring_zero(reward_spec):
    runner = RewardRunner(load_reward_fn(reward_spec), timeout_s=5.0)
    scores, stats = runner.score(["p"] * 4, ["nan", "inf", "str", "ok"], [None] * 4)
    assert scores == [0.0, 0.0, 0.0, 2.0]
    assert stats.errors == 3
    assert "expected a number" in stats.last_error


def test_timeout_kills_the_worker_and_leaks_nothing(reward_spec):
    pool = RewardPool(reward_spec, workers=2, timeout_s=0.5)
    try:
        pool.score_each(["p"], ["warm"], [0])  # workers up
        pids = {w.proc.pid for w in pool.workers}
        threads_before = threading.active_count()
        start = time.monotonic()
        scores, outcomes = pool.score_each(["p"] * 4, ["hang", "ab", "exit", "abc"], [0] * 4)
        assert time.monotonic() - start < 5.0
        assert outcomes[0] == "timeout" and scores[0] == 0.0
        assert outcomes[2].startswith("error: reward worker exited with code 3")
        assert scores[1] == 2.0 and scores[3] == 3.0
        assert pool.restarts == 2
        hung = [w for w in pool.workers if w.proc.pid in pids]
        assert len(hung) < 2  # the hung worker was replaced, not left running
        assert threading.active_count() == threads_before
    finally:
        pool.close()
    assert all(w.proc.poll() is not None for w in pool.workers)


def test_workers_that_were_ready_during_a_long_model_load_score_after_the_start_limit(reward_spec):
    """The pool starts while the model loads; a load longer than the start limit must not be read as
    workers that never started (their "ready" sits unread in the pipes until the first score)."""
    pool = RewardPool(reward_spec, workers=2, timeout_s=5.0, start_timeout_s=0.5)
    try:
        waiting = {w.fd for w in pool.workers}
        deadline = time.monotonic() + 60
        while waiting and time.monotonic() < deadline:  # each worker has written its "ready"
            ready, _, _ = select.select(list(waiting), [], [], 1.0)
            waiting -= set(ready)
        assert not waiting
        time.sleep(max(0.0, 0.6 - (time.monotonic() - min(w.spawned for w in pool.workers))))
        scores, outcomes = pool.score_each(["p"] * 3, ["a", "ab", "abc"], [0] * 3)
        assert scores == [1.0, 2.0, 3.0] and outcomes == ["ok"] * 3
    finally:
        pool.close()


def test_no_worker_ready_within_the_start_limit_stops_the_pool_with_one_line(tmp_path):
    (tmp_path / "slow_reward.py").write_text("import time\ntime.sleep(60)\ndef score(p, r, l):\n    return 1.0\n")
    pool = RewardPool(f"{tmp_path / 'slow_reward.py'}:score", workers=2, start_timeout_s=1.0)
    start = time.monotonic()
    with pytest.raises(OrbitError, match="no reward worker started within 1 s") as err:
        pool.score_each(["p"], ["a"], [0])
    assert time.monotonic() - start < 10
    assert "rl.reward_workers=0" in err.value.fix
    assert all(w.proc.poll() is not None for w in pool.workers)  # none left importing


def test_build_rewards_picks_pool_or_threads_and_reports_bad_modules(tmp_path, reward_spec):
    pool = build_rewards(RLSection(reward=reward_spec, reward_workers=1))
    try:
        assert isinstance(pool, RewardPool) and len(pool.workers) == 1
    finally:
        pool.close()
    assert isinstance(build_rewards(RLSection(reward=reward_spec, reward_workers=0)), RewardRunner)
    broken = tmp_path / "broken_pkg"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise RuntimeError('module-level failure')\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(OrbitError, match="reward module 'broken_pkg' failed to import: RuntimeError"):
            build_rewards(RLSection(reward="broken_pkg:score"))
    finally:
        sys.path.remove(str(tmp_path))
