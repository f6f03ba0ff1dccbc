"""Model-free drafting by n-gram lookup over the prompt and the generated text (prompt lookup / suffix match).

The longest suffix of the sequence (``max_ngram`` tokens down to ``min_ngram``) that occurred before is looked up;
the tokens that followed its most recent occurrences are the proposal: one chain, or up to ``width`` distinct
continuations merged into a small tree. On a CPU a verify pass over 4-10 tokens costs about twice a single decode
step, so a proposal must be likely to pay: matches shorter than ``min_ngram`` are not proposed. A lookup has no
probability for its tokens: its nodes get the acceptance its proposals have had at their depth (``ContinuationRates``).
"""

from __future__ import annotations

from whiflash_sgl.drafters.base import Drafter, SequenceState
from whiflash_sgl.drafters.node_estimates import ContinuationRates
from whiflash_sgl.tree import DraftTree


class NgramDrafter(Drafter):
    name = "ngram"

    def __init__(self, max_ngram: int = 4, min_ngram: int = 2, num_tokens: int = 8, width: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        if num_tokens < 1 or width < 1:
            raise ValueError("num_tokens and width must be >= 1")
        self.max_ngram, self.min_ngram, self.num_tokens, self.width = max_ngram, min_ngram, num_tokens, width
        self._last: tuple[tuple[int, int], DraftTree] | None = None  # the router peeks at the proposal first
        self._index: _NgramIndex | None = None
        self.estimates = ContinuationRates()

    def fork(self) -> "NgramDrafter":
        twin = super().fork()
        twin._index = None
        return twin

    def start(self, state: SequenceState) -> None:
        self._last = None

    def continuations(self, tokens: list[int], length: int) -> list[list[int]]:
        """Up to ``width`` distinct continuations of the longest earlier match of a suffix, most recent first."""
        index = self._index
        if index is None or index.tokens is not tokens or index.covered > len(tokens):
            index = self._index = _NgramIndex(tokens, self.min_ngram, self.max_ngram)
        index.update()
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            found: list[list[int]] = []
            for s in reversed(index.starts.get(tuple(tokens[-n:]), ())):
                cont = tokens[s + n : s + n + length]
                if cont not in found:
                    found.append(cont)
                if len(found) == self.width:
                    break
            if found:
                return found
        return []

    def propose(self, state: SequenceState, max_depth: int) -> DraftTree:
        length = min(self.num_tokens, max_depth)
        if length < 1:
            return DraftTree()
        key = (len(state.tokens), length)  # a sequence only grows, so its length names its tokens
        if self._last is None or self._last[0] != key:
            self._last = (key, DraftTree.from_paths(self.continuations(state.tokens, length)))
        return self.estimated(self._last[1])


class _NgramIndex:
    """Where each n-gram (``min_n`` <= n <= ``max_n``) of a growing token list starts, for those followed by a
    token, brought up to date with what was appended since the last lookup: a suffix match is then a few dict
    lookups instead of a scan of the whole sequence (0.4 ms per request and round at a few hundred tokens, for a
    peek the router takes every round)."""

    def __init__(self, tokens: list[int], min_n: int, max_n: int):
        self.tokens, self.sizes = tokens, range(min_n, max_n + 1)
        self.starts: dict[tuple[int, ...], list[int]] = {}
        self.covered = 0  # n-grams ending before this position are indexed

    def update(self) -> None:
        tokens = self.tokens
        for end in range(self.covered, len(tokens)):  # an n-gram ending at ``end`` is followed by tokens[end]
            for n in self.sizes:
                if n <= end:
                    self.starts.setdefault(tuple(tokens[end - n : end]), []).append(end - n)
        self.covered = len(tokens)
