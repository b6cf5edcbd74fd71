"""LoRA as extra columns of a weight dequantized ahead (``orbit_kernels.lora_concat``): the layout
adds each row's own slot's update to each linear's outputs only, against a row-by-row fp32
implementation and against the trainer's LoRA modules; the kernels write what the references write
(here under Triton's interpreter; on a GPU in bf16); and the engine with it scores what the trainer
scores, inside the runtime preflight's gate, as closely as the LoRA kernels it replaces."""

from __future__ import annotations

import os

import pytest
import torch

from orbit_core.models import dequant_ahead
from orbit_core.models.dequant_ahead import DequantAhead
from orbit_core.models.projections import fuse_projections, packed_calls
from orbit_core.policy.load import load_base
from orbit_kernels import lora_concat
from orbit_kernels._triton import triton
from orbit_kernels.lora_concat import columns_reason, extra_columns, fill_reference, shrink_reference
from tests.test_dequant_ahead import _with_lora
from tests.test_kernels import _lora_fp32

WIDTHS = (130, 70, 70)  # q/k/v-like outputs of one input


def _factors(groups: int, slots: int, rank: int, k: int, dtype=torch.float32):
    torch.manual_seed(groups * 100 + slots * 10 + rank)
    stacked = torch.randn(slots, groups * rank, k) * 0.05  # as the engine may store them: one buffer
    as_ = [stacked[:, g * rank:(g + 1) * rank] for g in range(groups)]
    bs = [torch.randn(slots, n, rank) * 0.05 for n in WIDTHS[:groups]]
    return as_, bs


def _extended(x, weight, as_, bs, row_slot, scaling):
    """``[x | t]`` and ``[W | scaling B]`` through the references."""
    k, width = x.shape[1], extra_columns(x.shape[1], len(as_), *as_[0].shape[:2])
    x_ext = torch.full((x.shape[0], k + width), float("nan"), dtype=x.dtype)
    w_ext = torch.full((weight.shape[0], k + width), float("nan"), dtype=weight.dtype)
    shrink_reference(x_ext, x, as_, row_slot)
    w_ext[:, :k] = weight
    fill_reference(w_ext, k, bs, scaling)
    return x_ext, w_ext


@pytest.mark.parametrize("groups, slots, rank", [(1, 1, 16), (3, 1, 8), (2, 2, 16), (3, 3, 4)])
def test_one_product_of_the_extended_tensors_is_the_base_plus_each_rows_own_lora(groups, slots, rank):
    k, rows = 96, 11
    as_, bs = _factors(groups, slots, rank, k)
    x = torch.randn(rows, k)
    weight = torch.randn(sum(WIDTHS[:groups]), k)
    row_slot = torch.randint(0, slots, (rows,)) if slots > 1 else None
    x_ext, w_ext = _extended(x, weight, as_, bs, row_slot, 2.0)
    got = (x_ext @ w_ext.t()).split(WIDTHS[:groups], dim=1)
    for y, w, a, b in zip(got, weight.split(WIDTHS[:groups]), as_, bs):
        torch.testing.assert_close(y, _lora_fp32(x @ w.t(), x, a, b, row_slot, 2.0), atol=1e-5, rtol=1e-5)


def test_the_extra_columns_are_refused_past_their_share_of_the_inner_dimension():
    as_, bs = _factors(3, 2, 16, 2048)
    assert columns_reason(2048, as_, bs) is None  # 96 extra columns (128 with the padding) on 2,048
    assert extra_columns(2048, 1, 1, 16) == 64 and extra_columns(2048, 3, 2, 16) == 128
    assert extra_columns(2000, 1, 1, 4) == 48  # 2,016 is not a multiple of 64: zeros to 2,048
    as_, bs = _factors(3, 2, 64, 2048)
    assert "over 0.125 of 2048" in columns_reason(2048, as_, bs)
    as_, bs = _factors(1, 1, 256, 4096)
    assert "rank 256" in columns_reason(4096, as_, bs)


