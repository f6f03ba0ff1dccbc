"""Choosing a tree-attention backend by name: ``auto``, ``reference`` or ``flashinfer``."""

from __future__ import annotations

import torch

from .backend_api import BackendUnavailableError, TreeAttentionBackend
from .flashinfer_backend import FlashInferBackend
from .flashinfer_backend import unavailable_reason as flashinfer_unavailable_reason
from .reference import ReferenceBackend

BACKEND_NAMES = ("auto", "reference", "flashinfer")


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine, reference first."""
    return ["reference"] + ([] if flashinfer_unavailable_reason() else ["flashinfer"])


def get_backend(name: str = "auto", device: torch.device | str | None = None) -> TreeAttentionBackend:
    """A backend by name. ``auto`` is FlashInfer when CUDA and flashinfer are both usable, else the reference.

    Asking for ``flashinfer`` where it cannot run raises :class:`BackendUnavailableError` saying why (no CUDA, or
    the package missing, with the install command).
    """
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown tree-attention backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if name == "reference":
        return ReferenceBackend()
    reason = flashinfer_unavailable_reason()
    if reason is None:
        return FlashInferBackend(device or "cuda")
    if name == "flashinfer":
        raise BackendUnavailableError(reason)
    return ReferenceBackend()
