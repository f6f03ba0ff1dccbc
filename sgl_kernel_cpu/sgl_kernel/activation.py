"""Gated activations: ``act(x[..., :d]) * x[..., d:]`` for an input of width ``2d``."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _gated(x: torch.Tensor, act) -> torch.Tensor:
    d = x.shape[-1] // 2
    x32 = x.float()
    return (act(x32[..., :d]) * x32[..., d:]).to(x.dtype)


def silu_and_mul_cpu(input: torch.Tensor) -> torch.Tensor:
    return _gated(input, F.silu)


def gelu_tanh_and_mul_cpu(input: torch.Tensor) -> torch.Tensor:
    return _gated(input, lambda t: F.gelu(t, approximate="tanh"))


def gelu_and_mul_cpu(input: torch.Tensor) -> torch.Tensor:
    return _gated(input, F.gelu)
