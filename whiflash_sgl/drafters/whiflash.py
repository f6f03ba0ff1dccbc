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
from dataclasses import replace

from whiflash_sgl.drafters.base import Drafter, RoundReport, SequenceState, propose_all
from whiflash_sgl.drafting_plan import FIRST_STEP, Calibration, FirstSteps, RoundTimes, Wish, explore, plan
from whiflash_sgl.forward_price import ScaledCurve
from whiflash_sgl.router import NO_DRAFT, BatchLoad, Decision, RoundFeatures, Router, members, root_statistics
from whiflash_sgl.tree import DraftTree

QUIET_MAX = 32  # most rounds a batch whose plan drafted nothing goes without routing before it routes again
ROUTED_RUN = 8  # a batch that routed this many rounds in a row goes one without, to keep measuring that


def roots(states: Sequence[SequenceState]) -> list[tuple[float, float]]:
    """Each sequence's entropy and margin at its root (zeros before its first)."""
    stats = iter(root_statistics([s.root_logits for s in states if s.root_logits is not None]))
    return [(0.0, 0.0) if s.root_logits is None else next(stats) for s in states]


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


class QuietRounds:
    """After a batch's plan drafted nothing, the next 1, 2, 4, ... up to ``QUIET_MAX`` rounds skip routing: no features,
    policy call or plan; each request drafts its n-gram lookup, if it finds one, else EAGLE-3's first step where that
    pays, or verifies its root alone (:meth:`WhiFlashDrafter._unrouted`). Routing costs a batch of 8 ~5 ms a round, 7%
    of a round without drafts on a 2-core CPU, which a batch whose drafting does not pay would otherwise lose to vanilla
    (at a gap of 8, whiflash:mlp drafting nothing at 8 and 16 requests still ran 3-4% behind it); a round whose plan
    drafts again, or a batch a quarter smaller or a third larger than it was when it last routed, brings the gap back to
    none (a request coming or going at 8 does not: that was a routing round in eight; the tail of a 16-request run does,
    where a batch of 12 or fewer drafts again, instead of going 30 rounds without routing). A plan that drafts counts as
    one without drafts while routed rounds of the batch's size are measured to commit tokens more slowly than rounds
    without routing (``RoundTimes.routing_pays``); and a batch that routed ``ROUTED_RUN`` rounds in a row goes one
    without, so that those stay measured."""

    def __init__(self) -> None:
        self.gap = self.left = self.size = self.routed = 0

    def skip(self, size: int) -> bool:
        """Whether a round of ``size`` requests skips routing."""
        if 4 * size <= 3 * self.size or 3 * size >= 4 * self.size:
            self.gap = self.left = 0
        if self.left or self.routed >= ROUTED_RUN:
            self.left, self.routed = max(self.left - 1, 0), 0
            return True
        self.size, self.routed = size, self.routed + 1
        return False

    def planned(self, drafted: bool) -> None:
        self.gap = 0 if drafted else min(max(2 * self.gap, 1), QUIET_MAX)
        self.left = self.gap


