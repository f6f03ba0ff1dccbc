"""The target model: an HF causal LM run over ragged batches of sequences, their KV in one token pool.

A forward takes :class:`Chunk` s, one per sequence: prefill chunks and draft trees of any requests, flattened into
one row batch (HF sees a batch of one sequence whose rows carry their own positions). Attention goes through the
``whiflash`` entry of transformers' attention-function registry, so any HF causal LM whose attention modules use
that registry works: the cache (``kv_pool.PoolCache``) writes the new rows' KV into the pool, and the attention plan,
built once per forward from the chunks' page tables and masks and passed as the ``whiflash_plan`` kwarg, runs every
layer. HF's own mask construction is switched off.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
from transformers.masking_utils import AttentionMaskInterface

from whiflash_sgl.config import ATTENTION_PATHS, MATMUL_PRECISIONS
from whiflash_sgl.cost_curve import CostCurve
from whiflash_sgl.cpu_linears import bf16_products_run_here, invariant_linears, pack_linears, prepacking_pays
from whiflash_sgl.errors import WhiFlashError
from whiflash_sgl.kernels import AttentionLayout, BackendUnavailableError, get_backend, tree_attention
from whiflash_sgl.kernels.cpu_extension import amx_runs_here
from whiflash_sgl.kernels.layout import indptr_from_lengths
from whiflash_sgl.kv_pool import PoolCache, TokenPool
from whiflash_sgl.model_store import resolve_model

ATTN_IMPLEMENTATION = "whiflash"
DEFAULT_KV_BUDGET = 1 << 30  # bytes of target KV (keys and values, all layers) for all running sequences together
MAX_POOL_CONTEXTS = 64  # a pool never holds more tokens than this many full context windows, whatever the budget


def _whiflash_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """In :meth:`Target.forward`, ``query`` is HF's ``[1, Hq, rows, D]`` and ``key``/``value`` the whole pool as
    ``[1, Hkv, capacity, D]``; a plain call of the model (no chunks) is causal attention over what HF passes."""
    plan, chunks = kwargs.get("whiflash_plan"), kwargs.get("whiflash_chunks")
    if plan is not None:  # the backends' ragged NHD rows [rows, heads, head_dim], and back
        return plan.run(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1))[None], None
    if chunks is None:
        return tree_attention(query, key, value, None, scaling), None
    outputs, start = [], 0  # the "direct" path: SDPA per chunk on its own gathered keys, nothing planned
    for chunk in chunks:
        n, rows = len(chunk.tokens), torch.cat([chunk.cached, chunk.rows]).to(key.device)
        mask = None if chunk.tree is None else chunk.mask().to(query.device)[None, None]
        outputs.append(tree_attention(query[:, :, start : start + n], key[:, :, rows], value[:, :, rows], mask,
                                      scaling)[0])
        start += n
    return torch.cat(outputs)[None], None


AttentionInterface.register(ATTN_IMPLEMENTATION, _whiflash_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, lambda *args, **kwargs: None)


@dataclass
class ForwardOut:
    logits: torch.Tensor  # [rows, V]
    hidden: torch.Tensor | None  # [rows, len(capture_layers), H]: residual stream entering each captured layer


class Target:
    """A target model with one sequence's KV cache. ``capture_layers`` are HF ``hidden_states`` indices.

    ``pack=True`` prepacks the linear layers for oneDNN (float32 on a CPU only; inference only: no gradients flow
    through them); ``None`` picks for this CPU: the batch-invariant kernel where it runs (``cpu_linears``), else
    oneDNN where that pays (:func:`prepacking_pays`, timed). ``lm_head`` stays the model's own dense output layer,
    for drafters that share it.

    ``matmul="bfloat16"`` computes the float32 target's linear layers with bf16 products summed in float32 (the
    kernel's AMX or AVX512-BF16 path, batch-invariant too; ``pack`` is then moot), the precision models are published
    in, and a verify pass's extra rows cheap; ``"auto"`` picks it where it runs, else float32."""

    def __init__(self, model, tokenizer, capture_layers: tuple[int, ...] = (), name: str = "",
                 attention: str = "auto", pack: bool | None = False, matmul: str = "float32"):
        self.name = name or getattr(model.config, "_name_or_path", "")
        self.model = model.eval()
        self.lm_head = model.get_output_embeddings()
        self.matmul = self._set_matmul(matmul)
        if self.matmul == "float32" and self._float32_on_cpu:
            if pack is None:
                pack = not invariant_linears(model) and prepacking_pays(model)
            if pack and torch.backends.mkldnn.is_available():
                with torch.no_grad():
                    pack_linears(model)
        self.tokenizer = tokenizer
        self.config = model.config
        self.model.config._attn_implementation = ATTN_IMPLEMENTATION
        self.capture_layers = tuple(capture_layers)  # HF hidden_states indices to return with every forward
        self._captured: dict[int, torch.Tensor] | None = None  # during a forward: what the capture hooks kept
        self._hooked: tuple[int, ...] = ()  # the capture_layers the hooks in _hooks serve
        self._hooks: list = []
        self.kv_budget, self._pool = DEFAULT_KV_BUDGET, None
        self.cost_curve: CostCurve | None = None  # this target's forward cost on this machine, when measured
        self._cache: PoolCache | None = None  # the HF view of the pool, remade when the pool is
        self.eos_token_ids = self._eos_ids()
        attn = next(m for m in self.model.modules() if hasattr(m, "scaling") and hasattr(m, "head_dim"))
        self._heads = dict(num_qo_heads=self.config.num_attention_heads, num_kv_heads=self.config.num_key_value_heads,
                           head_dim=attn.head_dim, scale=attn.scaling)
        self.set_attention(attention)

    def _set_matmul(self, matmul: str) -> str:
        """Swaps in the bf16-product kernel where asked for (or, for "auto", where it runs); the precision in use."""
        if matmul not in MATMUL_PRECISIONS:
            raise WhiFlashError(f"unknown matmul precision {matmul!r}; choose one of {', '.join(MATMUL_PRECISIONS)}")
        if matmul == "float32" or matmul == "auto" and not (self._float32_on_cpu and bf16_products_run_here()):
            return "float32"
        if not self._float32_on_cpu:
            raise WhiFlashError(f"bfloat16 matmul is for a float32 target on a CPU, not a {self.model.dtype} one on "
                                f"{self.device.type}; load it in float32 (--dtype float32) or use --matmul float32")
        if not invariant_linears(self.model, bf16_products=True):
            raise WhiFlashError("bfloat16 matmul needs a CPU with AMX or AVX512-BF16 (Intel Sapphire Rapids or "
                                "Cooper Lake, AMD Zen 4 or later) and a C++ compiler to build its kernel; use --matmul "
                                "float32 (or auto) here")
        return "bfloat16"

    def set_attention(self, name: str) -> None:
        """Route attention through backend ``name`` of ``whiflash_sgl.kernels`` (``auto``: FlashInfer on CUDA with a
        16-bit model, the compiled batch-invariant kernel for a float32 model on an AVX-512 CPU, in bf16 products
        where the matmuls are bf16, else the PyTorch reference) or ``direct`` (the reference on HF's layout, no
        planning). Attention's products are bf16 on AMX only (that kernel is built on AMX tiles); without AMX, bf16
        matmuls keep the float32 attention kernel. A path that cannot run here raises and leaves the target on the
        path it was on."""
        if name not in ATTENTION_PATHS:
            raise WhiFlashError(f"unknown attention path {name!r}; choose one of {', '.join(ATTENTION_PATHS)}")
        if name == "direct":
            self.attention, self._backend = name, None
            return
        dtype = self.model.dtype
        try:
            backend = get_backend(name, self.device, self._heads["head_dim"],
                                  self.matmul == "bfloat16" and amx_runs_here())
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

    @classmethod
    def load(cls, name_or_path: str, capture_layers: tuple[int, ...] = (), dtype=torch.float32,
             attention: str = "auto", pack: bool | None = None, device: str = "cpu",
             matmul: str = "float32") -> "Target":
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
        return cls(model, tokenizer, capture_layers, name=name_or_path, attention=attention, pack=pack,
                   matmul=matmul)

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
    def _float32_on_cpu(self) -> bool:
        return self.device.type == "cpu" and self.model.dtype == torch.float32

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def pool(self) -> TokenPool:
        """The KV token pool every sequence on this target shares, made on first use with the budget in force."""
        if self._pool is None:
            self._pool = TokenPool(self.config.num_hidden_layers, self._heads["num_kv_heads"],
                                   self._heads["head_dim"], self._pool_capacity(), self.model.dtype, self.device)
        return self._pool

    def set_kv_budget(self, budget_bytes: int) -> None:
        """Size the KV pool for ``budget_bytes`` (keys and values of every layer); only while no sequence holds KV."""
        if self._pool is not None and self._pool.reserved:
            raise WhiFlashError("the KV budget cannot change while sequences hold KV")
        per_token = TokenPool.bytes_per_token(self.config.num_hidden_layers, self._heads["num_kv_heads"],
                                              self._heads["head_dim"], self.model.dtype)
        if budget_bytes < per_token:
            raise WhiFlashError(f"a KV budget of {budget_bytes} bytes holds no token: one token's KV takes "
                                f"{per_token} bytes on this model; raise the budget (--kv-budget-mb)")
        self.kv_budget, self._pool = budget_bytes, None

    def reset_pool(self) -> None:
        """Forget every sequence's KV: the next use makes an empty pool of the same budget. For after a failed round,
        which may have taken rows and reservations that no request records any more."""
        self._pool = None

    def _pool_capacity(self) -> int:
        per_token = TokenPool.bytes_per_token(self.config.num_hidden_layers, self._heads["num_kv_heads"],
                                              self._heads["head_dim"], self.model.dtype)
        return min(self.kv_budget // per_token, MAX_POOL_CONTEXTS * self.context_length)

    @torch.inference_mode()
    def forward(self, chunks: Sequence[Chunk]) -> list[ForwardOut]:
        """One forward over every chunk's rows (any mix of prefill chunks and verify trees, of any requests): each
        chunk's rows write their KV to ``chunk.rows`` and attend to ``chunk.cached`` and to one another (causally, or
        as ``chunk.tree`` says). Per chunk: the logits of its last ``chunk.logits`` rows, hidden states of all."""
        device = self.device
        lengths = torch.tensor([len(c.tokens) for c in chunks])
        offsets = indptr_from_lengths(lengths)
        keep = torch.cat([torch.arange(int(offsets[i + 1]) - c.logits, int(offsets[i + 1]))
                          for i, c in enumerate(chunks)])
        self._start_capture()
        if self._cache is None or self._cache.pool is not self.pool:
            self._cache = PoolCache(self.pool)
        self._cache.write_rows = torch.cat([c.rows for c in chunks]).to(device)
        plan = None
        if self._backend is not None:
            plan = self._backend.plan(_layout(chunks).to(device), dtype=self.model.dtype, **self._heads)
        out = self.model(
            input_ids=torch.tensor([t for c in chunks for t in c.tokens], dtype=torch.long, device=device)[None],
            position_ids=torch.cat([c.positions for c in chunks]).to(device)[None],
            cache=self._cache,
            use_cache=True,
            whiflash_plan=plan,
            whiflash_chunks=chunks,
            logits_to_keep=keep.to(device),
        )
        logit_offsets = indptr_from_lengths(torch.tensor([c.logits for c in chunks]))
        hidden = self._take_captured()
        return [ForwardOut(out.logits[0, int(logit_offsets[i]) : int(logit_offsets[i + 1])],
                           None if hidden is None else hidden[int(offsets[i]) : int(offsets[i + 1])])
                for i in range(len(chunks))]

    def _start_capture(self) -> None:
        """Hooks on the layers whose inputs ``capture_layers`` names (HF ``hidden_states[j]`` is layer j's input;
        the last index, past every layer, is the final norm's output) keep them during the next forward. HF's
        ``output_hidden_states`` would keep every layer's: on a 512-row prefill chunk that was 36 MB of fresh memory
        and ~20 ms, and a 16-request decode step paid 1.5 ms for it (now 0.8)."""
        if self.capture_layers != self._hooked:
            for handle in self._hooks:
                handle.remove()
            layers = self.model.get_decoder().layers
            self._hooks = []
            for j in dict.fromkeys(self.capture_layers):
                if j < len(layers):
                    hook = functools.partial(self._keep_input, j)
                    self._hooks.append(layers[j].register_forward_pre_hook(hook, with_kwargs=True))
                else:
                    hook = functools.partial(self._keep_output, j)
                    self._hooks.append(self.model.get_decoder().norm.register_forward_hook(hook))
            self._hooked = self.capture_layers
        self._captured = {} if self.capture_layers else None

    def _keep_input(self, index: int, module, args, kwargs) -> None:
        if self._captured is not None:
            self._captured[index] = args[0] if args else kwargs["hidden_states"]

    def _keep_output(self, index: int, module, args, output) -> None:
        if self._captured is not None:
            self._captured[index] = output

    def _take_captured(self) -> torch.Tensor | None:
        """``[rows, len(capture_layers), H]`` from the hooks of the forward that just ran (None without capture)."""
        captured, self._captured = self._captured, None
        if not captured:
            return None
        return torch.stack([captured[j][0] for j in self.capture_layers], dim=1)

    def prefill(self, ids: list[int], logits: int = 1) -> ForwardOut:
        """One causal forward over ``ids`` as a sequence of its own, on pool slots borrowed for the call: the logits
        of the last ``logits`` positions and the hidden states of all (tools and tests; generation goes through the
        engine, which keeps the KV)."""
        pool = self.pool
        region = pool.reserve(len(ids))
        if region is None:
            raise WhiFlashError(f"a forward over {len(ids)} tokens needs that many KV slots and the KV pool has "
                                f"{pool.capacity - pool.reserved} unreserved; retry when fewer requests run")
        try:
            rows = region.alloc(len(ids))
            return self.forward([Chunk(list(ids), torch.arange(len(ids)), rows[:0], rows, logits=logits)])[0]
        finally:
            pool.release(region)

    def score(self, ids: list[int], last: int) -> torch.Tensor:
        """Logits of the ``last`` positions of ``ids`` (for log-probabilities of given tokens, not generation)."""
        capture, self.capture_layers = self.capture_layers, ()
        try:
            return self.prefill(ids, last).logits
        finally:
            self.capture_layers = capture


@dataclass
class Chunk:
    """One sequence's new rows in a batched target forward.

    ``cached``: pool rows of the positions already in KV, in position order. ``rows``: the pool rows the new tokens'
    KV goes to. ``tree``: ``[n, n]`` bool, which new rows each new row sees (itself and its ancestors, for a draft
    tree), or None for causal (a prefill chunk, a chain). ``logits``: how many of the last rows need logits."""

    tokens: list[int]
    positions: torch.Tensor
    cached: torch.Tensor
    rows: torch.Tensor
    tree: torch.Tensor | None = None
    logits: int = 0

    def mask(self) -> torch.Tensor:
        """``[n, len(cached) + n]``: the whole prefix, then the new rows as ``tree`` (or causality) allows."""
        n = len(self.tokens)
        inner = self.tree if self.tree is not None else torch.ones(n, n, dtype=torch.bool).tril()
        return torch.cat([torch.ones(n, len(self.cached), dtype=torch.bool), inner], dim=1)


def _layout(chunks: Sequence[Chunk]) -> AttentionLayout:
    """The forward's attention layout: paged over the pool, causal unless some chunk is a tree."""
    q_lens = torch.tensor([len(c.tokens) for c in chunks])
    kv_lens = torch.tensor([len(c.cached) + len(c.tokens) for c in chunks])
    mask = None
    if any(c.tree is not None for c in chunks):
        mask = torch.cat([c.mask().reshape(-1) for c in chunks])
    return AttentionLayout(indptr_from_lengths(q_lens), indptr_from_lengths(kv_lens), mask,
                           kv_indices=torch.cat([torch.cat([c.cached, c.rows]) for c in chunks]))
