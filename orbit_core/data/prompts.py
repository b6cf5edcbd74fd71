"""Turn prompt records into token ids, through the tokenizer's chat template when it has one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orbit_core.config.schema import DataSection
from orbit_core.data.jsonl import PromptRecord
from orbit_core.errors import OrbitError


def use_chat_template(tokenizer, mode: str) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if mode == "true" and not has_template:
        raise OrbitError("data.apply_chat_template=true but the tokenizer has no chat template", "set data.apply_chat_template=auto or false")
    return has_template if mode == "auto" else mode == "true"


def _full_ids(tokenizer, prompt: Any, chat: bool) -> list[int]:
    if chat:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    if isinstance(prompt, list):
        prompt = "\n".join(str(m.get("content", "")) for m in prompt)
    return tokenizer(str(prompt), add_special_tokens=False)["input_ids"]


def encode_prompt(tokenizer, prompt: Any, chat: bool, max_len: int) -> list[int]:
    """A string or message list -> ids; with ``chat``, a user turn plus the generation prompt.

    A prompt longer than ``max_len`` keeps its end: it holds the question and the generation prompt.
    """
    return _full_ids(tokenizer, prompt, chat)[-max_len:]


@dataclass
class EncodedPrompts:
    ids: dict[int, list[int]]
    """Token ids by the record's line number."""
    total: int
    truncated: int
    """Prompts longer than ``max_prompt_len`` (their start was cut)."""
    unknown: int
    """Prompts holding characters the tokenizer maps to its unknown token."""

    def summary(self, what: str, max_len: int) -> str:
        return (f"{what}: {self.total} prompts, {self.truncated} cut to data.max_prompt_len={max_len} tokens, "
                f"{self.unknown} with characters the tokenizer does not know")


def refuse_empty(lines: list[int], count: int, what: str) -> None:
    """Prompts that encode to no tokens give a model nothing to continue from (the engine would fail
    on them deep inside a step): refused by their lines."""
    if lines:
        raise OrbitError(f"{what}: {len(lines)} of {count} prompts encode to no tokens (first at line {lines[0]})",
                         "remove the empty prompts or fill them")


def encode_records(tokenizer, records: list[PromptRecord], chat: bool, data_cfg: DataSection, what: str) -> EncodedPrompts:
    """Encode every prompt once, counting truncations and unknown characters; refuse a dataset
    in which more than ``data.max_truncated_fraction`` of the prompts would be cut."""
    unk = getattr(tokenizer, "unk_token_id", None)
    ids: dict[int, list[int]] = {}
    truncated = unknown = 0
    empty: list[int] = []
    for record in records:
        full = _full_ids(tokenizer, record.prompt, chat)
        if not full:
            empty.append(record.line)
        truncated += len(full) > data_cfg.max_prompt_len
        unknown += unk is not None and unk in full
        ids[record.line] = full[-data_cfg.max_prompt_len:]
    refuse_empty(empty, len(records), what)
    encoded = EncodedPrompts(ids, len(records), truncated, unknown)
    if records and truncated > data_cfg.max_truncated_fraction * len(records):
        raise OrbitError(f"{what}: {truncated} of {len(records)} prompts ({truncated / len(records):.1%}) are longer than "
                         f"data.max_prompt_len={data_cfg.max_prompt_len} tokens and would lose their start",
                         "raise data.max_prompt_len, or allow it with data.max_truncated_fraction")
    return encoded


def check_labels(records: list[PromptRecord], reward: str, label_key: str, what: str) -> None:
    """The math reward compares with each record's label: a dataset without them cannot be scored."""
    if reward != "math":
        return
    missing = [r for r in records if r.label is None]
    if missing:
        raise OrbitError(f"{what}: {len(missing)} of {len(records)} prompts have no label {label_key!r} (first at line "
                         f"{missing[0].line}), and rl.reward=math scores answers against it",
                         "set data.label_key to the field holding the answer")
