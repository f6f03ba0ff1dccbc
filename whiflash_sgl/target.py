"""The target model: an HF causal LM driven with our KV cache and tree-masked attention.

Attention goes through the ``whiflash`` entry of transformers' attention-function registry, so any HF causal LM
whose attention modules use that registry works. The verify mask travels as the ``whiflash_mask`` forward kwarg,
which transformers hands to the attention function untouched; HF's own mask construction is switched off for it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
from transformers.masking_utils import AttentionMaskInterface

from whiflash_sgl.config import ATTENTION_PATHS
from whiflash_sgl.errors import WhiFlashError
from whiflash_sgl.kernels import AttentionLayout, BackendUnavailableError, get_backend, tree_attention
from whiflash_sgl.kv_cache import KVCache
from whiflash_sgl.model_store import resolve_model
from whiflash_sgl.tree import DraftTree

ATTN_IMPLEMENTATION = "whiflash"


def _whiflash_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    plan = kwargs.get("whiflash_plan")
    if plan is None:
        return tree_attention(query, key, value, kwargs.get("whiflash_mask"), scaling), None
    # HF's [1, heads, rows, head_dim] to the backends' ragged NHD rows [rows, heads, head_dim], and back
    return plan.run(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1))[None], None


AttentionInterface.register(ATTN_IMPLEMENTATION, _whiflash_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, lambda *args, **kwargs: None)


@dataclass
class ForwardOut:
    logits: torch.Tensor  # [rows, V]
    hidden: torch.Tensor | None  # [rows, len(capture_layers), H]: residual stream entering each captured layer


class PackedLinear(torch.nn.Module):
    """An inference-only ``nn.Linear`` whose weight is prepacked for oneDNN's float32 inner product."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed_weight = linear.weight.detach().to_mkldnn()
        self.packed_bias = None if linear.bias is None else linear.bias.detach().to_mkldnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.mkldnn_linear(x.to_mkldnn(), self.packed_weight, self.packed_bias).to_dense()


def pack_linears(module: torch.nn.Module) -> None:
    """Swap every ``nn.Linear`` under ``module`` for a :class:`PackedLinear`.

    A verify pass is a chain of small-M GEMMs (M = the rows verified), which the default CPU GEMM handles poorly:
    on the 2-core CI machine SmolLM2's verify of 8 rows drops from 64 to 49 ms and one row from 40 to 35 ms. The
    products are the same up to float32 rounding (~1e-5), and every method on the target shares them.
    """
    for name, child in module.named_children():
        if isinstance(child, torch.nn.Linear):
            setattr(module, name, PackedLinear(child))
        else:
            pack_linears(child)


