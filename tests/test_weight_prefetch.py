"""Packed weights asked into L2 ahead of the GEMVs (``orbit::l2_prefetch``, ``models.weight_prefetch``):
the spans the instruction names cover each tensor inside its own allocation, the requests name
exactly the packed tensors each block's calls read at those rows, and on a GPU the kernel runs
and a graphed engine decodes the same tokens and logprobs with and without it."""

from __future__ import annotations

import pytest
import torch

from orbit_core.models import weight_prefetch
from orbit_core.models.projections import fuse_projections, packed_calls
from orbit_core.peft.lora import apply_lora
from orbit_core.policy.load import load_base
from orbit_core.quant.quantize import quantize_checkpoint
from orbit_kernels import l2_prefetch
from orbit_kernels.packed_gemm import dense_above


def _with_lora(model):
    torch.manual_seed(0)
    apply_lora(model, 4, 8, 0.0, ["all-linear"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    return model.eval()


def test_each_span_starts_16_byte_aligned_and_covers_its_tensor():
    storage = torch.zeros(1000, dtype=torch.int32)
    views = [storage, storage[3:250], storage[4:5], storage.view(torch.uint8)[1:7], storage[:0],
             storage.view(10, 100)[:, :3]]
    spans = l2_prefetch.regions(views)
    assert [s[0] is v for s, v in zip(spans, views)] == [True] * 4  # the empty and the strided are skipped
    for t, lead, length in spans:
        start = t.data_ptr() - lead
        assert start % 16 == 0 and length % 16 == 0 and 0 <= lead < 16
        assert start + length >= t.data_ptr() + t.numel() * t.element_size() > start + length - 16


@pytest.mark.parametrize("fmt", ["int4", "fp8", "nvfp4"])
def test_the_requests_name_each_blocks_packed_tensors_in_call_order(packed_checkpoints, fmt):
    model = load_base(packed_checkpoints[fmt])
    fuse_projections(model)
    _with_lora(model)
    layer = model.model.layers[0]
    for block in (layer.self_attn, layer.mlp):
        want = []
        for parts in packed_calls(block):
            want += [parts.weight, parts.scale] + ([parts.global_scale] if fmt == "nvfp4" else [])
        got = weight_prefetch.block_tensors(block, 1)
        assert len(got) == len(want)
        assert all(a is b for a, b in zip(got, want))
        assert got[0] is packed_calls(block)[0].weight
        assert weight_prefetch.block_tensors(block, dense_above(fmt) + 1) == []  # dequantized ahead instead
    # q/k/v fused into one call but for nvfp4 (a global scale per linear), and o
    assert len(weight_prefetch.block_tensors(layer.self_attn, 1)) == (12 if fmt == "nvfp4" else 4)
    dense = load_base(packed_checkpoints["dense"])
    assert weight_prefetch.block_tensors(dense.model.layers[0].mlp, 1) == []
    x = torch.zeros(1, 1, model.config.hidden_size)
    assert weight_prefetch.plan(model.model.layers, x) is None  # the CPU: nothing to launch
    assert l2_prefetch.l2_prefetch(weight_prefetch.block_tensors(layer.mlp, 1)) is None


cuda = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                          reason="needs a GPU of compute capability 9 or later")


@cuda
def test_the_kernel_prefetches_odd_spans_and_leaves_every_value_alone():
    torch.manual_seed(0)
    big = torch.randint(-2**31, 2**31 - 1, (4096, 1000), dtype=torch.int32, device="cuda")
    tensors = [big, big[7:9], torch.randn(33, dtype=torch.bfloat16, device="cuda")[1:],
               torch.zeros(3, dtype=torch.uint8, device="cuda")] * 3  # 12 tensors: two launches
    before = [t.clone() for t in tensors]
    assert l2_prefetch.launch(tensors) == 2
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(tensors, before))


@cuda
@pytest.mark.parametrize("prompts_n", [1, 3])
def test_a_graphed_int4_engine_decodes_the_same_with_and_without_the_prefetch(tiny_checkpoint, tmp_path,
                                                                            monkeypatch, prompts_n):
    from orbit_core.models import load_tokenizer
    from orbit_core.rollout import BuiltinEngine, SamplingParams

    path = str(quantize_checkpoint(tiny_checkpoint, str(tmp_path / "int4"), "int4", group_size=32))
    tok = load_tokenizer(tiny_checkpoint)
    prompts = [tok(f"{a}+{a}=", add_special_tokens=False)["input_ids"] for a in range(prompts_n)]
    params = SamplingParams(max_new_tokens=8, temperature=1.0)
    launches = []
    launch = l2_prefetch.launch
    monkeypatch.setattr(l2_prefetch, "launch", lambda tensors: launches.append(len(tensors)) or launch(tensors))
    runs = {}
    for on in (True, False):
        weight_prefetch.ENABLED = on
        try:
            model = _with_lora(load_base(path, "bfloat16", "cuda"))
            runs[on] = BuiltinEngine(model, tok, max_running=8, seed=3).generate(prompts, params)
            if on:
                layers = len(model.model.layers)
                assert len(launches) >= 2 * layers and set(launches) == {4}  # codes + scales of two calls
                launches.clear()
        finally:
            weight_prefetch.ENABLED = True
    assert not launches
    for a, b in zip(runs[True], runs[False]):
        assert a.token_ids == b.token_ids
        assert a.logprobs == b.logprobs
