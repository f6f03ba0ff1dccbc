"""Registration of the stand-in ops as ``torch.ops.sgl_kernel.*`` (CPU kernels plus cheap Meta kernels).

The schemas follow SGLang 0.5.23's call sites: argument order and types as passed there, and ``Tensor(x!)`` on every
argument an op writes. Registering is idempotent: when the namespace already has our ops (the package was imported
before, e.g. under another module object) nothing is registered again.
"""

from __future__ import annotations

import torch
from torch.library import Library

from . import activation, attention, gemm, memory, misc, norm, rotary, speculative

NAMESPACE = "sgl_kernel"

# name -> (schema after the name, implementation, dispatch key)
_CPU = "CPU"
_ANY = "CompositeExplicitAutograd"  # ops without tensor arguments cannot dispatch on a backend key
OPS: dict[str, tuple[str, object, str]] = {
    "rmsnorm_cpu": ("(Tensor input, Tensor weight, float eps) -> Tensor", norm.rmsnorm_cpu, _CPU),
    "fused_add_rmsnorm_cpu": (
        "(Tensor(a!) input, Tensor(b!) residual, Tensor weight, float eps) -> ()", norm.fused_add_rmsnorm_cpu, _CPU),
    "fused_qk_norm_cpu": (
        "(Tensor(a!) q, Tensor(b!) k, Tensor q_weight, Tensor k_weight, float eps) -> ()",
        norm.fused_qk_norm_cpu, _CPU),
    "silu_and_mul_cpu": ("(Tensor input) -> Tensor", activation.silu_and_mul_cpu, _CPU),
    "gelu_tanh_and_mul_cpu": ("(Tensor input) -> Tensor", activation.gelu_tanh_and_mul_cpu, _CPU),
    "gelu_and_mul_cpu": ("(Tensor input) -> Tensor", activation.gelu_and_mul_cpu, _CPU),
    "rotary_embedding_cpu": (
        "(Tensor positions, Tensor(a!) query, Tensor(b!) key, int head_size, Tensor cos_sin_cache, bool is_neox)"
        " -> (Tensor, Tensor)", rotary.rotary_embedding_cpu, _CPU),
    "convert_weight_packed": ("(Tensor weight) -> Tensor", gemm.convert_weight_packed, _CPU),
    "weight_packed_linear": (
        "(Tensor mat1, Tensor mat2, Tensor? bias, bool is_vnni) -> Tensor", gemm.weight_packed_linear, _CPU),
    "decode_attention_cpu": (
        "(Tensor query, Tensor(a!) k_cache, Tensor(b!) v_cache, float k_scale, float v_scale, Tensor(c!) output,"
        " Tensor? key, Tensor? value, Tensor loc, Tensor(d!) attn_logits, Tensor req_to_token,"
        " Tensor req_pool_indices, Tensor seq_lens, float sm_scale, float logit_cap, bool is_cross_attention,"
        " int sliding_window_size, Tensor? encoder_lens, Tensor? sinks) -> ()",
        attention.decode_attention_cpu, _CPU),
    "extend_attention_cpu": (
        "(Tensor q_extend, Tensor? k_extend, Tensor? v_extend, Tensor(a!) o_extend, Tensor k_buffer,"
        " Tensor v_buffer, float k_scale, float v_scale, Tensor req_to_token, Tensor req_pool_indices,"
        " Tensor seq_lens, Tensor extend_seq_lens, Tensor extend_start_loc, int? max_len_extend, float sm_scale,"
        " float logit_cap, bool is_cross_attention, int sliding_window_size, Tensor? encoder_lens, Tensor? sinks,"
        " Tensor? tree_mask, bool is_causal) -> ()",
        attention.extend_attention_cpu, _CPU),
    "store_cache_cpu": (
        "(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor indices, int row_dim) -> ()",
        memory.store_cache_cpu, _CPU),
    "assign_req_to_token_pool_cpu": (
        "(Tensor req_pool_indices, Tensor(a!) req_to_token, Tensor start_offset, Tensor end_offset,"
        " Tensor out_cache_loc, int pool_len) -> ()", memory.assign_req_to_token_pool_cpu, _CPU),
    # Writes through raw addresses in data_ptrs, which no alias annotation can describe.
    "copy_all_layer_kv_cache_cpu": (
        "(Tensor data_ptrs, Tensor strides, Tensor tgt_loc, Tensor src_loc) -> ()",
        memory.copy_all_layer_kv_cache_cpu, _CPU),
    "murmur_hash32_cpu": (
        "(Tensor seed, Tensor positions, Tensor col_indices) -> Tensor", misc.murmur_hash32_cpu, _CPU),
    "init_cpu_threads_env": ("(str cpu_ids) -> str", misc.init_cpu_threads_env, _ANY),
    "initialize": ("(int size, int rank) -> ()", misc.initialize, _ANY),
    "build_tree_kernel_efficient_cpu": (
        "(Tensor parent_list, Tensor selected_index, Tensor verified_seq_len, Tensor(a!) tree_mask,"
        " Tensor(b!) positions, Tensor(c!) retrive_index, Tensor(d!) retrive_next_token,"
        " Tensor(e!) retrive_next_sibling, int topk, int depth, int draft_token_num, int tree_mask_mode) -> ()",
        speculative.build_tree_kernel_efficient_cpu, _CPU),
    "verify_tree_greedy_cpu": (
        "(Tensor(a!) predicts, Tensor(b!) accept_index, Tensor(c!) accept_token_num, Tensor candidates,"
        " Tensor retrive_index, Tensor retrive_next_token, Tensor retrive_next_sibling, Tensor target_predict)"
        " -> ()", speculative.verify_tree_greedy_cpu, _CPU),
    "assign_draft_cache_locs_contiguous_cpu": (
        "(Tensor req_pool_indices, Tensor req_to_token, Tensor seq_lens, Tensor(a!) out_cache_loc, int pool_len,"
        " int topk, int num_cols) -> ()", speculative.assign_draft_cache_locs_contiguous_cpu, _CPU),
    "assign_extend_cache_locs_cpu": (
        "(Tensor req_pool_indices, Tensor req_to_token, Tensor start_offset, Tensor end_offset,"
        " Tensor(a!) out_cache_loc, int pool_len) -> ()", speculative.assign_extend_cache_locs_cpu, _CPU),
    "fill_accept_out_cache_loc_cpu": (
        "(Tensor accept_index, Tensor out_cache_loc, Tensor(a!) accept_out_cache_loc) -> ()",
        speculative.fill_accept_out_cache_loc_cpu, _CPU),
    "fill_bonus_tokens_cpu": (
        "(Tensor accept_tokens, Tensor accept_lens, Tensor(a!) bonus_tokens, int accept_stride) -> ()",
        speculative.fill_bonus_tokens_cpu, _CPU),
    "rotate_input_ids_cpu": (
        "(Tensor(a!) input_ids, Tensor extend_start_loc, Tensor extend_seq_lens, Tensor topk_index,"
        " Tensor? select_index=None) -> ()", speculative.rotate_input_ids_cpu, _CPU),
    "build_draft_decode_metadata_cpu": (
        "(Tensor req_to_token, Tensor req_pool_indices, Tensor seq_lens, int topk, int num_steps, int pool_len)"
        " -> Tensor", speculative.build_draft_decode_metadata_cpu, _CPU),
    "reconstruct_indices_from_tree_mask_cpu": (
        "(Tensor tree_mask, Tensor verified_seq_len, Tensor(a!) positions, Tensor(b!) retrive_index,"
        " Tensor(c!) retrive_next_token, Tensor(d!) retrive_next_sibling, int batch_size, int draft_token_num)"
        " -> ()", speculative.reconstruct_indices_from_tree_mask_cpu, _CPU),
}