class Target:
    """A target model with one sequence's KV cache. ``capture_layers`` are HF ``hidden_states`` indices.

    ``pack=True`` prepacks the linear layers for oneDNN (float32 on a CPU only; inference only: no gradients flow
    through them). ``lm_head`` stays the model's own dense output layer, for drafters that share it."""

    def __init__(self, model, tokenizer, capture_layers: tuple[int, ...] = (), name: str = "",
                 attention: str = "auto", pack: bool = False):
        self.name = name or getattr(model.config, "_name_or_path", "")
        self.model = model.eval()
        self.lm_head = model.get_output_embeddings()
        if pack and self.device.type == "cpu" and model.dtype == torch.float32 and torch.backends.mkldnn.is_available():
            with torch.no_grad():
                pack_linears(model)
        self.tokenizer = tokenizer
        self.config = model.config
        self.model.config._attn_implementation = ATTN_IMPLEMENTATION
        self.capture_layers = tuple(capture_layers)  # HF hidden_states indices to return with every forward
        self.cache = KVCache()
        self.eos_token_ids = self._eos_ids()
        attn = next(m for m in self.model.modules() if hasattr(m, "scaling") and hasattr(m, "head_dim"))
        self._heads = dict(num_qo_heads=self.config.num_attention_heads, num_kv_heads=self.config.num_key_value_heads,
                           head_dim=attn.head_dim, scale=attn.scaling)
        self.set_attention(attention)

    def set_attention(self, name: str) -> None:
        """Route attention through backend ``name`` of ``whiflash_sgl.kernels`` (``auto``: FlashInfer on CUDA with a
        16-bit model, else the PyTorch reference) or ``direct`` (the reference on HF's layout, no planning). A path
        that cannot run here raises and leaves the target on the path it was on."""
        if name not in ATTENTION_PATHS:
            raise WhiFlashError(f"unknown attention path {name!r}; choose one of {', '.join(ATTENTION_PATHS)}")
        if name == "direct":
            self.attention, self._backend = name, None
            return
        dtype = self.model.dtype
        try:
            backend = get_backend(name, self.device)
        except BackendUnavailableError as exc:
            raise WhiFlashError(f"attention backend {name!r} cannot run here: {exc}") from exc
        if dtype not in backend.dtypes():
            if name != "auto":
                raise WhiFlashError(f"attention backend {name!r} does not compute in {dtype}; load the target in "
                                    f"one of {', '.join(map(str, backend.dtypes()))} (--dtype) or pick another")
            backend = get_backend("reference")
        self.attention, self._backend = name, backend

    @contextlib.contextmanager
    def attention_path(self, name: str):
        """Attention on path ``name`` (see :meth:`set_attention`, whose errors it raises on entry) for the body, then
        the path and backend object in use before, whatever the body raised."""
        saved = self.attention, self._backend
        self.set_attention(name)
        try:
            yield
        finally:
            self.attention, self._backend = saved

    def _plan(self, rows: int, mask: torch.Tensor | None):
        """The backend's plan for one forward of ``rows`` new rows after the cache (``mask``: ``[1, 1, rows, kv]``,
        or None for causal)."""
        kv = self.cache.get_seq_length() + rows
        layout = AttentionLayout(torch.tensor([0, rows]), torch.tensor([0, kv]),
                                 None if mask is None else mask.reshape(-1)).to(self.device)
        return self._backend.plan(layout, dtype=self.model.dtype, **self._heads)

    @classmethod
    def load(cls, name_or_path: str, capture_layers: tuple[int, ...] = (), dtype=torch.float32,
             attention: str = "auto", pack: bool = True, device: str = "cpu") -> "Target":
        path = resolve_model(name_or_path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise WhiFlashError(f"cannot load a causal LM from {path}: {exc}") from exc
        try:
            model.to(device)
        except (RuntimeError, AssertionError) as exc:  # no such device, or a torch built without it
            raise WhiFlashError(f"cannot put the model on device {device!r}: {exc}") from exc
        return cls(model, tokenizer, capture_layers, name=name_or_path, attention=attention, pack=pack)

    def _eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        for source in (self.config, getattr(self.model, "generation_config", None)):
            value = getattr(source, "eos_token_id", None)
            ids.update([value] if isinstance(value, int) else value or [])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return frozenset(ids)

    @property
    def context_length(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 1 << 30))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _forward(self, ids, positions: torch.Tensor, mask: torch.Tensor | None, keep_logits: int) -> ForwardOut:
        device = self.device
        out = self.model(
            input_ids=torch.as_tensor(ids, dtype=torch.long, device=device)[None],
            position_ids=positions.to(device)[None],
            cache=self.cache,
            use_cache=True,
            whiflash_mask=None if mask is None else mask.to(device),
            whiflash_plan=None if self._backend is None else self._plan(len(ids), mask),
            output_hidden_states=bool(self.capture_layers),
            logits_to_keep=keep_logits,  # the last N positions' logits; 0 = all
        )
        hidden = None
        if self.capture_layers:
            hidden = torch.stack([out.hidden_states[i][0] for i in self.capture_layers], dim=1)
        return ForwardOut(out.logits[0], hidden)

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> ForwardOut:
        """Start a sequence: cache all of ``ids``; logits of the last position only, hidden states of all."""
        self.cache = KVCache()
        return self._forward(ids, torch.arange(len(ids)), None, keep_logits=1)

    @torch.inference_mode()
    def verify(self, root: int, tree: DraftTree) -> ForwardOut:
        """One forward over ``[root, *tree.tokens]`` after the cached prefix; logits and hidden of every row."""
        start = self.cache.get_seq_length()
        mask = None
        if not tree.is_chain:  # a chain is plain causal attention over the cache tail
            mask = torch.ones(len(tree) + 1, start + len(tree) + 1, dtype=torch.bool)
            mask[:, start:] = tree.ancestor_mask()
            mask = mask[None, None]
        return self._forward([root, *tree.tokens], tree.positions(start), mask, keep_logits=0)

    @torch.inference_mode()
    def score(self, ids: list[int], last: int) -> torch.Tensor:
        """Logits of the ``last`` positions of ``ids`` in one causal forward (for log-probabilities of given
        tokens, not generation); resets the cache like ``prefill`` and captures no hidden states."""
        self.cache = KVCache()
        capture, self.capture_layers = self.capture_layers, ()
        try:
            return self._forward(ids, torch.arange(len(ids)), None, keep_logits=last).logits
        finally:
            self.capture_layers = capture

    @torch.inference_mode()
    def commit(self, start: int, path: list[int]) -> None:
        """Keep the root's KV (row ``start``) and the accepted ``path``'s rows, contiguous after the prefix."""
        self.cache.compact(start, [start, *(start + 1 + i for i in path)])
