"""The ``sgl_kernel`` ops of SGLang 0.5.23 the stand-in does not serve: names under ``torch.ops.sgl_kernel`` that
refuse to run.

Several SGLang modules bind ``torch.ops.sgl_kernel.<name>`` at import when the CPU kernels are present (rotary
utils, the Conv3d layer, the vision attention, Grok, Qwen3.5, ...) and the model registry imports them all, so every
name must exist for SGLang to start even when the model served never calls it. These are the ops of quantized GEMMs,
MoE, linear attention, vision and other model families: calling one raises, naming the op. Not listed: ops SGLang
probes with ``hasattr`` to pick a fused path (``fused_qk_norm_rope_cpu``, ``gdn_attention``,
``shm_group_initialize``, ``get_device_accessible_ptr``), which must stay absent.
"""

from __future__ import annotations

NAMES = (
    "apply_gguf_moe_weights", "apply_multidimensional_rope_cpu", "apply_rotary_pos_emb_cpu",
    "biased_grouped_topk_cpu", "bmm_cpu", "causal_conv1d_weight_pack", "conv3d_embed_cpu",
    "conv3d_embed_weight_pack", "convert_scale_packed", "convert_weight_packed_scale_zp",
    "deepseek_v4_topk_transform_512", "dsv4_fused_q_indexer_rope_hadamard_quant", "flash_attn_varlen_func",
    "fp8_per_tensor_scaled_mm_cpu", "fp8_scaled_mm_cpu", "fused_dual_residual_rmsnorm_cpu", "fused_experts_cpu",
    "fused_gdn_gating_cpu", "fused_input_proj_cpu", "fused_linear_sigmoid_mul", "fused_moe_router_cpu",
    "fused_norm_scale_shift_cpu", "fused_qk_gemma_rmsnorm_cpu", "fused_qk_gemma_rmsnorm_with_gate_cpu",
    "fused_qk_rmsnorm_apply_from_stats_cpu", "fused_qk_rmsnorm_cpu", "fused_qk_rmsnorm_sumsq_cpu",
    "fused_qkvzba_split_reshape_cat_contiguous_cpu", "fused_qkvzba_split_reshape_cat_cpu", "fused_rmsnorm_gated_cpu",
    "fused_scale_residual_norm_scale_shift", "fused_scale_residual_norm_scale_shift_cpu", "fused_scale_shift_cpu",
    "fused_sigmoid_gating_delta_rule_update_cpu", "fused_sigmoid_mul_cpu", "gemma3_rmsnorm_cpu",
    "gemma4_rmsnorm_cpu", "gemma_fused_add_rmsnorm_cpu", "gemma_rmsnorm_cpu", "grouped_topk_cpu",
    "image_preprocess_cpu", "int4_scaled_mm_cpu", "int8_scaled_mm_with_quant", "l2norm_cpu", "layernorm_cpu",
    "multimodal_rotary_embedding_cpu", "qkv_proj_with_rope_fused_weight", "query_device", "rotary_embedding",
    "shared_expert_cpu", "shm_allgather", "shm_allreduce", "shm_alltoall", "topk_sigmoid_cpu", "topk_softmax_cpu",
    "topk_transform", "topk_transform_paged", "topk_transform_ragged",
)


def _refusal(name: str):
    def refuse(*args, **kwargs):
        raise NotImplementedError(
            f"torch.ops.sgl_kernel.{name} is not served by WhiFlash's CPU stand-in (whiflash-sgl-kernel-cpu), which "
            f"covers unquantized dense Llama/Qwen-style models; serve a supported model or use the real sgl-kernel")

    return refuse


def install() -> None:
    """Bind each name on the op namespace as a plain function (no schema: it takes any arguments and refuses)."""
    import torch

    for name in NAMES:
        if not hasattr(torch.ops.sgl_kernel, name):
            setattr(torch.ops.sgl_kernel, name, _refusal(name))