def _meta_like_first_half(input):
    return input.new_empty((*input.shape[:-1], input.shape[-1] // 2))


def _meta_rotary(positions, query, key, head_size, cos_sin_cache, is_neox):
    if query.dim() == 3:
        return torch.empty_like(query), torch.empty_like(key)
    return query, key


# Shape-only kernels for the ops that return tensors (used when tracing with meta/fake tensors).
META: dict[str, object] = {
    "rmsnorm_cpu": lambda input, weight, eps: torch.empty_like(input),
    "silu_and_mul_cpu": _meta_like_first_half,
    "gelu_tanh_and_mul_cpu": _meta_like_first_half,
    "gelu_and_mul_cpu": _meta_like_first_half,
    "rotary_embedding_cpu": _meta_rotary,
    "convert_weight_packed": lambda weight: torch.empty_like(weight),
    "weight_packed_linear": lambda mat1, mat2, bias, is_vnni: mat1.new_empty((*mat1.shape[:-1], mat2.shape[0])),
    "murmur_hash32_cpu": lambda seed, positions, col_indices: torch.empty(
        (seed.numel(), col_indices.numel()), dtype=torch.uint32, device="meta"),
}


def _registered() -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::convert_weight_packed", "CPU")
    except RuntimeError:  # the op does not exist
        return False


def register() -> Library | None:
    """Define and implement every op once per process; returns the library (None if it was already done)."""
    if _registered():
        return None
    lib = Library(NAMESPACE, "DEF")
    for name, (schema, fn, key) in OPS.items():
        lib.define(name + schema)
        lib.impl(name, fn, key)
        if name in META:
            lib.impl(name, META[name], "Meta")
    return lib


# Kept referenced for the life of the process: dropping a Library object unregisters its ops.
_LIBRARY = globals().get("_LIBRARY") or register()
