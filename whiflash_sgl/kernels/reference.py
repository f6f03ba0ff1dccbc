"""PyTorch reference for tree attention: any device, any dtype, grouped-query heads.

:func:`tree_attention` serves one request in HF's ``[B, H, len, D]`` layout (the reference engine's target and
drafters call it). :class:`ReferencePlan` serves a ragged batch described by an :class:`AttentionLayout`, the layout a
FlashInfer backend takes, and is what every other backend is checked against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend_api import check_plan_args
from .layout import AttentionLayout


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


SHARED_MAX_QUERIES = 128  # a request with more query rows than this (a prefill chunk) gets an SDPA call of its own


class ReferencePlan:
    """Ragged, masked, grouped-query attention for one :class:`AttentionLayout`, by padding groups of requests for
    SDPA.

    The requests are grouped so that padding wastes little: key counts within a factor of two of the group's longest,
    and a request with more than ``SHARED_MAX_QUERIES`` query rows (a prefill chunk) on its own, since padded beside
    seven decode rows a 512-row chunk would cost eight chunks' attention. Planning works out what every layer of one
    forward shares (each group's padded row indices and mask); :meth:`run` gathers each group's keys and values, calls
    SDPA once per group and scatters the real rows back. Gathering the keys is most of the work for decode rows on a
    CPU, hence ``index_select``, two to three times faster there than indexing with a 2-D tensor. A query row whose
    mask allows no key gets zeros (SDPA alone would give NaN there).
    """

    def __init__(self, layout: AttentionLayout, scale: float) -> None:
        self.layout, self.scale = layout, scale
        keys = layout.key_rows()
        self._needed_kv = int(keys.max()) + 1 if keys.numel() else 0
        self._groups = [_PaddedGroup(layout, keys, requests) for requests in _groups(layout)]

    def run(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """``[total_q, Hq, Dv]`` attention outputs in the row order of ``query``."""
        total_q, needed_kv = int(self.layout.qo_indptr[-1]), self._needed_kv
        if query.dim() != 3 or query.shape[0] != total_q or key.shape[0] < needed_kv or key.shape[:2] != value.shape[:2]:
            raise ValueError(
                f"expected query [{total_q}, Hq, D] and key/value [>= {needed_kv}, Hkv, D], "
                f"got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )
        out = query.new_zeros(total_q, query.shape[1], value.shape[-1])
        for group in self._groups:
            group.run(query, key, value, self.scale, out)
        return out


def _groups(layout: AttentionLayout) -> list[list[int]]:
    """Requests with queries, longest keys first, in the groups :class:`ReferencePlan` pads together."""
    q_lens, kv_lens = layout.q_lens.tolist(), layout.kv_lens.tolist()
    groups, shared = [], None
    for i in sorted((i for i, n in enumerate(q_lens) if n), key=lambda i: -kv_lens[i]):
        if q_lens[i] > SHARED_MAX_QUERIES:
            groups.append([i])
        elif shared is None or 2 * kv_lens[i] < kv_lens[shared[0]]:
            shared = [i]
            groups.append(shared)
        else:
            shared.append(i)
    return groups


class _PaddedGroup:
    """Some requests of a layout padded to ``[n, max_q]`` query rows and ``[n, max_kv]`` keys."""

    def __init__(self, layout: AttentionLayout, keys: torch.Tensor, requests: list[int]) -> None:
        index = torch.tensor(requests, device=layout.device)
        q_lens, kv_lens = layout.q_lens[index], layout.kv_lens[index]
        self.q_rows, self.q_inside = _padded_rows(layout.qo_indptr[index], q_lens)
        kv_rows, _ = _padded_rows(layout.kv_indptr[index], kv_lens)
        self.kv_rows = keys[kv_rows]  # pool rows (or flat rows) of each request's keys
        mask = _padded_mask(layout, index, q_lens, kv_lens)
        blind = ~mask.any(-1)  # query rows that see no key
        mask[..., 0] |= blind
        self.mask = None if mask.all() else mask[:, None]
        self.blind = blind if blind.any() else None
        self.out_rows = self.q_rows[self.q_inside]

    def run(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
            out: torch.Tensor) -> None:
        """Writes the group's attention outputs into their rows of ``out``."""
        (n, max_q), max_kv = self.q_rows.shape, self.kv_rows.shape[1]
        q = query.index_select(0, self.q_rows.reshape(-1)).view(n, max_q, *query.shape[1:]).transpose(1, 2)
        k = key.index_select(0, self.kv_rows.reshape(-1)).view(n, max_kv, *key.shape[1:]).transpose(1, 2)
        v = value.index_select(0, self.kv_rows.reshape(-1)).view(n, max_kv, *value.shape[1:]).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, scale=scale,
                                           enable_gqa=q.shape[1] != k.shape[1]).transpose(1, 2)
        if self.blind is not None:
            o = o.masked_fill(self.blind[..., None, None], 0)
        out[self.out_rows] = o[self.q_inside]


def _padded_rows(starts: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, max_len]`` flat row indices of segments (past a segment's end: its last row), and which are real."""
    column = torch.arange(int(lengths.max()), device=starts.device)
    inside = column < lengths[:, None]
    return torch.minimum(starts[:, None] + column, (starts + lengths - 1)[:, None]), inside


def _padded_mask(layout: AttentionLayout, index: torch.Tensor, q_lens: torch.Tensor,
                 kv_lens: torch.Tensor) -> torch.Tensor:
    """``[n, max_q, max_kv]`` bool: the requests' dense masks, False outside each ``q_len x kv_len`` block."""
    rows = torch.arange(int(q_lens.max()), device=index.device)[None, :, None]
    cols = torch.arange(int(kv_lens.max()), device=index.device)[None, None, :]
    q_lens, kv_lens = q_lens[:, None, None], kv_lens[:, None, None]
    inside = (rows < q_lens) & (cols < kv_lens)
    if layout.mask is None:
        return inside & (cols <= rows + kv_lens - q_lens)
    # entries outside a request's block read a False appended after the last real entry
    lookup = torch.cat([layout.mask, layout.mask.new_zeros(1)])
    flat_index = layout.mask_indptr[index][:, None, None] + rows * kv_lens + cols
    return lookup[torch.where(inside, flat_index, layout.mask.numel())]


def ragged_tree_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: AttentionLayout, scale: float
) -> torch.Tensor:
    """One-shot :class:`ReferencePlan`: ``query [total_q, Hq, D]``, ``key/value [total_kv, Hkv, D]`` (NHD)."""
    return ReferencePlan(layout.to(query.device), scale).run(query, key, value)


class ReferenceBackend:
    """The PyTorch backend: any device, fp32 / bf16 / fp16."""

    name = "reference"

    def dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.bfloat16, torch.float16)

    def plan(
        self, layout: AttentionLayout, *, num_qo_heads: int, num_kv_heads: int, head_dim: int, scale: float,
        dtype: torch.dtype,
    ) -> ReferencePlan:
        check_plan_args(num_qo_heads, num_kv_heads, head_dim, dtype, self.dtypes())
        return ReferencePlan(layout, scale)

