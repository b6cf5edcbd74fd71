"""Triton kernels, each beside the plain-torch reference its tests compare against.

Installed as ``orbit_kernels`` (a package named ``kernels`` would shadow the PyPI package that
transformers probes for). ``int4`` (dequant, split-K GEMV, tiled GEMM), ``grouped_gemm`` (MoE
experts), and the rollout engine's inference kernels ``rmsnorm``, ``rope``, ``lora`` and
``decode_attention``.
"""
