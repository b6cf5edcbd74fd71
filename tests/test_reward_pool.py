"""Reward scoring: the process pool against the in-process thread runner, timeouts, bad return values."""

from __future__ import annotations

import threading
import time

import pytest

from orbit_core.config.schema import RLSection
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
        from orbit_core.errors import OrbitError

        with pytest.raises(OrbitError, match="reward module 'broken_pkg' failed to import: RuntimeError"):
            build_rewards(RLSection(reward="broken_pkg:score"))
    finally:
        sys.path.remove(str(tmp_path))
