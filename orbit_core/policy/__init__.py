"""The frozen base plus adapter that train, eval, convert, preflight and the engine all build on."""

from orbit_core.policy.adapter_files import latest_checkpoint, list_checkpoints, load_adapter, resolve_adapter_dir, save_adapter
from orbit_core.policy.build import PolicyModel, apply_adapter, build_policy, check_adapter_fits, load_teacher, pick_device
from orbit_core.policy.load import load_base

__all__ = ["latest_checkpoint", "list_checkpoints", "load_adapter", "resolve_adapter_dir", "save_adapter", "PolicyModel",
           "apply_adapter", "build_policy", "check_adapter_fits", "load_teacher", "pick_device", "load_base"]
