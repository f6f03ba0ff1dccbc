"""A view of some requests of an SGLang decode batch, for the EAGLE-3 draft worker to draft only those.

``EagleDraftWorker.draft`` reads a whole ``ScheduleBatch`` (its requests' pool rows, committed lengths, the
``EagleDraftInput`` of top-k and hidden states the last draft-extend left) and writes ``out_cache_loc`` and the
forward mode on it. ``ScheduleBatch.filter_batch`` would narrow one in place, but it also filters the sampling
penalizers, which the batch shares, so this makes a shallow copy and narrows the per-request fields that drafting
reads, as ``filter_batch`` does, on the copy only. The sampling info is copied too (``ForwardBatch.init_new`` writes
its grammars) with its per-request tensors narrowed; its penalizers are left alone (drafting never applies them).
Written against SGLang 0.5.23's ``ScheduleBatch`` and ``SamplingBatchInfo``.
"""

from __future__ import annotations

import copy

import torch

SAMPLING_FIELDS = ("temperatures", "top_ps", "top_ks", "min_ps", "sampling_seed")


def decode_sub_batch(batch, rows: list[int]):
    """The decode ``batch`` narrowed to ``rows`` (batch order), sharing tensors with it but no field."""
    sub = copy.copy(batch)
    index = torch.tensor(rows, dtype=torch.int64, device=batch.seq_lens.device)
    sub.reqs = [batch.reqs[i] for i in rows]
    if batch.multimodal_inputs is not None:
        sub.multimodal_inputs = [batch.multimodal_inputs[i] for i in rows]
    sub.req_pool_indices = batch.req_pool_indices[index]
    if batch.req_pool_indices_cpu is not None:
        sub.req_pool_indices_cpu = batch.req_pool_indices_cpu[rows]
    sub.seq_lens = batch.seq_lens[index]
    sub.orig_seq_lens = batch.orig_seq_lens[index]
    sub.seq_lens_cpu = None if batch.seq_lens_cpu is None else batch.seq_lens_cpu[rows]
    sub.seq_lens_sum = None if sub.seq_lens_cpu is None else int(sub.seq_lens_cpu.sum())
    sub.out_cache_loc = None
    if batch.input_ids is not None:
        sub.input_ids = batch.input_ids[index]
    sub.return_logprob, sub.top_logprobs_nums, sub.token_ids_logprobs = False, None, None
    sub.has_grammar = any(req.grammar for req in sub.reqs)

    sub.sampling_info = copy.copy(batch.sampling_info)
    for name in SAMPLING_FIELDS:
        value = getattr(batch.sampling_info, name, None)
        if value is not None:
            setattr(sub.sampling_info, name, value[index])
    sub.spec_info = copy.copy(batch.spec_info)
    sub.spec_info.filter_batch(new_indices=index, new_indices_cpu=rows)
    return sub
