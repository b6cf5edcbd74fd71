"""Triton kernels, each beside the plain-torch reference its tests compare against.

Installed as ``orbit_kernels`` (a package named ``kernels`` would shadow the PyPI package that
transformers probes for). The fused dequant-GEMM and decode kernels arrive with the GPU issues.
"""
