"""What the draft networks share: head splitting and rotary embedding on ``[1, heads, rows, head_dim]``, attention of
several sequences' rows each over its own keys (:func:`attend_each`), and :class:`CachedDrafter`, the per-sequence
cache bookkeeping and batched entry points of a drafter that runs a draft network."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

from whiflash_sgl.drafters.base import Drafter, SequenceState
from whiflash_sgl.kernels import tree_attention
from whiflash_sgl.kv_cache import KVCache
from whiflash_sgl.tree import DraftTree


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


class CachedDrafter(Drafter):
    """A drafter running a draft network (``self.model``, shared by its forks) with its own KV cache of committed
    positions, up to its ``frontier``. Everything is batched over sequences, and the single-sequence calls are a
    batch of one: :meth:`catch_up_batch` runs one KV-only prefill over all backlogs (a subclass gives the
    projections, :meth:`_context_kv`), :meth:`propose_batch` hands each group of drafters sharing a network to the
    subclass's ``_propose_group(drafters, states, max_depths)``."""

    lag = 1  # committed positions the KV-only prefill leaves out: it covers positions < len(tokens) - lag

    def start(self, state: SequenceState) -> None:
        self.cache = KVCache()
        self.frontier = 0

    def pending(self, state: SequenceState) -> int:
        return max(len(state.tokens) - self.lag - self.frontier, 0)

    def _context_kv(self, states: Sequence[SequenceState], spans: Sequence[tuple[int, int]],
                    positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per cache layer, the K/V ``[1, H, rows, D]`` of positions ``[start, end)`` of each sequence (one span
        each, rows concatenated; ``positions`` are theirs), from the target's stored features."""
        raise NotImplementedError

    def catch_up(self, state: SequenceState) -> None:
        self.catch_up_batch([self], [state])

    @classmethod
    @torch.inference_mode()
    def catch_up_batch(cls, drafters: Sequence["CachedDrafter"], states: Sequence[SequenceState]) -> None:
        """:meth:`catch_up` for drafters sharing one network: one projection (per layer) over all their backlogs."""
        behind = [(d, s, d.frontier, len(s.tokens) - d.lag) for d, s in zip(drafters, states)
                  if len(s.tokens) - d.lag > d.frontier]
        if not behind:
            return
        counts = [end - start for _, _, start, end in behind]
        positions = torch.cat([torch.arange(start, end) for _, _, start, end in behind])
        first = behind[0][0]
        kv = first._context_kv([s for _, s, _, _ in behind], [(a, b) for _, _, a, b in behind],
                               positions.to(first.model.norm.weight.device))
        for layer, (k, v) in enumerate(kv):
            for (d, *_), k_i, v_i in zip(behind, k.split(counts, dim=2), v.split(counts, dim=2)):
                d.cache.update(k_i, v_i, layer)
        for d, _, _, end in behind:
            d.frontier = end

    def propose(self, state: SequenceState, max_depth: int) -> DraftTree:
        return self.propose_batch([self], [state], [max_depth])[0]

    @classmethod
    def propose_batch(cls, drafters: Sequence["CachedDrafter"], states: Sequence[SequenceState],
                      max_depths: Sequence[int]) -> list[DraftTree]:
        """Every sequence's draft, each group of drafters sharing a network (forks do) drafted together; each tree is
        the one its sequence would get alone (but for what the batch's rate decides: ``SequenceState.commit_rate``),
        with its node probabilities calibrated (``node_estimates``)."""
        groups: dict[int, list[int]] = {}
        for i, d in enumerate(drafters):
            groups.setdefault(id(d.model), []).append(i)
        trees: list[DraftTree | None] = [None] * len(drafters)
        for group in groups.values():
            proposed = cls._propose_group([drafters[i] for i in group], [states[i] for i in group],
                                          [max_depths[i] for i in group])
            for i, tree in zip(group, proposed):
                trees[i] = drafters[i].estimated(tree)
        return trees
