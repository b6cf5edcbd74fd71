"""Training memory: nothing dequantized is kept for backward, no fp32 [batch, seq, vocab] tensor,
activation checkpointing and token-budget micro-batches give the reference path's gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from orbit_core.config.loader import build_config
from orbit_core.policy.build import build_policy
from orbit_core.rl.logprobs import chunked_token_entropy, chunked_token_logprobs, token_entropy, token_logprobs
from orbit_core.train.batch import RolloutBatch, micro_batch_rows
from orbit_core.train.torch_backend import TorchTrainer


@pytest.fixture(scope="module")
def int4_checkpoint(tmp_path_factory, tiny_checkpoint):
    from orbit_core.quant import quantize_checkpoint

    out = tmp_path_factory.mktemp("int4") / "q"
    quantize_checkpoint(tiny_checkpoint, str(out), "int4", group_size=16)
    return str(out)


def test_packed_linear_keeps_nothing_dequantized_and_matches_the_dense_reference(int4_checkpoint):
    from orbit_core.peft.lora import LoRALinear
    from orbit_core.policy import load_base
    from orbit_core.quant.linear import QuantLinear

    model = load_base(int4_checkpoint)
    packed = model.model.layers[0].mlp.up_proj
    assert isinstance(packed, QuantLinear)
    dense = nn.Linear(packed.in_features, packed.out_features, bias=False)
    dense.weight.data.copy_(packed.dequantized(torch.float32))
    dense.requires_grad_(False)
    torch.manual_seed(0)
    outputs, grads = [], []
    for base in (packed, dense):
        torch.manual_seed(1)
        layer = LoRALinear(base, rank=4, alpha=8, dropout=0.0)
        layer.lora_B.data.normal_()
        x = torch.randn(3, 5, packed.in_features, requires_grad=True)
        saved: list[tuple[int, ...]] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            y = layer(x)
        y.square().sum().backward()
        outputs.append(y.detach())
        grads.append((x.grad, layer.lora_A.grad, layer.lora_B.grad))
        if base is packed:
            assert (packed.out_features, packed.in_features) not in saved, saved
    torch.testing.assert_close(outputs[0], outputs[1], atol=0, rtol=0)
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_chunked_logprobs_equal_the_full_logits_path():
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16, requires_grad=True)
    weight = torch.randn(50, 16)
    targets = torch.randint(0, 50, (3, 7))
    for temperature in (1.0, 0.7):
        full = token_logprobs(hidden @ weight.t(), targets, temperature)
        grad_full, = torch.autograd.grad((full * torch.linspace(-1, 1, 7)).sum(), hidden)
        chunked = chunked_token_logprobs(hidden, weight, targets, temperature, chunk_rows=4)  # 21 rows: uneven chunks
        grad_chunked, = torch.autograd.grad((chunked * torch.linspace(-1, 1, 7)).sum(), hidden)
        torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(grad_chunked, grad_full, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(chunked_token_entropy(hidden, weight, temperature, chunk_rows=5),
                                   token_entropy(hidden @ weight.t(), temperature), atol=1e-5, rtol=0)


def _trainer(tiny_checkpoint, peft=None, **train):
    config = build_config({"model": {"path": tiny_checkpoint, "device": "cpu"}, "peft": peft or {"rank": 4},
                           "train": {"global_batch_size": 8, "micro_batch_size": 4, "lr": 1e-2, **train},
                           "rollout": {"batch_size": 2, "n_samples_per_prompt": 4}})
    torch.manual_seed(0)
    policy = build_policy(config.model, config.peft, log=lambda m: None)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name or "oft_skew" in name:
                p.normal_(0.0, 0.05)
    return TorchTrainer(policy.model, config)


def _batch(vocab: int) -> RolloutBatch:
    torch.manual_seed(3)
    ids = torch.randint(3, vocab, (8, 12))
    mask = torch.zeros(8, 11)
    for row, length in enumerate((3, 10, 4, 2, 9, 5, 6, 11)):  # ragged responses, right-padded
        mask[row, 11 - length if length == 11 else 1:1 + length] = 1.0
    return RolloutBatch(ids, mask, torch.zeros(8, 11), torch.zeros(8), advantages=torch.linspace(-1, 1, 8),
                        old_logprobs=torch.full((8, 11), -2.0))


@pytest.mark.parametrize("base", ["bf16", "int4"])
@pytest.mark.parametrize("setting", [{"activation_checkpointing": "full"}, {"activation_checkpointing": "selective"},
                                     {"max_tokens_per_micro_batch": 24}])
def test_memory_settings_give_the_reference_update(tiny_checkpoint, int4_checkpoint, setting, base):
    path = int4_checkpoint if base == "int4" else tiny_checkpoint  # int4: the packed linear's own backward
    reference, other = _trainer(path), _trainer(path, **setting)
    for trainer in (reference, other):  # compare gradients: Adam's first step is sign-like and hides them
        trainer.optimizer.step = lambda: None
    batch = _batch(reference.model.config.vocab_size)
    ref_stats, stats = reference.update(batch), other.update(batch)
    assert stats["loss"] == pytest.approx(ref_stats["loss"], abs=1e-6)
    assert ref_stats["grad_norm"] > 1e-3
    for want, got in zip(reference.params, other.params):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-7, rtol=1e-5)


def test_token_budget_micro_batches_cover_every_row_once_within_budget():
    batch = _batch(20)
    lengths = batch.lengths()
    groups = micro_batch_rows(batch, max_rows=4, max_tokens=24)
    assert sorted(i for g in groups for i in g.tolist()) == list(range(8))
    for group in groups:
        rows = group.tolist()
        assert len(rows) == 1 or len(rows) * max(lengths[i] for i in rows) <= 24
    padded = sum(len(g) * max(lengths[i] for i in g.tolist()) for g in groups)
    by_count = sum(len(g) * max(lengths[i] for i in g.tolist()) for g in micro_batch_rows(batch, 4))
    assert padded < by_count  # grouping by length pads less than fixed-size micro-batches


@pytest.mark.parametrize("base, checkpointing, method", [("bf16", "none", "lora"), ("int4", "full", "lora"),
                                                          ("bf16", "selective", "oft")])
def test_compiled_training_layers_give_the_eager_gradients_without_recompiling(tiny_checkpoint, int4_checkpoint, base,
                                                                               checkpointing, method):
    """train.compile=on (inductor, here on the CPU) against the eager layers; a batch of another
    length reuses the compiled graphs (dynamic sequence length). int4: the packed linear's
    autograd function inside the compiled graph, and the checkpoint around it; OFT: the Cayley
    solve inside it."""
    from torch._dynamo.utils import counters

    path = int4_checkpoint if base == "int4" else tiny_checkpoint
    peft = {"method": "oft", "oft_block_size": 8} if method == "oft" else None
    eager = _trainer(path, peft, activation_checkpointing=checkpointing)
    compiled = _trainer(path, peft, activation_checkpointing=checkpointing, compile="on")
    assert compiled.model.training_layer_call is not eager.model.training_layer_call
    for trainer in (eager, compiled):
        trainer.optimizer.step = lambda: None
    batch = _batch(eager.model.config.vocab_size)
    ref_stats, stats = eager.update(batch), compiled.update(batch)
    assert stats["loss"] == pytest.approx(ref_stats["loss"], abs=1e-5)
    for want, got in zip(eager.params, compiled.params):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-6, rtol=1e-4)
    graphs = counters["stats"]["unique_graphs"]
    ids = torch.randint(3, eager.model.config.vocab_size, (8, 19))  # longer than any micro-batch before
    ones = torch.ones(8, 18)
    compiled.update(RolloutBatch(ids, ones, torch.zeros(8, 18), torch.zeros(8), advantages=torch.linspace(-1, 1, 8),
                                 old_logprobs=torch.full((8, 18), -2.0)))
    assert counters["stats"]["unique_graphs"] == graphs


def test_compile_on_is_refused_where_it_cannot_serve(tiny_moe_checkpoint):
    from orbit_core.errors import OrbitError

    with pytest.raises(OrbitError, match="train.compile=on does not support an MoE model"):
        _trainer(tiny_moe_checkpoint, compile="on")
