"""A drafter's KV cache: preallocated and growable, truncatable to the committed prefix.

HF's ``DynamicCache`` concatenates on every step (an O(length) copy per layer per token). :class:`KVCache` keeps one
buffer per layer with spare capacity and returns views. (The target keeps its KV in ``kv_pool.TokenPool``.)
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class _GrowingLayer(DynamicLayer):
    """One layer's keys and values in a buffer that doubles when full; ``keys``/``values`` are views of it."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.length = 0
        self._k = key_states.new_empty((*key_states.shape[:2], 256, key_states.shape[-1]))
        self._v = value_states.new_empty((*value_states.shape[:2], 256, value_states.shape[-1]))
        self.is_initialized = True

    def _reserve(self, needed: int) -> None:
        capacity = self._k.shape[-2]
        if needed <= capacity:
            return
        while capacity < needed:
            capacity *= 2
        for name in ("_k", "_v"):
            old = getattr(self, name)
            new = old.new_empty((*old.shape[:2], capacity, old.shape[-1]))
            new[..., : self.length, :] = old[..., : self.length, :]
            setattr(self, name, new)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self._reserve(end)
        self._k[..., self.length : end, :] = key_states
        self._v[..., self.length : end, :] = value_states
        self.length = end
        return self.keys, self.values

    @property
    def keys(self):
        return self._k[..., : self.length, :] if self.is_initialized else None

    @keys.setter
    def keys(self, value):  # the base class assigns None on construction
        pass

    @property
    def values(self):
        return self._v[..., : self.length, :] if self.is_initialized else None

    @values.setter
    def values(self, value):
        pass

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        if self.is_initialized:
            self.length -= min(abs(tokens_to_remove), self.length)


class KVCache(Cache):
    """A drafter's cache, HF-compatible; with ``dtype``, what it stores is converted to that dtype."""

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        super().__init__(layer_class_to_replicate=_GrowingLayer)
        self.dtype = dtype

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.dtype is not None:
            key_states, value_states = key_states.to(self.dtype), value_states.to(self.dtype)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions."""
        for layer in self.layers:
            layer.crop(-(layer.get_seq_length() - length))
