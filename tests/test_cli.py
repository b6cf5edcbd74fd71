"""The `orbit` command as a user runs it: exit codes, one-line errors, dry-run, train and eval."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers import small_recipe

ORBIT = [sys.executable, "-m", "orbit_cli.main"]


def run(*args, env_extra=None, timeout=600):
    env = {**os.environ, "COLUMNS": "200", **(env_extra or {})}
    return subprocess.run([*ORBIT, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_help_lists_every_command():
    out = run("--help")
    assert out.returncode == 0
    for command in ("convert", "quantize", "preflight", "train", "eval", "recipes"):
        assert command in out.stdout


def test_user_errors_are_one_line_without_traceback(tmp_path):
    out = run("train", "--recipe", "tiny-arith-lora", "train.lrr=1")
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: unknown key 'train.lrr'")
    assert len(out.stderr.strip().splitlines()) == 1
    out = run("train", "--recipe", "tiny-arith-lora", f"model.path={tmp_path}/missing", "eval.enabled=false")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "model checkpoint directory not found" in out.stderr
    debug = run("--debug", "train", "--recipe", "tiny-arith-lora", "train.lrr=1")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_dry_run_prints_resolved_yaml_and_loads_nothing(tmp_path):
    out = run("train", "--recipe", "tiny-arith-lora", "train.lr=5e-4", "--dry-run",
              env_extra={"ORBIT_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 0
    assert "lr: 0.0005" in out.stdout
    assert not (tmp_path / "cache").exists()


def test_recipes_list_and_show():
    assert "tiny-arith-lora" in run("recipes", "list").stdout
    assert "warmstart_steps" in run("recipes", "show", "tiny-arith-lora").stdout


def test_train_then_eval_adapter(tmp_path, tiny_checkpoint):
    recipe = small_recipe(tmp_path, tiny_checkpoint, train={"steps": 2})
    out = run("train", "--recipe", str(recipe))
    assert out.returncode == 0, out.stderr
    run_dir = tmp_path / "run"
    assert (run_dir / "reward_curve.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((run_dir / "eval_report.json").read_text())
    assert set(report["after"]["pass_at_k"]) == {"pass@1", "pass@2"}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"reward/mean", "kl", "entropy", "response_len/mean", "tokens_per_s", "time/step_s"} <= set(rows[-2])
    out = run("eval", "--adapter", str(run_dir), "--json", str(tmp_path / "eval.json"))
    assert out.returncode == 0, out.stderr
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["num_prompts"] == 4
    assert evaluated["greedy_accuracy"] == report["after"]["greedy_accuracy"]  # greedy is deterministic
    out = run("eval", "--adapter", str(tmp_path / "nowhere"))
    assert out.returncode == 2 and "no adapter in" in out.stderr
    # the same command again: the finished run is shown, not redone, and its report kept
    saved = (run_dir / "eval_report.json").read_text()
    again = run("train", "--recipe", str(recipe))
    assert again.returncode == 0, again.stderr
    assert "already complete at step 2" in again.stdout
    assert f"{report['after']['greedy_accuracy']:.1%}" in again.stdout
    assert "checkpoint: None" not in again.stdout
    assert (run_dir / "eval_report.json").read_text() == saved


def test_completion_scripts_match_the_cli():
    root = os.path.join(os.path.dirname(__file__), "..", "completions")
    for shell, ext in (("bash", "bash"), ("zsh", "zsh"), ("fish", "fish")):
        orbit_script = os.path.join(os.path.dirname(sys.executable), "orbit")
        generated = subprocess.run([orbit_script], capture_output=True, text=True,
                                   env={**os.environ, "_ORBIT_COMPLETE": f"source_{shell}"})
        assert generated.returncode == 0, generated.stderr
        with open(os.path.join(root, f"orbit.{ext}")) as handle:
            assert handle.read().strip() == generated.stdout.strip()
