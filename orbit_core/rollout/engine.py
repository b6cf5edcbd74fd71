"""The ``builtin`` rollout backend: in-process continuous batching (see ``decode_loop``)."""

from __future__ import annotations

import torch
from torch import nn

from orbit_core.models.projections import fuse_projections
from orbit_core.models.transformer import DecoderLM
from orbit_core.rollout.decode_loop import DecodeLoop, Request
from orbit_core.rollout.types import Completion, SamplingParams

QUICK_MODES = True
"""``generate`` finds the modules in training mode by walking ``_modules`` itself and sets their flag
in the instance dict, where ``Module.modules()`` chains generators and ``Module.__setattr__`` checks
parameters, buffers and submodules first. A 28-layer model with LoRA (790 modules), on the
development machine's CPU (``bench/mode_walk.py``, ``mode_walk_cpu2.jsonl``): finding them 0.44 ms
against 0.54; setting them off and back on, for a model in training mode (the RL loop's), 0.19 ms
against 2.22. The same modules either way. False: ``modules()`` and ``setattr`` (benchmarks
compare)."""


def training_modules(root: nn.Module) -> list[nn.Module]:
    """The modules under ``root`` (itself included) in training mode, each once."""
    if not QUICK_MODES:
        return [m for m in root.modules() if m.training]
    found, seen, stack = [], set(), [root]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        if m.training:
            found.append(m)
        stack.extend(c for c in m._modules.values() if c is not None)
    return found


def set_training(modules: list[nn.Module], flag: bool) -> None:
    """Each module's own ``training`` flag, as ``m.training = flag`` sets it (no children)."""
    for m in modules:
        if QUICK_MODES and "training" in m.__dict__:
            m.__dict__["training"] = flag
        else:
            m.training = flag


class BuiltinEngine:
    """Generates with the live model object, so it always uses the current adapter weights."""
    name = "Orbit builtin engine (in process)"

    def __init__(self, model: DecoderLM, tokenizer, max_running: int = 256, seed: int = 0, cuda_graph: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        if self.device.type == "cuda":  # one base GEMM per q/k/v and gate/up group (models.projections)
            fuse_projections(model)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.loop = DecodeLoop(model, tokenizer, self.generator, max_running, cuda_graph=cuda_graph)
        self.steps = 0
        """Decode steps run so far: what a Ray engine actor's liveness probe reads while it generates."""

    @property
    def adapter_version(self) -> int:
        return self.loop.version

    @adapter_version.setter
    def adapter_version(self, version: int) -> None:
        self.loop.version = version

    def release(self) -> None:
        """Give the KV cache back (a colocated engine may do this while the trainer runs)."""
        self.loop.release()

    def cache_bytes(self) -> int:
        """Bytes of the KV cache now allocated (0 when released)."""
        cache = self.loop.cache
        return 0 if cache is None else 2 * cache.k.numel() * cache.k.element_size()

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        if any(len(p) == 0 for p in prompts):
            raise ValueError("a prompt with no tokens: generation needs at least one to continue from")
        requests = [Request(p, s, prompts[p]) for p in range(len(prompts)) for s in range(params.n)]
        if not requests:
            return []
        # generation runs without dropout; each module's mode is put back as it was (train()/eval() on
        # the root would set every module's, through a slow setattr each: milliseconds a call)
        training = training_modules(self.model)
        set_training(training, False)
        results: dict[int, Completion] = {}
        try:
            self.loop.submit(requests, params)
            while not self.loop.idle:
                self.steps += 1
                for request, completion in self.loop.step():
                    results[request.prompt_index * params.n + request.sample_index] = completion
        except BaseException:
            self.loop.reset()
            raise
        finally:
            set_training(training, True)
        return [results[i] for i in sorted(results)]
