"""Tree attention on AVX-512 CPUs: the compiled paged kernels, float32 (``csrc/paged_attention.cpp``) or, for a target
whose matmuls are bf16, bf16 products on AMX (``csrc/paged_attention_bf16.cpp``), both on the float32 pool.

It reads each request's keys from the pool rows its page table names and computes each query row's output in an
order fixed by that row's own visible keys, so a row's output is the same bits in any batch (see the kernel's
header), where the reference's padded SDPA groups are not: SDPA's blocked GEMMs sum in an order that depends on how
many query rows there are. Rows of one request share the loads of the keys they all see.
"""

from __future__ import annotations

import torch

from .backend_api import check_plan_args
from .cpu_extension import amx_runs_here, cpu_kernels
from .layout import AttentionLayout


def unavailable_reason(head_dim: int | None = None, bf16_products: bool = False) -> str | None:
    if cpu_kernels() is None:
        return "the CPU kernels need an AVX-512 CPU and a C++ compiler"
    if head_dim is not None and head_dim % 16:
        return f"the CPU attention kernel needs a head dim that is a multiple of 16, not {head_dim}"
    if bf16_products and not amx_runs_here():
        return "bf16 products need a CPU with AMX (Intel Sapphire Rapids or later); use float32 products here"
    return None


class CpuPlan:
    def __init__(self, layout: AttentionLayout, scale: float, bf16_products: bool = False) -> None:
        self.scale = scale
        self.kernel = cpu_kernels().paged_attention_bf16 if bf16_products else cpu_kernels().paged_attention
        self.qo_indptr, self.kv_indptr, self.kv_indices = layout.qo_indptr, layout.kv_indptr, layout.key_rows()
        mask = layout.mask if layout.mask is not None else torch.empty(0, dtype=torch.bool)
        mask_indptr = layout.mask_indptr if layout.mask is not None else torch.empty(0, dtype=torch.long)
        # which keys each query row sees, read from the mask once for every layer: the keys before its first unseen
        # one, then the others (for a tree row, its ancestors)
        self.lead, self.own_indptr, self.own = cpu_kernels().visible_keys(self.qo_indptr, self.kv_indptr, mask,
                                                                          mask_indptr)

    def run(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """``[total_q, Hq, D]`` from ``query [total_q, Hq, D]`` and the pool's ``key/value [rows, Hkv, D]``."""
        return self.kernel(query, key, value, self.qo_indptr, self.kv_indptr, self.kv_indices, self.lead,
                           self.own_indptr, self.own, self.scale)


class CpuBackend:
    name = "cpu"

    def __init__(self, bf16_products: bool = False) -> None:
        self.bf16_products = bf16_products  # queries, keys, values and weights rounded to bf16, sums in float32

    def dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32,)

    def plan(
        self, layout: AttentionLayout, *, num_qo_heads: int, num_kv_heads: int, head_dim: int, scale: float,
        dtype: torch.dtype,
    ) -> CpuPlan:
        check_plan_args(num_qo_heads, num_kv_heads, head_dim, dtype, self.dtypes())
        reason = unavailable_reason(head_dim, self.bf16_products)
        reason = reason or (None if layout.device.type == "cpu" else "a CPU layout is needed")
        if reason:
            raise ValueError(reason)
        return CpuPlan(layout, scale, self.bf16_products)
