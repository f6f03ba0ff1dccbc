"""Runs in a spawned child (a fresh interpreter, as SGLang's scheduler is): what does WHIFLASH look like there?"""

from __future__ import annotations


def probe() -> dict:
    from whiflash_sgl.sglang import torchvision_stub

    torchvision_stub.install()
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    try:
        SpeculativeAlgorithm.from_string("WHIFLASH")
        before = "registered"
    except ValueError as exc:
        before = str(exc)
    from sglang.srt.plugins import load_plugins

    load_plugins()
    from sglang.srt.plugins.hook_registry import HookRegistry

    from whiflash_sgl.sglang.settings import resolved_settings

    return {"before": before, "after": repr(SpeculativeAlgorithm.from_string("WHIFLASH")),
            "settings": resolved_settings().to_json(), "patched": sorted(HookRegistry._patched)}
