"""Tensor-parallel adapter training on the megatron backend, on one node.

Rank 0 is the ``orbit train`` process. It starts ranks 1..N-1 (``cuda:r``, or CPU processes), and
each holds its shard of the frozen base and of the adapter (``shard_adapter``). Every trainer call
that runs the model (``score``, ``update``...) is first sent, with its batch, to the other ranks
over a gloo group. Then all ranks run it together, and megatron's TP collectives meet inside the
forward and backward.

Gradients, by how a tensor meets the sharded activations:

* **sharded**: column-parallel B, row-parallel A, and row-parallel OFT blocks. Each rank's
  gradient for its shard is already whole.
* **partial**: column-parallel A and OFT rotation, and row-parallel B. The tensor is whole on
  every rank but sees only that rank's share of the activations, so the gradient is summed over
  the ranks before the step.
* **whole**: the value head, which reads the replicated final hidden state.

The clip norm adds every rank's sharded squares, and each whole tensor's once. So every rank scales
alike, and the whole tensors stay equal across ranks without being broadcast.

Expert parallelism (``train.expert_parallel``, MoE bases, TP = 1) uses the same ranks and calls:
the experts are split, attention and the adapter are whole on every rank, and every rank sees the
same batch. The adapter's gradients are averaged over the ranks before the step. They agree up to
summation order, and averaging keeps the ranks' adapters bit-identical over a run.

Every wait on another rank is bounded by its process group's timeout (``TIMEOUT_S``; the waits of
ranks 1..N-1 for the next call, ``IDLE_TIMEOUT_S``). A rank that dies is named at the next call.
Between calls rank 0 sends a ping every quarter of ``IDLE_TIMEOUT_S`` (at most ``PING_S``), so
ranks that wait through a rollout longer than that are waiting on a live rank 0, not timed out.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import tempfile
import threading
from typing import Any

import torch

from orbit_core.config.schema import RecipeConfig
from orbit_core.errors import OrbitError
from orbit_core.models.megatron_gpt import ROW_PARALLEL, cpu_shims, hf_names, load_megatron_policy, shard_adapter
from orbit_core.peft.base import adapter_state_dict, load_adapter_state_dict
from orbit_core.peft.value_head import attach_value_head
from orbit_core.policy.build import apply_adapter
from orbit_core.rollout.ray_engine import NO_MULTICAST
from orbit_core.train.torch_backend import TorchTrainer

TIMEOUT_S = 1800
"""Longest wait on another rank inside a call."""
IDLE_TIMEOUT_S = 1800
"""Longest wait of ranks 1..N-1 for rank 0's next call or ping (rank 0 generates a step's rollouts
meanwhile, and pings)."""
PING_S = 300
GATHERED = ("adapter", "state")


def tp_role(name: str) -> str:
    """``sharded``, ``partial`` or ``whole``: how a trainable tensor's gradient relates to the ranks'."""
    module, leaf = name.rsplit(".", 1)
    row = module.rsplit(".", 1)[-1] in ROW_PARALLEL
    if leaf == "lora_A":
        return "sharded" if row else "partial"
    if leaf == "lora_B":
        return "partial" if row else "sharded"
    if leaf == "oft_skew":
        return "sharded" if row else "partial"
    return "whole"


def unshard_adapter(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The ranks' HF-named shares (``shard_adapter``'s outputs, in rank order) -> the whole adapter."""
    out = {}
    for name, first in shards[0].items():
        module, leaf = name.rsplit(".", 1)
        row = module.rsplit(".", 1)[-1] in ROW_PARALLEL
        parts = [shard[name] for shard in shards]
        if leaf == "lora_B" and not row:
            out[name] = torch.cat(parts, dim=0)
        elif leaf == "lora_A" and row:
            out[name] = torch.cat(parts, dim=1)
        elif leaf == "oft_skew" and row and len(shards) > 1:
            out[name] = torch.cat(parts, dim=0)
        else:
            out[name] = first
    return out


