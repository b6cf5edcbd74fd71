"""Metrics sinks: a JSONL file in the run directory, and Weights & Biases when enabled."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from orbit_core.errors import OrbitError


def wandb_wanted(mode: str) -> bool:
    """``auto`` = on only when a key is configured (env, ~/.netrc or ~/.wandb_key)."""
    if mode in ("true", "offline"):
        return True
    if mode == "false":
        return False
    if os.environ.get("WANDB_API_KEY"):
        return True
    home = Path.home()
    netrc = home / ".netrc"
    return (home / ".wandb_key").is_file() or (netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"))


class MetricsLogger:
    def __init__(self, output_dir: str, wandb_mode: str = "false", project: str = "orbit", run_config: dict | None = None,
                 resume_step: int = 0, log=print):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step == 0 and self.path.exists():
            self.path.unlink()
        elif resume_step > 0 and self.path.exists():
            dropped = self._truncate_after(resume_step)
            if dropped:
                log(f"{self.path}: dropped {dropped} unreadable line(s) (a write cut short by the previous stop)")
        self.run = None
        if wandb_wanted(wandb_mode):
            try:
                import wandb
            except ImportError as err:
                raise OrbitError("train.wandb is on but wandb is not installed", "pip install 'orbit-rl[wandb]' or set train.wandb=false") from err
            if wandb_mode == "offline":
                os.environ["WANDB_MODE"] = "offline"
            self.run = wandb.init(project=project, config=run_config, dir=output_dir, resume="allow")

    def _truncate_after(self, step: int) -> int:
        """A resumed run redoes the steps after its checkpoint: drop their old lines (and any
        half-written one). Returns how many lines could not be read."""
        kept, unreadable = [], 0
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                unreadable += 1
                continue
            if isinstance(row, dict) and row.get("step", 0) <= step:
                kept.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)
        return unreadable

    def log(self, metrics: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(metrics) + "\n")
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=int(metrics.get("step", 0)))

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every readable line (a line cut short by a crash is skipped)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def write_rollouts(path: Path, step: int, groups) -> None:
    """One JSON line per sample: what produced it (adapter version) and what it scored."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for group in groups:
            for completion, score in zip(group.completions, group.scores):
                handle.write(json.dumps({
                    "step": step, "adapter_version": completion.adapter_version, "reward": score,
                    "prompt_ids": completion.prompt_ids, "token_ids": completion.token_ids,
                    "logprobs": completion.logprobs, "text": completion.text, "finish_reason": completion.finish_reason,
                }) + "\n")
