"""One rank of the TP=2 check in ``test_megatron_backend.py`` (run as a spawned process)."""

from __future__ import annotations

import sys

import torch


def run(rank: int, size: int, init: str, hf_path: str, megatron_dir: str, adapter_path: str, method: str,
        out_path: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from safetensors.torch import load_file

    from orbit_core.config.schema import PeftSection
    from orbit_core.models.megatron_gpt import hf_names, load_megatron_policy, shard_adapter
    from orbit_core.peft.base import load_adapter_state_dict
    from orbit_core.policy.build import apply_adapter

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=size)
    parallel_state.initialize_model_parallel(size, 1)
    model = load_megatron_policy(hf_path, "float32", torch.device("cpu"), training=False, megatron_dir=megatron_dir)
    apply_adapter(model, PeftSection(method=method, rank=4, alpha=8, oft_block_size=8))
    from_hf = {h: m for m, h in hf_names(model).items()}
    shard = shard_adapter(load_file(adapter_path), rank, size)
    load_adapter_state_dict(model, {from_hf[n.rsplit(".", 1)[0]] + "." + n.rsplit(".", 1)[1]: t for n, t in shard.items()})
    ids = torch.arange(2 * 12).reshape(2, 12) % model.config.vocab_size
    with torch.no_grad():
        logits = model(ids)  # the head gathers its vocab shards once, so every rank has the whole logits
    if rank == 0:
        torch.save(logits, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    run(int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:])
