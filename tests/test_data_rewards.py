"""Prompt JSONL, slicing, chat templates, and reward functions."""

from __future__ import annotations

import json

import pytest

from orbit_core.data import encode_prompt, read_prompts, split_slice, use_chat_template
from orbit_core.errors import OrbitError
from orbit_core.models import load_tokenizer
from orbit_core.rl.rewards import RewardRunner, extract_boxed, load_reward_fn, math_reward


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_slicing_and_keys(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"q": f"p{i}", "a": i} for i in range(10)])
    assert split_slice(f"{path}@[2:5]") == (path, slice(2, 5))
    assert [r.prompt for r in read_prompts(f"{path}@[:3]", "q", "a")] == ["p0", "p1", "p2"]
    assert [r.label for r in read_prompts(f"{path}@[7:]", "q", "a")] == [7, 8, 9]
    assert len(read_prompts(path, "q", "a")) == 10


def test_missing_prompt_key_names_file_and_line(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "a"}, {"question": "b"}])
    with pytest.raises(OrbitError, match=r"d.jsonl:2 has no prompt key 'prompt' \(keys: question\)"):
        read_prompts(path)
    with pytest.raises(OrbitError, match="prompt JSONL not found"):
        read_prompts(str(tmp_path / "nope.jsonl"))
    with pytest.raises(OrbitError, match="bad slice"):
        read_prompts(f"{path}@[a:b]")


def test_chat_template_is_applied_when_present(tiny_checkpoint, tmp_path):
    tok = load_tokenizer(tiny_checkpoint)
    assert not use_chat_template(tok, "auto")
    with pytest.raises(OrbitError, match="has no chat template"):
        use_chat_template(tok, "true")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}={% endfor %}{% if add_generation_prompt %}+{% endif %}"
    tok.save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert use_chat_template(tok, "auto")
    ids = encode_prompt(tok, "12", chat=True, max_len=64)
    assert tok.decode(ids) == "12=+"
    assert tok.decode(encode_prompt(tok, "12", chat=False, max_len=64)) == "12"


def test_math_reward_with_boxed_extraction():
    assert extract_boxed("so \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"
    assert extract_boxed("no box") is None
    assert math_reward("", "the answer is \\boxed{46}", "46") == 1.0
    assert math_reward("", "\\boxed{0.5}", "\\frac{1}{2}") == 1.0
    assert math_reward("", "46 then \\boxed{45}", "46") == 0.0  # the boxed answer is the answer
    assert math_reward("", "", "46") == 0.0


def test_user_reward_by_module_and_by_file(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def exact(prompt, response, label):\n    return float(response == label)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward_fn("my_rewards:exact")("", "7", "7") == 1.0
    assert load_reward_fn(f"{tmp_path / 'my_rewards.py'}:exact")("", "7", "8") == 0.0
    with pytest.raises(OrbitError, match="has no function 'nope'"):
        load_reward_fn("my_rewards:nope")
    with pytest.raises(OrbitError, match="cannot import reward module"):
        load_reward_fn("not_a_module_xyz:f")
    with pytest.raises(OrbitError, match="is not a reward"):
        load_reward_fn("justaname")


def test_what_a_reward_module_prints_on_import_still_reaches_the_user(tmp_path, monkeypatch, capsys):
    (tmp_path / "chatty_rewards.py").write_text(
        "import sys\nprint('grader ready')\nprint('using cache', file=sys.stderr)\n\n"
        "def exact(prompt, response, label):\n    return float(response == label)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward_fn("chatty_rewards:exact")("", "7", "7") == 1.0
    said = capsys.readouterr()
    assert said.out == "grader ready\n" and said.err == "using cache\n"


def test_runner_counts_errors_and_timeouts():
    import time

    def flaky(prompt, response, label):
        if prompt == "raise":
            raise ValueError("bad")
        if prompt == "hang":
            time.sleep(5)
        return 1.0

    start = time.monotonic()
    scores, stats = RewardRunner(flaky, timeout_s=0.2, workers=2).score(["ok", "raise", "hang", "hang", "ok"], [""] * 5, [None] * 5)
    assert time.monotonic() - start < 2.0
    assert scores == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert (stats.errors, stats.timeouts) == (1, 2)
    assert "ValueError: bad" in stats.last_error
