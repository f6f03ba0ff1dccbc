"""Hooks: what DFlash needs from the target runner when the algorithm presents itself as EAGLE-3, and the routing
report.

The target ``ModelRunner`` is built with algorithm WHIFLASH, for which only the EAGLE-3 branches of SGLang run. Four
hooks, registered with SGLang's ``HookRegistry`` (which also rebinds names other modules imported earlier):

* after ``resolve_spec_aux_hidden_state_config``: resolve the DFlash drafter's capture layers and
  layer count the way SGLang does for DFLASH, and add them to the target's config next to EAGLE-3's;
* around ``configure_aux_hidden_state_capture``: capture the union of both drafters' layers once,
  instead of the DFlash setter overwriting EAGLE-3's list, and record the layout (each drafter's columns) on the
  model as ``whiflash_aux_layout`` for the worker;
* after ``DefaultPoolConfigurator.__init__``: count the DFlash draft KV pool in the target's per-token
  budget (EAGLE-3's is already counted), so the pools fit the memory fraction;
* around ``SchedulerOutputStreamer.is_request_level_customized_info_key``: the worker's per-round routing list
  (``meta_info["spec_paradigms"]``) reaches the client whole.

Each hook changes nothing unless the runner is WHIFLASH's target runner.
"""

from __future__ import annotations

import logging

from whiflash_sgl.sglang.layout import aux_layout, cell_size_with_dflash, dflash_capture_layers, eagle3_capture_layers
from whiflash_sgl.sglang.settings import resolved_settings

log = logging.getLogger(__name__)

_RUNNER = "sglang.srt.model_executor.model_runner_components"
AUX_MODULE, AUX_NAME = f"{_RUNNER}.spec_aux_hidden_state", "resolve_spec_aux_hidden_state_config"
CAPTURE_MODULE, CAPTURE_NAME = f"{_RUNNER}.attention_backend_setup", "configure_aux_hidden_state_capture"
POOL_MODULE, POOL_NAME = "sglang.srt.model_executor.pool_configurator", "DefaultPoolConfigurator.__init__"
STREAMER_MODULE = "sglang.srt.managers.scheduler_components.output_streamer"
STREAMER_NAME = "SchedulerOutputStreamer.is_request_level_customized_info_key"
LAYOUT_ATTRIBUTE = "whiflash_aux_layout"
PARADIGMS_META_KEY = "spec_paradigms"  # meta_info: the paradigm of every verify round of a request


def add_dflash_aux_config(config, *, server_args, model_config, spec_algorithm, is_draft_worker):
    """AFTER ``resolve_spec_aux_hidden_state_config``: the DFlash half of WHIFLASH's target capture."""
    from sglang.srt.model_executor.model_runner_components.spec_aux_hidden_state import (
        SpecAuxHiddenStateConfig,
        _resolve_dflash_aux_hidden_state,
    )
    from sglang.srt.runtime_context import get_spec
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    from whiflash_sgl.sglang.spec import is_whiflash

    if is_draft_worker or not is_whiflash(spec_algorithm):
        return config
    dflash = SpecAuxHiddenStateConfig()
    with get_spec().override(speculative_draft_model_path=resolved_settings().dflash_path,
                             speculative_draft_model_revision=None):
        _resolve_dflash_aux_hidden_state(config=dflash, server_args=server_args, model_config=model_config,
                                         spec_algorithm=SpeculativeAlgorithm.DFLASH, is_draft_worker=False)
    # Only the DFlash fields: draft_model_config / draft_kv_num_layers stay EAGLE-3's (they size its private pool).
    config.dflash_use_aux_hidden_state = True
    config.dflash_target_layer_ids = dflash.dflash_target_layer_ids
    config.dflash_draft_num_layers = dflash.dflash_draft_num_layers
    return config


