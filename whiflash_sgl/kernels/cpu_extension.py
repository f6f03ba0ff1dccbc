"""The package's compiled CPU kernels (``whiflash_sgl/csrc``): batch-invariant GEMMs, float32 and AMX bf16, and paged
tree attention. Built with torch's ``cpp_extension`` on first use (~60 s on 2 cores, once per checkout, into torch's
extension cache), for AVX-512 CPUs; on CPUs with AVX2 but not AVX-512, only the float32 GEMM is built
(:func:`float32_gemm`)."""

from __future__ import annotations

import functools
import hashlib
import os
import time
import warnings
from pathlib import Path

import torch

from whiflash_sgl.errors import WhiFlashError

SOURCES = ("invariant_gemm.cpp", "paged_attention.cpp", "paged_attention_bf16.cpp", "bindings.cpp")
AVX512_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512bf16", "-mfma", "-mamx-tile", "-mamx-bf16"]
CSRC = Path(__file__).resolve().parent.parent / "csrc"
BUILD_LOCK_WAIT_S = 600.0  # how long a load waits for another process's build (one takes ~60 s on 2 cores)


def build_directory(csrc: Path = CSRC, name: str = "whiflash_cpu_kernels") -> Path:
    """Where this checkout's extension ``name`` is built: one folder per sources folder. Torch's default, one per
    extension name, holds the sources' paths in its build file, so every checkout that loaded the kernels rebuilt
    them for the next (~60 s each time, for a CI clone beside a working tree)."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return Path(root) / f"{name}-{hashlib.sha1(str(csrc).encode()).hexdigest()[:12]}"


def wait_for_build_lock(directory: Path, timeout: float = BUILD_LOCK_WAIT_S, poll: float = 1.0) -> None:
    """Wait while ``directory`` holds the lock of a build under way, at most ``timeout`` seconds. Torch waits on that
    lock forever, and a build killed midway leaves it behind: every later load of the kernels then hung."""
    lock = directory / "lock"
    deadline = time.monotonic() + timeout
    while lock.exists():
        if time.monotonic() >= deadline:
            raise WhiFlashError(
                f"the C++ kernels' build folder has been locked for {timeout:.0f} s ({lock}): another process is "
                f"building them, or a build was stopped midway; if none is running, delete {lock} and try again")
        time.sleep(poll)


def has_avx512() -> bool:
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def has_avx2() -> bool:
    """AVX2 and FMA (torch's ``AVX2`` capability requires both), or AVX-512, which comes with them."""
    return has_avx512() or torch.backends.cpu.get_cpu_capability() == "AVX2"


@functools.cache
def cpu_kernels():
    """The compiled module, or None where it cannot run: a CPU without AVX-512, or no C++ compiler (said once, as a
    warning; torch's own GEMM and the reference attention then serve). A build lock held past ``BUILD_LOCK_WAIT_S``
    is an error (:func:`wait_for_build_lock`): falling back would change the numerics without saying why."""
    return _build("whiflash_cpu_kernels", SOURCES, AVX512_FLAGS) if has_avx512() else None


@functools.cache
def avx2_gemm():
    """The float32 GEMM alone, built for AVX2 and FMA (``pack`` and ``linear`` as :func:`cpu_kernels` has them, the
    same results bit for bit), or None: no AVX2, or no C++ compiler."""
    return _build("whiflash_avx2_gemm", ("invariant_gemm_avx2.cpp",), ["-mavx2", "-mfma"]) if has_avx2() else None


def float32_gemm():
    """The batch-invariant float32 GEMM for this CPU: the AVX-512 build's, else the AVX2 one, else None."""
    return cpu_kernels() or avx2_gemm()


def _build(name: str, sources: tuple[str, ...], isa_flags: list[str]):
    directory = build_directory(name=name)
    wait_for_build_lock(directory)
    try:
        from torch.utils.cpp_extension import load

        directory.mkdir(parents=True, exist_ok=True)
        return load(name, [str(CSRC / source) for source in sources], extra_cflags=["-O3", *isa_flags, "-fopenmp"],
                    extra_ldflags=["-fopenmp"], build_directory=str(directory))
    except Exception as exc:  # no compiler or ninja, or a cache folder it cannot write
        warnings.warn(f"the CPU kernels could not be built, so torch's own GEMM and attention are used: {exc}")
        return None


def amx_runs_here() -> bool:
    """Whether this CPU and OS run the kernels' AMX paths (bf16 products)."""
    kernels = cpu_kernels()
    return kernels is not None and torch.cpu._is_amx_tile_supported() and kernels.amx_permitted()
