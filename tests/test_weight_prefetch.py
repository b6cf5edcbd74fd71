"""Prefetching packed weights into L2 (``models.weight_prefetch``, ``orbit::l2_prefetch``): the plan
names, for each layer, that layer's packed weights after q/k/v and the next layer's q/k/v, found by
walking the modules by name here; on a GPU the kernel runs on ragged, unaligned ranges, eagerly and
from a CUDA graph, and a graphed int4 + LoRA engine decodes bit for bit what it decodes without it."""

from __future__ import annotations

import pytest
import torch

from orbit_core.models import weight_prefetch
from orbit_core.models.projections import fuse_projections
from orbit_core.policy.load import load_base
from orbit_kernels import l2_prefetch
from tests.test_dequant_ahead import _packed, _with_lora

ATTN, MLP = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")


def _spans(tensors):
    return sorted((t.data_ptr(), t.numel() * t.element_size()) for t in tensors)


def _by_name(layer, names, part):
    return [t for n in names for t in _packed(getattr(getattr(layer, part), n))[:2]]


@pytest.mark.parametrize("fused", [False, True])
def test_each_layer_prefetches_its_weights_after_qkv_and_the_next_layers_qkv(packed_checkpoints, fused):
    model = _with_lora(load_base(packed_checkpoints["int4"]))
    if fused:
        assert fuse_projections(model) > 0
    layers = model.model.layers
    plan = weight_prefetch.layer_tensors(layers, rows=1)
    assert len(plan) == len(layers) >= 2
    for i, layer in enumerate(layers):
        want = _by_name(layer, ("o_proj",), "self_attn") + _by_name(layer, MLP, "mlp")
        if i + 1 < len(layers):
            want += _by_name(layers[i + 1], ATTN[:3], "self_attn")
        # a fused group is one buffer holding its linears' views end to end: compare the bytes covered
        covered = sum(n for _, n in _spans(plan[i]))
        assert covered == sum(n for _, n in _spans(want))
        for ptr, n in _spans(want):
            assert any(p <= ptr and ptr + n <= p + m for p, m in _spans(plan[i])), (i, ptr)
    # above the packed kernels' rows the weights are dequantized ahead: nothing to prefetch
    assert all(not ts for ts in weight_prefetch.layer_tensors(layers, rows=512))
    assert weight_prefetch.plan(model, layers, torch.zeros(1, 1, 64)) is None  # the CPU prefetches nothing


def test_requests_tile_each_tensor_in_aligned_chunks():
    base = torch.zeros(1000, dtype=torch.uint8)
    views = [base[3:500], base[16:32], base[1:10], base[0:1000]]  # base[1:10] holds no aligned 16 bytes
    got = l2_prefetch.ranges_tensor(views, torch.device("cpu"), chunk=64).tolist()
    start = base.data_ptr()
    assert all(a % 16 == 0 and 0 < n <= 64 and n % 16 == 0 for a, n in got)
    spans = []  # consecutive requests that continue one another, joined
    for a, n in got:
        if spans and spans[-1][0] + spans[-1][1] == a and spans[-1][1] % 64 == 0:
            spans[-1][1] += n
        else:
            spans.append([a, n])
    assert len(spans) == 3
    for (a, n), v in zip(spans, [views[0], views[1], views[3]]):
        lo, hi = v.data_ptr(), v.data_ptr() + v.numel()
        assert lo <= a < lo + 16 and hi - 16 < a + n <= hi  # all of the tensor but its unaligned ends
    assert spans[2] == [(start + 15) // 16 * 16, (start + 1000) // 16 * 16 - (start + 15) // 16 * 16]


cuda = pytest.mark.skipif(not torch.cuda.is_available() or l2_prefetch.device_reason(
    torch.device("cuda")) is not None, reason="needs a GPU of compute capability 9 and Triton")


@cuda
def test_the_prefetch_kernel_runs_on_ragged_ranges_eagerly_and_in_a_graph():
    data = torch.randn(3_000_001, device="cuda")
    keep = data.clone()
    # the 16 bytes of data[5:9] and the 4 of data[7:8] hold no aligned 16 bytes: no request
    ranges = l2_prefetch.ranges_tensor([data[1:], data[5:9], data[:1_000_003], data[7:8]], data.device)
    assert ranges.shape[0] == -(-11_999_984 // l2_prefetch.CHUNK) + -(-4_000_000 // l2_prefetch.CHUNK)
    l2_prefetch.l2_prefetch(ranges)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        l2_prefetch.l2_prefetch(ranges)
        data.add_(1.0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(data, keep + 1.0)


@cuda
def test_prefetching_changes_no_token_or_logprob(tiny_checkpoint, tmp_path, monkeypatch):
    from orbit_core.quant.quantize import quantize_checkpoint
    from orbit_core.rollout.engine import BuiltinEngine
    from orbit_core.rollout.types import SamplingParams
    from orbit_core.models import load_tokenizer

    path = str(quantize_checkpoint(tiny_checkpoint, str(tmp_path / "int4"), "int4", group_size=32))
    tok = load_tokenizer(tiny_checkpoint)
    prompts = [tok(f"{a}+{b}=", add_special_tokens=False)["input_ids"] for a in range(4) for b in range(5)]
    runs = {}
    for on in (True, False):
        monkeypatch.setattr(l2_prefetch, "ENABLED", on)
        model = _with_lora(load_base(path, "bfloat16", "cuda"))
        engine = BuiltinEngine(model, tok, max_running=32, seed=3)
        params = SamplingParams(max_new_tokens=10, temperature=1.0)
        runs[on] = [engine.generate(prompts[:n], params) for n in (1, 3, 12)]
        assert engine.loop.graphed is not None and engine.loop.graphed.graphs
        assert bool(model.__dict__.get("_orbit_prefetch_plans")) == on
    for a_run, b_run in zip(runs[True], runs[False]):
        for a, b in zip(a_run, b_run):
            assert a.token_ids == b.token_ids and a.logprobs == b.logprobs