def capture_union(original, *, model, eagle_use_aux_hidden_state, eagle_aux_hidden_state_layer_ids,
                  dflash_use_aux_hidden_state, dflash_target_layer_ids, is_dspark):
    """AROUND ``configure_aux_hidden_state_capture``: one capture list holding both drafters' layers.

    Only WHIFLASH's target config has both kinds of capture switched on (``add_dflash_aux_config`` does it);
    everything else goes to SGLang unchanged."""
    if not (eagle_use_aux_hidden_state and dflash_use_aux_hidden_state) or is_dspark:
        return original(model=model, eagle_use_aux_hidden_state=eagle_use_aux_hidden_state,
                        eagle_aux_hidden_state_layer_ids=eagle_aux_hidden_state_layer_ids,
                        dflash_use_aux_hidden_state=dflash_use_aux_hidden_state,
                        dflash_target_layer_ids=dflash_target_layer_ids, is_dspark=is_dspark)
    num_layers = model.config.num_hidden_layers
    layout = aux_layout(eagle3_capture_layers(eagle_aux_hidden_state_layer_ids, num_layers),
                        dflash_capture_layers(dflash_target_layer_ids), num_layers)
    if not hasattr(model, "set_eagle3_layers_to_capture"):
        raise ValueError(f"Model {model.__class__.__name__} does not implement set_eagle3_layers_to_capture, "
                         "which WHIFLASH's aux hidden-state capture requires")
    model.set_eagle3_layers_to_capture(layout.hf_layer_ids)
    setattr(model, LAYOUT_ATTRIBUTE, layout)
    log.info("WHIFLASH target captures before layers %s; EAGLE-3 reads columns %s, DFlash %s",
             list(layout.capture), list(layout.eagle3_columns), list(layout.dflash_columns))
    return None


def count_dflash_pool(_result, self, kvc):
    """AFTER ``DefaultPoolConfigurator.__init__``: the DFlash draft pool's bytes per token in the target's cell."""
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.mem_cache.draft_kv_budget import resolve_dflash_draft_cell_size

    from whiflash_sgl.sglang.spec import is_whiflash

    layers = kvc.spec_aux_config.dflash_draft_num_layers
    if kvc.is_draft_worker or not is_whiflash(kvc.spec_algorithm) or not layers:
        return None
    draft_config = ModelConfig.from_server_args(kvc.server_args, model_path=resolved_settings().dflash_path,
                                                is_draft_model=True)
    exact = resolve_dflash_draft_cell_size(draft_model_config=draft_config, draft_num_layers=int(layers),
                                           attn_tp_size=kvc.draft_attn_tp_size)
    before = self._cell_size
    self._cell_size = cell_size_with_dflash(before, kvc.layer_info.num_effective_layers, int(layers), exact)
    log.info("WHIFLASH KV budget: %d -> %d bytes per token with the DFlash draft pool", before, self._cell_size)
    return None


def paradigms_per_request(original, self, key):
    """AROUND ``SchedulerOutputStreamer.is_request_level_customized_info_key``: the routing list is one entry per
    verify round, not per token, so SGLang must send it whole (at the end, or with a stream's first chunk) instead
    of slicing it by token offsets."""
    return key == PARADIGMS_META_KEY or original(self, key)


HOOKS = ((AUX_MODULE, AUX_NAME, add_dflash_aux_config, "AFTER"),
         (CAPTURE_MODULE, CAPTURE_NAME, capture_union, "AROUND"),
         (POOL_MODULE, POOL_NAME, count_dflash_pool, "AFTER"),
         (STREAMER_MODULE, STREAMER_NAME, paradigms_per_request, "AROUND"))


def register_hooks() -> None:
    """Register the hooks whose target modules import here.

    A module that cannot be imported (a CPU-only SGLang without torchvision, say) cannot be served from either, so
    its hook is skipped with one warning instead of SGLang logging a traceback for it."""
    import importlib

    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    skipped = []
    for module, name, hook, kind in HOOKS:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            skipped.append(f"{name} ({exc})")
            continue
        HookRegistry.register(f"{module}.{name}", hook, HookType[kind])
    if skipped:
        log.warning("WHIFLASH target hooks not installed, so this SGLang install can resolve arguments but not serve: "
                    "%s", "; ".join(skipped))
