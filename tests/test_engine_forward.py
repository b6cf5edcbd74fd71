"""The engine's layer loop (``DecoderLM._engine_layers``: residual adds joined to the norms after
them) against the layers' own forward, on the CPU where both run the torch references."""

from __future__ import annotations

import pytest
import torch

from orbit_core.models.checkpoint import load_model


@pytest.mark.parametrize("fixture", ["tiny_checkpoint", "tiny_moe_checkpoint"])
def test_the_engine_layer_loop_computes_what_the_layers_do(request, fixture):
    model = load_model(request.getfixturevalue(fixture)).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # norms that differ, so that taking the wrong one shows
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight"):
                param.copy_(torch.rand_like(param) + 0.5)
    x = torch.randn(2, 7, model.config.hidden_size)
    cos, sin = model._rope(torch.arange(7).expand(2, 7))
    with torch.no_grad():
        want = x
        for layer in model.model.layers:
            want = layer(want, cos, sin, None, None, None)
        got, none = model._engine_layers(x, cos, sin, None, None, None, None)
        # a decode step joins the last residual add to the final norm as well
        last, hidden = model._engine_layers(x, cos, sin, None, None, None, model.model.norm)
        want_hidden = model.model.norm(want)
    assert torch.equal(got, want) and none is None
    assert torch.equal(last, want) and torch.equal(hidden, want_hidden)
