"""Fused base weights for linears that read one input (``models.projections``): what the model
computes is unchanged, one call gives every linear's output, and a fusion that no longer holds is
never used."""

from __future__ import annotations

import pytest
import torch

from orbit_core.models import projections
from orbit_core.models.engine_forward import engine_forward
from orbit_core.models.projections import base_outputs, fuse, fuse_projections, project
from orbit_core.peft.lora import apply_lora
from orbit_core.policy.load import load_base




def _first_tensor(linear: torch.nn.Module) -> torch.Tensor:
    return linear.weight if hasattr(linear, "weight") else linear.weight_packed


@pytest.mark.parametrize("kind", ["dense", "int4", "fp8"])
def test_fused_linears_compute_what_they_did_and_one_call_gives_each_output(packed_checkpoints, kind):
    model = load_base(packed_checkpoints[kind])
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        before = model(ids)
    assert fuse_projections(model) == 2 * len(model.model.layers)  # q/k/v and gate/up of every layer
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    storage = _first_tensor(attn.q_proj).untyped_storage().data_ptr()
    assert fuse_projections(model) == 2 * len(model.model.layers)  # a second engine: nothing copied again
    assert _first_tensor(attn.q_proj).untyped_storage().data_ptr() == storage
    assert all(_first_tensor(m).untyped_storage().data_ptr() == storage for m in (attn.k_proj, attn.v_proj))
    with torch.no_grad():
        assert torch.equal(model(ids), before)  # each linear reads its own rows of the shared buffer
        x = torch.randn(2, 3, 128)
        for group in ((attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)):
            fused = base_outputs(x, group)
            assert fused is not None and [f.shape[-1] for f in fused] == [m.out_features for m in group]
            for got, linear in zip(fused, group):
                torch.testing.assert_close(got, linear(x), atol=1e-5, rtol=1e-5)


def test_linears_that_cannot_share_a_buffer_are_left_alone(packed_checkpoints):
    nvfp4 = load_base(packed_checkpoints["nvfp4"])  # one global scale per linear
    assert fuse_projections(nvfp4) == 0
    model = load_base(packed_checkpoints["dense"])
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    weights = [attn.q_proj.weight, mlp.down_proj.weight]
    assert not fuse([attn.q_proj, mlp.down_proj])  # inputs of 128 and 256
    packed = load_base(packed_checkpoints["int4"]).model.layers[0].self_attn
    assert not fuse([attn.q_proj, packed.k_proj]) and not fuse([packed.q_proj, attn.k_proj])  # two kinds
    attn.k_proj.weight.requires_grad_(True)
    assert not fuse([attn.q_proj, attn.k_proj, attn.v_proj])  # a trained weight keeps its own tensor
    assert attn.q_proj.weight is weights[0] and mlp.down_proj.weight is weights[1]
    assert base_outputs(torch.randn(1, 128), [attn.q_proj, attn.k_proj, attn.v_proj]) is None


def test_a_replaced_tensor_ends_the_fusion(packed_checkpoints):
    model = load_base(packed_checkpoints["dense"])
    fuse_projections(model)
    attn = model.model.layers[0].self_attn
    group = [attn.q_proj, attn.k_proj, attn.v_proj]
    x = torch.randn(1, 128)
    assert base_outputs(x, group) is not None
    attn.k_proj.weight.data = attn.k_proj.weight.data.clone() * 2  # e.g. a load that assigns new tensors
    assert base_outputs(x, group) is None
    with torch.no_grad():
        got = project(x, *group)  # each linear on its own (the CPU path in any case)
    torch.testing.assert_close(got[1], attn.k_proj(x))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("kind", ["dense", "int4", "fp8"])
@pytest.mark.parametrize("rows", [1, 8, 40])
def test_the_engines_fused_projections_equal_separate_calls(packed_checkpoints, kind, rows):
    """On the GPU, in the engine's forward: the fused base call and grouped LoRA against each
    linear called apart (``FUSED`` off), bare and with a LoRA adapter."""
    model = load_base(packed_checkpoints[kind], "bfloat16", "cuda")
    assert fuse_projections(model) > 0
    attn = model.model.layers[1].self_attn
    x = torch.randn(rows, 1, 128, device="cuda", dtype=torch.bfloat16)
    for adapter in (False, True):
        if adapter:
            apply_lora(model, 8, 16, 0.0, ["q_proj", "k_proj", "v_proj"])
            for module in (attn.q_proj, attn.k_proj, attn.v_proj):
                torch.nn.init.normal_(module.lora_B, std=0.05)
            model.eval()
        group = (attn.q_proj, attn.k_proj, attn.v_proj)
        with torch.no_grad(), engine_forward():
            fused = [o.clone() for o in project(x, *group)]
            projections.FUSED = False
            try:
                apart = project(x, *group)
            finally:
                projections.FUSED = True
        for got, want in zip(fused, apart):
            assert got.stride(-1) == 1
            torch.testing.assert_close(got.float(), want.float(), atol=2e-2 * want.abs().max().item(), rtol=2e-2)
