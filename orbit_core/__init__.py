"""Orbit: adapter RL post-training on a frozen low-precision base."""

__version__ = "0.1.0"
