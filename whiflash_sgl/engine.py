"""The reference engine: prefill, then rounds of draft -> verify (one target forward) -> accept -> commit.

Greedy output is token-identical to the target's own greedy decoding, and sampled output follows the target's
distribution, for any drafter: see ``verify.py``. With the keyed rule (the default), sampled output is moreover
token-identical to vanilla's for the same seed, and drafters guess with the same keyed noise
(``SequenceState.sampler``). Without a drafter every round verifies the root alone, which is plain autoregressive
decoding on the same prefill/KV code (the ``vanilla`` baseline).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from whiflash_sgl.drafters.base import Drafter, RoundReport, SequenceState
from whiflash_sgl.errors import WhiFlashError
from whiflash_sgl.target import Target
from whiflash_sgl.tree import DraftTree
from whiflash_sgl.sampling import KeyedSampler, SamplingParams, check_seed
from whiflash_sgl.verify import accept


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

    @property
    def tau(self) -> float:
        """Tokens committed per verify pass, bonus included (the prefill's token is not a round's)."""
        return (len(self.tokens) - 1) / self.rounds if self.rounds else 1.0


class _Output:
    """Generated tokens and text with the stop conditions: EOS, stop strings, ``max_new_tokens``."""

    def __init__(self, tokenizer, eos_ids, max_new_tokens: int, stop: Sequence[str], on_text):
        self.tokenizer, self.eos_ids, self.max_new_tokens = tokenizer, eos_ids, max_new_tokens
        self.stop = [s for s in stop if s]
        self.on_text = on_text
        self.tokens: list[int] = []
        self.text = ""
        self.streamed = 0
        self.finish_reason: str | None = None

    def extend(self, new_tokens: list[int]) -> int:
        """Append tokens until a stop condition; return how many were taken."""
        taken = 0
        for token in new_tokens:
            self.tokens.append(token)
            taken += 1
            if token in self.eos_ids:
                self.finish_reason = "eos"
                break
            if len(self.tokens) >= self.max_new_tokens:
                self.finish_reason = "length"
                break
        self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if self.stop:
            self._apply_stop_strings()
        self._stream()
        return taken

    def _apply_stop_strings(self) -> None:
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if not hits:
            return
        cut = min(hits)
        self.text = self.text[:cut]
        # keep the fewest tokens whose text reaches the stop string
        for n in range(1, len(self.tokens) + 1):
            if len(self.tokenizer.decode(self.tokens[:n], skip_special_tokens=True)) > cut:
                del self.tokens[n:]
                break
        self.finish_reason = "stop"

    def _stream(self) -> None:
        if self.on_text is None:
            return
        end = len(self.text)
        if self.finish_reason is None:
            if self.stop:  # hold back what could still turn out to be the start of a stop string
                end -= max(len(s) for s in self.stop) - 1
            while end > self.streamed and self.text[end - 1] == "\ufffd":  # an incomplete UTF-8 sequence
                end -= 1
        if end > self.streamed:
            self.on_text(self.text[self.streamed : end])
            self.streamed = end


class SpeculativeEngine:
    """Generates with ``target`` and, when given, ``drafter``; one sequence at a time."""

    def __init__(
        self,
        target: Target,
        drafter: Drafter | None = None,
        sampling: SamplingParams = SamplingParams(),
        seed: int = 0,
    ):
        self.target, self.drafter, self.sampling = target, drafter, sampling
        seed = check_seed(seed)
        self.sampler = KeyedSampler(sampling, seed) if not sampling.greedy and sampling.rule == "keyed" else None
        self.generator = torch.Generator().manual_seed(seed)

    def _accept(self, tree: DraftTree, logits: torch.Tensor, root_position: int) -> tuple[list[int], int]:
        return accept(tree, logits, self.sampling, sampler=self.sampler, generator=self.generator,
                      root_position=root_position)

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

    def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        stop: Sequence[str] = (),
        on_text: Callable[[str], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        """``cancelled`` is asked before every round; when it says so, generation stops with ``finish_reason``
        "abort" and what was committed so far (a server uses it to free the engine for a client that left)."""
        self.check_request(prompt_ids, max_new_tokens)
        target = self.target
        out = _Output(target.tokenizer, target.eos_token_ids, max_new_tokens, stop, on_text)
        target.capture_layers = self.drafter.feature_layers if self.drafter is not None else ()
        tic = time.perf_counter()
        first = target.prefill(list(prompt_ids))
        state = SequenceState(tokens=list(prompt_ids), prompt_len=len(prompt_ids), features=first.hidden,
                              feature_layers=target.capture_layers, sampler=self.sampler)
        _, token = self._accept(DraftTree(), first.logits[-1:], len(prompt_ids) - 1)
        state.tokens.append(token)
        state.root_logits = first.logits[-1]
        out.extend([token])
        if self.drafter is not None:
            self.drafter.start(state)
        rounds = drafted = 0
        draft_seconds = verify_seconds = 0.0
        accept_lengths: list[int] = []
        while out.finish_reason is None:
            if cancelled is not None and cancelled():
                out.finish_reason = "abort"
                break
            remaining = max_new_tokens - len(out.tokens)
            tree = DraftTree()
            t0 = time.perf_counter()
            if self.drafter is not None and remaining > 1:
                tree = self.drafter.propose(state, remaining - 1).pruned(remaining - 1)
            t1 = time.perf_counter()
            start = target.cache.get_seq_length()
            step = target.verify(state.tokens[-1], tree)
            path, bonus = self._accept(tree, step.logits, start)
            target.commit(start, path)
            t2 = time.perf_counter()
            draft_seconds += t1 - t0
            verify_seconds += t2 - t1
            if step.hidden is not None:
                rows = step.hidden[[0, *(1 + i for i in path)]]
                state.features = rows if state.features is None else torch.cat([state.features, rows])
            new_tokens = [tree.tokens[i] for i in path] + [bonus]
            state.tokens.extend(new_tokens)
            state.root_logits = step.logits[0 if not path else path[-1] + 1]
            if self.drafter is not None:
                self.drafter.observe(RoundReport(tree, path, new_tokens, t2 - t1))
            out.extend(new_tokens)
            rounds += 1
            drafted += len(tree)
            accept_lengths.append(len(path))
        return GenerationResult(
            prompt_tokens=len(prompt_ids),
            tokens=out.tokens,
            text=out.text,
            finish_reason=out.finish_reason,
            seconds=time.perf_counter() - tic,
            rounds=rounds,
            drafted=drafted,
            accept_lengths=accept_lengths,
            draft_seconds=draft_seconds,
            verify_seconds=verify_seconds,
        )
