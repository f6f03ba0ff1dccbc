"""KV-cache and request-to-token-pool bookkeeping ops."""

from __future__ import annotations

import ctypes

import torch


def store_cache_cpu(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    indices: torch.Tensor, row_dim: int) -> None:
    """``k_cache[indices] = k; v_cache[indices] = v``, with every row viewed as ``row_dim`` elements."""
    slots = indices.long()
    k_cache.view(-1, row_dim)[slots] = k.reshape(-1, row_dim).to(k_cache.dtype)
    v_cache.view(-1, row_dim)[slots] = v.reshape(-1, row_dim).to(v_cache.dtype)


def _exclusive_cumsum(lengths: torch.Tensor) -> list[int]:
    offsets = [0]
    for n in lengths.tolist()[:-1]:
        offsets.append(offsets[-1] + n)
    return offsets


def assign_req_to_token_pool_cpu(req_pool_indices: torch.Tensor, req_to_token: torch.Tensor,
                                 start_offset: torch.Tensor, end_offset: torch.Tensor, out_cache_loc: torch.Tensor,
                                 pool_len: int) -> None:
    """``req_to_token[rpi[b], start[b]:end[b]] = out_cache_loc[off_b : off_b + end[b] - start[b]]``, where ``off_b``
    sums the earlier requests' lengths."""
    starts, ends = start_offset.tolist(), end_offset.tolist()
    offsets = _exclusive_cumsum(end_offset.long() - start_offset.long())
    for row, s, e, off in zip(req_pool_indices.tolist(), starts, ends, offsets):
        if e > s:
            req_to_token[row, s:e] = out_cache_loc[off:off + e - s].to(req_to_token.dtype)


def copy_all_layer_kv_cache_cpu(data_ptrs: torch.Tensor, strides: torch.Tensor, tgt_loc: torch.Tensor,
                                src_loc: torch.Tensor) -> None:
    """For every buffer ``i`` (raw address ``data_ptrs[i]``, slot size ``strides[i]`` bytes): copy slot
    ``src_loc[j]`` to slot ``tgt_loc[j]``.

    SGLang hands over addresses, not tensors, so each buffer is wrapped as a byte tensor covering the slots touched.
    All sources are read before any target is written.
    """
    tgt, src = tgt_loc.long(), src_loc.long()
    if tgt.numel() == 0 or bool(torch.equal(tgt, src)):
        return
    rows = int(torch.maximum(tgt.max(), src.max())) + 1
    mask64 = (1 << 64) - 1
    for ptr, stride in zip(data_ptrs.view(torch.int64).tolist(), strides.tolist()):
        raw = (ctypes.c_uint8 * (rows * stride)).from_address(ptr & mask64)
        slots = torch.frombuffer(raw, dtype=torch.uint8).view(rows, stride)
        slots[tgt] = slots[src]
