"""Paged attention over SGLang's token-to-KV pool: ``decode_attention_cpu`` and ``extend_attention_cpu``.

K/V of request ``b`` live in ``k_buffer[req_to_token[req_pool_indices[b], j]]`` for token ``j``. Both ops write their
result into the ``out``/``o`` tensor they are given and return nothing. Scores are computed in float32:

* ``s = q . k * sm_scale``; with ``logit_cap > 0``: ``s = logit_cap * tanh(s / logit_cap)``;
* ``sliding_window > 0`` (SGLang passes ``layer.sliding_window_size + 1``; 0 = off): key ``j`` is visible to the
  query at position ``p`` only when ``p - j < sliding_window``;
* ``sinks`` [Hq]: one extra logit per head in the softmax denominator, with no value;
* ``k_scale``/``v_scale`` multiply K/V read from the cache (fp8 caches; 1.0 otherwise);
* GQA: query head ``h`` uses KV head ``h // (Hq // Hk)``.

With ``encoder_lens`` (encoder-decoder models) a request's row of ``req_to_token`` starts with its encoder tokens:
cross-attention reads ``[0, encoder_len)`` with no mask, self-attention reads from ``encoder_len`` on.
"""

from __future__ import annotations

from typing import Optional

import torch

# Queries are processed in blocks of this many rows so the [H, rows, keys] score block stays small.
_Q_BLOCK = 256


def _softmax_attend(qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float, logit_cap: float,
                    mask: Optional[torch.Tensor], sink: Optional[torch.Tensor]) -> torch.Tensor:
    """Grouped attention core in float32: qg [X, Hk, R, D] (the R query rows of each KV head), k [X, Hk, L, D],
    v [X, Hk, L, Dv]; mask broadcastable to [X, Hk, R, L] (True = visible); sink broadcastable to [X, Hk, R, 1].

    A row that sees no key (and has no sink) gets zeros.
    """
    s = torch.matmul(qg, k.transpose(-1, -2)) * sm_scale
    if logit_cap > 0:
        s = logit_cap * torch.tanh(s / logit_cap)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    if sink is not None:
        p = torch.softmax(torch.cat((s, sink.expand(*s.shape[:-1], 1)), dim=-1), dim=-1)[..., :-1]
    else:
        p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)
    return torch.matmul(p, v)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float, logit_cap: float,
            mask: Optional[torch.Tensor], sinks: Optional[torch.Tensor]) -> torch.Tensor:
    """Attention of q [Lq, Hq, D] over k [Lk, Hk, D], v [Lk, Hk, Dv]; mask [Lq, Lk] bool (True = visible).

    Returns float32 [Lq, Hq, Dv]. Query heads are grouped by KV head (h = kv_head * group + j), so K/V are never
    repeated.
    """
    lq, hq = q.shape[0], q.shape[1]
    hk, dv = k.shape[1], v.shape[-1]
    group = hq // hk
    k32 = k.float().transpose(0, 1).unsqueeze(0)  # [1, Hk, Lk, D]
    v32 = v.float().transpose(0, 1).unsqueeze(0)
    sink_g = None if sinks is None else sinks.float().view(1, hk, 1, group)
    out = []
    for lo in range(0, lq, _Q_BLOCK):
        qb = q[lo:lo + _Q_BLOCK].float()
        lb = qb.shape[0]
        qg = qb.view(lb, hk, group, -1).transpose(0, 1).reshape(1, hk, lb * group, -1)  # row = i * group + j
        mb = None if mask is None else mask[lo:lo + lb].repeat_interleave(group, dim=0).view(1, 1, lb * group, -1)
        sb = None if sink_g is None else sink_g.expand(1, hk, lb, group).reshape(1, hk, lb * group, 1)
        o = _softmax_attend(qg, k32, v32, sm_scale, logit_cap, mb, sb)  # [1, Hk, lb * group, Dv]
        out.append(o.view(hk, lb, group, dv).transpose(0, 1).reshape(lb, hq, dv))
    return torch.cat(out, dim=0)


def _read_cache(buffer: torch.Tensor, slots: torch.Tensor, scale: float) -> torch.Tensor:
    x = buffer[slots.long()]
    if scale != 1.0:
        return x.float() * scale
    return x


