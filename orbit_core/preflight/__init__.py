"""Parity gates: the checkpoint is what its config says, and engine and trainer agree."""

from orbit_core.preflight.checkpoint import CheckpointReport, check_checkpoint
from orbit_core.preflight.runtime import RuntimeReport, runtime_parity

__all__ = ["CheckpointReport", "check_checkpoint", "RuntimeReport", "runtime_parity"]