@pytest.mark.parametrize("fmt", ["int4", "fp8"])
def test_a_layers_extended_weights_compute_what_its_lora_modules_compute(packed_checkpoints, fmt, monkeypatch):
    """The schedule (``packed_calls`` naming the adapter wrappers, ``lora_columns``, the buffer
    layout) against the trainer's modules: for each call of a layer, ``[x | t] @ [W | sB]^T``
    equals the wrapped linears' own forwards."""
    monkeypatch.setattr(lora_concat, "MAX_EXTRA", 1.0)  # 48 extra columns on the tiny model's 128 inputs
    model = load_base(packed_checkpoints[fmt])
    fuse_projections(model)
    _with_lora(model)
    layer = model.model.layers[0]
    calls = packed_calls(layer)
    ahead = DequantAhead([calls], torch.float32, torch.device("cpu"), side=False, rows=5)
    assert all(c is not None for c in ahead.columns[0]) and len(calls) == 4
    torch.manual_seed(1)
    xs = [torch.randn(5, parts.in_features) for parts in calls]
    with torch.no_grad():  # outside the schedule: the modules dequantize their own weights
        wants = [torch.cat([m(x) for m in parts.adapters], dim=1) for x, parts in zip(xs, calls)]
    with ahead, torch.no_grad():
        ahead.enter_layer(0)
        for x, want, parts in zip(xs, wants, calls):
            extended, columns = dequant_ahead.with_lora_for(parts.weight, torch.float32)
            x_ext = torch.empty(5, extended.shape[1])
            shrink_reference(x_ext, x, list(columns.as_), columns.row_slot)
            got = torch.nn.functional.linear(x_ext, extended, parts.bias)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            # a plain base call of the same weight reads the dense columns alone
            dense = dequant_ahead.dense_for(parts.weight, torch.float32)
            assert dense.data_ptr() == extended.data_ptr() and dense.shape[1] == parts.in_features
    assert ahead.hits == 8


interpreted = pytest.mark.skipif(triton is None or os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="needs triton, under its interpreter (no GPU)")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _check_kernels(device: str, dtype: torch.dtype, rows: int, groups: int, slots: int, rank: int):
    """The kernels against the references, into buffers that start as NaN: every column is written."""
    k = 256
    as_, bs = _factors(groups, slots, rank, k)
    as_, bs = [a.to(device) for a in as_], [b.to(device) for b in bs]
    x = torch.randn(rows, k, device=device).to(dtype)
    row_slot = torch.randint(0, slots, (rows,), device=device) if slots > 1 else None
    width = extra_columns(k, groups, slots, rank)
    want = torch.full((rows, k + width), float("nan"), device=device, dtype=dtype)
    shrink_reference(want, x, as_, row_slot)
    for split in (None, 1, 3):  # the default split, none, and partials summed by the last arrival
        got = torch.full_like(want, float("nan"))
        lora_concat.launch_shrink(got, x, as_, row_slot, split)
        assert torch.equal(got[:, :k], x)
        torch.testing.assert_close(got[:, k:].float(), want[:, k:].float(), atol=2e-3, rtol=2 ** -7)
    n = sum(WIDTHS[:groups])
    w_want = torch.full((n, k + width), float("nan"), device=device, dtype=dtype)
    w_got = w_want.clone()
    fill_reference(w_want, k, bs, 1.5)
    lora_concat.launch_fill(w_got, k, bs, 1.5)
    assert torch.equal(w_got[:, k:], w_want[:, k:]) and w_got[:, :k].isnan().all()


@interpreted
@pytest.mark.parametrize("rows, groups, slots, rank", [(5, 3, 1, 16), (37, 2, 2, 8), (20, 1, 3, 4)])
def test_interpreted_kernels_write_what_the_references_write(rows, groups, slots, rank):
    _check_kernels("cpu", torch.float16, rows, groups, slots, rank)


@cuda
@pytest.mark.parametrize("rows, groups, slots, rank", [(256, 3, 1, 16), (64, 2, 2, 16), (37, 1, 2, 8)])
def test_on_the_gpu_the_kernels_write_what_the_references_write(rows, groups, slots, rank):
    _check_kernels("cuda", torch.bfloat16, rows, groups, slots, rank)


