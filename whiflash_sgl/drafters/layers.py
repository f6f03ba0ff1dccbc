"""Small pieces the draft networks share: head splitting and rotary embedding on ``[1, heads, rows, head_dim]``,
and the two helpers that let one forward serve several sequences (:func:`attend_each`, :func:`per_weight_group`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

from whiflash_sgl.kernels import tree_attention


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


def attend_each(q: torch.Tensor, counts: Sequence[int], keys_values_masks, scale: float) -> torch.Tensor:
    """Attention of several sequences' query rows, each over its own keys: ``q`` ``[1, Hq, sum(counts), D]`` holds
    ``counts[i]`` rows of sequence ``i``, which attend to ``keys_values_masks[i] = (keys, values, mask)`` (a
    :func:`tree_attention` mask: ``[1, 1, counts[i], K_i]`` bool, or None for causal at the end of the keys).
    Returns ``[sum(counts), Hq * D]``, rows in the order of ``q``.

    A loop of one small SDPA call per sequence: on CPU it beats one padded ragged call (``kernels.ReferencePlan``),
    which must first gather every sequence's keys into one padded batch (measured, 1-16 sequences of ~300 keys)."""
    outs = [tree_attention(q_i, keys, values, mask, scale)[0].reshape(q_i.shape[2], -1)
            for q_i, (keys, values, mask) in zip(q.split(list(counts), dim=2), keys_values_masks)]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def per_weight_group(run, drafters: Sequence, *per_sequence: Sequence) -> list:
    """``run(drafters, *per_sequence)`` once per group of drafters that run the same draft network (forks share it),
    each call handed its group's drafters and per-sequence arguments; the results come back in input order."""
    groups: dict[int, list[int]] = {}
    for i, d in enumerate(drafters):
        groups.setdefault(id(d.model), []).append(i)
    out = [None] * len(drafters)
    for group in groups.values():
        results = run([drafters[i] for i in group], *([column[i] for i in group] for column in per_sequence))
        for i, result in zip(group, results):
            out[i] = result
    return out
