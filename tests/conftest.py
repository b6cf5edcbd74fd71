"""Shared fixtures: tiny random checkpoints saved by transformers, read back through Orbit's loader."""

from __future__ import annotations

import os

import pytest

# CI runs the suite in two pytest-xdist workers on two cores: a thread each, here and in the
# processes the tests start, so that they do not fight over the cores (OpenMP threads spin as they wait)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, min(2, (os.cpu_count() or 1) // _WORKERS))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))

import torch  # noqa: E402  (after OMP_NUM_THREADS)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():
    # read when a kernel is decorated (on import): without a GPU, kernels called directly run under
    # Triton's interpreter (tests/test_kernels_interpreted.py); the ops still serve the references
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(_THREADS)


def pytest_collection_modifyitems(config, items):
    """Start the end-to-end recipe runs (the longest tests) on both workers at once.

    ``--dist worksteal`` first hands each worker a contiguous share of this order, then lets an idle
    worker take tests from the end of another's queue. So the recipes that reuse the model the
    first one warm-starts go first, in their file's order, and each recipe with its own model heads
    another worker's share."""
    recipes = [item for item in items if item.path.name == "test_embedded_recipe.py"]
    own_model = [item for item in recipes if item.get_closest_marker("own_model")]
    rest = [item for item in items if item.path.name != "test_embedded_recipe.py"]
    order = [item for item in recipes if item not in own_model] + rest
    for worker, item in enumerate(own_model, start=1):
        share = len(items) * worker // max(_WORKERS, 2)
        order.insert(min(share, len(order)), item)
    items[:] = order


def save_hf_model(kind: str, path, **overrides):
    """Save a random transformers model of ``kind`` (llama/qwen2/qwen3) and return it."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
               "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
    config_cls, model_cls = classes[kind]
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=97, max_position_embeddings=256)
    max_shard = overrides.pop("max_shard_size", None)
    shape.update(overrides)
    torch.manual_seed(0)
    model = model_cls(config_cls(**shape)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.1)
    model.save_pretrained(str(path), **({"max_shard_size": max_shard} if max_shard else {}))
    return model


def make_tiny_checkpoint(path, seed: int = 0, moe: bool = False, max_positions: int = 64, edit=None) -> str:
    """A tiny Qwen3 checkpoint with Orbit's char tokenizer: the embedded model's family, untrained.
    ``moe``: Qwen3-MoE instead (4 experts, top 2); ``edit(model, tokenizer)`` changes the weights
    before they are saved."""
    from transformers import Qwen3Config, Qwen3MoeConfig

    from orbit_core.data.arith import ALPHABET
    from orbit_core.models.char_tokenizer import build_char_tokenizer
    from orbit_core.models.checkpoint import save_model
    from orbit_core.models.config import DecoderConfig
    from orbit_core.models.transformer import DecoderLM

    tok = build_char_tokenizer(ALPHABET, str(path))
    shape = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=max_positions,
                 tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if moe:
        hf = Qwen3MoeConfig(**shape, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                            norm_topk_prob=True).to_dict()
    else:
        hf = Qwen3Config(**shape).to_dict()
    torch.manual_seed(seed)
    model = DecoderLM(DecoderConfig.from_hf(hf))
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.3)
        if edit is not None:
            edit(model, tok)
    save_model(model, str(path), hf)
    return str(path)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen3"))


def _no_eos(model, tok) -> None:
    model.lm_head.weight[tok.eos_token_id].zero_()  # a logit of 0, under the largest of the others


@pytest.fixture(scope="session")
def endless_checkpoint(tmp_path_factory):
    """The tiny checkpoint with 8,192 positions, whose greedy decoding never picks EOS: a row runs to
    its max_new_tokens (the silence-limit tests need generations that last seconds)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen3-endless"), max_positions=8192, edit=_no_eos)


@pytest.fixture(scope="session")
def tiny_moe_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen3-moe"), moe=True)


@pytest.fixture(scope="session")
def teacher_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-teacher"), seed=7)


PACKED_SHAPE = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=4, intermediate_size=256)
"""A Qwen2 shape whose linears all have out_features a multiple of 128 (fp8's weight-scale blocks,
so fp8 fuses); Qwen2 puts biases on q/k/v."""


@pytest.fixture(scope="session")
def packed_checkpoints(tmp_path_factory):
    """``PACKED_SHAPE`` saved dense and quantized to int4, fp8 and nvfp4 (groups of 32)."""
    from orbit_core.quant.quantize import quantize_checkpoint

    root = tmp_path_factory.mktemp("packed")
    save_hf_model("qwen2", root / "dense", **PACKED_SHAPE)
    paths = {"dense": str(root / "dense")}
    for fmt in ("int4", "fp8", "nvfp4"):
        paths[fmt] = str(quantize_checkpoint(paths["dense"], str(root / fmt), fmt, group_size=32))
    return paths


@pytest.fixture()
def orbit_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ORBIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
