"""Verification kernels: attention over a KV cache with a tree mask.

The reference backend is plain PyTorch (SDPA with an explicit boolean mask) and runs on any device. A FlashInfer
backend for CUDA plugs in behind the same :func:`tree_attention` signature.
"""

from .reference import tree_attention

__all__ = ["tree_attention"]
