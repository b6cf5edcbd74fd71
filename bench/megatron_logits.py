"""GPU check: megatron-core's GPTModel, loaded from `orbit convert hf-to-megatron`, gives HF's logits.

Builds a random Qwen3 checkpoint, converts it, loads the torch_dist checkpoint into a GPTModel
(local layer spec) through dist_checkpointing.load, and compares logits with transformers. JSON line.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
import torch.distributed as dist

if __name__ == "__main__":
    dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl",
                            init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    torch.cuda.set_device(0)
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from orbit_core.convert.megatron import hf_to_megatron, resolve_iteration_dir

    parallel_state.initialize_model_parallel(1, 1)
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(0)
    root = tempfile.mkdtemp()
    hf_config = Qwen3Config(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                            num_key_value_heads=2, head_dim=32, vocab_size=1000, max_position_embeddings=512)
    torch.manual_seed(0)
    hf = Qwen3ForCausalLM(hf_config).eval()
    hf.save_pretrained(os.path.join(root, "hf"))
    hf_to_megatron(os.path.join(root, "hf"), os.path.join(root, "mg"))
    cfg = TransformerConfig(num_layers=2, hidden_size=256, num_attention_heads=8, num_query_groups=2, ffn_hidden_size=512,
                            kv_channels=32, gated_linear_unit=True, normalization="RMSNorm", add_bias_linear=False,
                            qk_layernorm=True, layernorm_epsilon=hf_config.rms_norm_eps, activation_func=torch.nn.functional.silu,
                            bias_activation_fusion=False, params_dtype=torch.float32)
    model = GPTModel(cfg, get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm"), vocab_size=1000,
                     max_sequence_length=512, share_embeddings_and_output_weights=False, position_embedding_type="rope",
                     rotary_base=int(hf_config.rope_parameters["rope_theta"])).cuda().eval()
    # megatron-core reads the torch_dist files; the local spec keeps the norms as separate modules,
    # so the TE spec's fused norm names are mapped back for load_state_dict
    plain = dist_checkpointing.load_plain_tensors(str(resolve_iteration_dir(os.path.join(root, "mg"))))
    renames = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
               "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}
    state = {}
    for key, value in plain.items():
        if isinstance(value, torch.Tensor):
            for fused, local in renames.items():
                key = key.replace(fused, local)
            state[key] = value.cuda()
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if "_extra_state" not in k]
    assert not missing and not result.unexpected_keys, (missing, result.unexpected_keys)
    ids = torch.randint(0, 1000, (2, 64), device="cuda")
    position_ids = torch.arange(64, device="cuda")[None].expand(2, -1)
    mask = torch.triu(torch.ones(1, 1, 64, 64, dtype=torch.bool, device="cuda"), diagonal=1)
    with torch.no_grad():
        ours = model(ids, position_ids, mask).float()
        reference = hf.cuda()(ids).logits.float()
    print(json.dumps({"bench": "megatron_logits", "max_abs_diff": (ours - reference).abs().max().item(),
                      "reference": "transformers Qwen3ForCausalLM", "device": torch.cuda.get_device_name()}))
    dist.destroy_process_group()