def _kv_range(req_row: torch.Tensor, b: int, seq: int, is_cross: bool,
              encoder_lens: Optional[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The slots of request ``b``'s keys in order (self-attention: ``seq`` tokens), and their first position."""
    if encoder_lens is None:
        return req_row[:seq], 0
    enc = int(encoder_lens[b])
    if is_cross:
        return req_row[:enc], 0
    return req_row[enc:enc + seq], enc


def decode_attention_cpu(query: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, k_scale: float,
                         v_scale: float, output: torch.Tensor, key: Optional[torch.Tensor],
                         value: Optional[torch.Tensor], loc: torch.Tensor, attn_logits: torch.Tensor,
                         req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                         sm_scale: float, logit_cap: float, is_cross_attention: bool, sliding_window_size: int,
                         encoder_lens: Optional[torch.Tensor], sinks: Optional[torch.Tensor]) -> None:
    """One new token per request: q [B, Hq, D] attends to its request's first ``seq_lens[b]`` tokens.

    ``key``/``value`` (the new token's K/V, [B, Hk*D] or [B, Hk, D]) are first stored at ``k_buffer[loc]``; SGLang
    passes them unless it already wrote an fp8 cache itself. ``attn_logits`` is the real kernel's scratch and is
    not touched.
    """
    if key is not None and value is not None:
        slots = loc.long()
        k_buffer[slots] = key.reshape(-1, *k_buffer.shape[1:]).to(k_buffer.dtype)
        v_buffer[slots] = value.reshape(-1, *v_buffer.shape[1:]).to(v_buffer.dtype)
    bs = query.shape[0]
    if bs == 0:
        return
    # Visible key range [lo, hi) of each request within its req_to_token row.
    seq = seq_lens.long()
    enc = encoder_lens.long() if encoder_lens is not None else torch.zeros_like(seq)
    if is_cross_attention:
        lo, hi = torch.zeros_like(seq), enc
    else:
        lo, hi = enc, enc + seq
        if sliding_window_size > 0:  # the query sits at position seq - 1
            lo = torch.maximum(lo, hi - sliding_window_size)
    count = (hi - lo).clamp(min=0)
    width = max(int(count.max()), 1)
    col = torch.arange(width)
    visible = col.unsqueeze(0) < count.unsqueeze(1)  # [B, L]
    cols = (lo.unsqueeze(1) + col).clamp(max=req_to_token.shape[1] - 1)
    slots = req_to_token[req_pool_indices.long().unsqueeze(1), cols].long()
    slots = torch.where(visible, slots, torch.zeros_like(slots))  # padding reads slot 0, masked out below
    hk, dv = k_buffer.shape[1], v_buffer.shape[-1]
    group = query.shape[1] // hk
    k = _read_cache(k_buffer, slots, k_scale).float().transpose(1, 2)  # [B, Hk, L, D]
    v = _read_cache(v_buffer, slots, v_scale).float().transpose(1, 2)
    qg = query.float().reshape(bs, hk, group, -1)  # [B, Hk, group, D]
    sink = None if sinks is None else sinks.float().view(1, hk, group, 1)
    out = _softmax_attend(qg, k, v, sm_scale, logit_cap, visible.view(bs, 1, 1, width), sink)
    output.copy_(out.reshape(bs, hk * group, dv))


def extend_attention_cpu(q_extend: torch.Tensor, k_extend: Optional[torch.Tensor], v_extend: Optional[torch.Tensor],
                         o_extend: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, k_scale: float,
                         v_scale: float, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                         seq_lens: torch.Tensor, extend_seq_lens: torch.Tensor, extend_start_loc: torch.Tensor,
                         max_len_extend: Optional[int], sm_scale: float, logit_cap: float,
                         is_cross_attention: bool, sliding_window_size: int, encoder_lens: Optional[torch.Tensor],
                         sinks: Optional[torch.Tensor], tree_mask: Optional[torch.Tensor], is_causal: bool) -> None:
    """Prefill/verify: rows ``extend_start_loc[b] + i`` (i < ext = extend_seq_lens[b]) of ``q_extend`` attend to
    the request's prefix (``seq_lens[b] - ext`` cached tokens, always visible) and to its new tokens.

    Among the new tokens the mask is causal, or ``tree_mask`` when given (flat bool, request ``b``'s ``ext x ext``
    block follows the previous requests' blocks; row i = query, column j = key), or full when ``is_causal`` is
    False. The new tokens' K/V come from ``k_extend``/``v_extend`` ([N, Hk, D]); when those are None they are read
    from the cache, where SGLang has already stored them. Cross-attention sees the encoder tokens, unmasked.
    """
    rows = req_pool_indices.tolist()
    seqs = seq_lens.tolist()
    exts = extend_seq_lens.tolist()
    starts = extend_start_loc.tolist()
    tree_offset = 0
    for b, (row, seq, ext, start) in enumerate(zip(rows, seqs, exts, starts)):
        if ext == 0:
            continue
        q = q_extend[start:start + ext]
        block = None
        if tree_mask is not None:
            block = tree_mask[tree_offset:tree_offset + ext * ext].view(ext, ext).bool()
            tree_offset += ext * ext
        if is_cross_attention:
            slots, _ = _kv_range(req_to_token[row], b, seq, True, encoder_lens)
            k = _read_cache(k_buffer, slots, k_scale)
            v = _read_cache(v_buffer, slots, v_scale)
            o_extend[start:start + ext].copy_(_attend(q, k, v, sm_scale, logit_cap, None, sinks))
            continue
        slots, _ = _kv_range(req_to_token[row], b, seq, False, encoder_lens)
        prefix = seq - ext
        first = 0  # first visible key index
        if sliding_window_size > 0:
            first = max(0, prefix - sliding_window_size + 1)  # the first query sits at position `prefix`
            first = min(first, prefix)
        k_pre = _read_cache(k_buffer, slots[first:prefix], k_scale)
        v_pre = _read_cache(v_buffer, slots[first:prefix], v_scale)
        if k_extend is not None and v_extend is not None:
            k_new = k_extend[start:start + ext].reshape(ext, *k_buffer.shape[1:])  # [N, Hk*D] is accepted too
            v_new = v_extend[start:start + ext].reshape(ext, *v_buffer.shape[1:])
        else:
            k_new = _read_cache(k_buffer, slots[prefix:seq], k_scale)
            v_new = _read_cache(v_buffer, slots[prefix:seq], v_scale)
        k = torch.cat((k_pre.float(), k_new.float()), dim=0)
        v = torch.cat((v_pre.float(), v_new.float()), dim=0)

        n_pre = prefix - first
        mask = torch.ones((ext, n_pre + ext), dtype=torch.bool)
        if block is not None:
            mask[:, n_pre:] = block
        elif is_causal:
            mask[:, n_pre:] = torch.ones((ext, ext), dtype=torch.bool).tril()
        if sliding_window_size > 0:
            q_pos = prefix + torch.arange(ext).unsqueeze(1)
            k_pos = first + torch.arange(n_pre + ext).unsqueeze(0)
            mask &= (q_pos - k_pos) < sliding_window_size
        o_extend[start:start + ext].copy_(_attend(q, k, v, sm_scale, logit_cap, mask, sinks))
