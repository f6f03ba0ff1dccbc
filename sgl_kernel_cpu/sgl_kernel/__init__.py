"""WhiFlash's pure-PyTorch stand-in for the ``sgl_kernel`` CPU ops of SGLang 0.5.23.

Importing it registers ``torch.ops.sgl_kernel.*`` (norms, rotary, activations, packed linear, paged attention,
KV-cache moves, speculative-decoding bookkeeping) and exposes the Python-level names SGLang imports on CPU. It is for
CPU-only machines: with CUDA available it refuses to load, so it can never shadow the real kernels.
"""

from __future__ import annotations

import torch

if torch.cuda.is_available():
    raise ImportError(
        "sgl_kernel here is WhiFlash's CPU-only stand-in (whiflash-sgl-kernel-cpu) and must not be used on a "
        "machine with CUDA: uninstall it (pip uninstall whiflash-sgl-kernel-cpu) and install the real "
        "sglang-kernel wheel")

from . import _ops, speculative, unserved  # noqa: E402  (registers torch.ops.sgl_kernel.*)
from .memory import assign_req_to_token_pool_cpu, copy_all_layer_kv_cache_cpu  # noqa: E402
from .speculative import (  # noqa: E402
    assign_draft_cache_locs_contiguous_cpu,
    assign_extend_cache_locs_cpu,
    build_draft_decode_metadata_cpu,
    build_tree_kernel_efficient_cpu,
    fill_accept_out_cache_loc_cpu,
    fill_bonus_tokens_cpu,
    rotate_input_ids_cpu,
    verify_tree_greedy_cpu,
)

unserved.install()

WHIFLASH_CPU_STANDIN = True
__version__ = "0.1.0"

__all__ = [
    "WHIFLASH_CPU_STANDIN",
    "assign_draft_cache_locs_contiguous_cpu",
    "assign_extend_cache_locs_cpu",
    "assign_req_to_token_pool_cpu",
    "build_draft_decode_metadata_cpu",
    "build_tree_kernel_efficient_cpu",
    "copy_all_layer_kv_cache_cpu",
    "fill_accept_out_cache_loc_cpu",
    "fill_bonus_tokens_cpu",
    "rotate_input_ids_cpu",
    "speculative",
    "verify_tree_greedy_cpu",
]
