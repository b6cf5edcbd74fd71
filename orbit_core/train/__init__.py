"""The RL training loop, its checkpoints and its run directory."""

from orbit_core.policy.adapter_files import latest_checkpoint, list_checkpoints, load_adapter
from orbit_core.train.checkpoint import load_checkpoint, save_checkpoint
from orbit_core.train.loop import Callbacks, RunResult, TrainingRun, run_training
from orbit_core.train.plot import plot_reward_curve
from orbit_core.train.schedule import lr_at

__all__ = [
    "latest_checkpoint", "list_checkpoints", "load_adapter", "load_checkpoint", "save_checkpoint", "Callbacks",
    "RunResult", "TrainingRun", "run_training", "plot_reward_curve", "lr_at",
]
