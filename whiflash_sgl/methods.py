"""Generation methods by name: our engine with or without a drafter, and transformers' own loops as peers."""

from __future__ import annotations

import contextlib
import copy
import time
from pathlib import Path

import torch

from whiflash_sgl.config import ATTENTION_PATHS, WhiFlashConfig
from whiflash_sgl.cost_curve import COST_CURVE_FILES, CostCurve
from whiflash_sgl.cpu_linears import drafter_linears
from whiflash_sgl.drafters.checkpoint import default_drafter_path, load_drafter_model
from whiflash_sgl.drafters.dflash import DFlashDrafter
from whiflash_sgl.drafters.eagle3 import Eagle3Drafter
from whiflash_sgl.drafters.ngram import NgramDrafter
from whiflash_sgl.drafters.oracle import OracleDrafter
from whiflash_sgl.drafters.whiflash import WhiFlashDrafter
from whiflash_sgl.engine import GenerationResult, SpeculativeEngine
from whiflash_sgl.errors import WhiFlashError
from whiflash_sgl.policies import load_policy
from whiflash_sgl.router import Router
from whiflash_sgl.sampling import SamplingParams
from whiflash_sgl.target import Target

METHODS = ("vanilla", "hf-generate", "hf-prompt-lookup", "ngram", "eagle3", "dflash", "whiflash:<policy>", "oracle")


class EngineMethod:
    """Our reference engine; ``drafter=None`` is the ``vanilla`` target-only loop. ``attention`` (a path of
    ``ATTENTION_PATHS``) is the target's attention during this method's generations; None keeps the target's own."""

    def __init__(self, name: str, target: Target, drafter=None, attention: str | None = None):
        self.name, self.target, self.drafter, self.attention = name, target, drafter, attention

    def generate(self, prompt_ids, max_new_tokens, sampling: SamplingParams, seed: int, stop=(), on_text=None,
                 cancelled=None):
        engine = SpeculativeEngine(self.target, self.drafter, sampling, seed)
        with self._attention():
            return engine.generate(prompt_ids, max_new_tokens, stop=stop, on_text=on_text, cancelled=cancelled)

    def _attention(self):
        """The target on this method's attention path for one generation, restored afterwards."""
        if self.attention is None:
            return contextlib.nullcontext()
        return self.target.attention_path(self.attention)


class HFGenerateMethod:
    """transformers' ``generate`` (plain, or with ``prompt_lookup_num_tokens``) on the same weights, SDPA attention."""

    def __init__(self, name: str, target: Target, prompt_lookup_num_tokens: int | None = None):
        self.name, self.target, self.prompt_lookup = name, target, prompt_lookup_num_tokens

    @contextlib.contextmanager
    def _hf_attention(self):
        config = self.target.model.config
        saved = config._attn_implementation
        config._attn_implementation = "sdpa"
        try:
            yield
        finally:
            config._attn_implementation = saved

    def generate(self, prompt_ids, max_new_tokens, sampling: SamplingParams, seed: int, stop=(), on_text=None):
        if stop or on_text is not None:
            raise WhiFlashError(f"method {self.name} supports neither stop strings nor streaming")
        model = self.target.model
        kwargs = {"do_sample": False} if sampling.greedy else {
            "do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
        }
        if self.prompt_lookup:
            kwargs["prompt_lookup_num_tokens"] = self.prompt_lookup
        calls = 0

        def count(*_):
            nonlocal calls
            calls += 1

        torch.manual_seed(seed)
        hook = model.register_forward_pre_hook(count)
        try:
            with self._hf_attention(), torch.inference_mode():
                tic = time.perf_counter()
                out = model.generate(
                    torch.tensor([list(prompt_ids)], device=self.target.device), max_new_tokens=max_new_tokens,
                    min_new_tokens=0,
                    pad_token_id=self.target.tokenizer.pad_token_id, **kwargs,
                )
                seconds = time.perf_counter() - tic
        finally:
            hook.remove()
        tokens = out[0, len(prompt_ids):].tolist()
        finish = "eos" if tokens and tokens[-1] in self.target.eos_token_ids else "length"
        return GenerationResult(
            prompt_tokens=len(prompt_ids), tokens=tokens,
            text=self.target.tokenizer.decode(tokens, skip_special_tokens=True),
            finish_reason=finish, seconds=seconds, rounds=max(calls - 1, 0), drafted=0, verify_seconds=seconds,
        )


def _drafter_path(kind: str, configured: str, target: Target) -> str:
    if configured:
        return configured
    path = default_drafter_path(kind, target)
    if path is None:
        raise WhiFlashError(f"no {kind} drafter for target {target.name}: set {kind}_path in --config to a "
                            f"folder made by `whiflash train-drafter --kind {kind}`")
    return str(path)


def make_drafter(kind: str, target: Target, config: WhiFlashConfig = WhiFlashConfig()):
    """A drafter by paradigm name, with the settings of ``config``."""
    try:
        return _build_drafter(kind, target, config)
    except ValueError as exc:  # a drafter rejecting its settings (depth 0, block size 1, ...)
        raise WhiFlashError(f"bad {kind} settings in the config: {exc}") from exc


