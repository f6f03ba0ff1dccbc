"""WhiFlash: one drafter that asks the router, every round, which paradigm drafts (or, for a hedge, which
paradigms draft: their trees are verified together as one).

The chosen drafter is brought up to date from the target's stored features just before it drafts (Lazy
Catch-up, with each drafter's KV-only prefill); ``catch_up="eager"`` instead keeps every drafter current each
round, for comparison. Catch-up spent on rounds that switched action is the switching overhead.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence

import torch

from whiflash_sgl.drafters.base import Drafter, RoundReport, SequenceState, propose_all
from whiflash_sgl.router import NO_DRAFT, BatchLoad, RoundFeatures, Router, members, root_statistics
from whiflash_sgl.tree import DraftTree


def roots(states: Sequence[SequenceState]) -> list[tuple[float, float]]:
    """Each sequence's entropy and margin at its root, in one pass over the batch (zeros before its first)."""
    found = [i for i, s in enumerate(states) if s.root_logits is not None]
    stats = root_statistics(torch.stack([states[i].root_logits for i in found])) if found else []
    out = [(0.0, 0.0)] * len(states)
    for i, value in zip(found, stats):
        out[i] = value
    return out


def round_features(router: Router, drafters: dict[str, Drafter], state: SequenceState, draft_tokens: dict,
                   tokenizer, batch: BatchLoad = BatchLoad(), root: tuple[float, float] | None = None) -> RoundFeatures:
    """The router's features for this round, from what the last verify pass and the drafters left behind (``root``:
    the sequence's entry of ``roots``, computed here when not given), and the n-gram drafter's proposal (a lookup:
    cheap enough to peek at every round, and cached for when it is chosen)."""
    dflash, eagle, ngram = drafters.get("dflash"), drafters.get("eagle3"), drafters.get("ngram")
    ngram_draft = len(ngram.propose(state, ngram.num_tokens)) if ngram is not None else 0
    return router.features(
        roots([state])[0] if root is None else root,
        tokenizer.decode(state.tokens[max(state.prompt_len, len(state.tokens) - 200):]),
        {p: d.pending(state) for p, d in drafters.items()},
        {**draft_tokens, **({"ngram": ngram_draft} if ngram is not None else {})},  # its size this round is known
        getattr(dflash, "last_confidences", []),
        math.exp(eagle.last_scores[0]) if getattr(eagle, "last_scores", None) else 0.0,
        ngram_draft,
        batch,
    )


class WhiFlashDrafter(Drafter):
    name = "whiflash"

    def __init__(self, drafters: dict[str, Drafter], router: Router, tokenizer, catch_up: str = "lazy"):
        if catch_up not in ("lazy", "eager"):
            raise ValueError(f"catch_up must be 'lazy' or 'eager', got {catch_up!r}")
        self.drafters, self.router, self.tokenizer, self.mode = drafters, router, tokenizer, catch_up
        self.feature_layers = tuple(sorted({layer for d in drafters.values() for layer in d.feature_layers}))
        self.tree_size = {p: 8 for p in drafters}  # last draft size per paradigm, for the cost model
        self._reset_sequence()

    def _reset_sequence(self) -> None:
        """Per-sequence state, cleared at every start: a sequence cut off between draft and verify leaves no draft
        behind for the next one."""
        self.switch_seconds = self.catchup_seconds = 0.0
        self.action = ""
        self.load = BatchLoad()  # the rest of the batch, as the last round saw it
        self.trace: list[tuple[str, int]] = []  # (action, accepted draft tokens) per drafted round
        self._trees: dict[str, DraftTree] = {}  # this round's draft per paradigm of the action

    def fork(self) -> "WhiFlashDrafter":
        """Another sequence's router state and drafters (their caches); weights, cost model and statistics shared."""
        twin = copy.copy(self)
        twin.drafters = {p: d.fork() for p, d in self.drafters.items()}
        twin.router = self.router.fork()
        twin.tree_size = dict(self.tree_size)
        twin._reset_sequence()
        return twin

    def start(self, state: SequenceState) -> None:
        for drafter in self.drafters.values():
            drafter.start(state)
        self.router.reset()
        self._reset_sequence()

    def summary(self) -> dict:
        return {"paradigms": [action for action, _ in self.trace], "switch_seconds": self.switch_seconds,
                "catchup_seconds": self.catchup_seconds}

    def pending(self, state: SequenceState) -> int:
        return max(d.pending(state) for d in self.drafters.values())

    def catch_up(self, state: SequenceState) -> None:
        for drafter in self.drafters.values():
            drafter.catch_up(state)

    def _catch_up_timed(self, paradigm: str, state: SequenceState) -> float:
        backlog = self.drafters[paradigm].pending(state)
        tic = time.perf_counter()
        self.drafters[paradigm].catch_up(state)
        seconds = time.perf_counter() - tic
        self.router.costs.observe_catchup(paradigm, backlog, seconds)
        return seconds

    def _route(self, state: SequenceState, root: tuple[float, float]) -> tuple[str, ...]:
        """This round's action for this sequence, with the chosen drafters caught up (all of them when eager)."""
        features = round_features(self.router, self.drafters, state, self.tree_size, self.tokenizer, self.load, root)
        previous, self.action = self.action, self.router.decide(features)
        if self.action == NO_DRAFT:
            self._trees = {NO_DRAFT: DraftTree()}
            return ()
        chosen = members(self.action)
        catchup = 0.0
        for paradigm in (self.drafters if self.mode == "eager" else chosen):
            catchup += self._catch_up_timed(paradigm, state)
        if previous and previous != self.action:
            self.switch_seconds += catchup
        self.catchup_seconds += catchup
        return chosen

    def propose(self, state: SequenceState, max_depth: int) -> DraftTree:
        return self.propose_batch([self], [state], [max_depth])[0]

    @classmethod
    def propose_batch(cls, drafters: Sequence["WhiFlashDrafter"], states: Sequence[SequenceState],
                      max_depths: Sequence[int]) -> list[DraftTree]:
        """Every sequence routes on its own; then each paradigm drafts, in one call, the sequences that chose it (a
        hedge's sequence is in several such calls, and its trees are verified together as one)."""
        chosen = [d._route(s, root) for d, s, root in zip(drafters, states, roots(states))]
        for paradigm in dict.fromkeys(p for c in chosen for p in c):
            group = [i for i, c in enumerate(chosen) if paradigm in c]
            tic = time.perf_counter()
            trees = propose_all([drafters[i].drafters[paradigm] for i in group], [states[i] for i in group],
                                [max_depths[i] for i in group])
            drafters[group[0]].router.costs.observe_draft(paradigm, time.perf_counter() - tic, len(group))
            for i, tree in zip(group, trees):
                drafters[i]._trees[paradigm] = tree
                drafters[i].tree_size[paradigm] = len(tree)
        return [DraftTree.union(d._trees.values()) if len(d._trees) > 1 else next(iter(d._trees.values()))
                for d in drafters]

    def observe(self, report: RoundReport) -> None:
        if not self._trees:  # the engine verified without asking for a draft (one token left)
            return
        each = {p: tree.matched(report.new_tokens) + 1 for p, tree in self._trees.items() if p != NO_DRAFT}
        self._trees = {}
        self.router.update(self.action, len(report.path) + 1, each)
        rows = report.forward_rows or len(report.tree) + 1
        self.router.costs.observe_verify(rows, report.verify_seconds)
        self.trace.append((self.action, len(report.path)))
        others = rows - len(report.tree) - 1
        self.load = BatchLoad(others, max(report.forward_tokens - len(report.new_tokens), 0),
                              report.draft_seconds * others / rows)
