"""Lossless acceptance of a draft tree against the target at the verify rows: every rule emits exactly the tokens
(greedy, keyed) or the distribution (rejection) the target alone would, whatever was drafted.

Greedy: follow the child whose token is the target's argmax, as long as one exists; the argmax at the last accepted
row is the bonus token. Output is token-identical to the target's own greedy decoding.

Keyed (T > 0, the default): the same walk with the target's keyed sample at each row (``sampling.py``) in place of
the argmax, so the output is token-identical to vanilla sampling with the same seed.

Rejection (T > 0): every drafter here proposes *deterministic* candidates (a token, not a distribution), so the
speculative-sampling rule reduces to: at a node with children c1..cm in draft order, start from p~ = p; for each ci
draw u ~ U[0,1) and accept ci if u < p~(ci), otherwise set p~(ci) = 0 and renormalise; if no child is accepted emit
y ~ p~. Below a fully accepted path (a leaf) the bonus is y ~ p. Each emitted token is then distributed exactly as
p, whatever the tree; the text, though, depends on what was drafted.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from whiflash_sgl.rowwise import argmax_rows
from whiflash_sgl.sampling import KeyedSampler, SamplingParams, target_probs
from whiflash_sgl.tree import DraftTree

def _children_table(tree: DraftTree) -> list[list[int]]:
    table: list[list[int]] = [[] for _ in range(len(tree) + 1)]  # index = parent + 1
    for i, p in enumerate(tree.parents):
        table[p + 1].append(i)
    return table


def _walk(tree: DraftTree, pick: Callable[[int], int]) -> tuple[list[int], int]:
    """Follow, from the root, the child holding the target's token ``pick(row)``; return the accepted node indices
    (root to leaf) and the target's token at the last accepted row (the bonus)."""
    children = _children_table(tree)
    path: list[int] = []
    node = -1
    while True:
        want = pick(node + 1)
        node = next((c for c in children[node + 1] if tree.tokens[c] == want), None)
        if node is None:
            return path, want
        path.append(node)


def accept_greedy(tree: DraftTree, logits: torch.Tensor) -> tuple[list[int], int]:
    """Accepted node indices and the bonus token, from verify-row logits ``[n+1, V]``."""
    best = argmax_rows(logits).tolist()
    return _walk(tree, best.__getitem__)


def accept_keyed(tree: DraftTree, logits: torch.Tensor, sampler: KeyedSampler,
                 root_position: int) -> tuple[list[int], int]:
    """The greedy walk on the target's keyed samples; only the rows the walk reaches are sampled."""
    positions = tree.positions(root_position)
    return _walk(tree, lambda row: sampler.sample(logits[row : row + 1], positions[row : row + 1])[0])


def accept_sampled(tree: DraftTree, probs: torch.Tensor, generator: torch.Generator) -> tuple[list[int], int]:
    """The deterministic-candidate rule of the module docstring; ``probs`` are verify-row target distributions."""
    children = _children_table(tree)
    path: list[int] = []
    node = -1
    while True:
        p = probs[node + 1]
        for child in children[node + 1]:
            token = tree.tokens[child]
            if torch.rand((), generator=generator).item() < p[token].item():
                path.append(child)
                node = child
                break
            p = p.clone()
            p[token] = 0.0
            p = p / p.sum()
        else:
            return path, int(torch.multinomial(p, 1, generator=generator).item())


def accept(tree: DraftTree, logits: torch.Tensor, params: SamplingParams, *, sampler: KeyedSampler | None = None,
           generator: torch.Generator | None = None, root_position: int = 0) -> tuple[list[int], int]:
    """Acceptance by ``params``: greedy, keyed (``sampler``; the root row sits at ``root_position``) or rejection
    (``generator``)."""
    if params.greedy:
        return accept_greedy(tree, logits)
    if params.rule == "keyed":
        return accept_keyed(tree, logits, sampler, root_position)
    # one small transfer; the walk then samples with the engine's (CPU) generator wherever the target runs
    return accept_sampled(tree, target_probs(logits, params).cpu(), generator)
