"""A drafter's estimate that each node of its tree gets accepted, learned from the verify passes it has seen.

The engine spends a batch's verify rows on the likeliest nodes (``cost_curve.trim_to_value``), so these estimates
decide how big trees get as the batch grows. A draft network's own path probability is overconfident (SmolLM2's
EAGLE-3 and DFlash nodes drafted at 0.3-0.8 were accepted about 0.7 times as often as that), and a lookup has none
at all; both kinds of estimate are corrected by what verification actually accepted, over every sequence the
drafter's forks serve.
"""

from __future__ import annotations

from collections.abc import Sequence

from whiflash_sgl.tree import DraftTree


class ContinuationRates:
    """For a drafter with no probabilities (the n-gram lookup): per depth, how often a node was accepted when its
    parent was (the root always is), the mean of a Beta prior (``prior`` at weight ``weight``) updated by every
    verified node at that depth. A node's estimate is the product of the rates along its path."""

    def __init__(self, prior: float = 0.5, weight: float = 2.0):
        self.prior, self.weight = prior, weight
        self.trials: list[int] = []
        self.accepted: list[int] = []

    def rate(self, depth: int) -> float:
        """The acceptance rate of a node at ``depth`` (1 = a child of the root) given its parent's."""
        if depth > len(self.trials):
            return self.prior
        return (self.accepted[depth - 1] + self.prior * self.weight) / (self.trials[depth - 1] + self.weight)

    def apply(self, tree: DraftTree) -> DraftTree:
        probs: list[float] = []
        for parent, depth in zip(tree.parents, tree.depths):
            probs.append((1.0 if parent < 0 else probs[parent]) * self.rate(depth))
        return DraftTree(tree.tokens, tree.parents, tuple(probs))

    def observe(self, tree: DraftTree, outcomes: Sequence[bool | None]) -> None:
        for parent, depth, outcome in zip(tree.parents, tree.depths, outcomes):
            if outcome is None or (parent >= 0 and not outcomes[parent]):
                continue  # not verified, or its parent was rejected: no trial of the rate given the parent
            while len(self.trials) < depth:
                self.trials.append(0)
                self.accepted.append(0)
            self.trials[depth - 1] += 1
            self.accepted[depth - 1] += outcome


class ProbCalibration:
    """For a drafter with path probabilities: in each tenth of [0, 1], accepted nodes per unit of probability the
    drafter gave the verified nodes there (a prior of ``weight`` at a ratio of 1), which scales its estimates in that
    tenth. A node never gets more than its parent."""

    BINS = 10

    def __init__(self, weight: float = 2.0):
        self.weight = weight
        self.predicted = [0.0] * self.BINS
        self.accepted = [0.0] * self.BINS

    def _bin(self, p: float) -> int:
        return min(int(p * self.BINS), self.BINS - 1)

    def ratio(self, p: float) -> float:
        b = self._bin(p)
        return (self.accepted[b] + self.weight) / (self.predicted[b] + self.weight)

    def least_raw(self, bar: float) -> float:
        """The least probability the drafter may give a node that the calibration takes to ``bar`` or above (1 when
        none): a drafter floored there drafts every node that could clear the bar and none that could not."""
        for b in range(self.BINS):
            needed = max(bar / self.ratio(b / self.BINS), b / self.BINS)
            if needed < (b + 1) / self.BINS or (b == self.BINS - 1 and needed <= 1.0):
                return needed
        return 1.0

    def apply(self, tree: DraftTree) -> DraftTree:
        if not tree.probs:
            return tree
        probs: list[float] = []
        for parent, p in zip(tree.parents, tree.probs):
            probs.append(min(p * self.ratio(p), 1.0 if parent < 0 else probs[parent]))
        return DraftTree(tree.tokens, tree.parents, tuple(probs))

    def observe(self, tree: DraftTree, outcomes: Sequence[bool | None]) -> None:
        for p, outcome in zip(tree.probs, outcomes):
            if outcome is not None:
                self.predicted[self._bin(p)] += p
                self.accepted[self._bin(p)] += outcome
