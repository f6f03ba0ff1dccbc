"""Bit-packed boolean masks in the layout FlashInfer's custom-mask prefill reads.

Layout reproduced: ``flashinfer.packbits(x, bitorder="little")`` / ``flashinfer.segment_packbits(x, indptr,
bitorder="little")``, which follow ``numpy.packbits(..., bitorder="little")``. Bit ``j`` (0 = least significant) of
byte ``k`` holds element ``8 * k + j``; a trailing partial byte is zero-padded. In the segmented form every segment
(one request's flattened ``qo_len x kv_len`` mask) is packed on its own and starts on a byte boundary, so segment
``i`` of ``n_i`` bits occupies ``ceil(n_i / 8)`` bytes at ``packed_indptr[i]``. FlashInfer's kernel reads entry
``(q, k)`` of request ``i`` as bit ``(q * kv_len_i + k) % 8`` of byte ``packed_indptr[i] + (q * kv_len_i + k) // 8``.
"""

from __future__ import annotations

import torch


def _bit_weights(device: torch.device) -> torch.Tensor:
    return torch.tensor([1 << j for j in range(8)], dtype=torch.uint8, device=device)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a 1-D boolean tensor into ``ceil(len / 8)`` little-endian uint8 bytes."""
    if bits.dim() != 1:
        raise ValueError(f"pack_bits takes a 1-D tensor, got shape {tuple(bits.shape)}")
    padded = torch.zeros((bits.numel() + 7) // 8 * 8, dtype=torch.uint8, device=bits.device)
    padded[: bits.numel()] = bits.to(torch.uint8)
    return (padded.view(-1, 8) * _bit_weights(bits.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``num_bits`` bits of ``packed`` as a boolean tensor."""
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"unpack_bits takes a 1-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    if not 0 <= num_bits <= 8 * packed.numel():
        raise ValueError(f"cannot unpack {num_bits} bits from {packed.numel()} bytes")
    bits = (packed[:, None] & _bit_weights(packed.device)) != 0
    return bits.reshape(-1)[:num_bits]


def packed_indptr(indptr: torch.Tensor) -> torch.Tensor:
    """Byte offsets of the segments of ``indptr`` (bit offsets) once each is packed on its own."""
    out = torch.zeros_like(indptr)
    out[1:] = torch.cumsum((indptr[1:] - indptr[:-1] + 7) // 8, 0)
    return out


def _segment_slots(indptr: torch.Tensor, byte_indptr: torch.Tensor) -> torch.Tensor:
    """For each bit of the unpacked segments, its bit position in the byte-aligned packed stream."""
    lengths = indptr[1:] - indptr[:-1]
    segment = torch.repeat_interleave(torch.arange(lengths.numel(), device=indptr.device), lengths)
    offset_in_segment = torch.arange(int(indptr[-1]), device=indptr.device) - indptr[segment]
    return byte_indptr[segment] * 8 + offset_in_segment


def segment_pack_bits(bits: torch.Tensor, indptr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack each segment ``bits[indptr[i]:indptr[i+1]]`` on its own; returns ``(packed, packed_indptr)``."""
    if bits.dim() != 1 or bits.numel() != int(indptr[-1]):
        raise ValueError(f"bits must be 1-D with indptr[-1] = {int(indptr[-1])} entries, got {tuple(bits.shape)}")
    byte_indptr = packed_indptr(indptr)
    aligned = torch.zeros(int(byte_indptr[-1]) * 8, dtype=torch.bool, device=bits.device)
    aligned[_segment_slots(indptr, byte_indptr)] = bits.bool()
    return pack_bits(aligned), byte_indptr


def segment_unpack_bits(packed: torch.Tensor, byte_indptr: torch.Tensor, indptr: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`segment_pack_bits`: the concatenated segments of ``indptr[i+1] - indptr[i]`` bits each."""
    if not torch.equal(byte_indptr, packed_indptr(indptr)):
        raise ValueError("packed_indptr does not match the segment lengths given by indptr")
    aligned = unpack_bits(packed, packed.numel() * 8)
    return aligned[_segment_slots(indptr, byte_indptr)]
