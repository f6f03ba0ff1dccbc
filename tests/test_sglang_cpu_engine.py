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
