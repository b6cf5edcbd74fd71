"""Triton kernels, each beside the plain-torch reference its tests compare against.

Installed as ``orbit_kernels`` (a package named ``kernels`` would shadow the PyPI package that
transformers probes for). The packed-weight formats: ``int4`` and ``fp_formats`` (references and
dispatch points), ``packed_gemv`` (few rows), ``packed_gemm`` (fused GEMM both ways, and the
whole-word dequantization), ``packed_grad`` (the input gradient's op); ``grouped_gemm`` (MoE
experts); and the rollout engine's inference kernels ``rmsnorm``, ``rope``, ``lora`` and
``decode_attention``.
"""
