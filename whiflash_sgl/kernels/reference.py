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


class ReferencePlan:
    """Ragged, masked, grouped-query attention for one :class:`AttentionLayout`, by padding the batch for SDPA.

    Planning gathers what every layer of one forward shares (the padded mask and the row gathers); :meth:`run` then
    pads ``q [total_q, Hq, D]`` and ``k, v [total_kv, Hkv, D]`` to ``[B, H, max_len, D]``, calls SDPA once and keeps
    the real rows. A query row whose mask allows no key gets zeros (SDPA alone would give NaN there).
    """

    def __init__(self, layout: AttentionLayout, scale: float) -> None:
        self.layout, self.scale = layout, scale
        self._q_index, self._q_inside = _padded_rows(layout.qo_indptr)
        self._kv_index, _ = _padded_rows(layout.kv_indptr)
        self._needed_kv = int(layout.kv_indptr[-1])
        if layout.kv_indices is not None and layout.kv_indices.numel():  # paged: gather from the pool's rows
            self._kv_index = layout.kv_indices[self._kv_index]
            self._needed_kv = int(layout.kv_indices.max()) + 1
        mask = layout.padded_mask()
        self._sees_nothing = ~mask.any(-1)
        mask[..., 0] |= self._sees_nothing
        self._mask = mask[:, None]

    def run(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """``[total_q, Hq, Dv]`` attention outputs in the row order of ``query``."""
        total_q, needed_kv = int(self.layout.qo_indptr[-1]), self._needed_kv
        if query.dim() != 3 or query.shape[0] != total_q or key.shape[0] < needed_kv or key.shape[:2] != value.shape[:2]:
            raise ValueError(
                f"expected query [{total_q}, Hq, D] and key/value [>= {needed_kv}, Hkv, D], "
                f"got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )
        if total_q == 0:
            return query.new_empty(0, query.shape[1], value.shape[-1])
        q = query[self._q_index].transpose(1, 2)
        k = key[self._kv_index].transpose(1, 2)
        v = value[self._kv_index].transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=self._mask, scale=self.scale, enable_gqa=q.shape[1] != k.shape[1]
        ).transpose(1, 2)
        out = out.masked_fill(self._sees_nothing[..., None, None], 0)
        return out[self._q_inside]


def _padded_rows(indptr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, max_len]`` flat row indices of each segment (clamped into range past its end), and which are real."""
    lengths = indptr[1:] - indptr[:-1]
    column = torch.arange(int(lengths.max()), device=indptr.device)
    inside = column < lengths[:, None]
    return (indptr[:-1, None] + column).clamp(max=max(int(indptr[-1]) - 1, 0)), inside


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