class ShardTrainer(TorchTrainer):
    """One rank's trainer: its shard of the base and adapter, and TorchTrainer's losses and optimizer."""

    def __init__(self, config: RecipeConfig, base_path: str, megatron_dir: str | None, device: torch.device,
                 rank: int, size: int, teacher=None):
        model = load_megatron_policy(base_path, config.model.dtype, device, megatron_dir=megatron_dir)
        apply_adapter(model, config.peft)
        if config.rl.value_head:
            attach_value_head(model, model.config.hidden_size)
        model.to(device)
        self.rank, self.size = rank, size
        self.tp = parallel_sizes(config)[0]
        modules = hf_names(model)
        self.to_hf = {f"{m}.{leaf}": f"{h}.{leaf}" for m, h in modules.items() for leaf in ("lora_A", "lora_B", "oft_skew")}
        self.from_hf = {h: m for m, h in self.to_hf.items()}
        super().__init__(model, config, teacher)
        self.roles = {name: tp_role(name) for name, p in model.named_parameters() if p.requires_grad}

    def update(self, batch) -> dict[str, float]:
        # megatron's collectives allocate on torch.cuda.current_device() in backward too (the MoE
        # dispatcher's gather), outside the forward's shims; on a GPU machine this patches nothing
        with cpu_shims():
            return super().update(batch)

    def _rename(self, state: dict[str, torch.Tensor], names: dict[str, str]) -> dict[str, torch.Tensor]:
        return {names.get(name, name): tensor for name, tensor in state.items()}

    def shard_state(self) -> dict[str, torch.Tensor]:
        """This rank's share of the adapter, HF-named, on the CPU."""
        return {n: t.detach().cpu() for n, t in self._rename(adapter_state_dict(self.model), self.to_hf).items()}

    def load_whole_adapter(self, adapter: dict[str, torch.Tensor], source: str) -> None:
        share = shard_adapter(adapter, self.rank, self.size) if self.tp > 1 else adapter
        load_adapter_state_dict(self.model, self._rename(share, self.from_hf), source)

    def _clip_grads(self, max_norm: float) -> float:
        if self.size == 1:
            return super()._clip_grads(max_norm)
        import torch.distributed as dist
        from megatron.core import parallel_state

        if self.tp == 1:  # expert parallel: whole adapters, the same batch on every rank
            grads = [p.grad for p in self.model.parameters() if p.requires_grad and p.grad is not None]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=parallel_state.get_expert_model_parallel_group())
            for grad, part in zip(grads, flat.div_(self.size).split([g.numel() for g in grads])):
                grad.copy_(part.view_as(grad))
            return super()._clip_grads(max_norm)

        group = parallel_state.get_tensor_model_parallel_group()
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad and p.grad is not None]
        partial = [p.grad for n, p in named if self.roles[n] == "partial"]
        if partial:  # one all-reduce for all of them
            flat = torch.cat([g.reshape(-1) for g in partial])
            dist.all_reduce(flat, group=group)
            for grad, part in zip(partial, flat.split([g.numel() for g in partial])):
                grad.copy_(part.view_as(grad))
        sharded = sum((p.grad.float().pow(2).sum() for n, p in named if self.roles[n] == "sharded"),
                      torch.zeros((), device=self.device))
        dist.all_reduce(sharded, group=group)
        whole = sum((p.grad.float().pow(2).sum() for n, p in named if self.roles[n] != "sharded"),
                    torch.zeros((), device=self.device))
        norm = float((sharded + whole).sqrt())
        scale = min(max_norm / (norm + 1e-6), 1.0)
        if scale < 1.0:
            for _, p in named:
                p.grad.mul_(scale)
        return norm

    def run(self, command: str, payload: Any) -> Any:
        """A call rank 0 sent; the result matters only for the gathered ones."""
        if command == "score":
            self.score(payload)
        elif command == "reference":
            self.reference_logprobs(payload)
        elif command == "update":
            self.update(payload)
        elif command == "logits":
            with torch.no_grad():
                self.model(payload.to(self.device))
        elif command == "load_adapter":
            self.load_whole_adapter(payload, "rank 0's adapter")
        elif command == "load_state":
            TorchTrainer.load_state_dict(self, payload["ranks"][self.rank])
        elif command == "adapter":
            return self.shard_state()
        elif command == "state":
            return self.optimizer_state()
        else:
            raise ValueError(f"unknown tensor-parallel command {command!r}")
        return None

    def optimizer_state(self) -> dict[str, Any]:
        """This rank's optimizer state; on the CPU when it travels to rank 0 (a pickled CUDA tensor
        would come back on this rank's GPU)."""
        state = TorchTrainer.state_dict(self)
        if self.size == 1:
            return state

        def to_cpu(value):
            if isinstance(value, torch.Tensor):
                return value.cpu()
            if isinstance(value, dict):
                return {k: to_cpu(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return type(value)(to_cpu(v) for v in value)
            return value

        return to_cpu(state)


def _device(rank: int, device: torch.device) -> torch.device:
    return torch.device("cuda", rank) if device.type == "cuda" else device


def parallel_sizes(config: RecipeConfig) -> tuple[int, int]:
    """(tensor-parallel, expert-parallel) sizes; the ranks number their product (one of them is 1)."""
    return config.train.tensor_parallel, config.train.expert_parallel


def init_rank(rank: int, size: int, init: str, device: torch.device, expert_parallel: int, idle_timeout_s: float):
    """This rank's process groups: the default one (NCCL on GPUs) for megatron, gloo for calls."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    os.environ.update(NO_MULTICAST)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init, rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    parallel_state.initialize_model_parallel(size // expert_parallel, 1, expert_model_parallel_size=expert_parallel)
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=idle_timeout_s))


def follow(rank: int, size: int, init: str, config: RecipeConfig, base_path: str, megatron_dir: str,
           device: str, idle_timeout_s: float) -> None:
    """Entry point of ranks 1..N-1: run what rank 0 sends until it says stop."""
    import torch.distributed as dist

    where = _device(rank, torch.device(device))
    control = init_rank(rank, size, init, where, parallel_sizes(config)[1], idle_timeout_s)
    torch.manual_seed(config.train.seed)
    shard = ShardTrainer(config, base_path, megatron_dir, where, rank, size)
    while True:
        message = [None]
        dist.broadcast_object_list(message, src=0, group=control)
        command, payload = message[0]
        if command == "stop":
            break
        if command == "ping":  # rank 0 is alive between calls
            continue
        result = shard.run(command, payload)
        if command in GATHERED:
            dist.gather_object(result, None, dst=0, group=control)
    dist.destroy_process_group()


class RankGroup:
    """Rank 0's handle on ranks 1..N-1."""

    def __init__(self, size: int, config: RecipeConfig, base_path: str, megatron_dir: str, device: torch.device):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            raise OrbitError("train.tensor_parallel or expert_parallel > 1 needs a process without a torch.distributed "
                             "group", "run `orbit train` in a fresh process")
        if device.type == "cuda" and torch.cuda.device_count() < size:
            field = "tensor_parallel" if parallel_sizes(config)[0] > 1 else "expert_parallel"
            raise OrbitError(f"train.{field}={size} needs {size} GPUs, {torch.cuda.device_count()} visible",
                             f"use train.{field}={torch.cuda.device_count()}")
        self.size = size
        idle_s = IDLE_TIMEOUT_S
        self.in_call = False
        """True while the ranks are inside a call rank 0 has not finished (an exception escaped it)."""
        self.lock = threading.Lock()
        """Held for each broadcast on the control group: a ping never lands inside a call."""
        self.init = f"file://{tempfile.mktemp(prefix='orbit-tp-pg-')}"
        ctx = mp.get_context("spawn")
        self.ranks = [ctx.Process(target=follow, args=(r, size, self.init, config, base_path, megatron_dir, str(device),
                                                       idle_s), daemon=True, name=f"orbit-tp-rank{r}")
                      for r in range(1, size)]
        for process in self.ranks:
            process.start()
        self.control = init_rank(0, size, self.init, _device(0, device), parallel_sizes(config)[1], idle_s)
        self.stop_pings = threading.Event()
        threading.Thread(target=self._ping, args=(min(PING_S, idle_s / 4),), daemon=True,
                         name="orbit-tp-ping").start()

    def _ping(self, every_s: float) -> None:
        import torch.distributed as dist

        while not self.stop_pings.wait(every_s):
            with self.lock:
                if self.stop_pings.is_set() or self.in_call or not all(p.is_alive() for p in self.ranks):
                    continue
                try:
                    dist.broadcast_object_list([("ping", None)], src=0, group=self.control)
                except Exception:  # a rank gone: the next call names it
                    return

    def _check(self) -> None:
        for process in self.ranks:
            if not process.is_alive():
                raise OrbitError(f"tensor-parallel {process.name} exited (code {process.exitcode})",
                                 "see its error above; the run stops here")

    def send(self, command: str, payload: Any = None) -> None:
        """Start a call on the other ranks; the caller sets ``in_call`` back when it is done."""
        import torch.distributed as dist

        self._check()
        with self.lock:
            dist.broadcast_object_list([(command, payload)], src=0, group=self.control)
            self.in_call = True

    def gather(self, command: str, mine: Any) -> list[Any]:
        import torch.distributed as dist

        self.send(command)
        out = [None] * self.size
        dist.gather_object(mine, out, dst=0, group=self.control)
        self.in_call = False
        return out

    def close(self) -> None:
        """Stop the other ranks: asked to, when they wait for the next call; killed, when a call
        failed on this rank while they were inside it (they would wait out the timeout)."""
        import torch.distributed as dist

        self.stop_pings.set()
        clean = not self.in_call and all(p.is_alive() for p in self.ranks)
        if clean:
            with self.lock:
                dist.broadcast_object_list([("stop", None)], src=0, group=self.control)
        for process in self.ranks:
            process.join(timeout=60 if clean else 0)
            if process.is_alive():
                process.kill()
                process.join(timeout=10)
        if dist.is_initialized() and clean:
            dist.destroy_process_group()
        path = self.init.removeprefix("file://")
        if os.path.exists(path):
            os.remove(path)