class WhiFlashDrafter(Drafter):
    name = "whiflash"

    def __init__(self, drafters: dict[str, Drafter], router: Router, tokenizer, catch_up: str = "lazy"):
        if catch_up not in ("lazy", "eager"):
            raise ValueError(f"catch_up must be 'lazy' or 'eager', got {catch_up!r}")
        self.drafters, self.router, self.tokenizer, self.mode = drafters, router, tokenizer, catch_up
        self.feature_layers = tuple(sorted({layer for d in drafters.values() for layer in d.feature_layers}))
        self.tree_size = {p: 8 for p in drafters}  # last verified draft size per paradigm (never 0), for the cost model
        self.calibration = Calibration()  # shared by the forks, as the cost model is
        self.quiet = QuietRounds()  # shared too: a batch's rounds without routing ...
        self.times = RoundTimes()  # ... and what its rounds cost beyond the cost model's price
        self.first_steps = FirstSteps()  # ... and what EAGLE-3's first step brings its requests without a draft
        self.latest: dict[str, DraftTree] = {}  # each paradigm's latest tree for any sequence (shared by the forks)
        self._reset_sequence()

    def _reset_sequence(self) -> None:
        """Per-sequence state, cleared at every start: a sequence cut off between draft and verify leaves no draft
        behind for the next one."""
        self.switch_seconds = self.catchup_seconds = 0.0
        self.action = ""
        self._switched = False  # this round's action differs from the last round's
        self.predicted_tau: float | None = None  # the policy's prediction for this round's action
        self.load = BatchLoad()  # the rest of the batch, as the last round saw it
        self.trace: list[tuple[str, int]] = []  # (action, accepted draft tokens) per drafted round
        self._trees: dict[str, DraftTree] = {}  # this round's draft per paradigm of the action
        self.drafted: dict[str, DraftTree] = {}  # each paradigm's latest tree for this sequence, with its estimates
        self._first_step = False  # this round's draft is EAGLE-3's first step alone (``FirstSteps``)

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

    def forward_price(self) -> ScaledCurve | None:
        """The router's own scaled curve (``CostModel.forwards``): the round's trim then prices rows as the plan
        does, and the scaling carries over from one batch to the next as the router's cost estimates do."""
        return self.router.costs.forwards

    def summary(self) -> dict:
        return {"paradigms": [action for action, _ in self.trace], "switch_seconds": self.switch_seconds,
                "catchup_seconds": self.catchup_seconds}

    def pending(self, state: SequenceState) -> int:
        return max(d.pending(state) for d in self.drafters.values())

    def catch_up(self, state: SequenceState) -> None:
        for drafter in self.drafters.values():
            drafter.catch_up(state)

    def _features(self, state: SequenceState, root: tuple[float, float]) -> RoundFeatures:
        features = round_features(self.router, self.drafters, state, self.tree_size, self.tokenizer, self.load, root)
        if "ngram" in self.drafters:  # the lookup's proposal this round (cached by the peek the features took)
            self.drafted["ngram"] = self.drafters["ngram"].propose(state, self.drafters["ngram"].num_tokens)
        return features

    def _kept(self, paradigm: str, bar: float) -> tuple[int, float]:
        """The draft rows ``paradigm`` would add this round, and the share of its tree's expected accepted tokens
        they hold: the nodes of a recent tree likely enough to clear the batch's bar for a row
        (``SequenceState.min_prob``); for a tree without estimates, all of it. At batch 1 the bar is near 0 and
        whole trees count; at 16 requests, a node or two of each, holding half of what the whole tree was expected
        to accept. The tree is this sequence's from the last round if it drafted with ``paradigm`` then, else the
        latest any sequence drafted, else none (the size last verified, whole). A tree no node of which clears the
        bar was drafted at another position and says nothing of this one, so the next in that order stands in:
        taken at its word, one weak tree kept a request from drafting for good (its own tree is refreshed only when
        it drafts), and at 8 requests two or three of them went 30-40 rounds without a draft while their policy
        predicted a tau of 2-3."""
        for tree in (self.drafted.get(paradigm), self.latest.get(paradigm)):
            if tree is None:
                continue
            if not tree.probs:
                return len(tree), 1.0
            kept = [p for p in tree.probs if p >= bar]
            if kept:
                return len(kept), sum(kept) / sum(tree.probs) if sum(tree.probs) > 0 else 1.0
        return self.tree_size[paradigm], 1.0

    def _wish(self, features: RoundFeatures, decision: Decision, forced: bool, bar: float, tokens_left: int) -> Wish:
        """What the decision's action would bring and cost this sequence: the policy's tau for its trees cut to the
        rows they would keep at the batch's ``bar`` (:meth:`_kept`; a learned policy predicts a whole tree's),
        calibrated, or its best paradigm's tau so far (measured on trees as cut); those rows; its paradigms'
        catch-up backlogs, and the rounds its ``tokens_left`` take at that tau."""
        chosen = members(decision.paradigm)
        kept = [self._kept(p, bar) for p in chosen]
        predicted = None if decision.tau is None else 1 + (decision.tau - 1) * max(share for _, share in kept)
        rows = sum(rows for rows, _ in kept)
        tau = (self.calibration(predicted) if predicted is not None
               else max(features.expected_tau().get(p, 1.0) for p in chosen))
        tau = min(tau, 1 + rows)  # a draft row accepts one token at most
        return Wish(decision.paradigm, tau, rows, {p: features.pending[p] for p in chosen}, forced, predicted,
                    tokens_left / max(tau, 1.0), *self._fallback(features, bar))

    def _fallback(self, features: RoundFeatures, bar: float) -> tuple[float, float]:
        """The tau and rows of what this sequence drafts if the plan leaves it out (``Wish.fallback_tau``): its
        lookup, at the tau its lookups reached, else EAGLE-3's first step, as the batch's first steps have done."""
        if self.drafted.get("ngram"):
            rows = self._kept("ngram", bar)[0]
            return min(features.expected_tau().get("ngram", 1.0), 1 + rows), rows
        if "eagle3" in self.drafters:
            return self.first_steps.fallback()
        return 1.0, 0.0

    def _take(self, decision: Decision, drafts: bool, probe: bool) -> tuple[str, ...]:
        """Settle this round's action (``NO_DRAFT`` unless it ``drafts``); return the paradigms that draft."""
        self.predicted_tau = decision.tau if drafts else None
        previous, self.action = self.action, self.router.settle(decision.paradigm if drafts else NO_DRAFT, probe)
        self._switched = bool(previous) and previous != self.action
        chosen = () if self.action == NO_DRAFT else members(self.action)
        self.drafted = {p: tree for p, tree in self.drafted.items() if p in chosen}  # the others' trees go stale
        if not chosen:
            self._trees = {NO_DRAFT: DraftTree()}
        return chosen

    @staticmethod
    def _catch_up(drafters: Sequence["WhiFlashDrafter"], states: Sequence[SequenceState],
                  stale: Sequence[tuple[str, ...]]) -> None:
        """Catch-up, batched: the drafters of a paradigm whose sequences need it this round (``stale[i]``: the
        action's paradigms, or all of them when eager) catch up in one KV-only prefill. The cost model observes its
        time against the whole backlog; each sequence is charged its share by backlog, as catch-up time and, on a
        round that switched action, as switching overhead."""
        for paradigm in dict.fromkeys(p for s in stale for p in s):
            group = [(drafters[i], states[i]) for i, s in enumerate(stale) if paradigm in s]
            backlogs = [d.drafters[paradigm].pending(state) for d, state in group]
            if not any(backlogs):
                continue
            own = [d.drafters[paradigm] for d, _ in group]
            tic = time.perf_counter()
            type(own[0]).catch_up_batch(own, [state for _, state in group])
            seconds = time.perf_counter() - tic
            drafters[0].times.spent(seconds)
            group[0][0].router.costs.observe_catchup(paradigm, sum(backlogs), seconds)
            for (d, _), backlog in zip(group, backlogs):
                share = seconds * backlog / sum(backlogs)
                d.catchup_seconds += share
                d.switch_seconds += share if d._switched else 0.0

    def propose(self, state: SequenceState, max_depth: int) -> DraftTree:
        return self.propose_batch([self], [state], [max_depth])[0]

    @classmethod
    def _unrouted(cls, drafters: Sequence["WhiFlashDrafter"], states: Sequence[SequenceState],
                  max_depths: Sequence[int], routed: bool | None) -> list[DraftTree]:
        """A round without routing: each sequence's n-gram lookup, where it finds one within ``max_depths`` (0: the
        roots alone), and EAGLE-3's first step for the others, where that pays (:meth:`_first_steps`). A lookup costs
        microseconds and no drafter call; the engine keeps of each draft only the nodes whose measured acceptance pays
        for their rows at the batch's size (``trim_to_value``). On a 2-core CPU, the lookup alone committed 16% more
        tokens per second than the roots alone at 16 requests and 17-20% more at 8, where routing (features, the
        policy, the plan) costs 2-4 ms of a 40 ms round."""
        lookups = [d.drafters["ngram"].propose(state, depth) if "ngram" in d.drafters and depth > 0 else DraftTree()
                   for d, state, depth in zip(drafters, states, max_depths)]
        first = cls._first_steps(drafters, states, [i for i, tree in enumerate(lookups) if not tree and max_depths[i]],
                                 sum(map(len, lookups)))
        decisions = [Decision("eagle3" if i in first else "ngram" if tree else NO_DRAFT)
                     for i, tree in enumerate(lookups)]
        drafting = [i in first or bool(tree) for i, tree in enumerate(lookups)]
        drafted = cls._draft(drafters, states, max_depths, decisions, drafting, [False] * len(drafters), first)
        drafters[0].times.ran(any(drafted), routed)
        return drafted

    @staticmethod
    def _first_steps(drafters: Sequence["WhiFlashDrafter"], states: Sequence[SequenceState], idle: Sequence[int],
                     draft_rows: int) -> set[int]:
        """Of the requests ``idle`` (that would verify their roots alone), those that draft EAGLE-3's first step: all
        that have EAGLE-3 where the batch's :class:`FirstSteps` find that it pays (``draft_rows``: the round's other
        draft rows), else none."""
        idle = [i for i in idle if "eagle3" in drafters[i].drafters]
        rate = drafters[0].times.quiet_rate(len(states)) or max(s.commit_rate for s in states)
        if idle and drafters[0].first_steps.pays(len(idle), drafters[0].router.costs, len(states) + draft_rows,
                                                 len(states), rate):
            return set(idle)
        return set()

    @classmethod
    def _draft(cls, drafters: Sequence["WhiFlashDrafter"], states: Sequence[SequenceState], max_depths: Sequence[int],
               decisions: Sequence[Decision], drafting: Sequence[bool], probes: Sequence[bool],
               first: set[int]) -> list[DraftTree]:
        """Settle each sequence's action (``decisions[i]`` where ``drafting[i]``, else none) and draft: each paradigm,
        in one call, for the sequences that chose it (a hedge's sequence is in several such calls, and its trees are
        verified together as one); the sequences in ``first`` draft EAGLE-3's first step alone. A call of first steps
        alone is priced on its own (``FIRST_STEP``), and their trees stand for no sequence's EAGLE-3 tree in the
        routing's estimates (``_kept``)."""
        chosen = [d._take(x, go, probe) for d, x, go, probe in zip(drafters, decisions, drafting, probes)]
        for i, d in enumerate(drafters):
            d._first_step = i in first
        # a first step catches up inside its call, whose time is then its price
        cls._catch_up(drafters, states, [tuple(d.drafters) if c and d.mode == "eager" else () if i in first else c
                                         for i, (d, c) in enumerate(zip(drafters, chosen))])
        for paradigm in dict.fromkeys(p for c in chosen for p in c):
            group = [i for i, c in enumerate(chosen) if paradigm in c]
            tic = time.perf_counter()
            trees = propose_all([drafters[i].drafters[paradigm] for i in group], [states[i] for i in group],
                                [min(max_depths[i], 1) if i in first else max_depths[i] for i in group])
            seconds = time.perf_counter() - tic
            drafters[group[0]].router.costs.observe_draft(FIRST_STEP if first.issuperset(group) else paradigm,
                                                          seconds, len(group))
            drafters[0].times.spent(seconds)
            for i, tree in zip(group, trees):
                drafters[i]._trees[paradigm] = tree
                if i not in first:
                    drafters[i].drafted[paradigm] = drafters[i].latest[paradigm] = tree
        return [DraftTree.union(d._trees.values()) if len(d._trees) > 1 else next(iter(d._trees.values()))
                for d in drafters]

    @classmethod
    def propose_batch(cls, drafters: Sequence["WhiFlashDrafter"], states: Sequence[SequenceState],
                      max_depths: Sequence[int]) -> list[DraftTree]:
        """Every sequence's policy picks its action; in a batch, the round's plan (``drafting_plan``) then says which of
        them draft (alone, the policy's choice stands: its objective weighs tau against cost already), and each it
        leaves out drafts its n-gram lookup where that finds something (the engine keeps what pays of it), else
        EAGLE-3's first step where that pays (:class:`FirstSteps`). Each paradigm drafts, in one call, the sequences
        that chose it (a hedge's sequence is in several such calls, and its trees are verified together as one). After a
        plan without drafts, a batch skips routing for a while (:class:`QuietRounds`), and now and then to measure a
        round without drafts (``RoundTimes``); and a batch of a size whose roots alone the cost model has not timed yet
        verifies them first: what not drafting costs is the plan's yardstick, and borrowed from 8 requests, where the
        curve was off by more, it made drafting at 16 look cheap (14 drafting rounds at 1.7x a round without drafts,
        before ``RoundTimes`` had one to compare)."""
        quiet, times, costs = drafters[0].quiet, drafters[0].times, drafters[0].router.costs
        n = len(drafters)
        if n > 1:
            times.start(states, drafters[0].load.sequences + 1 == n, time.perf_counter())
            if times.idle_due or not costs.knows_roots(n):  # a round of the roots alone, measured
                return cls._unrouted(drafters, states, [0] * n, None)
            if quiet.skip(n):
                return cls._unrouted(drafters, states, max_depths, False)
        features = [d._features(s, root) for d, s, root in zip(drafters, states, roots(states))]
        decisions = Router.choose_all([d.router for d in drafters], features)
        # a policy that predicts tau sees the present; only tau statistics from past drafts need probing
        probes = [n > 1 and x.tau is None and d.router.probe_due for d, x in zip(drafters, decisions)]
        first: set[int] = set()
        if n == 1:
            drafting = [True]
        else:
            wishes = [d._wish(f, x, probe, s.min_prob, depth + 1)  # a tree's depth is cut to the tokens left, less one
                      for d, f, x, probe, s, depth in zip(drafters, features, decisions, probes, states, max_depths)]
            decisions = [replace(x, tau=w.predicted) for x, w in zip(decisions, wishes)]  # what calibration learns
            extra = times.extra(n)
            drafting = plan(wishes, costs, n, extra)
            quiet.planned(any(drafting) and times.routing_pays(n))
            if not any(drafting) and quiet.gap == QUIET_MAX:  # drafted nothing for a long while
                drafting = explore(wishes, costs, n, extra)
            for i, d in enumerate(drafters):  # one the plan leaves out drafts its lookup, which costs no call
                if not drafting[i] and d.drafted.get("ngram"):
                    decisions[i], drafting[i] = Decision("ngram"), True
            lookup_rows = sum(len(d.drafted["ngram"]) for d, x in zip(drafters, decisions) if x.paradigm == "ngram")
            first = cls._first_steps(drafters, states, [i for i, go in enumerate(drafting) if not go and max_depths[i]],
                                     lookup_rows)
            for i in first:
                decisions[i], drafting[i] = Decision("eagle3"), True
            times.ran(any(drafting), routed=True)
        return cls._draft(drafters, states, max_depths, decisions, drafting, probes, first)

    def observe(self, report: RoundReport) -> None:
        self.times.forwarded(report.verify_seconds, report.prefilled)
        self.times.committed(len(report.new_tokens))
        if not self._trees:  # the engine verified the root without asking for a draft (one token left, or ...
            if report.prefilled:  # ... a round that ran a prompt chunk: one without a draft, for the record)
                self.trace.append((NO_DRAFT, 0))
            return
        # each paradigm's own tau as verified: its tree's acceptance, within what the engine kept of the tree
        each = {p: min(tree.matched(report.new_tokens), len(report.path)) + 1
                for p, tree in self._trees.items() if p != NO_DRAFT}
        verified = {p: min(len(tree), len(report.tree)) for p, tree in self._trees.items()}
        for p in each:
            self.drafters[p].observe(report)  # its node estimates learn from this round
        self._trees = {}
        if self._first_step:  # what a first step brings; the policy's statistics are of the trees it chooses
            self.first_steps.observe(each["eagle3"] - 1, verified["eagle3"])
        else:
            for p in each:
                # what the engine last verified of it; a tree it cut away entirely says nothing of the size (and a
                # size of 0 would stand for every later tree of the paradigm: ``_kept``)
                self.tree_size[p] = verified[p] or self.tree_size[p]
            self.router.update(self.action, len(report.path) + 1, each)
        if self.predicted_tau is not None:
            self.calibration.observe(self.predicted_tau, len(report.path) + 1)
        rows = report.forward_rows or len(report.tree) + 1
        if not report.prefilled:  # a prompt chunk's rows are priced nothing like a draft's: the curve would learn them
            self.router.costs.observe_verify(rows, report.verify_seconds, report.forward_sequences)
        self.trace.append((FIRST_STEP if self._first_step else self.action, len(report.path)))
        others = rows - len(report.tree) - 1
        self.load = BatchLoad(others, max(report.forward_tokens - len(report.new_tokens), 0),
                              report.draft_seconds * others / rows, report.forward_sequences - 1)
