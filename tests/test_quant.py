"""Quantized bases: compressed-tensors reads our files back, error bounds, packed memory, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from orbit_core.errors import OrbitError
from orbit_core.policy import load_base
from orbit_core.peft import apply_lora
from orbit_core.preflight import check_checkpoint
from orbit_core.quant import QuantLinear, quantize_checkpoint
from orbit_core.quant.dequant import dequant_fp8_block, dequant_int4, dequant_nvfp4
from orbit_core.quant.formats import format_from_config
from tests.conftest import save_hf_model

FORMATS = ["int4", "fp8", "nvfp4"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("src")
    save_hf_model("qwen3", path, head_dim=32, intermediate_size=256)
    return path


@pytest.fixture(scope="module")
def quantized(source, tmp_path_factory):
    root = tmp_path_factory.mktemp("q")
    return {f: quantize_checkpoint(str(source), str(root / f), f, group_size=32) for f in FORMATS}


@pytest.mark.parametrize("fmt", FORMATS)
def test_compressed_tensors_decompression_equals_ours(quantized, fmt):
    from compressed_tensors.compressors import BaseCompressor
    from safetensors.torch import load_file

    config = json.loads((quantized[fmt] / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    weight_format, ignored = format_from_config(config, "config.json")
    assert ignored == ["lm_head"]
    tensors = load_file(str(quantized[fmt] / "model.safetensors"))
    compressor = BaseCompressor.get_value_from_registry(weight_format.storage)
    module = "model.layers.1.mlp.down_proj"
    local = {k[len(module) + 1:]: v for k, v in tensors.items() if k.startswith(module + ".")}
    theirs = compressor.decompress(local, weight_format.scheme)["weight"].float()
    if fmt == "int4":
        ours = dequant_int4(local["weight_packed"], local["weight_scale"], tuple(local["weight_shape"].tolist()), torch.float32)
        torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    elif fmt == "fp8":
        torch.testing.assert_close(dequant_fp8_block(local["weight"], local["weight_scale"], torch.float32), theirs, atol=0, rtol=0)
    else:  # compressed-tensors decompresses nvfp4 in bf16; ours is fp32, so compare at bf16 precision
        ours = dequant_nvfp4(local["weight_packed"], local["weight_scale"], local["weight_global_scale"], torch.float32)
        torch.testing.assert_close(ours.bfloat16().float(), theirs, atol=1e-6, rtol=2**-7)


@pytest.mark.parametrize("shape", [(300, 200), (130, 260), (256, 384)])
def test_fp8_blocks_are_128_wide_where_a_dimension_is_not_a_multiple(shape):
    """compressed-tensors' own decompression is the reference; 200 columns are blocks of 128 and 72."""
    from compressed_tensors.compressors import BaseCompressor

    from orbit_core.quant.formats import weight_format
    from orbit_core.quant.quantize import quantize_weight

    fmt = weight_format("fp8")
    compressed = quantize_weight(torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * 0.02, fmt, "w")
    theirs = BaseCompressor.get_value_from_registry(fmt.storage).decompress(compressed, fmt.scheme)["weight"].float()
    ours = dequant_fp8_block(compressed["weight"], compressed["weight_scale"], torch.float32)
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


@pytest.mark.parametrize("fmt", ["int4", "fp8"])
def test_transformers_loads_our_checkpoint_with_our_logits(quantized, fmt):
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    theirs = AutoModelForCausalLM.from_pretrained(str(quantized[fmt]), dtype=torch.float32).eval()
    ours = load_base(str(quantized[fmt]))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("fmt", FORMATS)
def test_error_within_format_bound_and_memory_stays_packed(source, quantized, fmt):
    report = check_checkpoint(str(quantized[fmt]), str(source))
    assert report.passed, [c.detail for c in report.checks]
    assert 0.0 < report.max_error_ratio <= 1.0001
    model = load_base(str(quantized[fmt]))
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(quant) == 14
    packed = sum(b.numel() * b.element_size() for m in quant for b in m.buffers())
    dense = sum(m.in_features * m.out_features * 4 for m in quant)
    bits = {"int4": 4, "fp8": 8, "nvfp4": 4}[fmt]
    assert packed < dense * (bits / 32) * 1.3  # payload plus scales
    resident = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    others = sum(p.numel() * 4 for n, p in model.named_parameters())
    assert resident == packed + others  # nothing dequantized is kept around


def test_lora_trains_on_packed_base_and_fake_qat(quantized):
    from orbit_core.peft import adapter_parameters
    from orbit_core.quant import fake_quantize

    model = load_base(str(quantized["int4"]))
    apply_lora(model, 4, 8, 0.0, ["all-linear"])
    before = {n: b.clone() for n, b in model.named_buffers() if "weight" in n}
    opt = torch.optim.AdamW(adapter_parameters(model), lr=1e-2)
    for fake in (False, True):
        for _, m in model.named_modules():
            if hasattr(m, "fake_quant"):
                m.fake_quant = (lambda w, f=model.quant_format: fake_quantize(w, f)) if fake else None
        loss = model(torch.randint(0, 97, (2, 8))).logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
        opt.step()
    for n, b in model.named_buffers():
        if n in before:
            assert torch.equal(b, before[n])


def test_group_size_must_divide(source, tmp_path):
    with pytest.raises(OrbitError, match=r"group size 48 does not divide model.layers.0.self_attn.q_proj \(in_features=64\)"):
        quantize_checkpoint(str(source), str(tmp_path / "out"), "int4", group_size=48)
    assert not (tmp_path / "out").exists()  # no half-written OUT


def test_bad_checkpoints_fail_clearly(quantized, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(quantized["int4"], broken)
    config = json.loads((broken / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "gptq"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(OrbitError, match="quant_method='gptq' is not supported"):
        load_base(str(broken))
    truncated = tmp_path / "truncated"
    shutil.copytree(quantized["int4"], truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(OrbitError, match="corrupted or truncated"):
        load_base(str(truncated))


def test_corrupted_scale_fails_checkpoint_preflight(source, quantized, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(quantized["int4"], bad)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.weight_scale"][3, 0] = -1.0
    tensors["model.layers.1.self_attn.o_proj.weight_scale"] *= 1.5
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    report = check_checkpoint(str(bad), str(source))
    failed = {c.name: c.detail for c in report.checks if not c.passed}
    assert "model.layers.0.mlp.up_proj" in failed["scales finite and positive"]
    assert "dequantized weights within the format's error bound" in failed
