"""The real target (SmolLM2-135M-Instruct): greedy identity of every method. Run with ``pytest -m slow``."""

from __future__ import annotations

import pytest

from whiflash_sgl.chat import encode_chat
from whiflash_sgl.methods import METHODS, make_method
from whiflash_sgl.sampling import SamplingParams
from whiflash_sgl.target import Target

pytestmark = pytest.mark.slow

# METHODS names the routed method by its pattern; run it with every packaged policy
RUNNABLE = [m for m in METHODS if m != "whiflash:<policy>"] + [f"whiflash:{p}" for p in ("heuristic", "entropy", "mlp")]
PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number, with a docstring.",
    'Call the weather tool for Paris in JSON: {"name": "get_weather", "arguments": {...}}',
]


@pytest.fixture(scope="module")
def smollm2():
    return Target.load("smollm2-135m")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_every_method_is_greedy_identical_on_smollm2(smollm2, prompt):
    ids = encode_chat(smollm2.tokenizer, [{"role": "user", "content": prompt}])
    outputs = {m: make_method(m, smollm2).generate(ids, 64, SamplingParams(), 0).tokens for m in RUNNABLE}
    assert all(tokens == outputs["vanilla"] for tokens in outputs.values()), outputs
