"""FlashInfer backend for CUDA, driven the way SGLang 0.5.23 drives it for EAGLE tree verification.

One ``BatchPrefillWithPagedKVCacheWrapper`` (NHD, page size 1: every KV row is a page, ``kv_indices`` the layout's
page table into a token pool or else the flat rows, ``kv_last_page_len`` all ones), planned once per batch with the
flattened boolean ``custom_mask`` (FlashInfer packs it itself with ``segment_packbits(..., bitorder="little")``),
then run once per layer. A layout without a mask plans ``causal=True``, FlashInfer's bottom-right-aligned causal, as
SGLang does for DFlash verify.

The mask is handed over unpacked on purpose: given ``packed_custom_mask`` directly, ``plan()`` keeps a *bit*-offset
``mask_indptr`` while the kernel reads it as a *byte* offset, which is only right for a single request. flashinfer is
imported when a backend is built, never at module import, so this module loads on any machine.
"""

from __future__ import annotations

import importlib.util

import torch

from .backend_api import check_plan_args
from .layout import AttentionLayout

INSTALL_HINT = "pip install flashinfer-python  (a wheel matching the installed torch/CUDA; see launch/gpu_check.sh)"


def unavailable_reason() -> str | None:
    """Why the FlashInfer backend cannot run on this machine, or None when it can."""
    if importlib.util.find_spec("flashinfer") is None:
        return f"the flashinfer backend needs the flashinfer package, which is not installed: {INSTALL_HINT}"
    if not torch.cuda.is_available():
        return "the flashinfer backend needs a CUDA device, and torch.cuda.is_available() is False here"
    try:
        import flashinfer  # noqa: F401
    except ImportError as error:
        return f"flashinfer is installed but does not import ({error}); reinstall it: {INSTALL_HINT}"
    return None


class FlashInferBackend:
    """Batched tree attention with FlashInfer's custom-mask paged prefill (fp16 / bf16, CUDA only)."""

    name = "flashinfer"

    def __init__(self, device: torch.device | str = "cuda", workspace_bytes: int = 128 << 20) -> None:
        import flashinfer

        self.device = torch.device(device)
        self._workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=self.device)
        self._wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self._workspace, kv_layout="NHD")
        self.current_plan: FlashInferPlan | None = None

    def dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float16, torch.bfloat16)

    def plan(
        self, layout: AttentionLayout, *, num_qo_heads: int, num_kv_heads: int, head_dim: int, scale: float,
        dtype: torch.dtype,
    ) -> "FlashInferPlan":
        check_plan_args(num_qo_heads, num_kv_heads, head_dim, dtype, self.dtypes())
        layout = layout.to(self.device)
        self._wrapper.plan(
            layout.qo_indptr.to(torch.int32),
            layout.kv_indptr.to(torch.int32),
            layout.key_rows().to(torch.int32),
            torch.ones(layout.batch_size, dtype=torch.int32, device=self.device),
            num_qo_heads,
            num_kv_heads,
            head_dim,
            1,
            custom_mask=layout.mask,
            causal=layout.mask is None,
            sm_scale=scale,
            q_data_type=dtype,
            kv_data_type=dtype,
        )
        self.current_plan = FlashInferPlan(self, self._wrapper)
        return self.current_plan


class FlashInferPlan:
    """A planned batch; the wrapper holds one plan at a time, so a later ``plan()`` retires this one."""

    def __init__(self, backend: FlashInferBackend, wrapper) -> None:
        self._backend, self._wrapper = backend, wrapper

    def run(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        if self._backend.current_plan is not self:
            raise RuntimeError("this plan was replaced by a later plan() on the same FlashInfer backend")
        # page size 1: [total_kv, Hkv, D] is the paged cache [num_pages, page_size=1, Hkv, D]
        return self._wrapper.run(query, (key.unsqueeze(1), value.unsqueeze(1)))
