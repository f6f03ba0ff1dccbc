"""The CPU-engine workarounds: each still answers a line of SGLang's source, and applies where it should."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from whiflash_sgl.sglang import cpu_engine

pytest.importorskip("sglang.srt.plugins",
                    reason="SGLang is not installed; run launch/install_sglang_cpu.sh (CI does) to run these tests")


@pytest.mark.parametrize("workaround", cpu_engine.WORKAROUNDS, ids=lambda w: w.module)
def test_each_workaround_still_answers_sglang_source(workaround):
    """Fails when an SGLang release changes the code a workaround exists for: revisit that workaround then."""
    source = Path(importlib.util.find_spec(workaround.module).origin).read_text()
    assert workaround.evidence in source, f"{workaround.module} changed: {workaround.why}"


def test_workarounds_need_the_cpu_engine_and_the_standin():
    assert not cpu_engine.enabled({})
    assert cpu_engine.enabled({"SGLANG_USE_CPU_ENGINE": "1"}) == cpu_engine.standin_installed()


def test_speculative_view_answers_as_an_out_of_tree_platform_and_delegates_the_rest():
    class CpuPlatform:
        device_name = "cpu"

        def is_out_of_tree(self):
            return False

    view = cpu_engine._SpeculativeCpuPlatform(CpuPlatform())
    assert view.is_out_of_tree() and view.device_name == "cpu"
    assert view.supports_speculative_algorithm("dflash") and view.supports_speculative_algorithm("WHIFLASH")
    assert not view.supports_speculative_algorithm("DSPARK")
    assert view.get_default_speculative_draft_attention_backend("DFLASH") == "intel_amx"
    assert not view.supports_speculative_draft_attention_backend("DFLASH", "flashinfer")


def test_deterministic_inference_workarounds_apply_once_and_only_on_cpu():
    import types

    import torch

    choices = types.SimpleNamespace(DETERMINISTIC_ATTENTION_BACKEND_CHOICES=["fa3"])
    choices.add_deterministic_attention_backend_choices = choices.DETERMINISTIC_ATTENTION_BACKEND_CHOICES.extend
    cpu_engine._intel_amx_deterministic(choices)
    cpu_engine._intel_amx_deterministic(choices)
    assert choices.DETERMINISTIC_ATTENTION_BACKEND_CHOICES == ["fa3", "intel_amx"]

    def draw(x):
        return x + 1

    sampler = types.SimpleNamespace(multinomial_with_seed=torch.compile(draw, dynamic=True))
    cpu_engine._eager_seeded_multinomial(sampler)
    cpu_engine._eager_seeded_multinomial(sampler)
    assert sampler.multinomial_with_seed is draw

    class ModelRunner:
        enabled = []

        def __init__(self, device):
            self.device = device

        def maybe_enable_batch_invariant_mode(self):
            self.enabled.append(self.device)

    runner = types.SimpleNamespace(ModelRunner=ModelRunner)
    cpu_engine._no_batch_invariant_kernels_on_cpu(runner)
    cpu_engine._no_batch_invariant_kernels_on_cpu(runner)
    for device in ("cpu", "cuda:0", "cpu"):
        ModelRunner(device).maybe_enable_batch_invariant_mode()
    assert ModelRunner.enabled == ["cuda:0"]
