"""The engine: continuous batching of speculative decoding, every request drafted by its own choice each round.

A round (:meth:`SpeculativeEngine.step`): admit waiting requests whose worst-case KV fits the pool; every running
request's drafter proposes a tree (drafters of one kind draft their requests together, and a routed request picks
its own paradigm); ONE target forward verifies all trees and runs the next chunk of any prefill; each request then
accepts its path, keeps the KV rows of the accepted path, frees the rest and streams its new text. Requests join
at round boundaries after their prefill and leave when done or cancelled; a batch of one is the single-sequence
case (:meth:`SpeculativeEngine.generate`).

A round that runs a prompt chunk drafts nothing (SGLang goes further: with speculative decoding it turns mixed
chunks off, so decoding requests sit out a prefill batch; here they verify their roots in it): its forward is
compute-bound on the chunk, so a draft row costs its full share of it rather than the few percent it adds to a
decode forward, and every request in the chunk waits on that forward for its first token (at 16 requests, 42 draft
rows in a 518-row prefill forward added 39 ms to it and 63 ms to the round, for 12 tokens that a decode round of
the batch commits in 30 ms).

Greedy output is token-identical to the target's own greedy decoding, and sampled output follows the target's
distribution, for any drafter and any batch: see ``verify.py``. With the keyed rule (the default), sampled output is
moreover token-identical to vanilla's for the same seed, and drafters guess with the same keyed noise
(``SequenceState.sampler``). Without a drafter every round verifies the root alone, which is plain autoregressive
decoding on the same code (the ``vanilla`` baseline).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from whiflash_sgl.cost_curve import trim_to_value, value_bar
from whiflash_sgl.drafters.base import Drafter, RoundReport, SequenceState, propose_all
from whiflash_sgl.errors import WhiFlashError
from whiflash_sgl.forward_price import ScaledCurve
from whiflash_sgl.kv_pool import Region
from whiflash_sgl.output_text import OutputText
from whiflash_sgl.sampling import KeyedSampler, SamplingParams, check_seed
from whiflash_sgl.target import Chunk, Target
from whiflash_sgl.tree import DraftTree
from whiflash_sgl.verify import accept

MAX_TREE_NODES = 64  # a draft tree is cut to this many nodes; each request reserves KV for one that size


@dataclass
class GenerationResult:
    prompt_tokens: int
    tokens: list[int]  # generated token ids (an EOS that ended generation included)
    text: str  # generated text, cut before a stop string, special tokens removed
    finish_reason: str  # "length", "eos", "stop", or "abort" (the caller's ``cancelled`` said so)
    seconds: float
    rounds: int  # target verify passes after the prefill
    drafted: int  # draft tokens sent to verification
    accept_lengths: list[int] = field(default_factory=list)  # accepted draft tokens per round
    draft_seconds: float = 0.0  # time in the drafter (catch-up included)
    verify_seconds: float = 0.0  # time in target verify passes, acceptance and KV compaction
    paradigms: list[str] = field(default_factory=list)  # the paradigm that drafted each round (routed methods)
    switch_seconds: float = 0.0  # catch-up spent on rounds that switched paradigm
    catchup_seconds: float = 0.0  # all catch-up (KV-only prefill) the router triggered
    paradigm_accepts: list[dict[str, int]] = field(default_factory=list)  # oracle: each paradigm's acceptance
    commit_seconds: list[float] = field(default_factory=list)  # since submission, when each round's tokens came

    @property
    def ttft_seconds(self) -> float | None:
        """Time to first token: from submission (queueing and prefill included) to the prefill's token."""
        return self.commit_seconds[0] if self.commit_seconds else None

    @property
    def tau(self) -> float:
        """Tokens committed per verify pass, bonus included (the prefill's token is not a round's)."""
        return (len(self.tokens) - 1) / self.rounds if self.rounds else 1.0


