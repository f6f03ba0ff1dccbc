"""Small pieces the draft networks share: head splitting and rotary embedding on ``[1, heads, rows, head_dim]``."""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half


def heads(x: torch.Tensor, proj: nn.Linear, num_heads: int, head_dim: int) -> torch.Tensor:
    """``proj(x)`` for rows ``x`` ``[m, *]`` as ``[1, num_heads, m, head_dim]``."""
    return proj(x).view(x.shape[0], num_heads, head_dim).transpose(0, 1)[None]


def rotate(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Apply RoPE (``cos``/``sin`` of shape ``[m, head_dim]``) to ``[1, heads, m, head_dim]``."""
    cos, sin = rope
    return x * cos + rotate_half(x) * sin


def rope_at(rotary_emb: nn.Module, positions: torch.Tensor, like: torch.Tensor):
    cos, sin = rotary_emb(like, positions[None])
    return cos[0], sin[0]
