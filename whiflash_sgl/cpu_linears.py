"""Linear layers chosen for the CPU they run on.

A verify pass and a draft step are chains of small-M GEMMs (M = the rows in flight), and which kernel wins depends
on the CPU:

* float32 target on an AVX-512 CPU: :class:`InvariantLinear`, this package's own kernel (``csrc/invariant_gemm.cpp``,
  built on first use). Every output element is one chain of fused multiply-adds over the input features in order,
  whatever the number of rows, so a request's logits do not depend on the batch it is verified in; and it is faster
  than MKL's sgemm from 2 to 64 rows (Sapphire Rapids, 2 threads, SmolLM2's shapes: 8 rows of the 49k LM head 4.4
  against 8.9 ms, of a 576x1536 MLP projection 0.05 against 0.08 ms; 26 rows 8.4 against 10.0 and 0.15 against
  0.22 ms), as fast at one row and within 7% at 512. Whole forwards: one sequence of 8 rows 70 -> 47 ms, 8 sequences
  of one row 80 -> 59 ms, of 3 rows 97 -> 83 ms.
* float32 target on an AVX2 CPU without AVX-512: the same kernel's AVX2 build (``csrc/invariant_gemm_avx2.cpp``),
  the same panels and the same chains of FMAs, so the same bits as the AVX-512 build. On an AVX2-only EPYC
  (2 threads) MKL's sgemm took twice its one-row time from 2 rows on (the LM head: 1 row 8.6 ms, 2 rows 20.1, 8
  rows 18.6, 32 rows 26.7), the kernel 4.7, 4.6, 5.4 and 12.0 ms; an MLP projection at 8 rows 0.13 against 0.30
  ms. Whole forwards: one sequence of 1 row 57 -> 47 ms, of 8 rows 96 -> 63, 8 sequences of 1 row 103 -> 67, of 4
  rows 141 -> 125, 16 of 4 rows 219 -> 185.
* float32 target with ``matmul="bfloat16"`` on a CPU with AMX (Sapphire Rapids on): the same kernel file's AMX
  path, bf16 products of the weights and rows (each rounded to nearest even) summed in float32, the precision of
  ``torch.set_float32_matmul_precision("medium")`` and of models published in bf16. Rows are computed
  independently within AMX tiles, so it is batch-invariant too. The weights take half the bytes and extra rows
  next to no time (whole forwards with the paged attention kernel: one sequence's 8 verify rows 47 -> 29 ms, 8
  sequences of one row 54 -> 34, of 4 rows 89 -> 49). On a CPU with AVX512-BF16 but no AMX (AMD Zen 4), the same
  panels through VDPBF16PS: 1.6-2x the float32 kernel at every row count, batch-invariant as well.
* float32 target where neither build can run (no C++ compiler, or neither ISA): oneDNN's prepacked inner product
  beat the default GEMM on one AVX-512 host (SmolLM2's verify of 8 rows 64 -> 49 ms, one row 40 -> 35 ms); on an
  AVX2-only host (AMD EPYC) the default was as fast or faster at every row count from 1 to 512 (30 layers' linears:
  1 row 44 against 68 ms, 2 rows 67 against 90, 8 rows 101 against 109, 64 rows 287 against 300), and so it was on
  a Sapphire Rapids host with AMX (whole forwards: 1 row 37 against 61 ms, 8 sequences of 1 row 76 against 88, of 8
  rows 137 against 161). The ISA does not tell them apart, so :func:`prepacking_pays` times both on a linear of the
  model's own shape.
* bfloat16 drafters on a CPU with AMX or AVX512-BF16: the same bf16 path (:func:`drafter_linears`). oneDNN's bf16
  linear costs ~0.065 ms a call whatever the shape at up to 32 rows, the kernel 0.01-0.03 ms, and a draft step is a
  dozen calls.
* bfloat16 drafters without AVX-512: bf16 products are emulated. While reading the weights dominates they still
  win over MKL's float32 (an EAGLE-3 layer and its 8k head, 1 row 2.9 against 4.4 ms), but from a few rows on they
  lose 2-4x (16 rows 37 against 12 ms, 64 rows 138 against 30), which is what a batch of requests drafting together
  is. With the AVX2 build, every call runs the float32 kernel on the weights widened to float32 (exactly: a bf16
  value is a float32 one); without it, a bf16 linear keeps a float32 copy of its weight for calls of more than
  ``SMALL_ROWS`` rows (:class:`RowAdaptiveLinear`).

Either way the products are the same up to rounding, and drafts only propose, so no output changes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from whiflash_sgl.kernels.cpu_extension import amx_runs_here, avx2_gemm, cpu_kernels, float32_gemm, has_avx512

SMALL_ROWS = 4  # at most this many rows: bf16 weights; more: the float32 copy (on CPUs without AVX-512)
PROBE_CALLS = 15  # timed calls per kernel and row count when deciding whether prepacking pays


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


def bf16_products_run_here() -> bool:
    """Whether this CPU runs the kernel's bf16 products: on AMX (where the OS grants it), or with AVX512-BF16."""
    kernels = cpu_kernels()
    return kernels is not None and (amx_runs_here() or kernels.bf16_dot_runs())


