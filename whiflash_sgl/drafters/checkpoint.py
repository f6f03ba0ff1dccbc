"""Drafter checkpoints: HF-style folders (``config.json`` + ``model.safetensors``) that SGLang's loaders also read.

Saving stores bf16 weights (the committed drafters stay small) and, under ``config.json["whiflash"]``, what the
drafter was trained against: the target's layer count, hidden size, vocabulary size and a fingerprint of its
tokenizer. Loading checks all of them against the target in hand and names both sides when they differ.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, Qwen3Config

from whiflash_sgl.drafters.dflash import DFlashModel
from whiflash_sgl.drafters.eagle3 import Eagle3Model
from whiflash_sgl.errors import WhiFlashError
from whiflash_sgl.model_store import WEIGHTS_DIR

KINDS = {"eagle3": ("LlamaForCausalLMEagle3", LlamaConfig, Eagle3Model),
         "dflash": ("DFlashDraftModel", Qwen3Config, DFlashModel)}


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def _target_fields(target_config) -> dict:
    keys = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
            "max_position_embeddings", "rope_parameters", "hidden_act")
    return {k: getattr(target_config, k) for k in keys if getattr(target_config, k, None) is not None}


def eagle3_config(target, draft_vocab_size: int, aux_layer_ids: list[int]) -> LlamaConfig:
    """One Llama layer shaped like the target's, over a reduced vocabulary."""
    tc = target.config
    return LlamaConfig(
        **_target_fields(tc), intermediate_size=tc.intermediate_size, num_hidden_layers=1,
        vocab_size=tc.vocab_size, draft_vocab_size=draft_vocab_size, target_hidden_size=tc.hidden_size,
        tie_word_embeddings=False, architectures=[KINDS["eagle3"][0]],
        eagle_config={"eagle_aux_hidden_state_layer_ids": list(aux_layer_ids)},
    )


def dflash_config(target, num_layers: int, block_size: int, target_layer_ids: list[int],
                  mask_token_id: int) -> Qwen3Config:
    """``num_layers`` Qwen3-style layers shaped like the target's."""
    tc = target.config
    return Qwen3Config(
        **_target_fields(tc), intermediate_size=tc.intermediate_size, num_hidden_layers=num_layers,
        vocab_size=tc.vocab_size, target_hidden_size=tc.hidden_size, tie_word_embeddings=False,
        architectures=[KINDS["dflash"][0]], num_target_layers=tc.num_hidden_layers,
        dflash_config={"block_size": block_size, "target_layer_ids": list(target_layer_ids),
                       "mask_token_id": mask_token_id,
                       "mask_token": target.tokenizer.convert_ids_to_tokens(mask_token_id)},
    )


def save_drafter(model: torch.nn.Module, path: str | Path, target, extra: dict | None = None) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config["whiflash"] = {
        "target": target.name,
        "target_num_layers": target.config.num_hidden_layers,
        "target_hidden_size": target.config.hidden_size,
        "target_vocab_size": target.config.vocab_size,
        "target_tokenizer": tokenizer_fingerprint(target.tokenizer),
        **(extra or {}),
    }
    (path / "config.json").write_text(json.dumps(config, indent=1, default=str))
    state = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous()
             for k, v in model.state_dict().items() if "rotary_emb" not in k}
    save_file(state, str(path / "model.safetensors"))


def _check_against_target(kind: str, path: Path, config, target) -> None:
    tc = target.config
    meta = getattr(config, "whiflash", None) or {}
    pairs = [
        ("hidden size", getattr(config, "target_hidden_size", None) or config.hidden_size, tc.hidden_size),
        ("vocabulary size", config.vocab_size, tc.vocab_size),
    ]
    if "target_num_layers" in meta:
        pairs.append(("target layer count", meta["target_num_layers"], tc.num_hidden_layers))
    if "target_tokenizer" in meta and target.tokenizer is not None:
        pairs.append(("tokenizer fingerprint", meta["target_tokenizer"], tokenizer_fingerprint(target.tokenizer)))
    for what, drafter_side, target_side in pairs:
        if drafter_side != target_side:
            raise WhiFlashError(
                f"{kind} drafter {path} does not match the target {target.name}: {what} is {drafter_side} for the "
                f"drafter but {target_side} for the target; use a drafter trained for this target"
            )
    ids = (config.eagle_config["eagle_aux_hidden_state_layer_ids"] if kind == "eagle3"
           else config.dflash_config["target_layer_ids"])
    bad = [i for i in ids if not 0 <= i < tc.num_hidden_layers - 1]
    if bad:
        raise WhiFlashError(
            f"{kind} drafter {path} reads target layers {ids}, but the target {target.name} has "
            f"{tc.num_hidden_layers} layers (valid ids 0..{tc.num_hidden_layers - 2})"
        )


def load_drafter_model(kind: str, path: str | Path, target, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The draft network of ``kind`` from ``path``, checked against ``target``, in ``dtype`` (default: the
    target's)."""
    if kind not in KINDS:
        raise WhiFlashError(f"unknown drafter kind {kind!r}; available: {', '.join(KINDS)}")
    architecture, config_class, model_class = KINDS[kind]
    path = Path(path)
    config_file, weights_file = path / "config.json", path / "model.safetensors"
    for file in (config_file, weights_file):
        if not file.is_file():
            raise WhiFlashError(f"{kind} drafter file {file} is missing; train one with `whiflash train-drafter "
                                f"--kind {kind}` or pass the right folder")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise WhiFlashError(f"{config_file} is not valid JSON: {exc}") from exc
    if architecture not in raw.get("architectures", []):
        raise WhiFlashError(f"{path} holds a {raw.get('architectures')} model, not a {kind} drafter ({architecture})")
    config = config_class(**{k: v for k, v in raw.items() if k not in ("model_type", "transformers_version")})
    _check_against_target(kind, path, config, target)
    try:
        state = load_file(str(weights_file))
    except (SafetensorError, OSError) as exc:
        raise WhiFlashError(f"cannot read drafter weights {weights_file}: {exc}") from exc
    model = model_class(config)
    dtype = dtype or next(target.model.parameters()).dtype
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise WhiFlashError(f"{weights_file} does not fit a {kind} drafter: missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}")
    return model.to(device=target.device, dtype=dtype).eval()


def default_drafter_path(kind: str, target) -> Path | None:
    """The committed drafter for the embedded default target, if ``target`` is it."""
    path = WEIGHTS_DIR / "smollm2-135m" / kind
    if (path / "config.json").is_file():
        meta = json.loads((path / "config.json").read_text()).get("whiflash", {})
        if meta.get("target_tokenizer") == tokenizer_fingerprint(target.tokenizer):
            return path
    return None
