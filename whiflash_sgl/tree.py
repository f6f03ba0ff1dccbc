"""Draft trees: what a drafter proposes and the target verifies in one forward pass.

A tree hangs below a *root*, the last committed token, whose target KV is not cached yet. Nodes are stored in
topological order: ``parents[i]`` is ``-1`` (child of the root) or an index ``< i``. The verify input is
``[root, node_0, ..., node_{n-1}]``; row ``r`` of every per-row quantity below refers to that input (row 0 = root,
row ``i + 1`` = node ``i``). A chain is the tree whose node ``i`` has parent ``i - 1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class DraftTree:
    tokens: tuple[int, ...] = ()
    parents: tuple[int, ...] = ()
    # the drafter's estimate that each node gets accepted (its path's probability), never above its parent's;
    # empty when the drafter has none. The engine spends a batch's verify rows on the likeliest nodes by it.
    probs: tuple[float, ...] = field(default=(), compare=False)
    depths: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents):
            raise ValueError(f"tree has {len(self.tokens)} tokens but {len(self.parents)} parents")
        if self.probs and len(self.probs) != len(self.tokens):
            raise ValueError(f"tree has {len(self.tokens)} tokens but {len(self.probs)} node probabilities")
        depths = []
        for i, p in enumerate(self.parents):
            if not -1 <= p < i:
                raise ValueError(f"node {i} has parent {p}; parents must come before their children")
            depths.append(1 if p < 0 else depths[p] + 1)
        object.__setattr__(self, "depths", tuple(depths))

    @classmethod
    def chain(cls, tokens) -> "DraftTree":
        tokens = tuple(int(t) for t in tokens)
        return cls(tokens, tuple(range(-1, len(tokens) - 1)))

    @classmethod
    def from_paths(cls, paths) -> "DraftTree":
        """The trie of several token sequences (shared prefixes merged), in the order paths first appear."""
        tokens: list[int] = []
        parents: list[int] = []
        index: dict[tuple[int, int], int] = {}
        for path in paths:
            parent = -1
            for t in path:
                key = (parent, int(t))
                if key not in index:
                    index[key] = len(tokens)
                    tokens.append(int(t))
                    parents.append(parent)
                parent = index[key]
        return cls(tuple(tokens), tuple(parents))

    @classmethod
    def union(cls, trees) -> "DraftTree":
        """One tree holding every node of ``trees`` (shared prefixes merged), in the order they first appear. A
        merged node's probability is the largest any tree gives it, when every tree has probabilities (so that a
        hedge's tree is trimmed by value like any other); otherwise the union has none."""
        trees = list(trees)
        tokens: list[int] = []
        parents: list[int] = []
        probs: list[float] = []
        index: dict[tuple[int, int], int] = {}
        for tree in trees:
            merged: list[int] = []  # this tree's node -> the union's
            for i, (token, parent) in enumerate(zip(tree.tokens, tree.parents)):
                key = (-1 if parent < 0 else merged[parent], token)
                if key not in index:
                    index[key] = len(tokens)
                    tokens.append(token)
                    parents.append(key[0])
                    probs.append(0.0)
                merged.append(index[key])
                if tree.probs:
                    probs[merged[-1]] = max(probs[merged[-1]], tree.probs[i])
        return cls(tuple(tokens), tuple(parents), tuple(probs) if all(t.probs for t in trees) else ())

    def matched(self, tokens) -> int:
        """How many of ``tokens`` this tree holds as a path from the root (the acceptance it would have had)."""
        node, count = -1, 0
        for token in tokens:
            node = next((c for c in self.children(node) if self.tokens[c] == token), None)
            if node is None:
                break
            count += 1
        return count

    def outcomes(self, verified: "DraftTree", accepted: Sequence[int]) -> list[bool | None]:
        """Per node, what became of it in a verify pass over ``verified`` (which may have dropped some of this
        tree's nodes and added others') that accepted the draft tokens ``accepted``: None when it was not verified,
        else whether it was accepted."""
        where: list[int | None] = []  # this tree's node -> verified's
        result: list[bool | None] = []
        for token, parent, depth in zip(self.tokens, self.parents, self.depths):
            above = -1 if parent < 0 else where[parent]
            node = None if above is None else next(
                (c for c in verified.children(above) if verified.tokens[c] == token), None)
            where.append(node)
            on_path = (parent < 0 or bool(result[parent])) and depth <= len(accepted) and accepted[depth - 1] == token
            result.append(None if node is None else on_path)
        return result

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def depth(self) -> int:
        return max(self.depths, default=0)

    @property
    def is_chain(self) -> bool:
        return self.parents == tuple(range(-1, len(self.tokens) - 1))

    def children(self, node: int) -> list[int]:
        """Children of ``node`` (``-1`` = root) in draft order."""
        return [i for i, p in enumerate(self.parents) if p == node]

    def pruned(self, max_depth: int) -> "DraftTree":
        """The subtree of nodes at depth ``<= max_depth``."""
        return self.subtree([i for i, d in enumerate(self.depths) if d <= max_depth])

    def first(self, n: int) -> "DraftTree":
        """The first ``n`` nodes: a tree still, since every node's parent comes before it."""
        return self.subtree(range(min(n, len(self))))

    def subtree(self, keep) -> "DraftTree":
        """The nodes ``keep`` (ascending, every kept node's parent kept too), renumbered in their order."""
        keep = list(keep)
        if len(keep) == len(self):
            return self
        new_index = {old: new for new, old in enumerate(keep)}
        return DraftTree(
            tuple(self.tokens[i] for i in keep),
            tuple(-1 if self.parents[i] < 0 else new_index[self.parents[i]] for i in keep),
            tuple(self.probs[i] for i in keep) if self.probs else (),
        )

    def ancestor_mask(self) -> torch.Tensor:
        """``[n+1, n+1]`` bool over verify rows: row r may attend to row c iff c is r or an ancestor of r."""
        n = len(self.tokens)
        mask = torch.zeros(n + 1, n + 1, dtype=torch.bool)
        mask[:, 0] = True
        for i, p in enumerate(self.parents):
            row = i + 1
            if p >= 0:
                mask[row] = mask[p + 1]
            mask[row, row] = True
        return mask

    def positions(self, root_position: int) -> torch.Tensor:
        """Absolute positions of the verify rows."""
        return torch.tensor((root_position, *(root_position + d for d in self.depths)), dtype=torch.long)
