"""Turn prompt records into token ids, through the tokenizer's chat template when it has one."""

from __future__ import annotations

from typing import Any

from orbit_core.errors import OrbitError


def use_chat_template(tokenizer, mode: str) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if mode == "true" and not has_template:
        raise OrbitError("data.apply_chat_template=true but the tokenizer has no chat template", "set data.apply_chat_template=auto or false")
    return has_template if mode == "auto" else mode == "true"


def encode_prompt(tokenizer, prompt: Any, chat: bool, max_len: int) -> list[int]:
    """A string or message list -> ids; with ``chat``, a user turn plus the generation prompt."""
    if chat:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        ids = list(ids)
    else:
        if isinstance(prompt, list):
            prompt = "\n".join(str(m.get("content", "")) for m in prompt)
        ids = tokenizer(str(prompt), add_special_tokens=False)["input_ids"]
    if len(ids) > max_len:
        ids = ids[-max_len:]  # keep the end: it holds the question and the generation prompt
    return ids