@dataclass(eq=False)
class Request:
    """One generation inside the engine, from :meth:`SpeculativeEngine.submit` until its result is ready."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    seed: int
    out: OutputText
    drafter: Drafter | None
    reserved: int  # KV slots set aside for this request's worst case
    submitted: float  # on the engine's clock
    state: SequenceState | None = None  # from admission on
    sampler: KeyedSampler | None = None
    generator: torch.Generator | None = None
    region: Region | None = None  # its reserved pool rows, from admission on
    slots: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))  # pool rows, by position
    prefilled: int = 0  # prompt tokens whose KV is in the pool
    cancelled: bool = False
    rounds: int = 0
    drafted: int = 0
    accept_lengths: list[int] = field(default_factory=list)
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    commit_seconds: list[float] = field(default_factory=list)
    result: GenerationResult | None = None  # set when it leaves the engine

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.prompt_ids)


class SpeculativeEngine:
    """Serves any number of requests with ``target`` and, when given, a fork of ``drafter`` per request.

    ``sampling`` and ``seed`` are the defaults of requests that do not bring their own. At most ``max_running``
    requests decode at once; the rest wait in arrival order. Each round prefills at most ``prefill_chunk`` prompt
    tokens (chunked prefill), in the same forward as the running requests' verify, so a long prompt joining does not
    stall the others for its whole prefill. A request's times (its result's ``seconds`` and ``commit_seconds``) are
    read on ``clock``."""

    def __init__(self, target: Target, drafter: Drafter | None = None, sampling: SamplingParams = SamplingParams(),
                 seed: int = 0, max_running: int = 16, prefill_chunk: int = 512,
                 clock: Callable[[], float] = time.perf_counter):
        if max_running < 1 or prefill_chunk < 1:
            raise WhiFlashError(f"max_running and prefill_chunk must be >= 1, got {max_running}, {prefill_chunk}")
        self.target, self.drafter, self.sampling, self.seed = target, drafter, sampling, check_seed(seed)
        self.max_running, self.prefill_chunk, self.clock = max_running, prefill_chunk, clock
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admitted: prefilling, then decoding
        # the last round's bar for one more draft node and its expected tokens per second (``cost_curve.value_bar``)
        self.draft_floor = self.commit_rate = 0.0
        # what the round's trim prices a forward at: the target's curve scaled to this machine's forwards, the
        # drafter's where its cost model keeps one (they then learn from the same forwards), else the engine's own;
        # without a drafter there is nothing to trim
        self.forward_price: ScaledCurve | None = None
        if drafter is not None:
            kept, curve = drafter.forward_price(), target.cost_curve
            self.forward_price = kept if kept is not None or curve is None else ScaledCurve(curve)

    # ---- requests ---------------------------------------------------------------------------------------------

    def check_request(self, prompt_ids: Sequence[int], max_new_tokens: int) -> None:
        if not prompt_ids:
            raise WhiFlashError("the prompt is empty: give at least one token")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise WhiFlashError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        limit = self.target.context_length
        if len(prompt_ids) + max_new_tokens > limit:
            raise WhiFlashError(
                f"the prompt has {len(prompt_ids)} tokens and max_new_tokens is {max_new_tokens}: together they "
                f"exceed the model's context window of {limit} tokens; shorten the prompt or lower max_new_tokens"
            )
        need, capacity = self._reservation(len(prompt_ids), max_new_tokens), self.target.pool.capacity
        if need > capacity:
            raise WhiFlashError(
                f"the request needs {need} KV slots (prompt {len(prompt_ids)} + max_new_tokens {max_new_tokens} + "
                f"a draft tree of {MAX_TREE_NODES + 1} rows) and the KV pool holds {capacity}: raise the KV budget "
                f"(--kv-budget-mb), shorten the prompt or lower max_new_tokens")

    @staticmethod
    def _reservation(prompt_tokens: int, max_new_tokens: int) -> int:
        return prompt_tokens + max_new_tokens + MAX_TREE_NODES + 1

    def submit(self, prompt_ids: Sequence[int], max_new_tokens: int, *, sampling: SamplingParams | None = None,
               seed: int | None = None, stop: Sequence[str] = (),
               on_text: Callable[[str], None] | None = None) -> Request:
        """Queue a request; it joins the running batch at a round boundary once its KV fits."""
        self.check_request(prompt_ids, max_new_tokens)
        target = self.target
        request = Request(
            list(prompt_ids), max_new_tokens, sampling or self.sampling,
            self.seed if seed is None else check_seed(seed),
            OutputText(target.tokenizer, target.eos_token_ids, max_new_tokens, stop, on_text),
            None if self.drafter is None else self.drafter.fork(),
            self._reservation(len(prompt_ids), max_new_tokens),
            self.clock(),
        )
        self.waiting.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """Stop ``request`` at the next round boundary ("abort", with what it committed); its KV is freed then."""
        request.cancelled = True

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        stop: Sequence[str] = (),
        on_text: Callable[[str], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        """One request on its own. ``cancelled`` is asked before every step (the prefill's included); when it says
        so, generation stops with ``finish_reason`` "abort" and what was committed so far."""
        request = self.submit(prompt_ids, max_new_tokens, stop=stop, on_text=on_text)
        try:
            while request.result is None:
                if cancelled is not None and cancelled():
                    self.cancel(request)
                self.step()
        except BaseException:  # a failed round: nothing of it may stay reserved on the target
            self.running.clear()
            self.waiting.clear()
            self.target.reset_pool()
            raise
        return request.result

    # ---- the round ----------------------------------------------------------------------------------------------

    def step(self) -> list[Request]:
        """One round for every admitted request; returns the requests that finished in it."""
        done = self._leave()
        self._admit()
        if not self.running:
            return done
        target = self.target
        target.capture_layers = self.drafter.feature_layers if self.drafter is not None else ()
        prefilling = self._prefill_chunks()
        decoding = [r for r in self.running if r.decoding and r not in prefilling]
        t0 = time.perf_counter()
        trees = [DraftTree()] * len(decoding) if prefilling else self._draft(decoding)
        t1 = time.perf_counter()
        chunks = [*prefilling.values(), *(self._verify_chunk(r, t) for r, t in zip(decoding, trees))]
        outputs = target.forward(chunks)
        for (request, chunk), out in zip(prefilling.items(), outputs):
            self._prefilled(request, chunk, out)
        t2 = time.perf_counter()
        verified = list(zip(decoding, trees, chunks[len(prefilling):], outputs[len(prefilling):]))
        accepted = [accept(tree, out.logits, r.sampling, sampler=r.sampler, generator=r.generator,
                           root_position=len(r.slots)) for r, tree, _, out in verified]
        load = RoundReport(DraftTree(), [], [], verify_seconds=t2 - t1, draft_seconds=t1 - t0,
                           forward_rows=sum(len(c.tokens) for c in chunks), forward_sequences=len(chunks),
                           forward_tokens=sum(len(path) + 1 for path, _ in accepted), prefilled=bool(prefilling))
        if self.forward_price is not None and not prefilling:  # a prompt chunk's rows cost nothing like a draft's
            self.forward_price.observe(load.forward_rows, load.verify_seconds, load.forward_sequences)
        for (request, tree, chunk, out), (path, bonus) in zip(verified, accepted):
            self._commit(request, tree, chunk, out, path, bonus, load)
            request.draft_seconds += t1 - t0
            request.verify_seconds += time.perf_counter() - t1
        return done + self._leave()

    def _leave(self) -> list[Request]:
        """Requests that finished or were cancelled leave; their KV slots and reservations are freed."""
        pool, done = self.target.pool, []
        for request in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(request)
            request.out.finish_reason = "abort"
            done.append(request)
        for request in list(self.running):
            if request.cancelled and request.out.finish_reason is None:
                request.out.finish_reason = "abort"
            if request.out.finish_reason is not None:
                self.running.remove(request)
                pool.release(request.region)
                done.append(request)
        for request in done:
            request.result = self._result(request)
        return done

    def _result(self, request: Request) -> GenerationResult:
        result = GenerationResult(
            prompt_tokens=len(request.prompt_ids),
            tokens=request.out.tokens,
            text=request.out.text,
            finish_reason=request.out.finish_reason,
            seconds=self.clock() - request.submitted,
            rounds=request.rounds,
            drafted=request.drafted,
            accept_lengths=request.accept_lengths,
            draft_seconds=request.draft_seconds,
            verify_seconds=request.verify_seconds,
            commit_seconds=request.commit_seconds,
        )
        if request.drafter is not None:
            for name, value in request.drafter.summary().items():
                setattr(result, name, value)
        return result

    def _admit(self) -> None:
        """Arrival order: the first waiting request that does not fit holds back those behind it."""
        pool = self.target.pool
        while self.waiting and len(self.running) < self.max_running:
            region = pool.reserve(self.waiting[0].reserved)
            if region is None:
                break
            request = self.waiting.popleft()
            request.region = region
            request.state = SequenceState(tokens=list(request.prompt_ids), prompt_len=len(request.prompt_ids))
            sampling = request.sampling
            if not sampling.greedy and sampling.rule == "keyed":
                request.sampler = request.state.sampler = KeyedSampler(sampling, request.seed)
            request.generator = torch.Generator().manual_seed(request.seed)
            self.running.append(request)

    def _prefill_chunks(self) -> dict[Request, Chunk]:
        """This round's prefill work: prompt chunks, up to ``prefill_chunk`` tokens in all, first come first."""
        chunks, budget = {}, self.prefill_chunk
        for request in self.running:
            if request.decoding or budget == 0:
                continue
            start = request.prefilled
            end = min(len(request.prompt_ids), start + budget)
            budget -= end - start
            chunks[request] = Chunk(request.prompt_ids[start:end], torch.arange(start, end), request.slots,
                                    request.region.alloc(end - start), logits=int(end == len(request.prompt_ids)))
        return chunks

    def _prefilled(self, request: Request, chunk: Chunk, out) -> None:
        request.slots = torch.cat([request.slots, chunk.rows])
        request.prefilled += len(chunk.tokens)
        state = request.state
        if out.hidden is not None:
            state.add_features(out.hidden)
        state.feature_layers = self.target.capture_layers
        if not request.decoding:
            return
        _, token = accept(DraftTree(), out.logits[-1:], request.sampling, sampler=request.sampler,
                          generator=request.generator, root_position=len(request.prompt_ids) - 1)
        state.tokens.append(token)
        state.root_logits = out.logits[-1]
        request.commit_seconds.append(self.clock() - request.submitted)
        request.out.extend([token])
        if request.drafter is not None:
            request.drafter.start(state)

    def _draft(self, requests: list[Request]) -> list[DraftTree]:
        """Each request's tree (empty when one token is left, or without a drafter); drafters of one kind draft
        their requests together. With the target's cost curve known, the batch's verify rows then go to the likeliest
        nodes of all trees, as many as pay (``cost_curve.trim_to_value``), and the bar a node had to clear is the
        next round's ``SequenceState.min_prob`` (and the round's expected rate its ``commit_rate``): drafters need not
        draft what could not pass. Rows are priced at ``forward_price``: the curve was measured on one machine, and
        its rows' share of a forward is not another's."""
        trees = [DraftTree()] * len(requests)
        asks = [(i, r) for i, r in enumerate(requests)
                if r.drafter is not None and r.max_new_tokens - len(r.out.tokens) > 1]
        depths = [r.max_new_tokens - len(r.out.tokens) - 1 for _, r in asks]
        for _, request in asks:
            request.state.min_prob, request.state.commit_rate = self.draft_floor, self.commit_rate
        proposed = propose_all([r.drafter for _, r in asks], [r.state for _, r in asks], depths)
        for (i, _), tree, depth in zip(asks, proposed, depths):
            trees[i] = tree.pruned(depth).first(MAX_TREE_NODES)
        if self.forward_price is None:
            return trees
        trees = trim_to_value(trees, self.forward_price)
        self.draft_floor, self.commit_rate = value_bar(trees, self.forward_price)
        return trees

    def _verify_chunk(self, request: Request, tree: DraftTree) -> Chunk:
        start = len(request.slots)  # the root's position: every earlier position is in the pool
        return Chunk([request.state.tokens[-1], *tree.tokens], tree.positions(start), request.slots,
                     request.region.alloc(len(tree) + 1), None if tree.is_chain else tree.ancestor_mask(),
                     logits=len(tree) + 1)

    def _commit(self, request: Request, tree: DraftTree, chunk: Chunk, out, path: list[int], bonus: int,
                load: RoundReport) -> None:
        """Keep the KV rows of the root and the accepted path, free the rest, extend the output. ``load`` is the
        round's forward as a whole (its seconds, rows and committed tokens), for the drafter's cost model."""
        keep = [0, *(1 + i for i in path)]
        kept = torch.zeros(len(chunk.rows), dtype=torch.bool)
        kept[keep] = True
        request.slots = torch.cat([request.slots, chunk.rows[kept]])
        request.region.free(chunk.rows[~kept])
        state = request.state
        if out.hidden is not None:
            state.add_features(out.hidden[keep])
        new_tokens = [tree.tokens[i] for i in path] + [bonus]
        state.tokens.extend(new_tokens)
        state.root_logits = out.logits[keep[-1]]
        if request.drafter is not None:
            request.drafter.observe(replace(load, tree=tree, path=path, new_tokens=new_tokens))
        request.commit_seconds.append(self.clock() - request.submitted)
        request.out.extend(new_tokens)
        request.rounds += 1
        request.drafted += len(tree)
        request.accept_lengths.append(len(path))
