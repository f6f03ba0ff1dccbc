"""Does the installed SGLang have every symbol WHIFLASH uses, with the parameters it passes?

The plugin relies on SGLang internals (worker classes, hook targets, verify helpers) that change between releases,
so ``register()`` checks them all first and registers nothing on a mismatch. The check reads the source
(``ast``) instead of importing it: it must be cheap in every SGLang process that loads plugins, and some of these
modules pull in packages a CPU-only install lacks (torchvision through ``sglang.srt.configs``) without that saying
anything about SGLang's API.
"""

from __future__ import annotations

import ast
import importlib.util
from functools import lru_cache
from pathlib import Path

from whiflash_sgl.sglang import hooks

SGLANG_VERSION = "0.5.23"

_SPEC = "sglang.srt.speculative"
# "module:Qualified.name" -> parameter names WHIFLASH passes (by keyword, or relies on by position)
REQUIRED: dict[str, tuple[str, ...]] = {
    f"{_SPEC}.spec_info:SpeculativeAlgorithm.register":
        ("name", "supports_overlap", "validate_server_args", "spec_class"),
    f"{_SPEC}.spec_info:SpeculativeAlgorithm.from_string": ("name",),
    f"{_SPEC}.spec_registry:CustomSpecAlgo.__init__": ("name", "factory", "supports_overlap", "validate_server_args"),
    f"{_SPEC}.spec_registry:CustomSpecAlgo.handle_server_args": ("server_args",),
    f"{_SPEC}.spec_registry:_assert_custom_spec_algo_conforms": ("spec_class",),
    "sglang.srt.managers.overlap_utils:FutureMap.__init__":
        ("device", "spec_algo", "req_to_token_pool", "needs_cpu_seq_lens", "needs_confidence_relay"),
    "sglang.srt.plugins.hook_registry:HookRegistry.register": ("target", "hook", "hook_type"),
    "sglang.srt.plugins.hook_registry:HookRegistry.apply_hooks": (),
    "sglang.srt.plugins:load_plugins": (),
    "sglang.srt.runtime_context:get_spec": (),
    "sglang.srt.runtime_context:_ConfigBag.override": (),
    "sglang.srt.utils.hf_transformers.config:get_config": ("model", "trust_remote_code"),
    f"{_SPEC}.dflash_utils:parse_dflash_draft_config": ("draft_hf_config",),
    # hooks
    f"{hooks.AUX_MODULE}:{hooks.AUX_NAME}":
        ("server_args", "model_config", "spec_algorithm", "is_draft_worker"),
    f"{hooks.AUX_MODULE}:_resolve_dflash_aux_hidden_state":
        ("config", "server_args", "model_config", "spec_algorithm", "is_draft_worker"),
    f"{hooks.AUX_MODULE}:SpecAuxHiddenStateConfig": (),
    f"{hooks.CAPTURE_MODULE}:{hooks.CAPTURE_NAME}":
        ("model", "eagle_use_aux_hidden_state", "eagle_aux_hidden_state_layer_ids", "dflash_use_aux_hidden_state",
         "dflash_target_layer_ids", "is_dspark"),
    f"{hooks.POOL_MODULE}:{hooks.POOL_NAME}": ("self", "kvc"),
    f"{hooks.STREAMER_MODULE}:{hooks.STREAMER_NAME}": ("self", "key"),
    "sglang.srt.mem_cache.draft_kv_budget:resolve_dflash_draft_cell_size":
        ("draft_model_config", "draft_num_layers", "attn_tp_size"),
    "sglang.srt.configs.model_config:ModelConfig.from_server_args": ("server_args", "model_path", "is_draft_model"),
    # the worker
    f"{_SPEC}.base_spec_worker:BaseSpecWorker.__init__": (),
    f"{_SPEC}.eagle_worker_v2:EagleDraftWorker.__init__": ("server_args", "gpu_id", "nccl_port", "target_worker"),
    f"{_SPEC}.eagle_worker_v2:EagleDraftWorker.alloc_memory_pool":
        ("memory_pool_config", "req_to_token_pool", "token_to_kv_pool_allocator"),
    f"{_SPEC}.eagle_worker_v2:EagleDraftWorker.init_attention_backends": (),
    f"{_SPEC}.eagle_worker_v2:EagleDraftWorker.init_cuda_graphs": (),
    f"{_SPEC}.eagle_worker_v2:EagleDraftWorker.draft": ("batch",),
    f"{_SPEC}.base_spec_worker:BaseSpecWorker.note_request_finished": ("rid", "natural_stop"),
    # sub_batch: a decode batch narrowed to the requests that chose EAGLE-3
    f"{_SPEC}.eagle_info:EagleDraftInput.filter_batch": ("new_indices", "new_indices_cpu"),
    **{f"sglang.srt.managers.schedule_batch:ScheduleBatch.{field}": ()
       for field in ("reqs", "multimodal_inputs", "req_pool_indices", "req_pool_indices_cpu", "seq_lens",
                     "orig_seq_lens", "seq_lens_cpu", "seq_lens_sum", "out_cache_loc", "input_ids", "return_logprob",
                     "top_logprobs_nums", "token_ids_logprobs", "has_grammar", "sampling_info", "spec_info")},
    **{f"sglang.srt.sampling.sampling_batch_info:SamplingBatchInfo.{field}": ()
       for field in ("temperatures", "top_ps", "top_ks", "min_ps", "sampling_seed")},
    f"{_SPEC}.eagle_worker_v2:EagleDraftWorker._draft_extend_for_prefill":
        ("batch", "target_hidden_states", "next_token_ids", "mm_input_embeds", "kv_loc_plan"),
    f"{_SPEC}.eagle_worker_v2:EagleDraftWorker._draft_extend_for_decode": ("batch", "batch_result", "kv_loc_plan"),
    f"{_SPEC}.dflash_worker_v2:DFlashWorkerV2.__init__": ("server_args", "gpu_id", "nccl_port", "target_worker"),
    f"{_SPEC}.dflash_worker_v2:DFlashWorkerV2.alloc_memory_pool":
        ("memory_pool_config", "req_to_token_pool", "token_to_kv_pool_allocator"),
    f"{_SPEC}.dflash_worker_v2:DFlashWorkerV2.init_attention_backends": (),
    f"{_SPEC}.dflash_worker_v2:DFlashWorkerV2.init_cuda_graphs": (),
    f"{_SPEC}.dflash_worker_v2:DFlashWorkerV2._draft_write_ids": ("plan",),
    f"{_SPEC}.dflash_worker_v2:DFlashWorkerV2._append_target_hidden_to_draft_kv_by_loc":
        ("target_hidden", "cache_loc", "positions", "cache_loc_2d", "commit_lens", "extend_lens"),
    f"{_SPEC}.dflash_worker_v2:DFlashWorkerV2._greedy_sample_from_vocab_parallel_head": ("hidden_states", "lm_head"),
    f"{_SPEC}.dflash_worker_v2:_resolve_dflash_embedding_module": ("draft_model", "target_model"),
    "sglang.kernels.ops.speculative.cache_locs:assign_extend_cache_locs_func":
        ("req_pool_indices", "req_to_token", "start_offset", "end_offset", "batch_size", "draft_token_num", "device"),
    "sglang.kernels.ops.speculative.spec_tree:TreeMaskMode": (),
    f"{_SPEC}.eagle_worker_common:run_eagle_verify":
        ("batch", "target_worker", "req_to_token_pool", "token_to_kv_pool_allocator", "plan_stream",
         "plan_stream_ctx", "topk", "num_draft_tokens", "device", "metadata_ready_pre_pad", "finalize_tree_path",
         "grammar_barrier"),
    f"{_SPEC}.eagle_info:EagleVerifyInput": (),
    f"{_SPEC}.eagle_info:EagleDraftInput.create_idle_input":
        ("device", "hidden_size", "dtype", "topk", "capture_hidden_mode", "vocab_size"),
    f"{_SPEC}.eagle_utils:get_draft_recurrent_hidden_state_spec": (),
    f"{_SPEC}.spec_utils:draft_tp_context": ("layout",),
    "sglang.srt.model_executor.forward_batch_info:compute_position": (),
    "sglang.srt.model_executor.forward_batch_info:enable_num_token_non_padded": (),
    "sglang.srt.model_executor.graph_memory_usage:merge_graph_memory_usage": (),
    "sglang.srt.model_executor.graph_memory_usage:merge_graph_time_usage": (),
    "sglang.srt.layers.moe.utils:speculative_moe_backend_context": (),
    "sglang.srt.layers.moe.utils:speculative_moe_a2a_backend_context": (),
    "sglang.srt.lora.layers:unwrap_lora_layer": ("module",),
    "sglang.srt.utils.common:async_h2d": ("dtype", "device"),
    "sglang.srt.runtime_context:get_device": (),
    "sglang.srt.model_executor.forward_batch_info:CaptureHiddenMode": (),
    "sglang.srt.model_executor.forward_batch_info:ForwardBatch": (),
    f"{_SPEC}.spec_utils:get_plan_stream": ("device",),
    # keyed verification (keyed_verify): run_eagle_verify calls eagle_sample by its name in eagle_worker_common, and
    # eagle_sample calls verify_tree_greedy_func by its name in eagle_utils; both names are swapped for one verify
    f"{_SPEC}.eagle_worker_common:eagle_sample": (),
    f"{_SPEC}.eagle_utils:eagle_sample": ("verify_input", "batch", "logits_output"),
    f"{_SPEC}.eagle_utils:verify_tree_greedy_func": (),
    "sglang.kernels.ops.speculative.spec_tree:verify_tree_greedy_func":
        ("predicts", "accept_index", "accept_token_num", "candidates", "retrieve_index", "retrieve_next_token",
         "retrieve_next_sibling", "target_predict", "topk"),
    f"{_SPEC}.eagle_info:EagleVerifyInput.positions": (),
    f"{_SPEC}.eagle_info:EagleVerifyInput.draft_token_num": (),
    "sglang.srt.layers.logits_processor:LogitsProcessorOutput.next_token_logits": (),
    "sglang.srt.sampling.sampling_params:TOP_K_ALL": (),
    **{f"sglang.srt.sampling.sampling_params:SamplingParams.{field}": ()
       for field in ("temperature", "top_p", "top_k", "min_p", "sampling_seed")},
}


