"""Bad input as a new user gives it: one line naming the problem and the fix, exit code 2, no traceback."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from orbit_cli.main import main
from orbit_core.config import load_recipe
from orbit_core.errors import OrbitError
from orbit_core.train import Callbacks, list_checkpoints, run_training
from tests.helpers import small_recipe, write_prompts


def orbit(monkeypatch, capsys, *args: str, stdout: list | None = None) -> tuple[int, str]:
    """Run the CLI in this process (as the console script does) -> (exit code, stderr); what it
    wrote on stdout is appended to ``stdout`` when given."""
    monkeypatch.setattr(sys, "argv", ["orbit", *args])
    with pytest.raises(SystemExit) as stop:
        main()
    said = capsys.readouterr()
    if stdout is not None:
        stdout.append(said.out)
    return stop.value.code, said.err


def one_line_error(code: int, err: str, expected: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and expected in err, err


@pytest.mark.parametrize("override, expected", [
    ("train.lr=0", "train.lr must be > 0, got 0.0"),
    ("train.lr=-1e-4", "train.lr must be > 0"),
    ("train.lr=nan", "train.lr must be a finite number, got nan"),
    ("rollout.top_k=-1", "rollout.top_k must be >= 0, got -1"),
    ("rollout.temperature=0", "rollout.temperature=0 decodes greedily: a group's samples are one answer"),
    ("rollout.n_samples_per_prompt=1", "rl.advantage_estimator=grpo measures each sample against its prompt's group; "
                                       "with rollout.n_samples_per_prompt=1 every advantage is zero"),
    ("rl.reward_timeout_s=0", "rl.reward_timeout_s must be > 0"),
    ("rollout.engine_start_timeout_s=0", "rollout.engine_timeout_s and rollout.engine_start_timeout_s > 0"),
    ("data.max_prompt_len=0", "data.max_prompt_len must be > 0"),
    ("data.max_truncated_fraction=2", "data.max_truncated_fraction must be in [0, 1]"),
    ("rl.reward_workers=-5", "rl.reward_workers must be -1"),
    ("data.train_path=x.jsonl@[", "bad slice in 'x.jsonl@['"),
    ("model.device=gpu", "model.device=gpu is not a device -- use model.device=auto, cpu, cuda or cuda:N"),
    ("model.device=meta", "model.device=meta: Orbit runs on cpu or cuda devices"),
])
def test_bad_values_are_refused_in_one_line(monkeypatch, capsys, override, expected):
    out = []
    code, err = orbit(monkeypatch, capsys, "train", "--recipe", "tiny-arith-lora", override, stdout=out)
    one_line_error(code, err, expected)
    assert out == [""]  # and no empty progress bar before it


def test_bad_files_are_refused_in_one_line(monkeypatch, capsys, tmp_path, tiny_checkpoint):
    recipe = small_recipe(tmp_path, tiny_checkpoint)
    binary = tmp_path / "latin1.jsonl"
    binary.write_bytes(b'{"question": "caf\xe9", "answer": "1"}\n')
    code, err = orbit(monkeypatch, capsys, "train", "--recipe", str(recipe), f"data.train_path={binary}")
    one_line_error(code, err, "latin1.jsonl:1 is not UTF-8 text")

    listed = tmp_path / "list.yaml"
    listed.write_text("- model\n- data\n")
    one_line_error(*orbit(monkeypatch, capsys, "train", "--recipe", str(listed)), "is a YAML list, not a mapping")

    no_tokenizer = tmp_path / "no-tok"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(f"{tiny_checkpoint}/{name}", no_tokenizer / name)
    code, err = orbit(monkeypatch, capsys, "train", "--recipe", str(recipe), f"model.path={no_tokenizer}")
    one_line_error(code, err, "cannot load a tokenizer")

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    code, err = orbit(monkeypatch, capsys, "train", "--recipe", str(recipe), f"train.output_dir={a_file}/run")
    one_line_error(code, err, f"lies under {a_file}, which is a file")

    raising = tmp_path / "raising_reward.py"
    raising.write_text("raise KeyError('oops')\n")
    code, err = orbit(monkeypatch, capsys, "train", "--recipe", str(recipe), f"rl.reward={raising}:score")
    one_line_error(code, err, "failed to import: KeyError")

    script = tmp_path / "grader_script.py"  # a CLI script given as the reward: its argparse runs on import
    script.write_text("import argparse\nparser = argparse.ArgumentParser()\nparser.add_argument('--answers', required=True)\n"
                      "args = parser.parse_args()\n\ndef score(prompt, response, label):\n    return 0.0\n")
    code, err = orbit(monkeypatch, capsys, "train", "--recipe", str(recipe), f"rl.reward={script}:score")
    one_line_error(code, err, "grader_script.py exits while importing (SystemExit: 2; it printed: orbit: error: the "
                              "following arguments are required: --answers) -- put the script's own run")


def test_the_math_reward_without_math_verify_is_refused_before_any_work(monkeypatch, capsys, tmp_path, tiny_checkpoint):
    # a broken install once scored every sample 0 and trained (and evaluated) on nothing, exit 0
    recipe = small_recipe(tmp_path, tiny_checkpoint, rl={"reward": "math"})
    monkeypatch.setitem(sys.modules, "math_verify", None)  # import math_verify now raises ImportError
    for command in ("train", "eval"):
        code, err = orbit(monkeypatch, capsys, command, "--recipe", str(recipe))
        one_line_error(code, err, "rl.reward=math needs math-verify, which cannot be imported")
        assert "pip install 'math-verify>=0.7'" in err
    assert not (tmp_path / "run").exists()


def test_a_reward_that_fails_on_every_sample_stops_the_run_in_one_line(monkeypatch, capsys, tmp_path, tiny_checkpoint):
    # one failing sample scores 0 and the run goes on (test_train_loop); a whole batch failing is
    # a broken reward, and training or evaluating on its zeros would report nothing but zeros
    reward = tmp_path / "typo_reward.py"
    reward.write_text("def score(prompt, response, label):\n    return {'x': 1.0}['y']\n")
    recipe = small_recipe(tmp_path, tiny_checkpoint, rl={"reward": f"{reward}:score"}, eval={"enabled": False})
    code, err = orbit(monkeypatch, capsys, "train", "--recipe", str(recipe))
    one_line_error(code, err, "no reward of a batch of 16 could be scored (16 errors, 0 timeouts; the last error: KeyError: 'y')")
    assert list_checkpoints(str(tmp_path / "run")) == []
    code, err = orbit(monkeypatch, capsys, "eval", "--recipe", str(recipe), "eval.enabled=true")
    one_line_error(code, err, "no reward of a batch of 4 could be scored (4 errors")


def test_a_reward_that_breaks_mid_run_stops_it_after_saving_the_last_step(tmp_path, tiny_checkpoint):
    flag = tmp_path / "broken"
    reward = tmp_path / "breaks.py"
    reward.write_text(f"import os\n\ndef score(prompt, response, label):\n"
                      f"    if os.path.exists({str(flag)!r}):\n        raise RuntimeError('backend gone')\n"
                      f"    return float('1' in response)\n")
    recipe = small_recipe(tmp_path, tiny_checkpoint, rl={"reward": f"{reward}:score"}, eval={"enabled": False},
                          train={"save_interval": 0})
    on_step = lambda metrics: flag.touch() if metrics["step"] == 2 else None  # noqa: E731
    with pytest.raises(OrbitError, match=r"no reward of a batch of 16 could be scored .*RuntimeError: backend gone"):
        run_training(load_recipe(str(recipe)), Callbacks(on_message=lambda m: None, on_step=on_step))
    assert [step for step, _ in list_checkpoints(str(tmp_path / "run"))] == [2]


def test_devices_that_are_not_there_are_refused_before_anything_loads(monkeypatch, capsys, tmp_path, tiny_checkpoint):
    recipe = str(small_recipe(tmp_path, tiny_checkpoint))
    engine = ["train.mode=async", "rollout.placement=non-colocated"]
    monkeypatch.setattr("orbit_core.train.loop.build_policy", lambda *a, **k: pytest.fail("the model loaded"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    one_line_error(*orbit(monkeypatch, capsys, "train", "--recipe", recipe, "model.device=cpu",
                          "rollout.engine_device=cuda:1", *engine),
                   "rollout.engine_device=cuda:1 but no CUDA device is visible -- use rollout.engine_device=auto or cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a machine with two GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    one_line_error(*orbit(monkeypatch, capsys, "train", "--recipe", recipe, "model.device=cuda:2"),
                   "model.device=cuda:2 but only cuda:0 to cuda:1 are visible -- use model.device=auto or a visible cuda:N")
    one_line_error(*orbit(monkeypatch, capsys, "train", "--recipe", recipe, "model.device=cpu",
                          "rollout.engine_device=cuda:7", *engine),
                   "rollout.engine_device=cuda:7 but only cuda:0 to cuda:1 are visible")


def test_preflight_given_an_override_where_the_precision_goes_says_so(monkeypatch, capsys):
    code, err = orbit(monkeypatch, capsys, "preflight", "--recipe", "tiny-arith-lora", "model.path=/x")
    one_line_error(code, err, "orbit preflight takes the precision first, then overrides; got 'model.path=/x' -- "
                              "e.g. orbit preflight bf16 --recipe NAME model.path=/x")
    one_line_error(*orbit(monkeypatch, capsys, "preflight", "int5", "--recipe", "tiny-arith-lora"),
                   "unknown precision 'int5' -- use one of int4, fp8, nvfp4, bf16")


def test_eval_of_an_adapter_whose_base_moved_says_how_to_name_it(monkeypatch, capsys, tmp_path, tiny_checkpoint):
    base = tmp_path / "base"
    shutil.copytree(tiny_checkpoint, base)
    recipe = small_recipe(tmp_path, str(base), train={"steps": 1}, eval={"enabled": False})
    run_training(load_recipe(str(recipe)), Callbacks(on_message=lambda m: None))
    base.rename(tmp_path / "moved")
    run = tmp_path / "run"
    one_line_error(*orbit(monkeypatch, capsys, "eval", "--adapter", str(run)),
                   f"{run}: the adapter's base model {base} is not there any more -- name where it is now: "
                   f"orbit eval --adapter {run} model.path=DIR")
    out = []
    code, _ = orbit(monkeypatch, capsys, "eval", "--adapter", str(run), f"model.path={tmp_path / 'moved'}",
                    "eval.n_samples=2", "eval.k=[1]", stdout=out)
    assert code == 0 and "greedy" in out[0].lower()


def test_prompts_that_encode_to_no_tokens_are_refused_by_line(monkeypatch, capsys, tmp_path, tiny_checkpoint):
    rows = write_prompts(tmp_path / "prompts.jsonl", 16)
    with open(rows, "a") as handle:
        handle.write(json.dumps({"question": "", "answer": "8"}) + "\n")
    recipe = small_recipe(tmp_path, tiny_checkpoint, data={"train_path": str(rows)}, eval={"enabled": False})
    one_line_error(*orbit(monkeypatch, capsys, "train", "--recipe", str(recipe)),
                   "train data: 1 of 17 prompts encode to no tokens (first at line 17) -- remove the empty prompts")
    one_line_error(*orbit(monkeypatch, capsys, "eval", "--recipe", str(recipe), f"eval.test_path={rows}"),
                   "eval data: 1 of 17 prompts encode to no tokens (first at line 17)")


def test_quantize_refuses_bad_arguments(monkeypatch, capsys, tmp_path, tiny_checkpoint):
    out = []
    code, err = orbit(monkeypatch, capsys, "quantize", "int3", tiny_checkpoint, str(tmp_path / "q3"), stdout=out)
    one_line_error(code, err, "unknown quantization format 'int3' -- use one of int4, fp8, nvfp4")
    assert out == [""]  # no progress bar drawn for a run that never started
    for size in ("0", "-32"):
        code, err = orbit(monkeypatch, capsys, "quantize", "int4", tiny_checkpoint, str(tmp_path / "q"), "--group-size", size)
        one_line_error(code, err, "--group-size must be a positive number")
    a_file = tmp_path / "out-file"
    a_file.write_text("x")
    one_line_error(*orbit(monkeypatch, capsys, "quantize", "int4", tiny_checkpoint, str(a_file), "--group-size", "16"),
                   "exists and is not an empty directory")
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_checkpoint, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    code, err = orbit(monkeypatch, capsys, "quantize", "int4", str(truncated), str(tmp_path / "q2"), "--group-size", "16")
    one_line_error(code, err, "is corrupted or truncated")
    assert not (tmp_path / "q2").exists()


def test_a_dataset_without_labels_is_refused_for_the_math_reward(tmp_path, tiny_checkpoint):
    rows = tmp_path / "unlabeled.jsonl"
    rows.write_text(json.dumps({"question": "1+1="}) + "\n")
    recipe = small_recipe(tmp_path, tiny_checkpoint, data={"train_path": str(rows)}, rl={"reward": "math"},
                          eval={"enabled": False})
    with pytest.raises(OrbitError, match=r"1 of 1 prompts have no label 'answer' \(first at line 1\)"):
        run_training(load_recipe(str(recipe)), Callbacks(on_message=lambda m: None))


def test_truncated_prompts_are_refused_or_counted_and_unknown_characters_counted(tmp_path, tiny_checkpoint):
    rows = write_prompts(tmp_path / "prompts.jsonl", 16)
    with open(rows, "a") as handle:  # a character the tiny tokenizer does not have
        handle.write(json.dumps({"question": "7+1=\u00e9", "answer": "8"}) + "\n")
    recipe = small_recipe(tmp_path, tiny_checkpoint, data={"train_path": str(rows), "max_prompt_len": 5},
                          train={"steps": 1}, eval={"enabled": False})
    with pytest.raises(OrbitError, match=r"train data: \d+ of 17 prompts .* longer than data.max_prompt_len=5"):
        run_training(load_recipe(str(recipe)), Callbacks(on_message=lambda m: None))
    messages: list[str] = []
    result = run_training(load_recipe(str(recipe), ["data.max_truncated_fraction=1.0"]), Callbacks(on_message=messages.append))
    summary = [m for m in messages if m.startswith("train data: 17 prompts")]
    assert summary and "1 with characters the tokenizer does not know" in summary[0]
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["data/unknown_char_prompts"] == 1 and first["data/truncated_prompts"] > 0
    assert result.steps_done == 1


def test_reward_errors_stay_on_an_80_column_progress_line():
    from rich.console import Console

    from orbit_cli.train import progress_stats

    row = {"reward/errors": 3, "reward/timeouts": 1, "reward/mean": 0.5, "entropy": 0.1, "response_len/mean": 5.0,
           "tokens_per_s": 17664.0, "time/step_s": 0.72, "time/bubble_fraction": 0.0, "staleness/max": 0,
           "sync/bytes": 628368, "sync/ms": 5.0, "kl": 0.0}
    console = Console(width=80, record=True)
    # the bar and counters take about 40 columns; the stats get what is left of the line
    console.print("train " + "━" * 20 + " 60/60 0:01:02 " + progress_stats(row), overflow="crop", no_wrap=True)
    assert "reward err 3 t/o 1" in console.export_text()