@cuda
@pytest.mark.parametrize("fmt", ["int4", "fp8", "nvfp4"])
def test_on_the_gpu_the_engine_layers_with_lora_columns_match_the_lora_kernels_and_the_trainer(
        packed_checkpoints, fmt, monkeypatch):
    from orbit_core.models.engine_forward import engine_forward
    from orbit_core.peft import lora as peft_lora
    from tests.test_dequant_ahead import _layer_inputs

    monkeypatch.setattr(lora_concat, "MAX_EXTRA", 1.0)  # 48 extra columns on the tiny model's 128 inputs
    model = load_base(packed_checkpoints[fmt], "bfloat16", "cuda")
    fuse_projections(model)
    _with_lora(model)
    x, cos, sin = _layer_inputs(model, 48, "cuda", torch.bfloat16)
    shrinks = []
    monkeypatch.setattr(peft_lora, "lora_concat_shrink_",
                        lambda *args: shrinks.append(1) or lora_concat.lora_concat_shrink_(*args))
    with torch.no_grad():
        reference = x
        for layer in model.model.layers:
            reference = layer(reference, cos, sin, None, None, None)
        # nvfp4's q/k/v and gate/up stay apart: their LoRA kernels serve each group in one launch
        calls = sum(bool(c.adapters) for c in packed_calls(model.model.layers[0])) * len(model.model.layers)
        assert calls == (2 if fmt == "nvfp4" else 4) * len(model.model.layers)
        with engine_forward():
            got = model._engine_layers(x, cos, sin, None, None, None)
            assert len(shrinks) == calls
            lora_concat.ENABLED = False
            try:
                kernels = model._engine_layers(x, cos, sin, None, None, None)
            finally:
                lora_concat.ENABLED = True
    assert len(shrinks) == calls  # none with the columns off
    scale = reference.float().abs().max().item()
    torch.testing.assert_close(got.float(), kernels.float(), atol=2e-2 * scale, rtol=2e-2)
    torch.testing.assert_close(got.float(), reference.float(), atol=3e-2 * scale, rtol=3e-2)


@cuda
def test_a_graphed_int4_engine_with_lora_columns_scores_what_the_trainer_scores(tiny_checkpoint, tmp_path,
                                                                               monkeypatch):
    """The runtime preflight's comparison, over 49 rows (above the packed kernels' 32): the engine
    with the LoRA columns passes the default gate and is as close to the trainer as without."""
    monkeypatch.setattr(lora_concat, "MAX_EXTRA", 1.0)  # the tiny model's inputs are few
    from orbit_core.config.schema import PreflightSection
    from orbit_core.models import load_tokenizer
    from orbit_core.preflight.runtime import runtime_parity
    from orbit_core.quant.quantize import quantize_checkpoint
    from orbit_core.rollout import BuiltinEngine

    path = str(quantize_checkpoint(tiny_checkpoint, str(tmp_path / "int4"), "int4", group_size=32))
    tok = load_tokenizer(tiny_checkpoint)
    prompts = [tok(f"{a}+{b}=", add_special_tokens=False)["input_ids"] for a in range(7) for b in range(7)]
    gate = PreflightSection()
    trainer = _with_lora(load_base(path, "bfloat16", "cuda"))
    reports = {}
    for on in (True, False):
        lora_concat.ENABLED = on
        try:
            engine = BuiltinEngine(_with_lora(load_base(path, "bfloat16", "cuda")), tok, max_running=64, seed=3)
            reports[on] = runtime_parity(engine, trainer, tok, prompts, 8, gate.topk, gate.max_logprob_abs_diff,
                                         gate.min_topk_agreement, 1.0, gate.max_logprob_mean_abs_diff)
        finally:
            lora_concat.ENABLED = True
    assert reports[True].passed, reports[True]
    assert reports[True].mean_abs_diff <= 1.5 * reports[False].mean_abs_diff + 2e-3, reports
