"""The package's compiled CPU kernels (``whiflash_sgl/csrc``): batch-invariant GEMMs, float32 and AMX bf16, and paged
tree attention. Built with torch's ``cpp_extension`` on first use (~30 s once per machine, into torch's extension
cache), for AVX-512 CPUs only."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch

SOURCES = ("invariant_gemm.cpp", "paged_attention.cpp", "paged_attention_bf16.cpp", "bindings.cpp")


def has_avx512() -> bool:
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


@functools.cache
def cpu_kernels():
    """The compiled module, or None where it cannot run: a CPU without AVX-512, or no C++ compiler (said once, as a
    warning; torch's own GEMM and the reference attention then serve)."""
    if not has_avx512():
        return None
    try:
        from torch.utils.cpp_extension import load

        csrc = Path(__file__).resolve().parent.parent / "csrc"
        return load("whiflash_cpu_kernels", [str(csrc / name) for name in SOURCES],
                    extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-mavx512bf16", "-mfma", "-mamx-tile",
                                  "-mamx-bf16", "-fopenmp"],
                    extra_ldflags=["-fopenmp"])
    except Exception as exc:  # no compiler or ninja
        warnings.warn(f"the CPU kernels could not be built, so torch's own GEMM and attention are used: {exc}")
        return None


def amx_runs_here() -> bool:
    """Whether this CPU and OS run the kernels' AMX paths (bf16 products)."""
    kernels = cpu_kernels()
    return kernels is not None and torch.cpu._is_amx_tile_supported() and kernels.amx_permitted()
