"""The WHIFLASH algorithm as SGLang sees it: its spec class and its server-argument resolution.

To the target side WHIFLASH presents itself as EAGLE-3 (``is_eagle()`` and ``is_eagle3()`` true, every other family
predicate false): that gives it EAGLE-3's aux-hidden capture, its draft KV reserve, its verify-input dummies for
CUDA-graph capture, its decode-slot allocation and the top-k relay. What DFlash needs on the target side is added by
the hooks in ``whiflash_sgl.sglang.hooks``. Custom algorithms get none of SGLang's in-tree argument handling, so
``handle_server_args`` does the EAGLE/DFlash parts WHIFLASH needs itself.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from sglang.srt.speculative.spec_registry import CustomSpecAlgo

from whiflash_sgl.errors import WhiFlashError
from whiflash_sgl.sglang.settings import publish, settings_from_env
from whiflash_sgl.sglang.shape import resolve_tree_shape

log = logging.getLogger(__name__)

NAME = "WHIFLASH"
DEFAULT_MAX_RUNNING_REQUESTS = 48  # what SGLang's own EAGLE and DFlash handlers choose
DFLASH_ARCHITECTURES = ("DFlashDraftModel",)

# (field, the flag that sets it, a predicate on its value that means "in use")
UNSUPPORTED = (
    ("pp_size", "--pp-size", lambda v: v != 1),
    ("attn_dp_size", "--attn-dp-size", lambda v: v is not None and v > 1),
    ("enable_hierarchical_cache", "--enable-hierarchical-cache", bool),
    ("enable_unified_memory", "--enable-unified-memory", bool),
    ("disaggregation_mode", "--disaggregation-mode", lambda v: v not in (None, "null")),
    ("speculative_use_rejection_sampling", "--speculative-use-rejection-sampling", bool),
    ("enable_multi_layer_eagle", "--enable-multi-layer-eagle", bool),
    ("speculative_adaptive", "--speculative-adaptive", bool),
    ("speculative_draft_window_size", "--speculative-draft-window-size", lambda v: v is not None),
)


def is_whiflash(spec_algorithm) -> bool:
    return isinstance(spec_algorithm, WhiflashSpecAlgo)


class WhiflashSpecAlgo(CustomSpecAlgo):
    def __repr__(self) -> str:
        return f"WhiflashSpecAlgo({self.name!r})"

    def is_eagle(self) -> bool:
        return True

    def is_eagle3(self) -> bool:
        return True

    def supports_mixed_chunk(self) -> bool:
        return False

    # The scheduler calls these three for every algorithm; SGLang 0.5.23's CustomSpecAlgo lacks them.
    def need_topk(self) -> bool:
        return True

    def carries_draft_hidden_states(self) -> bool:
        return False  # prefill/decode disaggregation is not supported (validate_server_args rejects it)

    def create_future_map(self, device, req_to_token_pool, needs_cpu_seq_lens: bool = True,
                          needs_confidence_relay: bool = False):
        from sglang.srt.managers.overlap_utils import FutureMap

        return FutureMap(device, self, req_to_token_pool, needs_cpu_seq_lens, needs_confidence_relay)

    def handle_server_args(self, server_args) -> None:
        resolve_server_args(server_args)


def validate_server_args(server_args) -> None:
    """Reject what WHIFLASH cannot serve, naming the flag."""
    if not server_args.speculative_draft_model_path:
        raise WhiFlashError("WHIFLASH needs --speculative-draft-model-path: the EAGLE-3 drafter (the DFlash drafter "
                            "comes from WHIFLASH_CONFIG)")
    for name, flag, in_use in UNSUPPORTED:
        value = getattr(server_args, name, None)
        if in_use(value):
            raise WhiFlashError(f"WHIFLASH does not support {flag} (got {value!r}); drop the flag")


def _draft_config(path: str, server_args):
    from sglang.srt.utils.hf_transformers.config import get_config

    try:
        return get_config(path, trust_remote_code=server_args.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any failure to read the config is the same user error
        raise WhiFlashError(f"cannot read the drafter config at {path}: {type(exc).__name__}: {exc}") from exc


def _check_eagle3(server_args) -> None:
    path = server_args.speculative_draft_model_path
    architectures = getattr(_draft_config(path, server_args), "architectures", None) or []
    if not any("Eagle3" in a for a in architectures):
        raise WhiFlashError(f"--speculative-draft-model-path {path} holds {architectures}, not an EAGLE-3 drafter "
                            f"(e.g. LlamaForCausalLMEagle3); the DFlash drafter goes in WHIFLASH_CONFIG's dflash_path")


def _dflash_block_size(settings, server_args) -> int:
    from sglang.srt.speculative.dflash_utils import parse_dflash_draft_config

    hf_config = _draft_config(settings.dflash_path, server_args)
    architectures = getattr(hf_config, "architectures", None) or []
    if not any(a in DFLASH_ARCHITECTURES for a in architectures):
        raise WhiFlashError(f"WHIFLASH_CONFIG dflash_path {settings.dflash_path} holds {architectures}, not a DFlash "
                            f"drafter ({', '.join(DFLASH_ARCHITECTURES)})")
    checkpoint = parse_dflash_draft_config(draft_hf_config=hf_config).resolve_block_size(default=None)
    flag = server_args.speculative_dflash_block_size
    if settings.dflash_block_size and flag and settings.dflash_block_size != flag:
        raise WhiFlashError(f"--speculative-dflash-block-size {flag} differs from WHIFLASH_CONFIG dflash_block_size "
                            f"{settings.dflash_block_size}; set one of them")
    return settings.dflash_block_size or flag or checkpoint or 16


def resolve_server_args(server_args) -> None:
    """Settle every field WHIFLASH depends on, and publish its own settings to the processes spawned later.

    SGLang hands this a recording stand-in: reads see the resolution so far, writes are declared as resolutions."""
    from whiflash_sgl.policies import load_policy

    settings = settings_from_env()
    load_policy(settings.policy, settings.policy_params)  # an unknown policy or bad parameters fail here, at launch
    _check_eagle3(server_args)
    block_size = _dflash_block_size(settings, server_args)
    shape = resolve_tree_shape(block_size, server_args.speculative_num_draft_tokens,
                               server_args.speculative_num_steps, server_args.speculative_eagle_topk)
    server_args.speculative_num_draft_tokens = shape.width
    server_args.speculative_num_steps = shape.steps
    server_args.speculative_eagle_topk = shape.topk
    server_args.speculative_dflash_block_size = block_size
    if not server_args.disable_overlap_schedule:
        log.info("WHIFLASH runs with the overlap schedule off")
        server_args.disable_overlap_schedule = True
    if server_args.enable_mixed_chunk:
        log.warning("mixed chunked prefill is disabled: WHIFLASH does not support it")
        server_args.enable_mixed_chunk = False
    if server_args.max_running_requests is None:
        server_args.max_running_requests = DEFAULT_MAX_RUNNING_REQUESTS
    publish(replace(settings, dflash_block_size=block_size))
