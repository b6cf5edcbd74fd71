"""Rank 0 of the TP=2 training check in ``test_megatron_backend.py``: a fresh process, because
rank 0 creates the process group (and starts rank 1 itself)."""

from __future__ import annotations

import sys

import torch


def main(recipe: str, inputs: str, out: str) -> None:
    from orbit_core.config import load_recipe
    from orbit_core.policy.build import build_policy
    from orbit_core.train.megatron_backend import MegatronTrainer

    given = torch.load(inputs, weights_only=False)
    config = load_recipe(recipe, given["overrides"])
    torch.manual_seed(0)
    policy = build_policy(config.model, config.peft, log=lambda m: None)
    if given.get("idle_timeout_s"):
        from orbit_core.train import megatron_tp

        megatron_tp.IDLE_TIMEOUT_S = given["idle_timeout_s"]
    trainer = MegatronTrainer(policy, config)
    if given.get("idle_timeout_s"):  # rank 0 busy elsewhere (a long rollout) for longer than the ranks' limit
        import time

        try:
            time.sleep(given["idle_s"])
            trainer.load_adapter(given["adapter"], "test")
            torch.save({"adapter": trainer.adapter_state()}, out)
        finally:
            trainer.close()
        return
    if given.get("fail_mid_call"):  # rank 0 fails while rank 1 is inside the call's collectives
        import time

        processes, start = trainer.ranks.ranks, time.monotonic()
        try:
            with trainer._together("score", given["batch"]):
                raise RuntimeError("rank 0 fails mid-call")
        except RuntimeError:
            trainer.close()
        torch.save({"close_s": time.monotonic() - start, "alive": [p.is_alive() for p in processes]}, out)
        return
    try:
        trainer.load_adapter(given["adapter"], "test")
        batch = given["batch"]
        score = trainer.score(batch)[0]
        reference = trainer.reference_logprobs(batch)
        batch.old_logprobs, batch.advantages = given["old_logprobs"], given["advantages"]
        stats = trainer.update(batch)
        adapter = trainer.adapter_state()
        engine_copy = {k: v.clone() for k, v in trainer.engine_model.state_dict().items() if k in adapter}
        with torch.no_grad():
            logits = trainer.parity_model(given["ids"])
        state = trainer.state_dict()
        from orbit_core.models.megatron_moe import is_moe_layer, local_experts

        gpt = trainer.model.gpt
        experts = local_experts(gpt) if is_moe_layer(gpt.decoder.layers[0].mlp) else None
        torch.save({"experts": experts, "score": score, "reference": reference, "stats": stats, "adapter": adapter, "engine": engine_copy,
                    "logits": logits, "state_ranks": len(state["ranks"]),
                    "implementation": trainer.parity_model.implementation}, out)
    finally:
        trainer.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