def _source_path(module: str) -> Path | None:
    """The file defining ``module``, found without importing its parent packages (which may need missing extras)."""
    top, *rest = module.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        base = Path(root).joinpath(*rest)
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


@lru_cache(maxsize=None)
def _module_tree(module: str) -> ast.Module | None:
    path = _source_path(module)
    if path is None:
        return None
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _defines(node: ast.AST, name: str) -> bool:
    """Whether a statement of a module or class body binds ``name``: a def or class, an assignment (annotated or
    not; dataclass and struct fields are annotated assignments), or an import."""
    if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        return node.name == name
    if isinstance(node, ast.AnnAssign):
        return isinstance(node.target, ast.Name) and node.target.id == name
    if isinstance(node, ast.Assign):
        return any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return any((a.asname or a.name.split(".")[0]) == name for a in node.names)
    return False


def _find(tree: ast.AST, qualname: str):
    node = tree
    for part in qualname.split("."):
        body = getattr(node, "body", [])
        matches = [n for n in body if _defines(n, part)]
        if not matches:
            return None
        defs = [n for n in matches if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        node = (defs or matches)[-1]
    return node


def _parameters(node) -> set[str] | None:
    """Parameter names of a function, or None when it takes ``**kwargs`` (anything goes)."""
    args = node.args
    if args.kwarg is not None:
        return None
    return {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs}


def problems(required: dict[str, tuple[str, ...]] = REQUIRED) -> list[str]:
    """What the installed SGLang lacks, one line per symbol; empty when everything matches."""
    found = []
    for target, params in required.items():
        module, qualname = target.split(":")
        tree = _module_tree(module)
        if tree is None:
            found.append(f"{module}: module not found")
            continue
        node = _find(tree, qualname)
        if node is None:
            found.append(f"{module}.{qualname}: not defined")
            continue
        if params and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            have = _parameters(node)
            missing = [p for p in params if have is not None and p not in have]
            if missing:
                found.append(f"{module}.{qualname}: no parameter(s) {', '.join(missing)}")
    return found
