"""SGLang 0.5.23's own CPU engine on any x86/arm CPU: the workarounds it needs beside the ``sgl_kernel`` stand-in.

SGLang serves on CPU (``SGLANG_USE_CPU_ENGINE=1 --device cpu``, attention backend ``intel_amx``) through
``sgl_kernel`` CPU ops. No wheel of them exists for a machine like ours, so ``sgl_kernel_cpu/`` supplies them in
pure PyTorch. A few things in SGLang itself still stand in the way; this module is the one place that works around
them, each as a ``Workaround``: which SGLang module it touches, the source text there that makes it necessary
(``evidence``; ``tests/test_sglang_cpu_engine.py`` fails as soon as an SGLang release changes it, so an upgrade tells
us which workaround to revisit), and the change, applied right after SGLang imports that module.

Why patches and not only an out-of-tree platform plugin (``sglang.srt.platforms``): SGLang asks a platform whether it
supports DFLASH and which draft attention backend to use only when the platform is out of tree, and an out-of-tree
platform also flips two dozen other branches of the CPU engine off its tested path (``direct_register_custom_op``
registers its ops for ``PrivateUse1`` instead of the CPU, the rotary embedding leaves its CPU kernel, the KV pool
configurator refuses the pool). So only the speculative argument handler sees the CPU platform as out of tree
(``_SpeculativeCpuPlatform``), answering exactly the questions SGLang's platform interface defines.

``activate()`` runs in every Python process of the venv through a ``.pth`` file that ``launch/install_sglang_cpu.sh``
writes (SGLang captures the AMX check at import, in each process it spawns, before any plugin loads), and does
nothing unless ``SGLANG_USE_CPU_ENGINE=1`` and the stand-in is the installed ``sgl_kernel``.
"""

from __future__ import annotations

import importlib.abc
import importlib.metadata
import os
import sys
from dataclasses import dataclass
from typing import Callable

STANDIN_DISTRIBUTION = "whiflash-sgl-kernel-cpu"
SPECULATIVE_ALGORITHMS = ("EAGLE", "EAGLE3", "DFLASH", "NGRAM", "WHIFLASH")
DRAFT_ATTENTION_BACKEND = "intel_amx"


@dataclass(frozen=True)
class Workaround:
    module: str  # the SGLang module it changes, patched right after it is imported
    evidence: str  # source text of that module which makes the workaround necessary
    why: str
    apply: Callable  # apply(module)


def _report_amx(module) -> None:
    module.is_amx_tile_supported = True


def _cpu_platform_for_speculation(module) -> None:
    if not isinstance(module.current_platform, _SpeculativeCpuPlatform):
        module.current_platform = _SpeculativeCpuPlatform(module.current_platform)


def _intel_amx_drafts(module) -> None:
    if DRAFT_ATTENTION_BACKEND not in module.DRAFT_ATTENTION_BACKEND_CHOICES:
        module.add_draft_attention_backend_choices([DRAFT_ATTENTION_BACKEND])


def _chain_tree_topk(module) -> None:
    if not hasattr(module.DFlashVerifyInput, "tree_topk"):
        module.DFlashVerifyInput.tree_topk = 1


def _intel_amx_deterministic(module) -> None:
    if DRAFT_ATTENTION_BACKEND not in module.DETERMINISTIC_ATTENTION_BACKEND_CHOICES:
        module.add_deterministic_attention_backend_choices([DRAFT_ATTENTION_BACKEND])


def _wrap_once(owner, name: str, wrap: Callable) -> None:
    """Replace ``owner.name`` by ``wrap(original)``, once however often a workaround is applied."""
    original = getattr(owner, name)
    if getattr(original, "_whiflash_cpu", False):
        return
    wrapper = wrap(original)
    wrapper._whiflash_cpu = True
    setattr(owner, name, wrapper)


def _cpu_record_stream(module) -> None:
    import torch

    def wrap(original):
        def record_stream(tensor, stream):
            if tensor.device.type != "cpu":
                original(tensor, stream)

        return record_stream

    _wrap_once(torch.Tensor, "record_stream", wrap)


def _plain_dflash_qk_norm_rope(module) -> None:
    def wrap(original):
        def __init__(self, *args, **kwargs):
            original(self, *args, **kwargs)
            self.use_table_qk_norm_rope = False

        return __init__

    _wrap_once(module.DFlashAttention, "__init__", wrap)


def _embeds_in_model_dtype(module) -> None:
    def wrap(original):
        def _extend_forward_kwargs(self, forward_batch, pp_proxy_tensors):
            kwargs = original(self, forward_batch, pp_proxy_tensors)
            if "input_embeds" in kwargs and forward_batch.input_embeds is not None:
                kwargs["input_embeds"] = forward_batch.input_embeds.to(self.dtype)
            return kwargs

        return _extend_forward_kwargs

    _wrap_once(module.ModelRunner, "_extend_forward_kwargs", wrap)


def _no_batch_invariant_kernels_on_cpu(module) -> None:
    def wrap(original):
        def maybe_enable_batch_invariant_mode(self):
            if str(self.device).split(":")[0] != "cpu":
                original(self)

        return maybe_enable_batch_invariant_mode

    _wrap_once(module.ModelRunner, "maybe_enable_batch_invariant_mode", wrap)


def _eager_seeded_multinomial(module) -> None:
    compiled = module.multinomial_with_seed
    module.multinomial_with_seed = getattr(compiled, "_torchdynamo_orig_callable", compiled)


