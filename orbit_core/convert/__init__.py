"""Checkpoint formats: PEFT adapter export, merged HF checkpoints."""

from orbit_core.convert.merge import merge_adapter
from orbit_core.convert.peft_export import export_peft_adapter

__all__ = ["merge_adapter", "export_peft_adapter"]
