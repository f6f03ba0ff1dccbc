"""The routing upper bound: every paradigm drafts from the same prefix each round, and their union is verified in
one pass, so each round accepts the longest prefix any single paradigm would have reached.

Each round it also records what every paradigm alone would have accepted, with the router's features and the
measured draft times: the traces a learned policy is trained on (``whiflash collect-traces``).
"""

from __future__ import annotations

import copy
import time

from whiflash_sgl.drafters.base import Drafter, RoundReport, SequenceState
from whiflash_sgl.drafters.whiflash import round_features
from whiflash_sgl.router import Router
from whiflash_sgl.tree import DraftTree


class OracleDrafter(Drafter):
    name = "oracle"

    def __init__(self, drafters: dict[str, Drafter], router: Router, tokenizer):
        self.drafters, self.router, self.tokenizer = drafters, router, tokenizer
        self.feature_layers = tuple(sorted({layer for d in drafters.values() for layer in d.feature_layers}))
        self.traces: list[dict] = []
        self.tree_size = {p: 8 for p in drafters}
        self.trace: list[tuple[str, int]] = []  # (best paradigm, accepted draft tokens) per round
        self._round: dict = {}

    def fork(self) -> "OracleDrafter":
        """Another sequence's drafters and router state; weights, cost model and the ``traces`` log shared."""
        twin = copy.copy(self)
        twin.drafters = {p: d.fork() for p, d in self.drafters.items()}
        twin.router = self.router.fork()
        twin.tree_size = dict(self.tree_size)
        return twin

    def start(self, state: SequenceState) -> None:
        for drafter in self.drafters.values():
            drafter.start(state)
        self.router.reset()
        self.trace = []
        self.accepts: list[dict[str, int]] = []  # what each paradigm alone would have accepted, per round

    def summary(self) -> dict:
        return {"paradigms": [paradigm for paradigm, _ in self.trace], "paradigm_accepts": self.accepts}

    def propose(self, state: SequenceState, max_depth: int) -> DraftTree:
        features = round_features(self.router, self.drafters, state, self.tree_size, self.tokenizer)
        trees, seconds = {}, {}
        for paradigm, drafter in self.drafters.items():
            tic = time.perf_counter()
            trees[paradigm] = drafter.propose(state, max_depth)
            seconds[paradigm] = time.perf_counter() - tic
        self._round = {"features": features, "trees": trees, "draft_seconds": seconds}
        self.tree_size = {p: len(t) for p, t in trees.items()}
        return DraftTree.union(trees.values())

    def observe(self, report: RoundReport) -> None:
        if not self._round:  # the engine verified without asking for a draft (one token left)
            return
        accepted = {p: tree.matched(report.new_tokens) for p, tree in self._round["trees"].items()}
        best = max(accepted, key=lambda p: (accepted[p], -len(self._round["trees"][p])))
        self.trace.append((best, len(report.path)))
        self.accepts.append(accepted)
        self.router.update(best, len(report.path) + 1)
        self.traces.append({
            "features": self._round["features"],
            "accepted": accepted,
            "draft_tokens": {p: len(t) for p, t in self._round["trees"].items()},
            "draft_seconds": self._round["draft_seconds"],
        })
        self._round = {}
