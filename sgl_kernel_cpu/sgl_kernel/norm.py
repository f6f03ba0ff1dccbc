"""RMSNorm ops (``rmsnorm_cpu``, ``fused_add_rmsnorm_cpu``, ``fused_qk_norm_cpu``).

All reductions run in float32 and the results are rounded once to the input dtype, as the real kernels do.
"""

from __future__ import annotations

import torch


def _rms_normalize(x32: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x * rsqrt(mean(x^2) + eps) * weight`` over the last dim; ``x32`` is float32."""
    inv = torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return x32 * inv * weight.float()


def rmsnorm_cpu(input: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _rms_normalize(input.float(), weight, eps).to(input.dtype)


def fused_add_rmsnorm_cpu(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """In place: ``residual <- input + residual`` and ``input <- rmsnorm(input + residual)``.

    The norm is taken of the float32 sum, before it is rounded into ``residual``'s dtype.
    """
    total = input.float() + residual.float()
    residual.copy_(total)
    input.copy_(_rms_normalize(total, weight, eps))


def _norm_heads_(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    head_dim = weight.numel()
    heads = x.unflatten(-1, (-1, head_dim))  # a view: q/k are usually strided slices of qkv
    heads.copy_(_rms_normalize(heads.float(), weight, eps))


def fused_qk_norm_cpu(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                      eps: float) -> None:
    """In place per-head RMSNorm of ``q`` [T, Hq*D] and ``k`` [T, Hk*D] (D = weight size)."""
    _norm_heads_(q, q_weight, eps)
    _norm_heads_(k, k_weight, eps)
