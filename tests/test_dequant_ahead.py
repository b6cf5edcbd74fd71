"""Dequantizing the next layer's packed weights ahead (``models.dequant_ahead``): the schedule names
exactly the base calls the engine makes, every call is served the dense weight of its own tensors,
and what the layers compute is unchanged; on a GPU, with the side stream, eagerly and replayed
from a CUDA graph, against the inline path and against the trainer's torch references."""

from __future__ import annotations

import pytest
import torch

from orbit_core.models import dequant_ahead, projections
from orbit_core.models.dequant_ahead import DequantAhead
from orbit_core.models.engine_forward import engine_forward
from orbit_core.models.projections import fuse_projections, packed_calls
from orbit_core.peft.lora import apply_lora
from orbit_core.peft.oft import apply_oft
from orbit_core.policy.load import load_base
from orbit_core.quant.quantize import quantize_checkpoint

GROUP_NAMES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))



def _packed(linear):
    base = getattr(linear, "base", linear)
    return tuple(getattr(base, name) for name in base.tensor_names)


def _keys(calls):
    return [(c.weight.data_ptr(), tuple(c.weight.shape)) for c in calls]


def _with_lora(model):
    torch.manual_seed(0)
    apply_lora(model, 4, 8, 0.0, ["all-linear"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    return model.eval()


@pytest.mark.parametrize("fmt", ["int4", "fp8"])
def test_the_schedule_names_one_call_per_fused_group_and_per_other_packed_linear(packed_checkpoints, fmt):
    model = load_base(packed_checkpoints[fmt])
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    singles = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    assert sorted(_keys(packed_calls(model.model.layers[0]))) == sorted(
        (_packed(m)[0].data_ptr(), tuple(_packed(m)[0].shape)) for m in singles)
    fuse_projections(model)
    _with_lora(model)  # through the adapter wrappers to their bases
    calls = packed_calls(model.model.layers[0])
    qkv, gate_up = (projections._record([getattr(m, n).base for n in names]) for m, names in
                    zip((attn, mlp), GROUP_NAMES))
    want = [qkv.tensors[0], gate_up.tensors[0], _packed(attn.o_proj)[0], _packed(mlp.down_proj)[0]]
    assert _keys(calls) == [(w.data_ptr(), tuple(w.shape)) for w in want]
    assert calls[0].bias is qkv.tensors[-1] and calls[0].bias is not None  # qwen2's q/k/v biases ride along
    projections.FUSED = False
    try:  # the engine then calls each linear on its own, and so does the schedule
        assert len(packed_calls(model.model.layers[0])) == 7
    finally:
        projections.FUSED = True
    oft = load_base(packed_checkpoints[fmt])
    fuse_projections(oft)
    apply_oft(oft, 8, False, 6e-5, False, ["all-linear"])  # each linear rotates its own input
    layer = oft.model.layers[0]
    linears = [getattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
        getattr(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]
    assert sorted(_keys(packed_calls(layer))) == sorted(
        (_packed(m)[0].data_ptr(), tuple(_packed(m)[0].shape)) for m in linears)


def test_nothing_is_scheduled_for_dense_linears_or_routed_experts(packed_checkpoints, tmp_path,
                                                                  tiny_moe_checkpoint):
    assert packed_calls(load_base(packed_checkpoints["dense"]).model.layers[0]) == []
    nvfp4 = load_base(packed_checkpoints["nvfp4"])  # one global scale per linear: never fused
    assert fuse_projections(nvfp4) == 0 and len(packed_calls(nvfp4.model.layers[0])) == 7
    moe = load_base(str(quantize_checkpoint(tiny_moe_checkpoint, str(tmp_path / "moe"), "int4", group_size=16)))
    layer = moe.model.layers[0]
    calls = packed_calls(layer)
    attn = layer.self_attn
    assert sorted(_keys(calls)) == sorted((_packed(m)[0].data_ptr(), tuple(_packed(m)[0].shape))
                                          for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))


def _layer_inputs(model, rows: int, device: str, dtype: torch.dtype):
    torch.manual_seed(0)
    x = torch.randn(rows, 3, model.config.hidden_size, device=device, dtype=dtype)
    cos, sin = model._rope(torch.arange(3, device=device).expand(rows, 3))
    return x, cos.to(dtype), sin.to(dtype)


@pytest.mark.parametrize("fmt", ["int4", "fp8", "nvfp4"])
def test_every_call_is_served_its_own_dense_weight_and_the_layers_compute_what_they_did(
        packed_checkpoints, fmt, monkeypatch):
    """On the CPU, dequantizing on the current stream as each layer is entered: the inline path's
    output exactly, with every packed call of every layer served from the schedule's buffers."""
    model = _with_lora(load_base(packed_checkpoints[fmt]))
    x, cos, sin = _layer_inputs(model, 5, "cpu", torch.float32)
    with torch.no_grad():
        want, _ = model._engine_layers(x, cos, sin, None, None, None)
    made = []

    def inline(layers, x):
        made.append(DequantAhead([packed_calls(layer) for layer in layers], x.dtype, x.device, side=False))
        return made[-1]

    monkeypatch.setattr(dequant_ahead, "plan", inline)
    with torch.no_grad():
        got, _ = model._engine_layers(x, cos, sin, None, None, None)
    assert made[0].hits == 7 * len(model.model.layers)
    assert torch.equal(got, want)
    assert dequant_ahead.dense_for(_packed(model.model.layers[0].self_attn.q_proj)[0], x.dtype) is None  # only inside


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("fmt", ["int4", "fp8", "nvfp4"])
def test_on_the_gpu_the_side_stream_schedule_equals_the_inline_path_eagerly_and_in_a_graph(
        packed_checkpoints, fmt, monkeypatch):
    model = load_base(packed_checkpoints[fmt], "bfloat16", "cuda")
    fuse_projections(model)
    _with_lora(model)
    rows = 48  # above every format's packed-kernel rows: the forward dequantizes
    x, cos, sin = _layer_inputs(model, rows, "cuda", torch.bfloat16)
    layers = model.model.layers
    with torch.no_grad():
        reference = x  # the trainer's path: each layer's own forward on the torch references
        for layer in layers:
            reference = layer(reference, cos, sin, None, None, None)
        with engine_forward():
            dequant_ahead.ENABLED = False
            try:
                inline, _ = model._engine_layers(x, cos, sin, None, None, None)
            finally:
                dequant_ahead.ENABLED = True
            made = []
            plan = dequant_ahead.plan
            monkeypatch.setattr(dequant_ahead, "plan", lambda layers, x: made.append(plan(layers, x)) or made[-1])
            ahead, _ = model._engine_layers(x, cos, sin, None, None, None)
            assert made[0] is not None and made[0].stream is not None
            assert made[0].hits == sum(len(c) for c in made[0].calls) == len(packed_calls(layers[0])) * len(layers)
            static_x = x.clone()
            graph = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                model._engine_layers(static_x, cos, sin, None, None, None)  # warm-up outside the graph
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph):
                replayed, _ = model._engine_layers(static_x, cos, sin, None, None, None)
            static_x.copy_(x * 0.5)
            graph.replay()
            dequant_ahead.ENABLED = False
            try:
                inline_half, _ = model._engine_layers(x * 0.5, cos, sin, None, None, None)
            finally:
                dequant_ahead.ENABLED = True
    assert torch.equal(ahead, inline)
    torch.testing.assert_close(replayed, inline_half, atol=0, rtol=0)
    scale = reference.float().abs().max().item()
    torch.testing.assert_close(ahead.float(), reference.float(), atol=3e-2 * scale, rtol=3e-2)


@cuda
def test_a_graphed_int4_engine_decodes_the_same_with_and_without_dequantizing_ahead(tiny_checkpoint, tmp_path):
    from orbit_core.models import load_tokenizer
    from orbit_core.rollout import BuiltinEngine, SamplingParams

    path = str(quantize_checkpoint(tiny_checkpoint, str(tmp_path / "int4"), "int4", group_size=32))
    tok = load_tokenizer(tiny_checkpoint)
    prompts = [tok(f"{a}+{b}=", add_special_tokens=False)["input_ids"] for a in range(7) for b in range(7)]
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    runs = {}
    for on in (True, False):
        dequant_ahead.ENABLED = on
        try:
            model = _with_lora(load_base(path, "bfloat16", "cuda"))
            runs[on] = BuiltinEngine(model, tok, max_running=64, seed=3).generate(prompts, params)
        finally:
            dequant_ahead.ENABLED = True
    for a, b in zip(runs[True], runs[False]):
        assert a.token_ids == b.token_ids
        assert a.logprobs == b.logprobs
