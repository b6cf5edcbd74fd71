"""Whether the running forward is the rollout engine's, which may use the inference-only kernels.

The fused kernels (``orbit::rms_norm``, ``orbit::lora_add_``) round differently from the autograd
references in the last bits. The trainer scores old logprobs without a graph and then trains with
one; both must be the same arithmetic, or a PPO ratio starts off 1 by rounding. So only the
engine's forwards (prefill and decode, and the CUDA graphs captured from them) take the kernels,
and the runtime preflight then compares two different code paths.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager

import torch

_ENGINE = contextvars.ContextVar("orbit_engine_forward", default=False)


@contextmanager
def engine_forward():
    token = _ENGINE.set(True)
    try:
        yield
    finally:
        _ENGINE.reset(token)


def use_engine_kernels(x: torch.Tensor) -> bool:
    """Whether a module may run its inference kernel on ``x``: a GPU tensor in the engine's forward,
    with no autograd graph being built. The context variable is read last: a training forward
    stops at the grad check, so ``torch.compile`` never meets it (a graph break on every module)."""
    return x.is_cuda and not torch.is_grad_enabled() and _ENGINE.get()
