"""PyTorch reference for tree attention: any device, any dtype, grouped-query heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def tree_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Attention of ``query`` over the whole of ``key``/``value``, restricted by ``mask``.

    Shapes: query ``[B, Hq, Q, D]``, key/value ``[B, Hkv, K, D]`` with ``Hq`` a multiple of ``Hkv``; ``mask`` is a
    boolean ``[B or 1, 1, Q, K]`` (True = may attend) or None. ``None`` means causal with the queries at the end of the
    keys: each query sees every key up to its own position, which for a single query is every key.
    Returns ``[B, Q, Hq, D]`` (the layout HF attention modules reshape from).
    """
    q_len, k_len = query.shape[-2], key.shape[-2]
    if mask is None and q_len > 1:
        if q_len == k_len:
            out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale, enable_gqa=True)
            return out.transpose(1, 2)
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)
