"""Low-precision bases: compressed-tensors formats, quantization, packed loading."""

from orbit_core.quant.dequant import dequant_fp8_block, dequant_int4, dequant_nvfp4
from orbit_core.quant.formats import FORMATS, WeightFormat, format_from_config, weight_format
from orbit_core.quant.linear import QuantLinear, fake_quantize
from orbit_core.quant.quantize import quantize_checkpoint

__all__ = ["dequant_fp8_block", "dequant_int4", "dequant_nvfp4", "FORMATS", "WeightFormat", "format_from_config",
           "weight_format", "QuantLinear", "fake_quantize", "quantize_checkpoint"]
