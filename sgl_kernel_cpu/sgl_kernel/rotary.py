"""``rotary_embedding_cpu``: rotary position embedding over a ``[max_pos, rotary_dim]`` cos/sin cache.

SGLang uses the returned pair (``q, k = rotary_emb(...)``). Matching the real kernel, 2-D and 4-D inputs are rotated
in place and returned; 3-D inputs are left alone and rotated copies are returned.
"""

from __future__ import annotations

import torch


def _rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> None:
    """Rotate the first ``2 * cos.shape[-1]`` dims of ``x`` [..., H, D] in place; cos/sin are [..., 1, rd/2]."""
    rotary_dim = 2 * cos.shape[-1]
    part = x[..., :rotary_dim]
    p32 = part.float()
    if is_neox:  # halves: (x1, x2) = (x[:rd/2], x[rd/2:rd])
        x1, x2 = p32[..., : rotary_dim // 2], p32[..., rotary_dim // 2:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:  # GPT-J: interleaved pairs (x[2i], x[2i+1])
        x1, x2 = p32[..., 0::2], p32[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    part.copy_(out)


def _heads_view(x: torch.Tensor, head_size: int) -> torch.Tensor:
    if x.dim() == 2:  # [T, H*D], possibly a strided slice of qkv
        return x.unflatten(-1, (-1, head_size))
    return x  # [T, H, D] or [B, S, H, D]


def rotary_embedding_cpu(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, head_size: int,
                         cos_sin_cache: torch.Tensor, is_neox: bool):
    if query.dim() == 3:
        query, key = query.clone(), key.clone()
    q = _heads_view(query, head_size)
    k = _heads_view(key, head_size)
    half = cos_sin_cache.shape[-1] // 2
    pos = positions.reshape(q.shape[:-2]).long()
    cs = cos_sin_cache[pos].float().unsqueeze(-2)  # [..., 1, rotary_dim]
    cos, sin = cs[..., :half], cs[..., half:]
    _rotate_(q, cos, sin, is_neox)
    _rotate_(k, cos, sin, is_neox)
    return query, key
