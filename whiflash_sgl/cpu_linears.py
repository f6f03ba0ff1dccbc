"""Linear layers chosen for the CPU they run on.

A verify pass and a draft step are chains of small-M GEMMs (M = the rows in flight), and which kernel wins depends
on the instruction set:

* float32 target: oneDNN's prepacked inner product beats the default GEMM on an AVX-512 host (SmolLM2's verify of 8
  rows 64 -> 49 ms, one row 40 -> 35 ms); on an AVX2-only host (AMD EPYC) the default is as fast or faster at every
  row count from 1 to 512 (30 layers' linears: 1 row 44 against 68 ms, 2 rows 67 against 90, 8 rows 101 against
  109, 64 rows 287 against 300), so there nothing is packed.
* bfloat16 drafters: without AVX-512, bf16 products are emulated. While reading the weights dominates they still
  win (an EAGLE-3 layer and its 8k head, 1 row 2.9 against 4.4 ms in float32), but from a few rows on they lose
  2-4x (16 rows 37 against 12 ms, 64 rows 138 against 30), which is what a batch of requests drafting together
  is. There a bf16 linear keeps a float32 copy of its weight for calls of more than ``SMALL_ROWS`` rows.

Either way the products are the same up to rounding, and drafts only propose, so no output changes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SMALL_ROWS = 4  # at most this many rows: bf16 weights; more: the float32 copy (on CPUs without AVX-512)


def has_avx512() -> bool:
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def prepacking_pays() -> bool:
    """Whether oneDNN-prepacked float32 linears beat the default CPU GEMM here (see the module docstring)."""
    return torch.backends.mkldnn.is_available() and has_avx512()


class PackedLinear(torch.nn.Module):
    """An inference-only ``nn.Linear`` whose weight is prepacked for oneDNN's float32 inner product."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed_weight = linear.weight.detach().to_mkldnn()
        self.packed_bias = None if linear.bias is None else linear.bias.detach().to_mkldnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.mkldnn_linear(x.to_mkldnn(), self.packed_weight, self.packed_bias).to_dense()


class RowAdaptiveLinear(torch.nn.Module):
    """A bfloat16 ``nn.Linear`` that computes calls of more than ``SMALL_ROWS`` rows in float32 (with a copy of its
    weight, not saved with the module); the output is bfloat16 either way. ``weight`` and ``bias`` stay the bf16
    parameters, under their names."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.register_buffer("weight32", linear.weight.detach().float(), persistent=False)
        self.register_buffer("bias32", None if linear.bias is None else linear.bias.detach().float(),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= SMALL_ROWS * self.in_features:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        return torch.nn.functional.linear(x.float(), self.weight32, self.bias32).to(x.dtype)


def _swap_linears(module: torch.nn.Module, make: Callable[[torch.nn.Linear], torch.nn.Module]) -> None:
    for name, child in module.named_children():
        if isinstance(child, torch.nn.Linear):
            setattr(module, name, make(child))
        else:
            _swap_linears(child, make)


def pack_linears(module: torch.nn.Module) -> None:
    """Swap every ``nn.Linear`` under ``module`` for a :class:`PackedLinear` (inference only)."""
    _swap_linears(module, PackedLinear)


def float32_for_many_rows(module: torch.nn.Module) -> torch.nn.Module:
    """On a CPU without AVX-512, every bfloat16 ``nn.Linear`` in ``module`` (or ``module`` itself) becomes a
    :class:`RowAdaptiveLinear`; elsewhere, and for other dtypes, ``module`` stays as it is. Returns ``module``."""
    if has_avx512() or next(module.parameters()).dtype != torch.bfloat16:
        return module
    if isinstance(module, torch.nn.Linear):
        return RowAdaptiveLinear(module)
    _swap_linears(module, RowAdaptiveLinear)
    return module
