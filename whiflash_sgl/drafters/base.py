"""The drafter interface: given the committed sequence, propose a draft tree below its last token.

A drafter object serves one sequence; :meth:`Drafter.fork` makes one for another sequence, sharing the weights (and,
for a router, its cost model and statistics). :func:`propose_all` drafts for many sequences in one round, handing
each drafter class its sequences at once (:meth:`Drafter.propose_batch`) so that a model-based drafter can run one
batched forward for all of them.

A model-based drafter keeps its own KV cache over committed positions. Its *frontier* is how many positions that
cache covers; :meth:`Drafter.catch_up` brings it to the committed length from the target's stored features with
projections only (KV-only prefill), and :meth:`Drafter.propose` catches up first if it must. Keeping the two apart
lets the router bring an idle drafter up to date lazily, only when it is chosen.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from whiflash_sgl.drafters.node_estimates import ContinuationRates, ProbCalibration
from whiflash_sgl.forward_price import ScaledCurve
from whiflash_sgl.sampling import KeyedSampler
from whiflash_sgl.tree import DraftTree


@dataclass
class SequenceState:
    """What a drafter may look at. ``tokens[-1]`` is the root of the next draft; its target KV is not cached yet.

    ``features[t]`` (``[n-1, len(feature_layers), H]``) holds the target's hidden states at committed position ``t``
    for the HF ``hidden_states`` indices in ``feature_layers`` (the residual stream entering each of those layers),
    or is None when the engine captures nothing (model-free drafters). ``root_logits`` are the target's logits that
    produced the root token (free after every verify pass). ``sampler`` is the request's keyed draw when it samples
    with the keyed rule: a drafter then guesses the target's keyed sample by drawing with the same noise.
    """

    tokens: list[int]
    prompt_len: int
    features: torch.Tensor | None = None
    feature_layers: tuple[int, ...] = ()
    root_logits: torch.Tensor | None = None
    sampler: KeyedSampler | None = None
    min_prob: float = 0.0  # the least path probability that can pay this round (the batch's last trim bar)
    commit_rate: float = 0.0  # tokens per second the batch's last round was expected to commit (0: not known)
    _buffer: torch.Tensor | None = field(default=None, repr=False, compare=False)  # what ``features`` is a view of

    def add_features(self, rows: torch.Tensor) -> None:
        """Append the features of newly committed positions. ``features`` stays a view of a buffer that doubles when
        full, so a round copies its own rows rather than the whole history (at 500 positions that history is 3.5 MB
        per request and round)."""
        held = 0 if self.features is None else len(self.features)
        if self._buffer is None or held + len(rows) > len(self._buffer):
            buffer = rows.new_empty((max(2 * (held + len(rows)), 64), *rows.shape[1:]))
            if held:
                buffer[:held] = self.features
            self._buffer = buffer
        self._buffer[held : held + len(rows)] = rows
        self.features = self._buffer[: held + len(rows)]

    def context_features(self, layers: tuple[int, ...], start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        """Features of positions ``[start, end)`` for ``layers``, concatenated: ``[end-start, len(layers)*H]``, in
        the drafter's ``dtype``."""
        columns = [self.feature_layers.index(layer) for layer in layers]
        rows = self.features[start:end, columns]
        return rows.reshape(rows.shape[0], -1).to(dtype)


@dataclass(frozen=True)
class RoundReport:
    """The outcome of one verify pass, for drafters that learn from it (the router)."""

    tree: DraftTree
    path: list[int]  # accepted node indices
    new_tokens: list[int]  # accepted draft tokens + bonus
    verify_seconds: float  # the whole verify forward, shared with the other sequences in it
    forward_rows: int = 0  # rows of that forward, all sequences' together (0: not known, taken as this tree's)
    forward_tokens: int = 0  # tokens that forward committed, all sequences' together
    forward_sequences: int = 1  # sequences in that forward, this one included
    draft_seconds: float = 0.0  # the round's drafting, all sequences' together
    prefilled: bool = False  # that forward also ran prompt chunks (its time is not a verify's)


