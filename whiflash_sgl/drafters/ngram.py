"""Model-free drafting by n-gram lookup over the prompt and the generated text (prompt lookup / suffix match).

The longest suffix of the sequence (``max_ngram`` tokens down to ``min_ngram``) that occurred before is looked up;
the tokens that followed its most recent occurrences are the proposal: one chain, or up to ``width`` distinct
continuations merged into a small tree. On a CPU a verify pass over 4-10 tokens costs about twice a single decode
step, so a proposal must be likely to pay: matches shorter than ``min_ngram`` are not proposed.
"""

from __future__ import annotations

import numpy as np

from whiflash_sgl.drafters.base import Drafter, SequenceState
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

    def start(self, state: SequenceState) -> None:
        self._last = None

    def continuations(self, tokens: list[int], length: int) -> list[list[int]]:
        """Up to ``width`` distinct continuations of the longest earlier match of a suffix, most recent first."""
        seq = np.asarray(tokens, dtype=np.int64)
        for n in range(min(self.max_ngram, len(seq) - 1), self.min_ngram - 1, -1):
            windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)  # every n-gram that has a successor
            starts = np.flatnonzero((windows == seq[-n:]).all(axis=1))
            found: list[list[int]] = []
            for s in starts[::-1]:
                cont = seq[s + n : s + n + length].tolist()
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
        return self._last[1]
