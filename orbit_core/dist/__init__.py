"""Process-group helpers (rank / world size); the single-process default needs nothing else."""

from orbit_core.dist.world import is_main_process, rank, world_size

__all__ = ["is_main_process", "rank", "world_size"]
