"""What a tree-attention backend is: ``plan`` once per batch, ``run`` once per layer.

This mirrors how SGLang drives FlashInfer for verification: the batch's ragged layout and masks are planned once per
forward (``begin_forward``/``plan``), and every attention layer then runs on that plan with its own q, k, v.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .layout import AttentionLayout


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here; the message says why and how to fix it."""


class AttentionPlan(Protocol):
    def run(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """``query [total_q, Hq, D]``, ``key/value [total_kv, Hkv, D]`` (NHD, page size 1) to ``[total_q, Hq, D]``."""


class TreeAttentionBackend(Protocol):
    name: str

    def dtypes(self) -> tuple[torch.dtype, ...]:
        """The q/k/v dtypes this backend computes in."""

    def plan(
        self, layout: AttentionLayout, *, num_qo_heads: int, num_kv_heads: int, head_dim: int, scale: float,
        dtype: torch.dtype,
    ) -> AttentionPlan:
        """Prepare a batch; the plan stays valid until this backend plans another one."""


def check_plan_args(
    num_qo_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, dtypes: tuple[torch.dtype, ...]
) -> None:
    """The argument checks every backend's ``plan`` shares."""
    if num_kv_heads <= 0 or num_qo_heads % num_kv_heads or head_dim <= 0:
        raise ValueError(
            "need num_qo_heads a multiple of num_kv_heads > 0 and head_dim > 0, got "
            f"{num_qo_heads}, {num_kv_heads}, {head_dim}"
        )
    if dtype not in dtypes:
        raise ValueError(f"dtype {dtype} is not one of {dtypes}")
