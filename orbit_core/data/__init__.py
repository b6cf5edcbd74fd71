from orbit_core.data.jsonl import PromptRecord, read_prompts, split_slice
from orbit_core.data.prompts import encode_prompt, use_chat_template

__all__ = ["PromptRecord", "read_prompts", "split_slice", "encode_prompt", "use_chat_template"]
