"""Tree attention masks and positions from parent arrays, as tensor ops.

Conventions are those of ``whiflash_sgl.tree``: nodes in topological order, ``parents[i]`` is ``-1`` (child of the
root) or an index ``< i``; the verify rows are ``[root, node_0, ..., node_{n-1}]``, so node ``i`` is row ``i + 1``.
Everything here is computed by walking all rows up to the root at once: one gather per tree level, no Python loop
over nodes, and the same code serves one tree or a padded batch of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def as_parents(parents: torch.Tensor | Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """``parents`` as a 1-D long tensor, validated (``-1 <= parents[i] < i``)."""
    parents = torch.as_tensor(parents, dtype=torch.long, device=device).reshape(-1)
    index = torch.arange(parents.numel(), device=parents.device)
    bad = (parents < -1) | (parents >= index)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"node {i} has parent {int(parents[i])}; parents must come before their children")
    return parents


def ancestor_walk(row_parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ancestor masks and depths of a padded batch of trees given per *row*.

    ``row_parents`` is ``[B, R]`` long: the parent row of every verify row, with the root row 0 pointing at itself
    (padding rows may point at any row below them, e.g. the root). Returns ``mask [B, R, R]`` (row r sees c iff c
    is r or an ancestor of r) and ``depth [B, R]`` (root 0). Requires ``row_parents[b, r] < r`` for ``r > 0``, so
    every walk reaches the root within ``R - 1`` steps.
    """
    batch, rows = row_parents.shape
    pointer = torch.arange(rows, device=row_parents.device).expand(batch, rows).contiguous()
    mask = torch.zeros(batch, rows, rows, dtype=torch.bool, device=row_parents.device)
    mask.scatter_(2, pointer[..., None], True)
    depth = torch.zeros(batch, rows, dtype=torch.long, device=row_parents.device)
    while bool((pointer != 0).any()):
        depth += pointer != 0
        pointer = row_parents.gather(1, pointer)
        mask.scatter_(2, pointer[..., None], True)
    return mask, depth


def _row_parents(parents: torch.Tensor) -> torch.Tensor:
    return torch.cat([parents.new_zeros(1), parents + 1])


def build_tree_mask(parents: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """``[n+1, n+1]`` bool over the verify rows: row r may see row c iff c is r or an ancestor of r (row 0 = root)."""
    mask, _ = ancestor_walk(_row_parents(as_parents(parents))[None])
    return mask[0]


def tree_depths(parents: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Depth of every verify row: 0 for the root, 1 for its children, and so on."""
    _, depth = ancestor_walk(_row_parents(as_parents(parents))[None])
    return depth[0]


def tree_positions(parents: torch.Tensor | Sequence[int], root_position: int) -> torch.Tensor:
    """Absolute positions of the verify rows: the root's position plus each row's depth."""
    return tree_depths(parents) + root_position
