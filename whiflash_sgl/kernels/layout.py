"""The description of a ragged batch of masked attention problems, in FlashInfer's terms (page size 1).

Request ``i`` has ``q_len_i = qo_indptr[i+1] - qo_indptr[i]`` query rows, stored at rows ``qo_indptr[i]:`` of a flat
``q [total_q, Hq, D]``, and ``kv_len_i`` keys at rows ``kv_indptr[i]:`` of flat ``k, v [total_kv, Hkv, D]`` (for tree
verification: the request's cached prefix followed by its verify rows, so ``kv_len_i = prefix_i + q_len_i``). The
mask of request ``i`` is a dense ``q_len_i x kv_len_i`` boolean (True = may attend) over *all* its keys, prefix
included, flattened row-major and concatenated: request ``i`` is ``mask[mask_indptr[i]:mask_indptr[i+1]]``. This is
what SGLang hands FlashInfer as ``custom_mask`` for EAGLE verify. ``mask=None`` means causal aligned to the bottom
right (query ``r`` sees keys ``0 .. kv_len - q_len + r``), which is what SGLang uses for DFlash's block verify.

``kv_indices`` makes the keys paged (FlashInfer's page table with page size 1): request ``i``'s keys are then the
rows ``kv_indices[kv_indptr[i]:kv_indptr[i+1]]`` of a KV pool shared by all requests, in that order, instead of the
flat rows ``kv_indptr[i]:`` themselves. A batched engine keeps every request's KV in one token pool this way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .bitpack import packed_indptr, segment_pack_bits, segment_unpack_bits


def indptr_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """``[0, l0, l0 + l1, ...]``: offsets of consecutive segments of the given lengths."""
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])


@dataclass(frozen=True)
class AttentionLayout:
    """Index pointers and masks of a ragged batch, as the module docstring lays them out; validated on creation."""

    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    mask: torch.Tensor | None = None
    mask_indptr: torch.Tensor | None = None
    kv_indices: torch.Tensor | None = None

    def __post_init__(self) -> None:
        device = self.mask.device if self.mask is not None else torch.as_tensor(self.qo_indptr).device
        for name in ("qo_indptr", "kv_indptr"):
            object.__setattr__(self, name, torch.as_tensor(getattr(self, name), dtype=torch.long, device=device))
        if self.qo_indptr.dim() != 1 or self.qo_indptr.shape != self.kv_indptr.shape or len(self.qo_indptr) < 2:
            raise ValueError("qo_indptr and kv_indptr must both be 1-D of length batch_size + 1")
        q_lens, kv_lens = self.q_lens, self.kv_lens
        if int(self.qo_indptr[0]) != 0 or int(self.kv_indptr[0]) != 0 or (q_lens < 0).any() or (kv_lens < 0).any():
            raise ValueError("indptr arrays must start at 0 and never decrease")
        if ((q_lens > 0) & (kv_lens == 0)).any():
            raise ValueError("every request with queries needs at least one key")
        if self.kv_indices is not None:
            indices = torch.as_tensor(self.kv_indices, dtype=torch.long, device=device)
            if indices.shape != (int(self.kv_indptr[-1]),) or (indices < 0).any():
                raise ValueError(f"kv_indices must be {int(self.kv_indptr[-1])} non-negative pool rows")
            object.__setattr__(self, "kv_indices", indices)
        if self.mask is None:
            if self.mask_indptr is not None:
                raise ValueError("mask_indptr given without a mask")
            if (kv_lens < q_lens).any():
                raise ValueError("a causal layout needs kv_len >= q_len for every request")
            return
        expected = indptr_from_lengths(q_lens * kv_lens)
        mask_indptr = expected if self.mask_indptr is None else torch.as_tensor(self.mask_indptr, dtype=torch.long)
        if not torch.equal(mask_indptr.cpu(), expected.cpu()):
            raise ValueError("mask_indptr must be the running sum of q_len * kv_len over the requests")
        if self.mask.dtype != torch.bool or self.mask.dim() != 1 or self.mask.numel() != int(expected[-1]):
            raise ValueError(f"mask must be a flat bool tensor of {int(expected[-1])} entries")
        object.__setattr__(self, "mask_indptr", mask_indptr.to(device))

    # ---- constructors -------------------------------------------------------------------------------------------

    @classmethod
    def from_request_masks(cls, masks: Sequence[torch.Tensor]) -> "AttentionLayout":
        """A layout from one dense ``[q_len_i, kv_len_i]`` bool mask per request, KV stored request after request."""
        q_lens = torch.tensor([m.shape[0] for m in masks], dtype=torch.long)
        kv_lens = torch.tensor([m.shape[1] for m in masks], dtype=torch.long)
        flat = torch.cat([m.reshape(-1).bool() for m in masks])
        return cls(indptr_from_lengths(q_lens), indptr_from_lengths(kv_lens), flat)

    @classmethod
    def from_packed(
        cls,
        qo_indptr: torch.Tensor,
        kv_indptr: torch.Tensor,
        packed_mask: torch.Tensor,
        packed_mask_indptr: torch.Tensor | None = None,
    ) -> "AttentionLayout":
        """A layout from a FlashInfer-style bit-packed mask (see :mod:`.bitpack` for the exact layout)."""
        qo_indptr = torch.as_tensor(qo_indptr, dtype=torch.long)
        kv_indptr = torch.as_tensor(kv_indptr, dtype=torch.long)
        bit_indptr = indptr_from_lengths((qo_indptr[1:] - qo_indptr[:-1]) * (kv_indptr[1:] - kv_indptr[:-1]))
        byte_indptr = packed_indptr(bit_indptr) if packed_mask_indptr is None else packed_mask_indptr
        byte_indptr = torch.as_tensor(byte_indptr, dtype=torch.long)
        mask = segment_unpack_bits(packed_mask, byte_indptr.to(packed_mask.device), bit_indptr.to(packed_mask.device))
        return cls(qo_indptr, kv_indptr, mask, bit_indptr)

    # ---- views --------------------------------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return len(self.qo_indptr) - 1

    @property
    def q_lens(self) -> torch.Tensor:
        return self.qo_indptr[1:] - self.qo_indptr[:-1]

    @property
    def kv_lens(self) -> torch.Tensor:
        return self.kv_indptr[1:] - self.kv_indptr[:-1]

    @property
    def device(self) -> torch.device:
        return self.qo_indptr.device

    def to(self, device: torch.device | str) -> "AttentionLayout":
        mask = None if self.mask is None else self.mask.to(device)
        indices = None if self.kv_indices is None else self.kv_indices.to(device)
        return AttentionLayout(self.qo_indptr.to(device), self.kv_indptr.to(device), mask, kv_indices=indices)

    def key_rows(self) -> torch.Tensor:
        """Where each request's keys are, flat: the page table, or the flat rows themselves when unpaged."""
        if self.kv_indices is not None:
            return self.kv_indices
        return torch.arange(int(self.kv_indptr[-1]), device=self.device)

    def packed_mask(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(packed uint8, byte indptr)`` as ``flashinfer.segment_packbits(mask, mask_indptr, "little")`` returns."""
        if self.mask is None:
            raise ValueError("a causal layout has no explicit mask to pack")
        return segment_pack_bits(self.mask, self.mask_indptr)

    def request_mask(self, i: int) -> torch.Tensor:
        """The dense ``[q_len_i, kv_len_i]`` mask of request ``i``."""
        q_len, kv_len = int(self.q_lens[i]), int(self.kv_lens[i])
        if self.mask is None:
            return torch.ones(q_len, kv_len, dtype=torch.bool, device=self.device).tril(kv_len - q_len)
        start = int(self.mask_indptr[i])
        return self.mask[start : start + q_len * kv_len].view(q_len, kv_len)
