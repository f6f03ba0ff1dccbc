"""Linear layers chosen for the CPU they run on.

A verify pass and a draft step are chains of small-M GEMMs (M = the rows in flight), and which kernel wins depends
on the CPU:

* float32 target: oneDNN's prepacked inner product beat the default GEMM on one AVX-512 host (SmolLM2's verify of 8
  rows 64 -> 49 ms, one row 40 -> 35 ms); on an AVX2-only host (AMD EPYC) the default was as fast or faster at every
  row count from 1 to 512 (30 layers' linears: 1 row 44 against 68 ms, 2 rows 67 against 90, 8 rows 101 against
  109, 64 rows 287 against 300), and so it was on a Sapphire Rapids host with AMX (whole forwards: 1 row 37 against
  61 ms, 8 sequences of 1 row 76 against 88, of 8 rows 137 against 161). The ISA does not tell them apart, so
  :func:`prepacking_pays` times both on a linear of the model's own shape.
* bfloat16 drafters: without AVX-512, bf16 products are emulated. While reading the weights dominates they still
  win (an EAGLE-3 layer and its 8k head, 1 row 2.9 against 4.4 ms in float32), but from a few rows on they lose
  2-4x (16 rows 37 against 12 ms, 64 rows 138 against 30), which is what a batch of requests drafting together
  is. There a bf16 linear keeps a float32 copy of its weight for calls of more than ``SMALL_ROWS`` rows.

Either way the products are the same up to rounding, and drafts only propose, so no output changes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

SMALL_ROWS = 4  # at most this many rows: bf16 weights; more: the float32 copy (on CPUs without AVX-512)
PROBE_CALLS = 15  # timed calls per kernel and row count when deciding whether prepacking pays


def has_avx512() -> bool:
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def prepacking_pays(model: torch.nn.Module) -> bool:
    """Whether oneDNN-prepacked float32 linears beat the default CPU GEMM here, timed on the largest linear inside
    ``model``'s layers at 1 and 16 rows (the median of ``PROBE_CALLS`` calls each): packing must win by 10%."""
    if not torch.backends.mkldnn.is_available():
        return False
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    if not linears or linears[0].weight.dtype != torch.float32:
        return False
    probe = max(linears, key=lambda m: m.weight.numel())
    with torch.no_grad():
        packed = PackedLinear(probe)
        rows = [torch.randn(m, probe.in_features) for m in (1, 16)]
        return _seconds(packed, rows) < 0.9 * _seconds(probe, rows)


def _seconds(linear: torch.nn.Module, inputs: list[torch.Tensor]) -> float:
    """The summed median time of ``linear`` on each of ``inputs``, after a warm-up call."""
    total = 0.0
    for x in inputs:
        linear(x)
        times = []
        for _ in range(PROBE_CALLS):
            tic = time.perf_counter()
            linear(x)
            times.append(time.perf_counter() - tic)
        total += statistics.median(times)
    return total


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
