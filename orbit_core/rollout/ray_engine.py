"""What runs inside a Ray engine actor: the builtin engine on its own copy of the frozen base, or a
proxy for one SGLang-API server. Plain classes; ``train/ray_rollouts.py`` wraps them in ``ray.remote``.

Both take adapters as tensors pulled from Ray's object store. Ray runs an actor's calls one at a
time in the order one caller submitted them, so an adapter load is a barrier: every generate
submitted after it runs on the new adapter, which is what bounds staleness in async mode.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import torch

from orbit_core.config.schema import ModelSection, PeftSection
from orbit_core.errors import OrbitError
from orbit_core.rollout.types import Completion, SamplingParams

PROBE = "probe"
"""The actors' second concurrency group (one thread): ``progress`` answers there while ``generate``
runs in the default group, whose one thread keeps the calls of one caller in order."""


def remote_class(ray, cls):
    """``cls`` as a Ray actor class with the ``PROBE`` group."""
    return ray.remote(concurrency_groups={PROBE: 1})(cls)


NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
"""Every process Orbit starts keeps NVLink multicast off (it is not available on shared hosts)."""


class _Counters:
    def __init__(self) -> None:
        self.tokens = 0
        self.busy_s = 0.0
        self.sync_ms = 0.0
        self.version = 0

    def timed(self, generate) -> tuple[list[Completion], dict]:
        """Run one generate call; returns its completions and what this call cost (not cumulative)."""
        start = time.perf_counter()
        completions = generate()
        busy = time.perf_counter() - start
        tokens = sum(len(c.token_ids) for c in completions)
        self.busy_s += busy
        self.tokens += tokens
        return completions, {"busy_s": busy, "tokens": tokens, "version": self.version}

    def stats(self) -> dict:
        return {"tokens": self.tokens, "busy_s": self.busy_s, "sync_ms": self.sync_ms, "version": self.version,
                "pid": os.getpid(), "host": socket.gethostname()}


class BuiltinEngineActor:
    def __init__(self, model: ModelSection, peft: PeftSection, max_running: int, seed: int, threads: int,
                 adapter: dict[str, torch.Tensor], version: int, cuda_graph: bool = True, moe_chunk: int = 16,
                 moe_grouped_gemm: str = "auto"):
        from orbit_core.models.moe import set_dequant_chunk
        from orbit_core.policy.build import build_policy
        from orbit_core.rollout.engine import BuiltinEngine

        os.environ.update(NO_MULTICAST)
        torch.set_num_threads(max(1, threads))
        policy = build_policy(model, peft, log=lambda message: None)
        self.model = policy.model.eval()  # its trainable tensors are the adapter's, which loads replace
        set_dequant_chunk(self.model, moe_chunk, moe_grouped_gemm)
        self.engine = BuiltinEngine(self.model, policy.tokenizer, max_running=max_running, seed=seed, cuda_graph=cuda_graph)
        self.device = str(policy.device)
        self.counters = _Counters()
        self.load_adapter(version, adapter)

    def info(self) -> dict:
        return {**self.counters.stats(), "device": self.device, "threads": torch.get_num_threads()}

    def progress(self) -> int:
        """Decode steps so far (called in the ``PROBE`` group, beside a running generate)."""
        return self.engine.steps

    def load_adapter(self, version: int, adapter: dict[str, torch.Tensor]) -> dict:
        from orbit_core.peft.base import load_adapter_state_dict

        start = time.perf_counter()
        for name, value in adapter.items():
            if not torch.isfinite(value).all():
                raise OrbitError(f"adapter v{version}: {name} holds NaN or inf", "the update diverged; lower train.lr")
        load_adapter_state_dict(self.model, adapter, f"adapter v{version}")
        self.engine.adapter_version = self.counters.version = version
        self.counters.sync_ms = (time.perf_counter() - start) * 1e3
        return self.counters.stats()

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> tuple[list[Completion], dict]:
        return self.counters.timed(lambda: self.engine.generate(prompts, params))


class SGLangEngineActor:
    """One SGLang-API server seen through an actor: the adapter is written as a PEFT directory on the
    actor's node (where the server can read it) and loaded by name and version."""

    def __init__(self, url: str, timeout_s: float, peft: dict, targets: list[str], base_model: str,
                 adapter: dict[str, torch.Tensor], version: int):
        from orbit_core.rollout.sglang_client import SGLangEngines

        os.environ.update(NO_MULTICAST)
        self.url, self.peft, self.targets, self.base_model = url, peft, targets, base_model
        self.engines = SGLangEngines([url], timeout_s)
        self.root = Path(tempfile.mkdtemp(prefix="orbit-ray-sglang-"))
        self.counters = _Counters()
        self.load_adapter(version, adapter)

    def info(self) -> dict:
        return {**self.counters.stats(), "device": self.url, "threads": 0}

    def progress(self) -> int:
        """Tokens answered so far plus the server's ``/health`` answers while a request is out (one
        request shows no tokens until it returns)."""
        return sum(server.tokens + server.health_answers for server in self.engines.servers)

    def load_adapter(self, version: int, adapter: dict[str, torch.Tensor]) -> dict:
        start = time.perf_counter()
        self.engines.publish_peft(self.root, version, adapter, self.peft, self.targets, self.base_model)
        self.counters.version = version
        self.counters.sync_ms = (time.perf_counter() - start) * 1e3
        return self.counters.stats()

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> tuple[list[Completion], dict]:
        return self.counters.timed(lambda: self.engines.generate(prompts, params))

    def __del__(self) -> None:
        shutil.rmtree(getattr(self, "root", ""), ignore_errors=True)