class Drafter:
    """Base class; model-free drafters only implement :meth:`propose`."""

    name = ""
    feature_layers: tuple[int, ...] = ()  # target hidden_states indices this drafter reads (empty: model-free)
    # learns from verification how likely its nodes are (``node_estimates``); one object shared by the forks
    estimates: ContinuationRates | ProbCalibration | None = None
    _proposed: DraftTree | None = None  # this round's tree as drafted, until the verify pass is observed

    def estimated(self, tree: DraftTree) -> DraftTree:
        """``tree`` with the estimates' node probabilities (as it is without estimates); the tree as drafted is
        kept for :meth:`observe` to learn from."""
        if self.estimates is None:
            return tree
        self._proposed = tree
        return self.estimates.apply(tree)

    def fork(self) -> "Drafter":
        """A drafter for another sequence: same weights and settings, its own per-sequence state (set up by
        :meth:`start`)."""
        return copy.copy(self)

    def start(self, state: SequenceState) -> None:
        """A new sequence begins (its prompt is prefilled); drop any per-sequence state."""

    def pending(self, state: SequenceState) -> int:
        """Committed positions not yet in this drafter's cache (the catch-up backlog)."""
        return 0

    def catch_up(self, state: SequenceState) -> None:
        """Bring the drafter's cache up to the committed sequence (KV-only prefill)."""

    @classmethod
    def catch_up_batch(cls, drafters: Sequence["Drafter"], states: Sequence[SequenceState]) -> None:
        """``drafters[i].catch_up(states[i])`` for every i, all instances of this class; a drafter that can batch its
        KV-only prefill over sequences overrides this."""
        for drafter, state in zip(drafters, states):
            drafter.catch_up(state)

    def propose(self, state: SequenceState, max_depth: int) -> DraftTree:
        """A draft below ``state.tokens[-1]`` no deeper than ``max_depth`` (may be empty)."""
        raise NotImplementedError

    @classmethod
    def propose_batch(cls, drafters: Sequence["Drafter"], states: Sequence[SequenceState],
                      max_depths: Sequence[int]) -> list[DraftTree]:
        """``drafters[i].propose(states[i], max_depths[i])`` for every i, all instances of this class; a drafter
        that can batch its forwards over sequences overrides this."""
        return [d.propose(s, depth) for d, s, depth in zip(drafters, states, max_depths)]

    def forward_price(self) -> ScaledCurve | None:
        """The target's curve scaled to this machine's forwards that this drafter's cost model keeps, where it keeps
        one: the engine then trims by it and tells it of every forward. None: the engine keeps its own."""
        return None

    def observe(self, report: RoundReport) -> None:
        """Called after each verify pass with its outcome (``report.tree`` may hold other drafters' nodes too): the
        estimates learn what became of this round's nodes."""
        proposed, self._proposed = self._proposed, None
        if proposed is not None and self.estimates is not None:
            accepted = report.new_tokens[: len(report.path)]
            self.estimates.observe(proposed, proposed.outcomes(report.tree, accepted))

    def summary(self) -> dict:
        """Per-sequence figures for the sequence's ``GenerationResult`` (routed drafters: each round's paradigm)."""
        return {}


def propose_all(drafters: Sequence[Drafter], states: Sequence[SequenceState],
                max_depths: Sequence[int]) -> list[DraftTree]:
    """Every sequence's draft, each drafter class handed all of its sequences in one call."""
    trees: list[DraftTree | None] = [None] * len(drafters)
    for kind in dict.fromkeys(type(d) for d in drafters):
        group = [i for i, d in enumerate(drafters) if type(d) is kind]
        proposed = kind.propose_batch([drafters[i] for i in group], [states[i] for i in group],
                                      [max_depths[i] for i in group])
        for i, tree in zip(group, proposed):
            trees[i] = tree
    return trees
