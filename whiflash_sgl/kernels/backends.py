"""Choosing a tree-attention backend by name: ``auto``, ``reference``, ``flashinfer`` or ``cpu``."""

from __future__ import annotations

import torch

from .backend_api import BackendUnavailableError, TreeAttentionBackend
from .cpu_backend import CpuBackend
from .cpu_backend import unavailable_reason as cpu_unavailable_reason
from .flashinfer_backend import FlashInferBackend
from .flashinfer_backend import unavailable_reason as flashinfer_unavailable_reason
from .reference import ReferenceBackend

BACKEND_NAMES = ("auto", "reference", "flashinfer", "cpu")


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine, reference first."""
    return (["reference"] + ([] if flashinfer_unavailable_reason() else ["flashinfer"])
            + ([] if cpu_unavailable_reason() else ["cpu"]))


def get_backend(name: str = "auto", device: torch.device | str | None = None,
                head_dim: int | None = None, bf16_products: bool = False) -> TreeAttentionBackend:
    """A backend by name. ``auto`` is FlashInfer when CUDA and flashinfer are both usable; on a CPU (``device``) the
    compiled kernel where it runs (an AVX-512 CPU, a compiler, ``head_dim`` a multiple of 16), in bf16 products on
    AMX with ``bf16_products`` (a float32 target whose matmuls are bf16: ``Target.matmul``); else the reference.

    Asking for ``flashinfer`` or ``cpu`` where it cannot run raises :class:`BackendUnavailableError` saying why (no
    CUDA, or the package missing, with the install command; no AVX-512 or no compiler).
    """
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown tree-attention backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if name == "reference":
        return ReferenceBackend()
    on_cpu = device is not None and torch.device(device).type == "cpu"
    if name == "cpu" or name == "auto" and on_cpu:
        reason = cpu_unavailable_reason(head_dim, bf16_products)
        if reason is None:
            return CpuBackend(bf16_products)
        if name == "cpu":
            raise BackendUnavailableError(reason)
        return ReferenceBackend()
    reason = flashinfer_unavailable_reason()
    if reason is None:
        return FlashInferBackend(device or "cuda")
    if name == "flashinfer":
        raise BackendUnavailableError(reason)
    return ReferenceBackend()
