"""Prompt JSONL files with ``path@[A:B]`` slicing and configurable keys."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from orbit_core.config.schema import DataSection
from orbit_core.data.embedded import resolve_data_path
from orbit_core.errors import OrbitError, require_path

_SLICE = re.compile(r"^(?P<path>.+)@\[(?P<start>-?\d*):(?P<stop>-?\d*)\]$")


@dataclass(frozen=True)
class PromptRecord:
    prompt: Any
    """A string, or a list of chat messages ``[{"role", "content"}]``."""
    label: Any
    line: int


def split_slice(spec: str) -> tuple[str, slice]:
    """``data.jsonl@[10:20]`` -> (``data.jsonl``, slice(10, 20)); no suffix -> the whole file."""
    match = _SLICE.match(spec)
    if not match:
        if "@[" in spec:
            raise OrbitError(f"bad slice in {spec!r}", "write path@[:N] or path@[A:B] with integers")
        return spec, slice(None)
    start, stop = match["start"], match["stop"]
    return match["path"], slice(int(start) if start else None, int(stop) if stop else None)


def read_prompts(spec: str, prompt_key: str = "prompt", label_key: str = "label") -> list[PromptRecord]:
    path, window = split_slice(spec)
    require_path(path, "prompt JSONL", is_dir=False)
    records: list[PromptRecord] = []
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise OrbitError(f"{path}:{line_no} is not UTF-8 text (byte {err.start})", "re-encode the file as UTF-8") from err
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise OrbitError(f"{path}:{line_no} is not valid JSON ({err.msg})", "fix or remove that line") from err
            if not isinstance(row, dict) or prompt_key not in row:
                keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                raise OrbitError(
                    f"{path}:{line_no} has no prompt key {prompt_key!r} (keys: {keys})",
                    "set data.prompt_key to the field holding the prompt",
                )
            records.append(PromptRecord(row[prompt_key], row.get(label_key), line_no))
    records = records[window]
    if not records:
        raise OrbitError(f"{spec} holds no prompts", "check the file and its @[A:B] slice")
    return records


def load_records(spec: str, data_cfg: DataSection) -> list[PromptRecord]:
    """A recipe's prompt file (``embedded:`` data built on first use) with the recipe's keys."""
    return read_prompts(resolve_data_path(spec), data_cfg.prompt_key, data_cfg.label_key)
