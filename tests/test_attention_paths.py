"""``<method>@<attention>``: the target's attention during that method's generations is the path named, and only
then."""

from __future__ import annotations

import json

import pytest

import whiflash_sgl.target as target_module
from whiflash_sgl.config import WhiFlashConfig
from whiflash_sgl.errors import WhiFlashError
from whiflash_sgl.kernels import ReferencePlan, available_backends
from whiflash_sgl.methods import make_method
from whiflash_sgl.sampling import SamplingParams
from whiflash_sgl.target import Target


@pytest.fixture
def attention_calls(monkeypatch):
    """Counts of the attention computations the target makes, by path: ``direct`` (``tree_attention`` on HF's
    layout) and ``reference`` (a plan of the reference backend). The real functions still compute the result."""
    calls = {"direct": 0, "reference": 0}
    direct, reference_run = target_module.tree_attention, ReferencePlan.run

    def counted_direct(*args, **kwargs):
        calls["direct"] += 1
        return direct(*args, **kwargs)

    def counted_reference(self, *args, **kwargs):
        calls["reference"] += 1
        return reference_run(self, *args, **kwargs)

    monkeypatch.setattr(target_module, "tree_attention", counted_direct)
    monkeypatch.setattr(ReferencePlan, "run", counted_reference)
    return calls


@pytest.mark.parametrize("base", ["vanilla", "ngram"])
def test_the_named_path_computes_attention_and_outputs_agree(looping_target, prompt_ids, attention_calls, base):
    target = looping_target
    config = WhiFlashConfig(ngram_width=2)  # ngram drafts trees: masked verify rows on both paths
    before = target.attention, target._backend
    target.set_attention("direct")  # the target's own path differs from one of the two named below
    try:
        saved_backend = target._backend
        outputs = {}
        for path in ("reference", "direct"):
            method = make_method(f"{base}@{path}", target, config)
            attention_calls.update(direct=0, reference=0)
            outputs[path] = method.generate(prompt_ids, 32, SamplingParams(), 0)
            other = "direct" if path == "reference" else "reference"
            assert attention_calls[path] > 0 and attention_calls[other] == 0, attention_calls
            assert (target.attention, target._backend) == ("direct", saved_backend)  # restored after the run
        assert outputs["direct"].tokens == outputs["reference"].tokens
        assert len(outputs["direct"].tokens) == 32
        if base == "ngram":
            assert outputs["reference"].tau > 1  # drafts were verified, not only single rows
    finally:
        target.attention, target._backend = before


def test_without_a_path_the_target_keeps_its_own(tiny_target, prompt_ids, attention_calls):
    method = make_method("vanilla", tiny_target)
    assert method.attention is None
    before = tiny_target.attention, tiny_target._backend
    method.generate(prompt_ids, 4, SamplingParams(), 0)
    assert (tiny_target.attention, tiny_target._backend) == before
    assert attention_calls["reference"] > 0 and attention_calls["direct"] == 0  # auto on a CPU: the reference


def test_the_path_is_restored_when_a_generation_fails(tiny_target, prompt_ids):
    method = make_method("vanilla@direct", tiny_target)
    before = tiny_target.attention, tiny_target._backend

    def fail(_text):
        raise RuntimeError("client went away")

    with pytest.raises(RuntimeError, match="client went away"):
        method.generate(prompt_ids, 8, SamplingParams(), 0, on_text=fail)
    assert (tiny_target.attention, tiny_target._backend) == before


@pytest.mark.skipif("flashinfer" in available_backends(), reason="flashinfer can run on this machine")
def test_an_unavailable_path_fails_when_the_method_is_made(served_dir):
    target = Target.load(str(served_dir / "model"), pack=False)
    config = WhiFlashConfig(**json.loads((served_dir / "whiflash.json").read_text()))
    assert make_method("eagle3@reference", target, config).attention == "reference"
    before = target.attention, target._backend
    with pytest.raises(WhiFlashError, match=r"eagle3@flashinfer: .*flashinfer.*pip install flashinfer-python"
                                            r".*or use eagle3@reference, eagle3@direct"):
        make_method("eagle3@flashinfer", target, config)
    assert (target.attention, target._backend) == before
