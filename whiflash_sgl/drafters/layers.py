"""What the draft networks share: head splitting and rotary embedding on ``[1, heads, rows, head_dim]``, attention of
several sequences' rows each over its own keys (:func:`attend_each`), and :class:`CachedDrafter`, the per-sequence
cache bookkeeping and batched entry points of a drafter that runs a draft network."""

from __future__ import annotations

import functools
import statistics
import time
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
    Returns ``[sum(counts), Hq * D]`` in ``q``'s dtype, rows in the order of ``q``; attention runs in the keys'
    dtype (a bf16 EAGLE-3 cache may hold them in float32: :func:`attention_dtype`).

    A loop of one small SDPA call per sequence: on CPU it beats one padded ragged call (``kernels.ReferencePlan``),
    which must first gather every sequence's keys into one padded batch (measured, 1-16 sequences of ~300 keys)."""
    outs = [tree_attention(q_i.to(keys.dtype), keys, values, mask, scale)[0].reshape(q_i.shape[2], -1)
            for q_i, (keys, values, mask) in zip(q.split(list(counts), dim=2), keys_values_masks)]
    return (outs[0] if len(outs) == 1 else torch.cat(outs)).to(q.dtype)


def attention_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a draft network's KV cache holds and its attention runs in: the network's own, but float32 for a
    bf16 network on a CPU where that is faster (:func:`float32_attention_pays`)."""
    weight, config = model.norm.weight, model.config
    if weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and float32_attention_pays(
            config.num_attention_heads, config.num_key_value_heads, config.head_dim):
        return torch.float32
    return weight.dtype


@functools.cache
def float32_attention_pays(num_heads: int, kv_heads: int, head_dim: int, keys: int = 512, calls: int = 15) -> bool:
    """Whether a bf16 drafter's attention of one query row (an EAGLE-3 root's: the call every draft round makes) is
    faster in float32 on this CPU, with keys and values kept in float32: timed once, the median of ``calls`` calls
    each over ``keys`` keys. On a Zen 4 (AVX512-BF16 without AMX) PyTorch's bf16 SDPA took 235 us over 400 cached
    keys against 35 us in float32 (widening them per call instead: 115 us), and EAGLE-3 drafted 8 requests in 7.3-7.5
    ms a round against 8.2-8.4 (one request: 2.7 against 2.85). With more query rows (a DFlash block) the two ran
    alike, and DFlash's float32 context, copied whole beside each block, made its rounds slower (17.5 against 15-16.5
    ms at 8 requests), so it keeps its cache in its own dtype."""
    q = torch.randn(1, num_heads, 1, head_dim, dtype=torch.bfloat16)
    dtypes = (torch.bfloat16, torch.float32)
    k, v = (torch.randn(1, kv_heads, keys, head_dim, dtype=torch.bfloat16) for _ in range(2))
    cached = {d: (k.to(d), v.to(d)) for d in dtypes}

    def seconds(dtype: torch.dtype) -> float:
        times = []
        for _ in range(calls + 1):  # the first call warms up
            tic = time.perf_counter()
            tree_attention(q.to(dtype), *cached[dtype], None, head_dim**-0.5)
            times.append(time.perf_counter() - tic)
        return statistics.median(times[1:])

    return seconds(torch.float32) < seconds(torch.bfloat16)


class CachedDrafter(Drafter):
    """A drafter running a draft network (``self.model``, shared by its forks) with its own KV cache of committed
    positions, up to its ``frontier``. Everything is batched over sequences, and the single-sequence calls are a
    batch of one: :meth:`catch_up_batch` runs one KV-only prefill over all backlogs (a subclass gives the
    projections, :meth:`_context_kv`), :meth:`propose_batch` hands each group of drafters sharing a network to the
    subclass's ``_propose_group(drafters, states, max_depths)``."""

    lag = 1  # committed positions the KV-only prefill leaves out: it covers positions < len(tokens) - lag

    def start(self, state: SequenceState) -> None:
        self.cache = self.new_cache()
        self.frontier = 0

    def new_cache(self) -> KVCache:
        """A sequence's empty cache (EAGLE-3's holds :func:`attention_dtype`)."""
        return KVCache()

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
