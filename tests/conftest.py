"""Tiny real models built in-process: a byte-level BPE tokenizer trained on a few lines, a 2-layer Llama."""

from __future__ import annotations

import os
import time

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


def save_random_drafters(target: Target, root) -> None:
    """Randomly initialised drafters for ``target`` in ``root/eagle3`` (EAGLE-3 over a draft vocabulary of the first
    128 tokens, so with d2t/t2d maps) and ``root/dflash`` (one layer, blocks of 5, ``<|endoftext|>`` as mask)."""
    from whiflash_sgl.drafters.checkpoint import dflash_config, eagle3_config, save_drafter
    from whiflash_sgl.drafters.dflash import DFlashModel
    from whiflash_sgl.drafters.eagle3 import Eagle3Model
    from whiflash_sgl.train.eagle3 import set_vocabulary
    from whiflash_sgl.train.train_drafter import default_layer_ids

    layer_ids = default_layer_ids(target.config.num_hidden_layers)
    torch.manual_seed(3)
    eagle = Eagle3Model(eagle3_config(target, 128, layer_ids))
    set_vocabulary(eagle, torch.arange(128))
    save_drafter(eagle, root / "eagle3", target)
    mask_id = target.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    save_drafter(DFlashModel(dflash_config(target, 1, 5, layer_ids, mask_id)), root / "dflash", target)


@pytest.fixture(scope="session")
def random_drafters():
    """``random_drafters(target, root)``: see :func:`save_random_drafters`."""
    return save_random_drafters


@pytest.fixture(scope="session")
def served_dir(tmp_path_factory, tiny_tokenizer):
    """An HF folder of a 6-layer tiny Llama, randomly initialised EAGLE-3 and DFlash drafters for it, and a
    WhiFlash config naming them. Small initial weights make the target fall into loops that the n-gram paradigm
    drafts well, so speculation accepts tokens even with untrained drafters."""
    import json

    root = tmp_path_factory.mktemp("served")
    model = make_tiny_model(len(tiny_tokenizer), num_hidden_layers=6, initializer_range=0.02)
    model.save_pretrained(root / "model")
    tiny_tokenizer.save_pretrained(root / "model")
    save_random_drafters(Target(model, tiny_tokenizer, name="tiny-served"), root)
    (root / "whiflash.json").write_text(json.dumps({
        "eagle3_path": str(root / "eagle3"), "dflash_path": str(root / "dflash"),
        "eagle3_depth": 3, "eagle3_topk": 2, "eagle3_budget": 6,
    }))
    return root


@pytest.fixture(scope="session")
def server(served_dir):
    """The embedded server (WhiFlash, heuristic policy) on a free loopback port, in a thread of this process."""
    from whiflash_sgl.server.launch import start_background
    from whiflash_sgl.server.model import ServedModel
    from whiflash_sgl.server.service import Service

    model = ServedModel.load(str(served_dir / "model"), "WHIFLASH", "heuristic", str(served_dir / "whiflash.json"),
                             served_name="tiny")
    running = start_background(Service(model, max_waiting=64))
    yield running
    running.stop()


REQUIRE_SERVER_ENV = "WHIFLASH_REQUIRE_SGLANG_SERVER"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With WHIFLASH_REQUIRE_SGLANG_SERVER=1 (.ci/run sets it) a skipped sglang_server test is a failure: CI installs
    SGLang and the stand-in, so a skip there means the real-server tests silently stopped running."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get(REQUIRE_SERVER_ENV) == "1" and item.get_closest_marker("sglang_server"):
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid} skipped, but {REQUIRE_SERVER_ENV}=1 requires it to run: {report.longrepr}"


def _verify_logits(target: Target, prefix: list[int], root: int, tree) -> torch.Tensor:
    """The target's logits at the verify rows of ``tree`` below ``root`` after ``prefix``: two forwards through
    ``Target.forward`` on pool slots, freed afterwards."""
    from whiflash_sgl.target import Chunk

    pool = target.pool
    region = pool.reserve(len(prefix) + len(tree) + 1)
    cached, rows = region.alloc(len(prefix)), region.alloc(len(tree) + 1)
    try:
        target.forward([Chunk(list(prefix), torch.arange(len(prefix)), cached[:0], cached)])
        mask = None if tree.is_chain else tree.ancestor_mask()
        verify = Chunk([root, *tree.tokens], tree.positions(len(prefix)), cached, rows, mask, logits=len(tree) + 1)
        return target.forward([verify])[0].logits
    finally:
        pool.release(region)


@pytest.fixture(scope="session")
def verify_logits():
    """``verify_logits(target, prefix, root, tree)``: see :func:`_verify_logits`."""
    return _verify_logits


def _wait_until(condition, timeout: float = 10) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture(scope="session")
def wait_until():
    """``wait_until(condition, timeout=10)``: see :func:`_wait_until`."""
    return _wait_until


@pytest.fixture
def prompts(tmp_path):
    """A three-prompt JSONL set for bench runs (categories code, chat, code)."""
    import json

    path = tmp_path / "prompts.jsonl"
    rows = [{"id": f"p{i}", "category": c,
             "messages": [{"role": "user", "content": f"def add(a, b): return a + b  # {i}"}]}
            for i, c in enumerate(["code", "chat", "code"])]
    path.write_text("\n".join(json.dumps(row) for row in rows))
    return path


@pytest.fixture
def run_cli(capsys):
    """``run_cli(*argv)``: the ``whiflash`` command in-process; returns (exit code, stdout, stderr)."""
    from whiflash_sgl.cli import main

    def run(*argv):
        code = main([str(a) for a in argv])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
