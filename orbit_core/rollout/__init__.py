from orbit_core.rollout.engine import BuiltinEngine
from orbit_core.rollout.sampling import sample_tokens
from orbit_core.rollout.types import Completion, RolloutBackend, SamplingParams

__all__ = ["BuiltinEngine", "sample_tokens", "Completion", "RolloutBackend", "SamplingParams"]
