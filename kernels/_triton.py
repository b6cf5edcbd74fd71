"""Triton when it is installed; on CPU-only installs both names are None and every op serves its
plain-torch reference."""

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None