class InvariantLinear(torch.nn.Module):
    """An inference-only ``nn.Linear`` computed by a compiled GEMM on its packed weight: float32 products
    (:func:`float32_gemm`; a bf16 layer's weight and rows are widened, exactly), or with ``bf16_products`` bf16 ones
    (AMX or AVX512-BF16, :func:`cpu_kernels`) summed in float32; the output in the input's dtype."""

    def __init__(self, linear: torch.nn.Linear, gemm, bf16_products: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.bf16_products = linear.in_features, linear.out_features, bf16_products
        self._linear = gemm.linear_bf16 if bf16_products else gemm.linear
        pack = gemm.pack_bf16 if bf16_products else gemm.pack
        self.register_buffer("panels", pack(linear.weight.detach().float()), persistent=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._linear(x.reshape(-1, self.in_features).float(), self.panels, self.out_features)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


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


def invariant_linears(module: torch.nn.Module, bf16_products: bool = False) -> bool:
    """Swap every float32 ``nn.Linear`` under ``module`` for an :class:`InvariantLinear` (inference only), where
    the kernel runs on this CPU (for ``bf16_products``: where :func:`bf16_products_run_here`); returns whether it
    did."""
    gemm = cpu_kernels() if bf16_products else float32_gemm()
    if gemm is None or next(module.parameters()).dtype != torch.float32:
        return False
    if bf16_products and not bf16_products_run_here():
        return False
    with torch.no_grad():
        _swap_linears(module, lambda linear: InvariantLinear(linear, gemm, bf16_products))
    return True


def drafter_linears(module: torch.nn.Module) -> torch.nn.Module:
    """The linear layers a bfloat16 drafter (or ``module`` itself, a linear) runs on this CPU: the kernel's bf16 path
    where it runs (bf16 products as before, summed in float32 and rounded back to bf16, at a fraction of oneDNN's
    per-call cost: a draft step is a dozen small GEMMs); on CPUs without AVX-512, the AVX2 float32 kernel on the
    widened weights, else :class:`RowAdaptiveLinear`; elsewhere, and for other dtypes or devices, ``module`` stays
    as it is. Returns ``module`` or its swap."""
    weight = next(module.parameters())
    if weight.dtype != torch.bfloat16 or weight.device.type != "cpu":
        return module
    if bf16_products_run_here():
        gemm = cpu_kernels()
        make = lambda linear: InvariantLinear(linear, gemm, bf16_products=True)  # noqa: E731
    elif not has_avx512():
        gemm = avx2_gemm()
        make = RowAdaptiveLinear if gemm is None else lambda linear: InvariantLinear(linear, gemm)  # noqa: E731
    else:
        return module
    if isinstance(module, torch.nn.Linear):
        return make(module)
    with torch.no_grad():
        _swap_linears(module, make)
    return module
