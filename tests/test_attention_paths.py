"""``<method>@<attention>``: the target's attention during that method's generations is the path named, and only
then."""

from __future__ import annotations

import json

import pytest

import whiflash_sgl.target as target_module
from whiflash_sgl.config import WhiFlashConfig
from whiflash_sgl.errors import WhiFlashError
from whiflash_sgl.kernels import ReferencePlan, available_backends, get_backend
from whiflash_sgl.kernels.cpu_backend import CpuPlan
from whiflash_sgl.methods import make_method
from whiflash_sgl.sampling import SamplingParams
from whiflash_sgl.target import Target


@pytest.fixture
def attention_calls(monkeypatch):
    """Counts of the attention computations the target makes, by path: ``direct`` (``tree_attention`` on HF's
    layout), ``reference`` and ``cpu`` (a plan of that backend). The real functions still compute the result."""
    calls = {"direct": 0, "reference": 0, "cpu": 0}
    direct, reference_run, cpu_run = target_module.tree_attention, ReferencePlan.run, CpuPlan.run

    def counted_direct(*args, **kwargs):
        calls["direct"] += 1
        return direct(*args, **kwargs)

    def counted_reference(self, *args, **kwargs):
        calls["reference"] += 1
        return reference_run(self, *args, **kwargs)

    def counted_cpu(self, *args, **kwargs):
        calls["cpu"] += 1
        return cpu_run(self, *args, **kwargs)

    monkeypatch.setattr(target_module, "tree_attention", counted_direct)
    monkeypatch.setattr(ReferencePlan, "run", counted_reference)
    monkeypatch.setattr(CpuPlan, "run", counted_cpu)
    return calls


CPU_PATHS = ("reference", "direct") + (("cpu",) if "cpu" in available_backends() else ())


@pytest.mark.parametrize("base", ["vanilla", "ngram"])
def test_the_named_path_computes_attention_and_outputs_agree(looping_target, prompt_ids, attention_calls, base):
    target = looping_target
    config = WhiFlashConfig(ngram_width=2)  # ngram drafts trees: masked verify rows on both paths
    before = target.attention, target._backend
    target.set_attention("direct")  # the target's own path differs from one of the two named below
    try:
        saved_backend = target._backend
        outputs = {}
        for path in CPU_PATHS:
            method = make_method(f"{base}@{path}", target, config)
            attention_calls.update(direct=0, reference=0, cpu=0)
            outputs[path] = method.generate(prompt_ids, 32, SamplingParams(), 0)
            assert attention_calls[path] > 0 and sum(attention_calls.values()) == attention_calls[path]
            assert (target.attention, target._backend) == ("direct", saved_backend)  # restored after the run
        assert all(outputs[path].tokens == outputs["direct"].tokens for path in CPU_PATHS)
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
    expected = get_backend("auto", "cpu", tiny_target._heads["head_dim"]).name  # the kernel where it runs
    assert attention_calls[expected] > 0 and sum(attention_calls.values()) == attention_calls[expected]


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
                                            r".*or use eagle3@reference, eagle3@cpu, eagle3@direct"):
        make_method("eagle3@flashinfer", target, config)
    assert (target.attention, target._backend) == before
