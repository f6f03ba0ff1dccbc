"""Verification kernels: tree masks, ragged batched tree attention, batched acceptance.

* :mod:`.tree_mask` / :mod:`.tree_batch`: masks and positions from parent arrays, for one tree or a batch;
* :mod:`.bitpack`: masks bit-packed the way FlashInfer's custom-mask prefill reads them;
* :mod:`.layout`: :class:`AttentionLayout`, a ragged batch described FlashInfer-style (indptr arrays, flat masks);
* :mod:`.reference` / :mod:`.flashinfer_backend` / :mod:`.backends`: the PyTorch reference (any device) and FlashInfer
  (CUDA) behind one plan/run interface, chosen with :func:`get_backend`;
* :mod:`.accept`: greedy and sampled acceptance for a batch;
* :mod:`.check`: ``python -m whiflash_sgl.kernels.check`` runs every available backend against SDPA.

:func:`tree_attention` is the single-request entry point the reference engine's models call.
Imports inside this package are relative: it is installed as ``whiflash_sgl.kernels``, and a top-level ``kernels``
name must not shadow the optional ``kernels`` package transformers probes for.
"""

from .accept import BatchAcceptance, accept_greedy_batch, accept_sampled_batch, follow_targets
from .backend_api import AttentionPlan, BackendUnavailableError, TreeAttentionBackend
from .backends import available_backends, get_backend
from .bitpack import pack_bits, segment_pack_bits, segment_unpack_bits, unpack_bits
from .layout import AttentionLayout
from .reference import ReferenceBackend, ReferencePlan, ragged_tree_attention, tree_attention
from .tree_batch import TreeBatch
from .tree_mask import build_tree_mask, tree_depths, tree_positions

__all__ = [
    "AttentionLayout",
    "AttentionPlan",
    "BackendUnavailableError",
    "BatchAcceptance",
    "ReferenceBackend",
    "ReferencePlan",
    "TreeAttentionBackend",
    "TreeBatch",
    "accept_greedy_batch",
    "accept_sampled_batch",
    "available_backends",
    "build_tree_mask",
    "follow_targets",
    "get_backend",
    "pack_bits",
    "ragged_tree_attention",
    "segment_pack_bits",
    "segment_unpack_bits",
    "tree_attention",
    "tree_depths",
    "tree_positions",
    "unpack_bits",
]
