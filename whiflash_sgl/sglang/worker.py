"""``WhiFlashWorker``: SGLang's EAGLE-3 draft worker and DFlash worker behind one target, routed every round.

Written against SGLang 0.5.23 (``eagle_worker_v2``, ``dflash_worker_v2``, ``eagle_worker_common.run_eagle_verify``);
every SGLang symbol used here is listed in ``whiflash_sgl.sglang.compat``. It runs on CUDA and on SGLang's CPU
engine (``whiflash_sgl.sglang.cpu_engine``).

Construction. The EAGLE-3 draft worker is built under ``get_spec().override(speculative_algorithm="EAGLE3")`` and
the DFlash worker under an override naming DFLASH, the DFlash drafter and its block size, so each builds its draft
runner with its own algorithm's semantics (draft pool sizing, attention backend, CUDA graphs). Every later call into
a sub-worker re-enters the same scope, because SGLang reads ``get_spec()`` again there.

A round (decode):

1. **Route, per request.** Each request of the batch has its own router state (``routing.RequestRoutes``, keyed by
   its rid, dropped when it finishes), so its policy picks its own paradigm from its own features: the target's
   entropy and top-1 margin at its bonus position, its last and EMA tau, EAGLE's first-step top-1 probability for
   it, and the measured cost of each paradigm's draft and verify (one cost model for the batch). Text-syntax
   features are not available in the scheduler process and stay off, and so are hedges (two paradigms' drafts
   verified as one tree): the routers are built without them.
2. **Draft**, each drafter once, for the requests that chose it. EAGLE-3: ``EagleDraftWorker.draft`` on a view of
   the batch narrowed to those requests (``sub_batch``) builds their top-k trees as an ``EagleVerifyInput`` of width
   ``N``. DFlash: one draft-runner forward over ``[bonus, MASK x (B-1)]`` for its requests (``TARGET_VERIFY`` mode,
   SGLang's DFlash draft path), greedy tokens from the target's head, then the chains padded to the same width by
   ``verify_layout`` (the mask in the layout the target's attention backend reads). A DFlash block is a
   single-branch tree, so a mixed round merges both into one ``EagleVerifyInput``, each request's rows in its place
   (``verify_layout.merge_rows``); a round where all chose one paradigm is that drafter's input alone.
3. **Verify** every request in one target forward, ``run_eagle_verify`` (finalize on, so the accepted path, hidden
   states included, is at the front of each request's block). Greedy requests: SGLang's own greedy tree walk.
   Sampled requests (T > 0): the same walk against the target's keyed sample at each row instead of its argmax
   (``keyed_verify``), the draw SGLang's sampler makes for the request's seed with
   ``--enable-deterministic-inference``; so a seeded request's text is the non-speculative server's, whatever was
   drafted and routed. (SGLang alone, on CPU, verifies sampled requests greedily, which is not lossless at T > 0.)
4. **Keep both drafters current (eager catch-up)** for every request, whichever drafter it chose. DFlash: the
   committed tokens' target features go into its KV (``_append_target_hidden_to_draft_kv_by_loc``, KV-only: no
   queries, no attention, no MLP). EAGLE-3: its draft-extend over the verify block, which also yields the next
   round's top-k. Both run over the whole batch and read their own columns of the union capture (``hooks`` sets it
   up). Prefill materialises both drafters' prompt KV, so radix-cached prefixes are valid for either.

Only plain DFlash drafters (no candidate selector, LiLiCorr or Domino head) are supported. Both drafters draft
greedily (SGLang's EAGLE-3 top-k tree and DFlash's argmax block), sampled requests included: drafts only decide how
many tokens a round commits, never which, because acceptance is the target's (argmax, or keyed sample), so neither
the drafts nor the routing can change the output. Where SGLang verifies sampled requests with its own sampling kernel
instead of the greedy walk (CUDA: ``tree_speculative_sampling_target_only``), that kernel's rule stands: the same
distribution, but a text that depends on the drafts.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch
from sglang.kernels.ops.speculative.cache_locs import assign_extend_cache_locs_func
from sglang.srt.layers.moe.utils import speculative_moe_a2a_backend_context, speculative_moe_backend_context
from sglang.srt.lora.layers import unwrap_lora_layer
from sglang.srt.model_executor.forward_batch_info import (
    CaptureHiddenMode,
    ForwardBatch,
    ForwardMode,
    compute_position,
    enable_num_token_non_padded,
)
from sglang.srt.model_executor.graph_memory_usage import merge_graph_memory_usage, merge_graph_time_usage
from sglang.srt.runtime_context import get_device, get_spec
from sglang.srt.speculative.base_spec_worker import BaseSpecWorker
from sglang.srt.speculative.dflash_worker_v2 import DFlashWorkerV2, _resolve_dflash_embedding_module
from sglang.srt.speculative.eagle_info import EagleDraftInput, EagleVerifyInput
from sglang.srt.speculative.eagle_utils import get_draft_recurrent_hidden_state_spec
from sglang.srt.speculative.eagle_worker_common import run_eagle_verify
from sglang.srt.speculative.eagle_worker_v2 import EagleDraftWorker
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
from sglang.srt.speculative.spec_utils import draft_tp_context, get_plan_stream
from sglang.srt.utils import async_h2d

from whiflash_sgl.errors import WhiFlashError
from whiflash_sgl.policies import load_policy
from whiflash_sgl.router import root_statistics
from whiflash_sgl.sglang.hooks import LAYOUT_ATTRIBUTE, PARADIGMS_META_KEY
from whiflash_sgl.sglang.keyed_verify import keyed_verify
from whiflash_sgl.sglang.layout import select_columns
from whiflash_sgl.sglang.routing import RequestRoutes
from whiflash_sgl.sglang.settings import SERVED_PARADIGMS, resolved_settings
from whiflash_sgl.sglang.sub_batch import decode_sub_batch
from whiflash_sgl.sglang.verify_layout import VerifyArrays, chain_proposals, merge_rows, verify_arrays

log = logging.getLogger(__name__)


def _mask_mode(target_worker, default) -> str:
    """The tree-mask layout the target's attention backend reads (SGLang's ``TreeMaskMode``): its verify-mask
    buffer's, or else ``default``, the one SGLang's EAGLE verify builds (``EagleDraftWorker.tree_mask_mode``: full
    on GPU, query-length only for the CPU engine)."""
    from sglang.kernels.ops.speculative.spec_tree import TreeMaskMode

    verify_mask = target_worker.model_runner.attn_backend.verify_mask
    mode = default if verify_mask is None else verify_mask.mode
    if mode == TreeMaskMode.FULL_MASK:
        return "full"
    if mode == TreeMaskMode.QLEN_ONLY:
        return "qlen_only"
    raise WhiFlashError(f"WHIFLASH cannot build DFlash verify masks in {mode.name} layout; use an attention backend "
                        f"with full or query-length masks (e.g. --attention-backend flashinfer)")


def _round_counters():
    """Prometheus counters of verify rounds (one per batch step): by paradigm that drafted for some request, and the
    rounds where both did. SGLang's /metrics collects them across its processes (prometheus_client is imported only
    now, after SGLang has set up its multiprocess directory)."""
    from prometheus_client import Counter

    return (Counter("whiflash_paradigm_rounds", "WHIFLASH verify rounds (one per batch step) in which the paradigm "
                    "drafted for at least one request", ["paradigm"]),
            Counter("whiflash_mixed_rounds", "WHIFLASH verify rounds in which some requests were drafted by EAGLE-3 "
                    "and others by DFlash, all verified in one target forward"))


class WhiFlashWorker(BaseSpecWorker):
    def __init__(self, server_args, gpu_id: int, nccl_port: int, target_worker):
        super().__init__()
        self.server_args = server_args
        self._target_worker = target_worker
        self.device = get_device().device
        self.settings = resolved_settings()
        spec = get_spec()
        self.width = int(spec.speculative_num_draft_tokens)
        self.topk = int(spec.speculative_eagle_topk)
        self.steps = int(spec.speculative_num_steps)

        with self._eagle_scope():
            self.eagle = EagleDraftWorker(server_args, gpu_id, nccl_port, target_worker)
        with self._dflash_scope():
            self.dflash = DFlashWorkerV2(server_args, gpu_id, nccl_port, target_worker)
        if self.dflash.selector is not None or self.dflash.lilicorr is not None or self.dflash._is_domino:
            raise WhiFlashError(f"{self.settings.dflash_path} has a candidate selector, LiLiCorr or Domino head; "
                                f"WHIFLASH serves plain DFlash drafters only")
        # DFlashWorkerV2 defers the target's verify-time logits gather for its own accept path; WHIFLASH verifies
        # with SGLang's EAGLE sampling, which reads gathered logits.
        if self.dflash._target_logits_processor is not None:
            self.dflash._target_logits_processor.defer_verify_gather = False
        self._draft_worker = self.eagle
        self.draft_parallel_layout = self.eagle.parallel_layout
        self.plan_stream, self.plan_stream_ctx = get_plan_stream(self.device)

        policy = load_policy(self.settings.policy, self.settings.policy_params)
        self.routes = RequestRoutes(policy, self.settings.fallback, self.settings.policy_deadline_ms / 1000,
                                    self.width)
        self._round_counters = _round_counters() if server_args.enable_metrics else None

    # ---- scopes: each sub-worker sees its own algorithm in get_spec() ----------------------------------------------

    def _eagle_scope(self):
        return get_spec().override(speculative_algorithm="EAGLE3")

    @contextlib.contextmanager
    def _dflash_scope(self):
        with get_spec().override(speculative_algorithm="DFLASH", speculative_draft_model_path=self.settings.dflash_path,
                                 speculative_draft_model_revision=None, speculative_num_draft_tokens=self.width,
                                 speculative_num_steps=1, speculative_eagle_topk=1):
            yield

    @contextlib.contextmanager
    def _eagle_run_scope(self):
        with (self._eagle_scope(), draft_tp_context(self.eagle.parallel_layout), speculative_moe_backend_context(),
              speculative_moe_a2a_backend_context()):
            yield

    # ---- lifecycle the scheduler drives ---------------------------------------------------------------------------

    def alloc_memory_pool(self, memory_pool_config=None, req_to_token_pool=None, token_to_kv_pool_allocator=None):
        with self._eagle_scope():
            self.eagle.alloc_memory_pool(memory_pool_config=memory_pool_config, req_to_token_pool=req_to_token_pool,
                                         token_to_kv_pool_allocator=token_to_kv_pool_allocator)
        with self._dflash_scope():
            self.dflash.alloc_memory_pool(memory_pool_config=memory_pool_config,
                                          req_to_token_pool=req_to_token_pool,
                                          token_to_kv_pool_allocator=token_to_kv_pool_allocator)
        self.req_to_token_pool = req_to_token_pool
        self.token_to_kv_pool_allocator = token_to_kv_pool_allocator

    def init_attention_backends(self):
        with self._eagle_scope():
            self.eagle.init_attention_backends()
        with self._dflash_scope():
            self.dflash.init_attention_backends()

    def init_cuda_graphs(self):
        with self._eagle_scope():
            self.eagle.init_cuda_graphs()
        with self._dflash_scope():
            self.dflash.init_cuda_graphs()

    def _draft_model_runners(self):
        return (*self.eagle.draft_runners, self.dflash.draft_model_runner)

    def weight_update_runners(self):
        return [("draft", runner) for runner in self._draft_model_runners()]

    @property
    def last_shared_read_runner(self):
        return self.eagle.draft_runner  # the EAGLE-3 draft-extend is the last phase of every step

    @property
    def spec_v2_attn_backends(self) -> tuple:
        return (self._target_worker.model_runner.attn_backend, self.eagle.draft_attn_backend,
                self.eagle.draft_extend_attn_backend or self.eagle.draft_runner.attn_backend,
                self.dflash.draft_model_runner.attn_backend)

    @property
    def graph_memory_usage(self) -> dict:
        return merge_graph_memory_usage(self.eagle.graph_memory_usage, self.dflash.graph_memory_usage,
                                        self._additional_graph_memory_usage)

    @property
    def graph_time_usage(self) -> dict:
        return merge_graph_time_usage(self.eagle.graph_time_usage, self.dflash.graph_time_usage,
                                      self._additional_graph_time_usage)

    @property
    def weight_load_time(self) -> float:
        return self.eagle.weight_load_time + self.dflash.weight_load_time

    @property
    def preloaded_weights_bytes(self) -> int:
        return self.eagle.preloaded_weights_bytes + self.dflash.preloaded_weights_bytes

    # ---- the union capture ----------------------------------------------------------------------------------------

    def _columns(self, hidden: torch.Tensor, paradigm: str) -> torch.Tensor:
        layout = getattr(self._target_worker.model_runner.model, LAYOUT_ATTRIBUTE, None)
        if layout is None:
            raise WhiFlashError("the target captures no WHIFLASH layer union: the plugin's hooks were not applied "
                                "in this process (is SGLANG_PLUGINS excluding whiflash?)")
        return select_columns(hidden, layout.columns(paradigm), len(layout.capture))

    # ---- one scheduler step ---------------------------------------------------------------------------------------

    def forward_batch_generation(self, batch, on_publish=None, grammar_barrier=None, pp_proxy_tensors=None):
        if batch.forward_mode.is_extend() or batch.is_extend_in_batch:
            return self._prefill(batch, on_publish)
        return self._decode(batch, on_publish, grammar_barrier)

    def _prefill(self, batch, on_publish):
        out = self._target_worker.forward_batch_generation(batch, capture_hidden_mode=CaptureHiddenMode.FULL,
                                                           return_kv_loc_plan=True)
        kv_loc_plan, out.kv_loc_plan = out.kv_loc_plan, None
        out.new_seq_lens = batch.seq_lens
        if on_publish is not None:
            on_publish(out.new_seq_lens)
        hidden = out.logits_output.hidden_states
        if not batch.forward_mode.is_idle():
            # DFlash first: the EAGLE-3 draft-extend is the step's last reader of the shared buffers.
            extend_lens = async_h2d(batch.extend_lens, dtype=torch.int32, device=self.device)
            prefix_lens = async_h2d(batch.prefix_lens, dtype=torch.int32, device=self.device)
            positions, _ = compute_position(self._target_worker.model_runner.prefill_attention_backend_str,
                                            prefix_lens, extend_lens, int(sum(batch.extend_lens)))
            with self._dflash_scope(), draft_tp_context(self.dflash.draft_parallel_layout):
                self.dflash._append_target_hidden_to_draft_kv_by_loc(
                    target_hidden=self._columns(hidden, "dflash"), cache_loc=self.dflash._draft_write_ids(kv_loc_plan),
                    positions=positions, extend_lens=extend_lens)
        with self._eagle_run_scope():
            out.next_draft_input = self.eagle._draft_extend_for_prefill(
                batch, self._columns(hidden, "eagle3"), out.next_token_ids, out.logits_output.mm_input_embeds,
                kv_loc_plan=kv_loc_plan)
        return out

    def _idle_draft_input(self) -> EagleDraftInput:
        hidden_size, hidden_dtype = get_draft_recurrent_hidden_state_spec(self.eagle.draft_runner)
        return EagleDraftInput.create_idle_input(device=self.device, hidden_size=hidden_size, dtype=hidden_dtype,
                                                 topk=self.topk, capture_hidden_mode=CaptureHiddenMode.LAST,
                                                 vocab_size=self._target_worker.model_config.vocab_size)

    def _eagle_top1(self, draft_input: EagleDraftInput, bs: int) -> list[float]:
        if draft_input.topk_p is None:
            return [0.0] * bs
        return draft_input.topk_p[:, 0].float().tolist()

    def _decode(self, batch, on_publish, grammar_barrier):
        if batch.spec_info is None:
            batch.spec_info = self._idle_draft_input()
        idle = batch.forward_mode.is_idle()
        rids = [] if idle else [req.rid for req in batch.reqs]
        paradigms = [] if idle else self.routes.route(rids, self._eagle_top1(batch.spec_info, len(rids)))

        verify_input, draft_seconds = self._draft(batch, paradigms)
        start = time.perf_counter()
        batch.spec_info = verify_input
        with keyed_verify(batch.reqs if not idle else ()):
            out = run_eagle_verify(batch, target_worker=self._target_worker,
                                   req_to_token_pool=self.req_to_token_pool,
                                   token_to_kv_pool_allocator=self.token_to_kv_pool_allocator,
                                   plan_stream=self.plan_stream, plan_stream_ctx=self.plan_stream_ctx,
                                   topk=verify_input.topk, num_draft_tokens=self.width, device=self.device,
                                   metadata_ready_pre_pad=False, finalize_tree_path=True,
                                   grammar_barrier=grammar_barrier)
        if on_publish is not None:
            on_publish(out.new_seq_lens)
        if not idle:
            self._catch_up_dflash(batch, verify_input, out)
        if out.logits_output is not None and out.logits_output.hidden_states is not None:
            out.logits_output.hidden_states = self._columns(out.logits_output.hidden_states, "eagle3")
        with self._eagle_run_scope():
            self.eagle._draft_extend_for_decode(batch, out, kv_loc_plan=verify_input.kv_loc_plan)
        if not idle:
            self._observe(rids, paradigms, out, draft_seconds, self._synchronized(start))
            self._report(paradigms, out)
        return out

    def note_request_finished(self, *, rid: str, natural_stop: bool) -> None:
        self.routes.drop(rid)

    def _report(self, paradigms: list[str], out) -> None:
        """What users see of the routing: each request's ``meta_info["spec_paradigms"]`` lists the paradigm of
        every verify round it took part in (SGLang accumulates per-request ``customized_info``; a hook sends it
        whole); in ``/metrics``, ``whiflash_paradigm_rounds_total{paradigm}`` counts the batch rounds in which a
        paradigm drafted for some request, and ``whiflash_mixed_rounds_total`` those in which both did."""
        logits_output = out.logits_output
        if logits_output is not None:
            info = dict(logits_output.customized_info or {})
            info[PARADIGMS_META_KEY] = list(paradigms)
            logits_output.customized_info = info
        if self._round_counters is not None:
            by_paradigm, mixed = self._round_counters
            for paradigm in sorted(set(paradigms)):
                by_paradigm.labels(paradigm=paradigm).inc()
            if len(set(paradigms)) > 1:
                mixed.inc()

    def _synchronized(self, start: float) -> float:
        torch.get_device_module(self.device).synchronize()
        return time.perf_counter() - start

    def _observe(self, rids: list[str], paradigms: list[str], out, draft_seconds: dict[str, float],
                 verify_seconds: float) -> None:
        """Feed the routers: each request's tau (committed tokens in its verify, bonus included) and the root
        statistics its next round's features use (the target's distribution at its last accepted row, which
        predicted the bonus token); the shared cost model gets each drafter's time and the verify's."""
        # logits stay in tree order (finalize compacts KV, predictions and hidden states only): find the row by index
        last = (out.accept_lens.long() - 1).unsqueeze(1)
        rows = out.accept_index.long().gather(1, last).squeeze(1)
        logits = out.logits_output.next_token_logits
        roots = root_statistics(logits[rows]) if logits is not None else None
        self.routes.observe(rids, paradigms, out.accept_lens.float().tolist(), roots)
        for paradigm, seconds in draft_seconds.items():  # one call drafted every request that chose the paradigm
            self.routes.costs.observe_draft(paradigm, seconds, sequences=max(paradigms.count(paradigm), 1))
        # the whole batch's rows, over its requests
        self.routes.costs.observe_verify(self.width * len(rids), verify_seconds, len(rids))

    # ---- drafting: each drafter for the requests that chose it, one verify input -----------------------------------

    def _draft(self, batch, paradigms: list[str]) -> tuple[EagleVerifyInput, dict[str, float]]:
        """The round's verify input and each drafter's time. EAGLE-3 alone (or an idle batch): its own input. Else
        DFlash drafts its requests, EAGLE-3 (on a narrowed view of the batch) its own, and their rows merge."""
        rows = {p: [i for i, chosen in enumerate(paradigms) if chosen == p] for p in SERVED_PARADIGMS}
        seconds = {}
        start = time.perf_counter()
        if not rows["dflash"]:
            with self._eagle_run_scope():
                verify_input = self.eagle.draft(batch)
            return verify_input, {"eagle3": self._synchronized(start)}
        mask_mode = _mask_mode(self._target_worker, self.eagle.tree_mask_mode)
        parts = []
        if rows["eagle3"]:
            with self._eagle_run_scope():
                tree = self.eagle.draft(decode_sub_batch(batch, rows["eagle3"]))
            parts.append((rows["eagle3"], VerifyArrays(tree.draft_token, tree.positions, tree.custom_mask,
                                                       tree.retrieve_index, tree.retrieve_next_token,
                                                       tree.retrieve_next_sibling)))
            seconds["eagle3"] = self._synchronized(start)
            start = time.perf_counter()
        window = self._window(batch, None)
        dflash_window = window if not rows["eagle3"] else self._window(batch, rows["dflash"])
        parts.append((rows["dflash"], self._dflash_chains(batch, rows["dflash"], dflash_window, mask_mode)))
        seconds["dflash"] = self._synchronized(start)

        arrays = parts[0][1] if len(parts) == 1 else merge_rows(parts, batch.seq_lens, mask_mode)
        _, kv_loc_plan = window
        # depth up to the width (a DFlash chain); top-k > 1 where EAGLE-3 trees are in, so that run_eagle_verify
        # moves each accepted path to the front of its block (an identity for a chain)
        verify_input = EagleVerifyInput(
            draft_token=arrays.tokens, custom_mask=arrays.mask, positions=arrays.positions,
            retrieve_index=arrays.retrieve_index, retrieve_next_token=arrays.retrieve_next_token,
            retrieve_next_sibling=arrays.retrieve_next_sibling, retrieve_cum_len=None, spec_steps=self.width - 1,
            topk=self.topk if rows["eagle3"] else 1, draft_token_num=self.width, capture_hidden_mode=None,
            seq_lens_sum=None, seq_lens_cpu=None, prepared_out_cache_loc=kv_loc_plan.write_virtual,
            kv_loc_plan=kv_loc_plan)
        return verify_input, seconds

    def _seq_lens_cpu(self, batch) -> torch.Tensor:
        if batch.seq_lens_cpu is not None:
            return batch.seq_lens_cpu
        return torch.tensor([r.kv.kv_allocated_len for r in batch.reqs], dtype=torch.int32)

    def _window(self, batch, rows: list[int] | None):
        """The ``N`` KV slots past each committed prefix (of ``rows``, or of every request) and their plan."""
        req_pool_indices, prefix, seq_lens_cpu = batch.req_pool_indices, batch.seq_lens, self._seq_lens_cpu(batch)
        if rows is not None:
            index = torch.tensor(rows, dtype=torch.int64, device=self.device)
            req_pool_indices, prefix, seq_lens_cpu = req_pool_indices[index], prefix[index], seq_lens_cpu[rows]
        req_to_token = self._target_worker.model_runner.req_to_token_pool.req_to_token
        cache_loc = assign_extend_cache_locs_func(req_pool_indices=req_pool_indices, req_to_token=req_to_token,
                                                  start_offset=prefix, end_offset=prefix + self.width,
                                                  batch_size=len(prefix), draft_token_num=self.width,
                                                  device=self.device)
        kv_loc_plan = self._target_worker.model_runner.kv_index_translator.plan(
            req_pool_indices=req_pool_indices, seq_lens=prefix, seq_lens_cpu=seq_lens_cpu, write_virtual=cache_loc,
            read_extent=self.width)
        return cache_loc, kv_loc_plan

    # ---- DFlash: draft blocks, verify them as chains, keep its KV current ------------------------------------------

    def _dflash_chains(self, batch, rows: list[int], window, mask_mode: str) -> VerifyArrays:
        """DFlash's blocks for the requests ``rows`` (batch order), as chains padded to the verify width: one
        draft-runner forward over ``[bonus, MASK x (B-1)]`` per request, writing the draft KV in ``window``."""
        dflash, width = self.dflash, self.width
        bs = len(rows)
        index = torch.tensor(rows, dtype=torch.int64, device=self.device)
        prefix, req_pool_indices = batch.seq_lens[index], batch.req_pool_indices[index]
        seq_lens_cpu = self._seq_lens_cpu(batch)[rows]
        cache_loc, kv_loc_plan = window
        bonus = batch.spec_info.bonus_tokens.view(-1)[index]
        block_ids = torch.full((bs, width), int(dflash._mask_token_id), dtype=torch.long, device=self.device)
        block_ids[:, 0] = bonus
        positions = (prefix.unsqueeze(1) + torch.arange(width, device=self.device)).reshape(-1)

        target_model = self._target_worker.model_runner.model
        if dflash._full_embed_gpu is not None:
            embeds = torch.nn.functional.embedding(block_ids, dflash._full_embed_gpu)
        else:
            embeds = unwrap_lora_layer(_resolve_dflash_embedding_module(dflash.draft_model, target_model))(block_ids)
        if dflash._noise_embed_scale != 1.0:
            embeds = embeds * dflash._noise_embed_scale
        draft_seq_lens_cpu = seq_lens_cpu + width
        forward_batch = ForwardBatch(
            forward_mode=ForwardMode.TARGET_VERIFY, batch_size=bs, input_ids=block_ids.flatten(),
            req_pool_indices=req_pool_indices, seq_lens=prefix, out_cache_loc=cache_loc,
            seq_lens_sum=int(draft_seq_lens_cpu.sum()), seq_lens_cpu=draft_seq_lens_cpu, positions=positions,
            input_embeds=embeds.view(bs * width, -1), spec_algorithm=SpeculativeAlgorithm.DFLASH,
            spec_info=dflash._draft_block_spec_info, capture_hidden_mode=CaptureHiddenMode.NULL,
            num_token_non_padded=(torch.full((), bs * width, dtype=torch.int32, device=self.device)
                                  if enable_num_token_non_padded() else None),
            global_num_token_non_padded_cpu=bs * width, can_run_decode_cuda_graph=batch.can_run_decode_cuda_graph)
        kv_loc_plan.bind(forward_batch, dflash.draft_model_runner.kv_index_translator)
        with self._dflash_scope(), torch.inference_mode(), draft_tp_context(dflash.draft_parallel_layout):
            draft_out = dflash.draft_model_runner.forward(forward_batch)
            if dflash._draft_sampler is not None and draft_out.can_run_graph:
                drafts = dflash._draft_sampler.out[: bs * (width - 1)].view(bs, width - 1)
            else:
                hidden = draft_out.logits_output.hidden_states.view(bs, width, -1)
                drafts = dflash._greedy_sample_from_vocab_parallel_head(
                    hidden_states=hidden[:, 1:, :].reshape(-1, hidden.shape[-1]),
                    lm_head=unwrap_lora_layer(target_model.lm_head)).view(bs, width - 1)
        return verify_arrays(chain_proposals(bonus, drafts, width), prefix, mask_mode)

    def _catch_up_dflash(self, batch, verify_input: EagleVerifyInput, out) -> None:
        """KV-only: the committed tokens' target features into the DFlash draft KV at their slots."""
        bs = out.accept_lens.numel()
        if verify_input.kv_loc_plan is not None:
            cache_loc = self.dflash._draft_write_ids(verify_input.kv_loc_plan)
        else:
            cache_loc = batch.out_cache_loc
        positions = (batch.seq_lens.unsqueeze(1) + torch.arange(self.width, device=self.device)).reshape(-1)
        with self._dflash_scope(), draft_tp_context(self.dflash.draft_parallel_layout):
            self.dflash._append_target_hidden_to_draft_kv_by_loc(
                target_hidden=self._columns(out.logits_output.hidden_states, "dflash"), cache_loc=cache_loc,
                cache_loc_2d=cache_loc.view(bs, self.width), positions=positions, commit_lens=out.accept_lens)
