"""The run directory's rules: whose files are in it, what may be resumed, when a run is finished.

* ``train.resume=never`` in a directory that already holds files is refused (two runs would share
  ``keep_last`` and ``metrics.jsonl``), unless ``train.overwrite=true`` moves the old contents aside.
* ``resume=auto`` takes the newest checkpoint that loads whole, naming any damaged one it skips.
* A resumed run lists how its recipe differs from the checkpoint's; changes to the adapter's shape
  or method are refused, since the saved tensors could not be loaded into it.
* ``config.yaml`` is written by the loop only once the run really starts.
* One run at a time: a run holds an exclusive lock on ``.orbit-run.lock`` in its directory from
  before it reads anything there until it ends. A second ``orbit train`` on the same directory is
  refused; without the lock it would resume from the first one's checkpoints and prune them under
  ``keep_last``. The lock is the operating system's (``flock``), so a crashed run leaves none.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from orbit_core.config.loader import to_dict
from orbit_core.config.schema import RecipeConfig
from orbit_core.errors import OrbitError
from orbit_core.policy.adapter_files import list_checkpoints
from orbit_core.train.checkpoint import load_checkpoint, load_latest_valid

EVAL_REPORT = "eval_report.json"
ADAPTER_SHAPE_FIELDS = ("peft.method", "peft.rank", "peft.target_modules", "peft.oft_block_size", "peft.oft_block_share",
                        "rl.value_head")
"""Fields that decide which adapter tensors exist and their shapes."""
NOT_A_CHANGE = ("train.resume", "train.overwrite")


LOCK = ".orbit-run.lock"


class RunLock:
    """This process's hold on a run directory (created if missing) until ``release``."""

    def __init__(self, out: Path):
        self.out, self.created = out, not out.exists()
        path = out / LOCK
        for _ in range(5):
            out.mkdir(parents=True, exist_ok=True)
            handle = open(path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise OrbitError(f"train.output_dir={out} is in use by a running orbit train ({holder})",
                                 "let it finish or stop it, or pick another train.output_dir") from None
            try:  # a run that just ended may have removed the file it held: then lock the new one
                if os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            handle.close()
        else:
            raise OrbitError(f"could not lock {path}: it kept being replaced", "retry the command")
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self.handle = handle

    def release(self) -> None:
        """Let go; a directory this run created and left without run files is removed again."""
        if self.handle.closed:
            return
        if self.created and not _run_files(self.out):
            (self.out / LOCK).unlink(missing_ok=True)  # still held: a run waiting on it sees it replaced
            try:
                self.out.rmdir()
            except OSError:
                pass
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


def _run_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name != LOCK) if out.is_dir() else []


@dataclass
class ResumePlan:
    state: dict[str, Any] | None = None
    """The loaded checkpoint to continue from (None: start at step 0)."""
    changes: list[str] = field(default_factory=list)
    """``section.field: old -> new`` for every recipe field that differs from the checkpoint's."""
    saved_report: dict[str, Any] | None = None
    """The run's ``eval_report.json`` when it has one."""
    lock: RunLock | None = None
    """Held from planning to the end of the run (``TrainingRun.close``)."""

    @property
    def start_step(self) -> int:
        return int(self.state["trainer_state"]["step"]) if self.state else 0


def _check_output_dir(out: Path) -> None:
    for parent in (out, *out.parents):
        if parent.exists():
            if not parent.is_dir():
                raise OrbitError(f"train.output_dir={out} lies under {parent}, which is a file",
                                 "point train.output_dir at a directory path")
            return


def _move_aside(out: Path, log: Callable[[str], None]) -> None:
    aside = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    suffix = 1
    while aside.exists():
        aside = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{suffix}")
        suffix += 1
    out.rename(aside)
    log(f"train.overwrite=true: moved the previous contents of {out} to {aside}")


def _flatten(tree: dict[str, Any]) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in tree.items() if isinstance(values, dict)
            for key, value in values.items()}


def recipe_changes(saved: dict[str, Any], current: RecipeConfig) -> tuple[list[str], list[str]]:
    """(every changed field as ``name: old -> new``, the names among them that change the adapter's shape)."""
    old, new = _flatten(saved), _flatten(to_dict(current))
    changed = sorted(k for k in new if k in old and old[k] != new[k] and k not in NOT_A_CHANGE)
    return [f"{k}: {old[k]!r} -> {new[k]!r}" for k in changed], [k for k in changed if k in ADAPTER_SHAPE_FIELDS]


def read_report(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / EVAL_REPORT).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def plan_resume(config: RecipeConfig, log: Callable[[str], None]) -> ResumePlan:
    """Take the run directory's lock, then decide, before anything is loaded or written, where this
    run starts. The plan holds the lock; it is released here if planning fails."""
    out = Path(config.train.output_dir)
    _check_output_dir(out)
    lock = RunLock(out)
    try:
        plan = _plan(config, out, lock, log)
    except BaseException:
        lock.release()
        raise
    return plan


def _plan(config: RecipeConfig, out: Path, lock: RunLock, log: Callable[[str], None]) -> ResumePlan:
    t = config.train
    if _run_files(out):
        if t.overwrite:
            _move_aside(out, log)
            lock.release()  # it moved aside with the old files; the new directory gets its own
            lock = RunLock(out)
        elif t.resume == "never":
            held = ", ".join(_run_files(out)[:4])
            raise OrbitError(f"train.output_dir={out} already holds another run's files ({held}), and train.resume=never "
                             "would mix the two runs", "continue it with train.resume=auto, move it aside with "
                             "train.overwrite=true, or pick another train.output_dir")
    if t.resume == "never":
        return ResumePlan(lock=lock)
    if t.resume == "auto":
        state = load_latest_valid(str(out), log)
        if state is None and list_checkpoints(str(out)):
            raise OrbitError(f"every checkpoint in {out / 'checkpoints'} is damaged", "start over with train.overwrite=true")
    else:
        path = Path(t.resume)
        if not path.is_dir():
            raise OrbitError(f"train.resume={t.resume}: no such checkpoint directory", "use auto, never or a step_* directory")
        state = load_checkpoint(path)
    if state is None:
        return ResumePlan(lock=lock)
    saved = state["adapter_config"].get("recipe")
    changes: list[str] = []
    if isinstance(saved, dict):
        changes, shape = recipe_changes(saved, config)
        if shape:
            raise OrbitError(f"cannot resume {state['path']}: {', '.join(c for c in changes if c.split(':')[0] in shape)} "
                             "changes the adapter's tensors", "resume with the checkpoint's adapter settings, or start a "
                             "new run in another train.output_dir")
    return ResumePlan(state, changes, read_report(out), lock)
