"""Batched lossless acceptance of draft trees, as tensor ops (a loop over tree depth, none over requests or nodes).

Both modes reduce to one walk. Every verify row ``r`` of every request gets a *target token* ``y_r``: the argmax of
the target's logits (greedy), or one draw from the target's distribution ``p_r`` (sampling). From the root, the walk
moves to the first child (in draft order) whose token equals ``y`` of the current row, and stops at a row with no such
child; that row's ``y`` is the bonus token.

Greedy, this is ``whiflash_sgl.verify.accept_greedy`` exactly (same argmax, same first-match rule).

Sampling, it has exactly the output distribution of the deterministic-candidate rule of ``whiflash_sgl.verify``
(children ``c1..cm`` tried in order with ``u < p~(ci)``, rejected tokens zeroed and ``p~`` renormalised, a residual
draw when all fail). At one node, let ``P_j`` be the mass of the distinct tokens among ``c1..cj``. The rule accepts
``ci`` (the first child carrying its token) with probability ``prod_{j<i}(1 - p~_j(cj)) * p~_i(ci) =
(1 - P_{i-1}) * p(ci) / (1 - P_{i-1}) = p(ci)``, accepts later duplicates of a rejected token with probability 0,
and emits a token ``y`` outside the children with probability ``(1 - P_m) * p(y) / (1 - P_m) = p(y)``; drawing
``y ~ p`` and matching it gives the same probabilities, and both use fresh randomness at every node. Drawing all
rows up front costs one ``multinomial`` call for the whole batch, and cannot hit the rule's degenerate case of an
all-zero residual from rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tree_batch import TreeBatch


@dataclass(frozen=True)
class BatchAcceptance:
    """Per request: accepted node indices root to leaf (``path[i, :num_accepted[i]]``, -1 after) and the bonus."""

    path: torch.Tensor
    num_accepted: torch.Tensor
    bonus: torch.Tensor

    def tolist(self) -> list[tuple[list[int], int]]:
        """``[(path, bonus), ...]``, the shape ``whiflash_sgl.verify.accept`` returns for one request."""
        paths, counts, bonus = self.path.tolist(), self.num_accepted.tolist(), self.bonus.tolist()
        return [(p[:n], b) for p, n, b in zip(paths, counts, bonus)]


def follow_targets(trees: TreeBatch, target_tokens: torch.Tensor) -> BatchAcceptance:
    """The walk of the module docstring, given the target token of every verify row (flat, ``trees.qo_indptr``)."""
    if target_tokens.shape != (int(trees.qo_indptr[-1]),):
        raise ValueError(f"need one target token per verify row ({int(trees.qo_indptr[-1])}), "
                         f"got shape {tuple(target_tokens.shape)}")
    tokens = trees.padded_nodes(trees.tokens, pad=-1)
    parent_rows = trees.padded_nodes(trees.parents + 1, pad=-1)
    # targets per padded row [B, max_nodes + 1]: the root's row is qo_indptr[i], node j's row qo_indptr[i] + 1 + j
    rows = trees.qo_indptr[:-1, None] + torch.arange(tokens.shape[1] + 1, device=tokens.device)
    targets = target_tokens[rows.clamp(max=target_tokens.numel() - 1)]

    batch, width = tokens.shape
    current = torch.zeros(batch, dtype=torch.long, device=tokens.device)
    active = torch.ones(batch, dtype=torch.bool, device=tokens.device)
    path = torch.full((batch, width), -1, dtype=torch.long, device=tokens.device)
    for step in range(width):
        wanted = targets.gather(1, current[:, None])
        match = (parent_rows == current[:, None]) & (tokens == wanted) & active[:, None]
        active = match.any(1)
        if not bool(active.any()):
            break
        child = match.to(torch.uint8).argmax(1)  # the first matching child in draft order
        path[:, step] = torch.where(active, child, -1)
        current = torch.where(active, child + 1, current)
    return BatchAcceptance(path, (path >= 0).sum(1), targets.gather(1, current[:, None])[:, 0])


def accept_greedy_batch(trees: TreeBatch, logits: torch.Tensor) -> BatchAcceptance:
    """Greedy acceptance from verify-row logits ``[total_rows, V]`` (rows laid out by ``trees.qo_indptr``)."""
    return follow_targets(trees, logits.argmax(-1))


def accept_sampled_batch(trees: TreeBatch, probs: torch.Tensor, generator: torch.Generator | None) -> BatchAcceptance:
    """Sampled acceptance from verify-row target distributions ``[total_rows, V]`` (e.g. ``verify.target_probs``)."""
    draws = torch.multinomial(probs.float(), 1, generator=generator)[:, 0]
    return follow_targets(trees, draws)
