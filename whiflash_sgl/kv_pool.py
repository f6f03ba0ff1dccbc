"""The target's KV cache for a batch: one token pool that every running request shares.

Each layer keeps its keys and values in one preallocated ``[capacity, Hkv, D]`` buffer (FlashInfer's paged layout
with page size 1); a request owns a list of pool rows, its page table, in position order. A verify round writes its
tree's rows into free slots and keeps the accepted ones, so committing a tree path is bookkeeping: no KV moves and
nothing is reallocated on the hot path. The capacity comes from a memory budget. A request reserves its worst case
(prompt + ``max_new_tokens`` + one draft tree) when it is admitted, so an admitted request never runs out of slots.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from whiflash_sgl.errors import WhiFlashError


class TokenPool:
    """Keys and values of ``capacity`` token slots for every layer, a free list and the reserved count."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        if capacity < 1:
            raise WhiFlashError(f"the KV pool needs at least one token slot, got a budget for {capacity}")
        shape = (num_layers, capacity, kv_heads, head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self._free = list(range(capacity - 1, -1, -1))  # a stack: the lowest rows are handed out first
        self.reserved = 0

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def reserve(self, tokens: int) -> bool:
        """Set ``tokens`` slots aside for one request if they are still unreserved; say whether they were."""
        if self.reserved + tokens > self.capacity:
            return False
        self.reserved += tokens
        return True

    def release(self, tokens: int) -> None:
        self.reserved -= tokens

    def alloc(self, n: int) -> torch.Tensor:
        """``n`` free rows. Callers stay within their reservation, so this cannot run dry for an admitted request."""
        if n > len(self._free):
            raise RuntimeError(f"KV pool exhausted: {n} slots asked, {len(self._free)} free (a reservation was "
                               f"overrun)")
        rows = self._free[len(self._free) - n:][::-1]
        del self._free[len(self._free) - n:]
        return torch.tensor(rows, dtype=torch.long)

    def free(self, rows: torch.Tensor) -> None:
        self._free.extend(reversed(rows.tolist()))


class _PoolLayer(DynamicLayer):
    """One layer of a :class:`PoolCache`: writes the forward's new rows into the pool and hands attention the whole
    pool, as ``[1, Hkv, capacity, D]`` views; the attention plan's page table picks each request's rows."""

    def __init__(self, cache: "PoolCache", index: int):
        super().__init__()
        self.cache, self.index = cache, index
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        pool, rows = self.cache.pool, self.cache.write_rows
        keys, values = pool.keys[self.index], pool.values[self.index]
        keys[rows] = key_states[0].transpose(0, 1)
        values[rows] = value_states[0].transpose(0, 1)
        return keys.transpose(0, 1)[None], values.transpose(0, 1)[None]

    def get_seq_length(self) -> int:
        return 0  # positions are always given; nothing reads a length off this cache

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0


class PoolCache(Cache):
    """The HF ``Cache`` a batched target forward runs with: ``write_rows`` are the pool rows of its input rows."""

    def __init__(self, pool: TokenPool):
        self.pool = pool
        self.write_rows = torch.empty(0, dtype=torch.long)
        super().__init__(layers=[_PoolLayer(self, i) for i in range(pool.keys.shape[0])])