WORKAROUNDS = (
    Workaround("sglang.srt.utils.common", "is_amx_tile_supported = torch.cpu._is_amx_tile_supported()",
               "SGLang's CPU kernels (norms, rope, packed linears, intel_amx attention, store_cache) are all gated on "
               "AMX tiles; the stand-in serves them on any CPU, so report tiles present", _report_amx),
    Workaround("sglang.srt.arg_groups.speculative_hook",
               'cfg.device.startswith("cuda") or cfg.device == "npu" or cfg.device == "xpu"',
               "_handle_dflash refuses DFLASH on an in-tree cpu platform, and the DFLASH draft attention backend "
               "falls back to flashinfer there; only an out-of-tree platform is asked", _cpu_platform_for_speculation),
    Workaround("sglang.srt.arg_groups.choices", "add_draft_attention_backend_choices = ",
               "SGLang's extension point for draft attention backends: the DFLASH draft worker falls back to "
               "flashinfer for any backend missing from that list, and the CPU's intel_amx is missing", _intel_amx_drafts),
    Workaround("sglang.srt.speculative.dflash_info", "class DFlashVerifyInput",
               "the intel_amx backend reads spec_info.tree_topk in TARGET_VERIFY (1 = a chain, no tree mask), which "
               "DFlashVerifyInput lacks (a no-op once SGLang adds it)", _chain_tree_topk),
    Workaround("sglang.srt.speculative.dflash_worker_v2", "batch.seq_lens.record_stream(",
               "DFlashWorkerV2.forward_batch_generation calls Tensor.record_stream unguarded, which rejects CPU "
               "tensors; a stream has nothing to record on a CPU tensor", _cpu_record_stream),
    Workaround("sglang.srt.model_executor.model_runner",
               'kwargs["input_embeds"] = forward_batch.input_embeds.bfloat16()',
               "ModelRunner._extend_forward_kwargs casts given input embeddings to bf16 whatever the model's dtype, so "
               "a float32 server's DFlash draft block (embedded by the worker) meets float32 weights as bf16; cast "
               "to the runner's dtype instead (float32 is what keeps greedy output identical on CPU)",
               _embeds_in_model_dtype),
    Workaround("sglang.srt.arg_groups.choices", "add_deterministic_attention_backend_choices = (",
               "--enable-deterministic-inference (the only mode in which SGLang samples with the request's seed) "
               "refuses every attention backend outside DETERMINISTIC_ATTENTION_BACKEND_CHOICES, which lacks the "
               "CPU's intel_amx; the stand-in's attention gives the same result for the same input on every run",
               _intel_amx_deterministic),
    Workaround("sglang.srt.model_executor.model_runner",
               "from sglang.srt.batch_invariant_ops import enable_batch_invariant_mode",
               "with deterministic inference ModelRunner registers Triton matmul/log-softmax/mean kernels for the "
               "accelerator's dispatch key (get_dispatch_device_backend() raises on CPU); they have no CPU meaning, "
               "so the CPU's own ATen kernels stay", _no_batch_invariant_kernels_on_cpu),
    Workaround("sglang.srt.layers.sampler",
               "@torch.compile(dynamic=True, disable=is_npu())\ndef multinomial_with_seed(",
               "the seeded Gumbel-max draw is torch.compile'd: on CPU inductor builds C++ for it at the first "
               "sampled request of each scheduler process (6 s on 2 cores, more under load) and is no faster after; "
               "eager PyTorch draws the same tokens", _eager_seeded_multinomial),
    Workaround("sglang.srt.models.dflash", "self.use_table_qk_norm_rope = (",
               "DFlashAttention takes a Triton kernel (table_qk_norm_rope_) for bf16 q/k norm + rope on every "
               "non-NPU device; on CPU the plain RMSNorm + rotary path runs instead", _plain_dflash_qk_norm_rope),
)


class _SpeculativeCpuPlatform:
    """SGLang's CPU platform, answering the speculative questions of ``sglang.srt.platforms.interface`` as an
    out-of-tree platform would; everything else is the CPU platform's own."""

    def __init__(self, platform):
        self._platform = platform

    def __getattr__(self, name):
        return getattr(self._platform, name)

    def is_out_of_tree(self) -> bool:
        return True

    def supports_speculative_algorithm(self, algorithm: str) -> bool:
        return algorithm.upper() in SPECULATIVE_ALGORITHMS

    def supports_speculative_draft_attention_backend(self, algorithm: str, backend: str) -> bool:
        return backend == DRAFT_ATTENTION_BACKEND

    def get_default_speculative_draft_attention_backend(self, algorithm: str) -> str:
        return DRAFT_ATTENTION_BACKEND


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs each workaround right after its module executes, whoever imports it first."""

    def __init__(self, workarounds):
        self._by_module = {}
        for w in workarounds:
            self._by_module.setdefault(w.module, []).append(w)

    def find_spec(self, name, path=None, target=None):
        if name not in self._by_module:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        execute, workarounds = spec.loader.exec_module, self._by_module[name]

        def exec_module(module):
            execute(module)
            for w in workarounds:
                w.apply(module)

        spec.loader.exec_module = exec_module
        return spec


def standin_installed() -> bool:
    try:
        importlib.metadata.distribution(STANDIN_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def enabled(environ=os.environ) -> bool:
    return environ.get("SGLANG_USE_CPU_ENGINE") == "1" and standin_installed()


def install_workarounds() -> None:
    """Apply every workaround: now to modules already imported, on import to the rest (idempotent)."""
    from whiflash_sgl.sglang import torchvision_stub

    torchvision_stub.install()
    if any(isinstance(f, _AfterImport) for f in sys.meta_path):
        return
    for w in WORKAROUNDS:
        if w.module in sys.modules:
            w.apply(sys.modules[w.module])
    pending = [w for w in WORKAROUNDS if w.module not in sys.modules]
    sys.meta_path.insert(0, _AfterImport(pending))


def activate() -> None:
    """The ``.pth`` entry: install the workarounds in a CPU-engine process that has the stand-in."""
    if enabled():
        install_workarounds()
