"""Lossless acceptance of a draft tree against the target's distributions at the verify rows.

Greedy: follow the child whose token is the target's argmax, as long as one exists; the argmax at the last accepted
row is the bonus token. Output is token-identical to the target's own greedy decoding.

Sampling (T > 0): every drafter here proposes *deterministic* candidates (a token, not a distribution), so the
speculative-sampling rule reduces to: at a node with children c1..cm in draft order, start from p~ = p; for each ci
draw u ~ U[0,1) and accept ci if u < p~(ci), otherwise set p~(ci) = 0 and renormalise; if no child is accepted emit
y ~ p~. Below a fully accepted path (a leaf) the bonus is y ~ p. Each emitted token is then distributed exactly as
p, whatever the tree, which is what makes every drafter and every routing policy lossless.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from whiflash_sgl.tree import DraftTree


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution the target samples from: temperature, then top-k, then top-p (nucleus), renormalised."""
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token when the mass strictly before it already reaches top_p (the top token always stays)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= params.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def _children_table(tree: DraftTree) -> list[list[int]]:
    table: list[list[int]] = [[] for _ in range(len(tree) + 1)]  # index = parent + 1
    for i, p in enumerate(tree.parents):
        table[p + 1].append(i)
    return table


def accept_greedy(tree: DraftTree, logits: torch.Tensor) -> tuple[list[int], int]:
    """Accepted node indices (root to leaf) and the bonus token, from verify-row logits ``[n+1, V]``."""
    best = logits.argmax(-1).tolist()
    children = _children_table(tree)
    path: list[int] = []
    node = -1
    while True:
        want = best[node + 1]
        node = next((c for c in children[node + 1] if tree.tokens[c] == want), None)
        if node is None:
            return path, want
        path.append(node)


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


def accept(tree: DraftTree, logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None):
    """Greedy or sampled acceptance, as ``params`` say."""
    if params.greedy:
        return accept_greedy(tree, logits)
    # one small transfer; the walk then samples with the engine's (CPU) generator wherever the target runs
    return accept_sampled(tree, target_probs(logits, params).cpu(), generator)