DRAFTER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _in_dtype(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module`` itself when it already has ``dtype``, else a converted copy (the target's stays as it is)."""
    if next(module.parameters()).dtype == dtype:
        return module
    return copy.deepcopy(module).to(dtype).requires_grad_(False)


def _build_drafter(kind: str, target: Target, config: WhiFlashConfig):
    if kind == "ngram":
        return NgramDrafter(config.ngram_max, config.ngram_min, config.ngram_tokens, config.ngram_width)
    if config.drafter_dtype not in DRAFTER_DTYPES:
        raise WhiFlashError(f"drafter_dtype must be one of {', '.join(DRAFTER_DTYPES)}, got {config.drafter_dtype!r}")
    dtype = DRAFTER_DTYPES[config.drafter_dtype]
    embed = _in_dtype(target.model.get_input_embeddings(), dtype)
    if kind == "eagle3":
        model = load_drafter_model(kind, _drafter_path(kind, config.eagle3_path, target), target, dtype)
        return Eagle3Drafter(drafter_linears(model), embed, config.eagle3_depth, config.eagle3_topk,
                             config.eagle3_budget, config.eagle3_min_prob)
    if kind == "dflash":
        model = load_drafter_model(kind, _drafter_path(kind, config.dflash_path, target), target, dtype)
        lm_head = drafter_linears(_in_dtype(target.lm_head, dtype))
        return DFlashDrafter(drafter_linears(model), embed, lm_head,
                             config.dflash_block_size or None, config.dflash_tree_topk, config.dflash_tree_budget)
    raise WhiFlashError(f"unknown drafter {kind!r}; available: ngram, eagle3, dflash")


def cost_curve(target: Target, config: WhiFlashConfig) -> CostCurve | None:
    """The cost curve ``config.cost_curve`` names for ``target``, resolved as ``WhiFlashConfig`` documents."""
    if config.cost_curve == "none":
        return None
    if config.cost_curve:
        return CostCurve.load(Path(config.cost_curve))
    committed = default_drafter_path("eagle3", target)  # present only for the embedded default target
    if committed is None or target.device.type != "cpu":
        return None
    path = committed.parent / COST_CURVE_FILES[target.matmul]
    return CostCurve.load(path) if path.is_file() else None


def _paradigms(target: Target, config: WhiFlashConfig) -> dict:
    names = [p.strip() for p in config.paradigms.split(",") if p.strip()]
    if len(names) < 2 or len(set(names)) != len(names):
        raise WhiFlashError(f"paradigms must name two or more distinct drafters, got {config.paradigms!r}")
    if config.fallback not in names:
        raise WhiFlashError(f"fallback {config.fallback!r} is not among the paradigms {names}")
    return {name: make_drafter(name, target, config) for name in names}


def make_method(name: str, target: Target, config: WhiFlashConfig = WhiFlashConfig(),
                policy_params: dict | None = None):
    """A generation method by name. ``policy_params`` are the parameters of the ``whiflash:<policy>`` policy, or,
    when every value is a mapping, per-policy parameters keyed by policy name (one file for several policies).

    ``<method>@<path>`` runs an engine method with the target's attention on another path (``direct``, ``reference``,
    ``flashinfer``, ``auto``): two paths compared in one bench run.
    """
    target.cost_curve = cost_curve(target, config)
    base, _, attention = name.partition("@")
    if not attention:
        return _make_method(name, target, config, policy_params)
    if attention not in ATTENTION_PATHS:
        raise WhiFlashError(f"unknown attention path {attention!r} in {name!r}; choose one of "
                            f"{', '.join(ATTENTION_PATHS)}")
    method = _make_method(base, target, config, policy_params)
    if not isinstance(method, EngineMethod):
        raise WhiFlashError(f"{base} does not run on this engine's attention; drop '@{attention}'")
    try:  # set up the path once now, so that a path this machine cannot run fails here, not in the first forward
        with target.attention_path(attention):
            pass
    except WhiFlashError as exc:
        others = ", ".join(f"{base}@{p}" for p in ATTENTION_PATHS if p not in (attention, "auto"))
        raise WhiFlashError(f"{name}: {exc}. Run it where that backend can run, or use {others}") from exc
    method.name, method.attention = name, attention
    return method


def _make_method(name: str, target: Target, config: WhiFlashConfig, policy_params: dict | None):
    if name == "vanilla":
        return EngineMethod(name, target)
    if name in ("ngram", "eagle3", "dflash"):
        return EngineMethod(name, target, make_drafter(name, target, config))
    if name.startswith("whiflash:"):
        if config.catch_up not in ("lazy", "eager"):
            raise WhiFlashError(f"catch_up must be 'lazy' or 'eager', got {config.catch_up!r}")
        policy_name = name.split(":", 1)[1]
        params = policy_params or {}
        if params and all(isinstance(v, dict) for v in params.values()):
            params = params.get(policy_name, {})
        policy = load_policy(policy_name, params)
        drafters = _paradigms(target, config)
        router = Router(policy, tuple(drafters), config.fallback, config.policy_deadline_ms / 1000, hedging=True,
                        curve=target.cost_curve)
        return EngineMethod(name, target, WhiFlashDrafter(drafters, router, target.tokenizer, config.catch_up))
    if name == "oracle":
        drafters = _paradigms(target, config)
        router = Router(None, tuple(drafters), config.fallback)
        return EngineMethod(name, target, OracleDrafter(drafters, router, target.tokenizer))
    if name == "hf-generate":
        return HFGenerateMethod(name, target)
    if name == "hf-prompt-lookup":
        return HFGenerateMethod(name, target, prompt_lookup_num_tokens=10)
    raise WhiFlashError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
