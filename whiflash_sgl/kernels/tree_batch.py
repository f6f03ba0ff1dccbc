"""A batch of draft trees as flat tensors: what a batched verify attends with and accepts from.

Request ``i`` owns nodes ``node_indptr[i]:node_indptr[i+1]`` of the flat ``tokens`` / ``parents`` (parents are
indices *within* the request, ``-1`` = its root; see :mod:`.tree_mask`). Its verify rows are ``[root, nodes...]``, so
the batch's verify rows are laid out by ``qo_indptr = node_indptr + arange(B + 1)``: the same ragged row layout the
attention kernels and the target's logits use. A request whose tree is empty has just its root row.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .layout import AttentionLayout, indptr_from_lengths
from .tree_mask import ancestor_walk


@dataclass(frozen=True)
class TreeBatch:
    """Flat tokens and request-local parents of a batch of trees, as the module docstring lays them out."""

    tokens: torch.Tensor
    parents: torch.Tensor
    node_indptr: torch.Tensor

    def __post_init__(self) -> None:
        if self.tokens.shape != self.parents.shape or self.tokens.dim() != 1 or self.node_indptr.dim() != 1:
            raise ValueError("tokens and parents must be flat and of one length, node_indptr 1-D")
        if int(self.node_indptr[-1]) != self.tokens.numel() or (self.num_nodes < 0).any():
            raise ValueError("node_indptr must rise from 0 to the number of nodes")
        device = self.node_indptr.device
        request = torch.repeat_interleave(torch.arange(self.batch_size, device=device), self.num_nodes)
        local = torch.arange(self.tokens.numel(), device=device) - self.node_indptr[request]
        bad = (self.parents < -1) | (self.parents >= local)
        if bad.any():
            node = int(bad.nonzero()[0])
            raise ValueError(f"request {int(request[node])}, node {int(local[node])} has parent "
                             f"{int(self.parents[node])}; parents must come before their children")

    @classmethod
    def from_lists(
        cls,
        parents: Sequence[Sequence[int]],
        tokens: Sequence[Sequence[int]] | None = None,
        device: torch.device | str | None = None,
    ) -> "TreeBatch":
        """From per-request parent lists and, optionally, token lists (default: all zeros)."""
        tokens = tokens if tokens is not None else [[0] * len(p) for p in parents]
        if len(tokens) != len(parents) or any(len(t) != len(p) for t, p in zip(tokens, parents)):
            raise ValueError("every tree needs exactly one token per node")
        lengths = torch.tensor([len(p) for p in parents], dtype=torch.long)
        return cls(
            tokens=torch.tensor([t for ts in tokens for t in ts], dtype=torch.long, device=device),
            parents=torch.tensor([p for ps in parents for p in ps], dtype=torch.long, device=device),
            node_indptr=indptr_from_lengths(lengths).to(device),
        )

    @classmethod
    def from_trees(cls, trees: Iterable, device: torch.device | str | None = None) -> "TreeBatch":
        """From objects with ``tokens`` and ``parents`` sequences, such as ``whiflash_sgl.tree.DraftTree``."""
        trees = list(trees)
        return cls.from_lists([t.parents for t in trees], [t.tokens for t in trees], device)

    @property
    def batch_size(self) -> int:
        return len(self.node_indptr) - 1

    @property
    def num_nodes(self) -> torch.Tensor:
        return self.node_indptr[1:] - self.node_indptr[:-1]

    @property
    def qo_indptr(self) -> torch.Tensor:
        """Verify-row offsets: request ``i`` has ``num_nodes[i] + 1`` rows, its root first."""
        return self.node_indptr + torch.arange(self.batch_size + 1, device=self.node_indptr.device)

    def padded_nodes(self, values: torch.Tensor, pad: int) -> torch.Tensor:
        """Per-node ``values`` (flat, like ``tokens``) as ``[B, max_nodes]``, ``pad`` past each request's end."""
        width = int(self.num_nodes.max()) if self.batch_size else 0
        column = torch.arange(width, device=values.device)
        index = self.node_indptr[:-1, None] + column
        inside = column < self.num_nodes[:, None]
        return torch.where(inside, values[index.clamp(max=max(values.numel() - 1, 0))], pad)

    def ancestor_masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``mask [B, R, R]`` and ``depth [B, R]`` over padded verify rows (``R = max_nodes + 1``, root row 0)."""
        row_parents = self.padded_nodes(self.parents + 1, pad=0)
        row_parents = torch.cat([row_parents.new_zeros(self.batch_size, 1), row_parents], dim=1)
        return ancestor_walk(row_parents)

    def positions(self, prefix_lens: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Absolute positions of all verify rows, flat ``[total_rows]``; a root sits at its request's prefix length."""
        prefix_lens = torch.as_tensor(prefix_lens, dtype=torch.long, device=self.node_indptr.device)
        _, depth = self.ancestor_masks()
        inside = torch.arange(depth.shape[1], device=depth.device) <= self.num_nodes[:, None]
        return (depth + prefix_lens[:, None])[inside]

    def attention_layout(self, prefix_lens: torch.Tensor | Sequence[int]) -> AttentionLayout:
        """The verify layout: request ``i`` attends over ``prefix_lens[i]`` cached keys plus its own verify rows.

        Each query row sees the whole prefix and, among the verify rows, itself and its ancestors (SGLang's FULL_MASK
        rows). KV is laid out request after request, prefix first.
        """
        prefix_lens = torch.as_tensor(prefix_lens, dtype=torch.long, device=self.node_indptr.device)
        if prefix_lens.shape != (self.batch_size,) or (prefix_lens < 0).any():
            raise ValueError(f"need {self.batch_size} non-negative prefix lengths, got {prefix_lens.tolist()}")
        tree_mask, _ = self.ancestor_masks()
        q_lens = self.num_nodes + 1
        kv_lens = prefix_lens + q_lens
        max_q, max_kv = tree_mask.shape[1], int(kv_lens.max())
        rows = torch.arange(max_q, device=tree_mask.device)[None, :, None]
        cols = torch.arange(max_kv, device=tree_mask.device)[None, None, :]
        tree_col = (cols - prefix_lens[:, None, None]).clamp(0, max_q - 1).expand(self.batch_size, max_q, max_kv)
        dense = torch.where(cols < prefix_lens[:, None, None], True, tree_mask.gather(2, tree_col))
        inside = (rows < q_lens[:, None, None]) & (cols < kv_lens[:, None, None])
        return AttentionLayout(indptr_from_lengths(q_lens), indptr_from_lengths(kv_lens), dense[inside])
