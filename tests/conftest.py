"""Tiny real models built in-process: a byte-level BPE tokenizer trained on a few lines, a 2-layer Llama."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from whiflash_sgl.target import Target

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "def add(a, b):\n    return a + b\n",
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
    "The quick brown fox jumps over the lazy dog. The dog sleeps.",
    "for i in range(10):\n    print(i * i)\n",
    "Speculative decoding drafts tokens and verifies them in one pass.",
]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(vocab_size: int, seed: int = 0, **overrides):
    settings = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, eos_token_id=2, bos_token_id=1, pad_token_id=0,
        tie_word_embeddings=True, initializer_range=0.2,
    )
    config = LlamaConfig(**{**settings, **overrides})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def make_model():
    """``make_model(vocab_size, seed=0, **config_overrides)``: a tiny Llama built in-process."""
    return make_tiny_model


@pytest.fixture(scope="session")
def tiny_target(tiny_tokenizer):
    return Target(make_tiny_model(len(tiny_tokenizer)), tiny_tokenizer, name="tiny")


@pytest.fixture(scope="session")
def looping_target(tiny_tokenizer):
    """With small initial weights a random model falls into repeating loops, which n-gram lookup can draft."""
    return Target(make_tiny_model(len(tiny_tokenizer), initializer_range=0.02), tiny_tokenizer, name="looping")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model(len(tiny_tokenizer)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def prompt_ids(tiny_tokenizer):
    return tiny_tokenizer("def add(a, b):\n    return")["input_ids"]
