"""Weight "packing" and the matching linear op.

SGLang treats the presence of ``convert_weight_packed`` as the AMX probe and hands every packed weight only to
``weight_packed_linear``; both are ours, so the packed layout is simply the original ``[N, K]`` layout.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def convert_weight_packed(weight: torch.Tensor) -> torch.Tensor:
    # A fresh tensor: the op's schema promises a new output, not an alias of its input.
    return weight.clone(memory_format=torch.contiguous_format)


def weight_packed_linear(mat1: torch.Tensor, mat2: torch.Tensor, bias: Optional[torch.Tensor],
                         is_vnni: bool) -> torch.Tensor:
    """``mat1 @ mat2.T (+ bias)`` in ``mat1``'s dtype; ``mat2`` is an [N, K] weight from ``convert_weight_packed``."""
    weight = mat2 if mat2.dtype == mat1.dtype else mat2.to(mat1.dtype)
    if bias is not None and bias.dtype != mat1.dtype:
        bias = bias.to(mat1.dtype)
    return F.linear(mat1, weight, bias)
