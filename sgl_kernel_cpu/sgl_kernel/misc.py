"""Thread binding, the (single-process) communication setup, and the seeded-sampling hash."""

from __future__ import annotations

import os

import torch

_MASK32 = 0xFFFFFFFF


def _parse_cpu_list(text: str) -> list[int]:
    """``"0-3,8,10-11"`` -> [0, 1, 2, 3, 8, 10, 11]."""
    cpus: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            cpus.extend(range(int(lo), int(hi) + 1))
        else:
            cpus.append(int(part))
    return cpus


def init_cpu_threads_env(cpu_ids: str) -> str:
    """Pin this process to ``cpu_ids`` (when they are all allowed) and use one torch thread per CPU.

    The real kernel binds each OpenMP thread to one core; pinning the process and sizing the pool is the closest
    pure-PyTorch equivalent. Returns a one-line description (SGLang ignores it).
    """
    cpus = _parse_cpu_list(cpu_ids)
    if not cpus:
        return f"sgl_kernel stand-in: no CPUs in {cpu_ids!r}; threads unchanged ({torch.get_num_threads()})"
    pinned = False
    if hasattr(os, "sched_getaffinity") and set(cpus) <= os.sched_getaffinity(0):
        os.sched_setaffinity(0, cpus)
        pinned = True
    torch.set_num_threads(len(cpus))
    return f"sgl_kernel stand-in: {len(cpus)} threads on CPUs {cpu_ids}" + ("" if pinned else " (not pinned)")


def initialize(size: int, rank: int) -> None:
    """Shared-memory all-reduce setup. The stand-in serves one rank only (SGLang skips collectives then)."""
    if size > 1:
        raise RuntimeError(
            f"sgl_kernel CPU stand-in: tensor parallelism {size} is not supported (no shared-memory all-reduce); "
            "run with --tp 1")


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """``(a * c) mod 2**32`` for int64 ``a`` in [0, 2**32), without overflowing int64."""
    lo, hi = c & 0xFFFF, c >> 16
    return (a * lo + (((a * hi) & 0xFFFF) << 16)) & _MASK32


def _rotl32(x: torch.Tensor, r: int) -> torch.Tensor:
    return ((x << r) | (x >> (32 - r))) & _MASK32


def _mix(h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """One murmur3 block: scramble ``k`` and fold it into ``h``."""
    k = _mul32(k, 0xCC9E2D51)
    k = _rotl32(k, 15)
    k = _mul32(k, 0x1B873593)
    h = h ^ k
    h = _rotl32(h, 13)
    return (_mul32(h, 5) + 0xE6546B64) & _MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _as_int64_bits(t: torch.Tensor) -> torch.Tensor:
    """The integer's two's-complement bits as int64 (uint64 tensors are reinterpreted, not converted)."""
    if t.dtype == torch.uint64:
        return t.view(torch.int64)
    return t.to(torch.int64)


def murmur_hash32_cpu(seed: torch.Tensor, positions: torch.Tensor, col_indices: torch.Tensor) -> torch.Tensor:
    """uint32 [n, m]: murmur3 over four 32-bit blocks (seed low, seed high, position, column), length 16.

    Position and column are taken modulo 2**32, as a 32-bit cast would.
    """
    s = _as_int64_bits(seed).view(-1, 1)
    pos = _as_int64_bits(positions).view(-1, 1) & _MASK32
    col = _as_int64_bits(col_indices).view(1, -1) & _MASK32
    h = torch.zeros_like(s)
    h = _mix(h, s & _MASK32)
    h = _mix(h, (s >> 32) & _MASK32)
    h = _mix(h, pos)
    h = _mix(h.expand(-1, col.shape[1]), col.expand(h.shape[0], -1))
    h = _fmix32(h ^ 16)
    return h.to(torch.uint32)
