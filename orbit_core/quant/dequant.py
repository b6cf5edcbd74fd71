"""Plain-torch dequantization of the three compressed-tensors weight formats Orbit trains on.

These are the references the Triton kernels are tested against, and the CPU path. Each takes the
tensors exactly as stored in the checkpoint and returns ``[out, in]`` in ``dtype``. They live
beside their kernels in ``orbit_kernels``; this module is where the library imports them from.
"""

from orbit_kernels.fp_formats import E2M1_VALUES, dequant_fp8_block, dequant_nvfp4, unpack_fp4
from orbit_kernels.int4 import dequant_int4, unpack_int4

__all__ = ["E2M1_VALUES", "dequant_fp8_block", "dequant_int4", "dequant_nvfp4", "unpack_fp4", "unpack_int4"]
