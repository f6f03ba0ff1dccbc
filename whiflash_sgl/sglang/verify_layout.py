"""One verify input of uniform width from per-request proposals, in the layout SGLang's EAGLE verify reads.

SGLang verifies every request of a batch over the same number of rows ``N`` (its target-verify CUDA graphs and
FlashInfer's sync-free plan need a uniform width). WhiFlash's proposals differ in shape: an EAGLE-3 top-k tree, a
DFlash chain, possibly shorter than ``N``. Each request's proposal becomes ``N`` rows -- row 0 the root (the last
committed token, the bonus of the previous round), then the draft nodes in topological order, then padding rows.
Padding rows attend to the root and themselves only and no first-child/next-sibling link reaches them, so the greedy
and sampling acceptance walks (which follow only those links) never accept one, whatever token they hold.

The arrays, per SGLang 0.5.23 (``build_tree_kernel_efficient`` / ``build_chain_tree``):

* ``tokens``, ``positions``: ``[bs * N]``, positions = committed length + depth;
* ``mask``: FULL_MASK = per request a row-major ``[N, seq_len + N]`` boolean block (the committed prefix, all
  True, then the tree), blocks concatenated; QLEN_ONLY = the ``[N, N]`` tree blocks only;
* ``retrieve_index`` ``[bs, N]``: the global row ``b * N + j``; ``retrieve_next_token`` / ``retrieve_next_sibling``
  ``[bs, N]``: the local row of the first child / next sibling, ``-1`` for none.

Pure PyTorch on any device; nothing here imports SGLang.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from whiflash_sgl.kernels.tree_mask import ancestor_walk

MASK_MODES = ("full", "qlen_only")


@dataclass(frozen=True)
class Proposals:
    """A padded batch of proposals: ``tokens [bs, N]`` (column 0 the root), ``parents [bs, N]`` (the parent row of
    each row; the root's and the padding rows' entries are ignored), ``lengths [bs]`` (rows in use, root included)."""

    tokens: torch.Tensor
    parents: torch.Tensor
    lengths: torch.Tensor

    @property
    def width(self) -> int:
        return self.tokens.shape[1]


@dataclass(frozen=True)
class VerifyArrays:
    tokens: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    retrieve_index: torch.Tensor
    retrieve_next_token: torch.Tensor
    retrieve_next_sibling: torch.Tensor


def chain_proposals(roots: torch.Tensor, drafts: torch.Tensor, width: int,
                    lengths: torch.Tensor | None = None) -> Proposals:
    """Chains ``root -> drafts[b, 0] -> drafts[b, 1] ...`` padded to ``width`` rows (a DFlash block is one).

    ``lengths`` (rows per request, root included) cuts chains short, e.g. where a policy asks for fewer tokens."""
    bs, depth = drafts.shape
    if depth + 1 > width:
        raise ValueError(f"a chain of {depth} draft tokens needs {depth + 1} rows, more than the width {width}")
    device = drafts.device
    tokens = roots.reshape(bs, 1).to(drafts.dtype).expand(bs, width).clone()
    tokens[:, 1:depth + 1] = drafts
    parents = (torch.arange(width, device=device) - 1).expand(bs, width)
    if lengths is None:
        lengths = torch.full((bs,), depth + 1, dtype=torch.long, device=device)
    return Proposals(tokens, parents, lengths.to(device=device, dtype=torch.long))


def _first_true(matrix: torch.Tensor) -> torch.Tensor:
    """Index of the first True along the last axis, ``-1`` where there is none."""
    found = matrix.any(-1)
    first = matrix.to(torch.int8).argmax(-1)
    return torch.where(found, first, torch.full_like(first, -1))


def verify_arrays(proposals: Proposals, seq_lens: torch.Tensor, mask_mode: str = "full") -> VerifyArrays:
    """SGLang's verify arrays for ``proposals`` over requests whose committed lengths are ``seq_lens``."""
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
    tokens, lengths = proposals.tokens, proposals.lengths
    bs, width = tokens.shape
    device = tokens.device
    rows = torch.arange(width, device=device)
    if bool(((lengths < 1) | (lengths > width)).any()):
        raise ValueError(f"every proposal needs between 1 and {width} rows (the root included)")
    live = rows[None, :] < lengths[:, None]
    node = live & (rows[None, :] > 0)
    parents = torch.where(node, proposals.parents, torch.zeros_like(proposals.parents))
    if bool((parents >= rows[None, :]).logical_and(node).any()) or bool((parents < 0).logical_and(node).any()):
        raise ValueError("every draft row's parent must be an earlier row (the root is row 0)")

    mask, depth = ancestor_walk(parents)
    positions = (seq_lens.to(device).reshape(bs, 1).long() + depth).reshape(-1)
    # children[b, p, r]: row r is a draft child of row p; siblings[b, r, s]: s is a later child of r's parent
    children = node[:, None, :] & (parents[:, None, :] == rows[None, :, None])
    siblings = (node[:, :, None] & node[:, None, :] & (parents[:, :, None] == parents[:, None, :])
                & (rows[None, None, :] > rows[None, :, None]))
    next_token = _first_true(children)
    next_sibling = _first_true(siblings)
    retrieve_index = torch.arange(bs * width, device=device).reshape(bs, width)

    if mask_mode == "qlen_only":
        flat_mask = mask.reshape(-1)
    else:
        flat_mask = torch.cat([
            torch.cat([mask.new_ones(width, int(n)), mask[b]], dim=1).reshape(-1)
            for b, n in enumerate(seq_lens.tolist())
        ]) if bs else mask.new_zeros(0)
    return VerifyArrays(tokens.reshape(-1), positions, flat_mask, retrieve_index, next_token, next_sibling)


def merge_rows(parts, seq_lens: torch.Tensor, mask_mode: str = "full") -> VerifyArrays:
    """One batch's verify arrays from its sub-batches' (per-request routing: EAGLE-3's tree for the requests that
    chose it, DFlash's padded chain for the others, all verified in one target forward).

    ``parts`` holds ``(rows, arrays)`` pairs: ``rows`` lists where each request of that sub-batch sits in the batch
    (sub-batch order), ``arrays`` are its verify arrays at the batch's width, built over ``seq_lens[rows]``; the rows
    of all parts cover the batch once. Tokens, positions and the first-child/next-sibling links (local rows) move
    with their request, ``retrieve_index`` (global rows) is shifted to the request's place, and each request's mask
    block (its size depends on its committed length in the full layout) moves there too; a part's mask may run
    past its blocks (SGLang sizes EAGLE's full mask by an upper bound when it has no CPU lengths). Dtypes are the
    first part's."""
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
    bs = len(seq_lens)
    order = [b for rows, _ in parts for b in rows]
    if sorted(order) != list(range(bs)):
        raise ValueError(f"the parts' rows {order} do not cover a batch of {bs} once")
    first = parts[0][1]
    width = first.retrieve_index.shape[1]
    lens = seq_lens.tolist()
    tokens = first.tokens.new_empty(bs, width)
    positions = first.positions.new_empty(bs, width)
    next_token = first.retrieve_next_token.new_empty(bs, width)
    next_sibling = first.retrieve_next_sibling.new_empty(bs, width)
    retrieve_index = first.retrieve_index.new_empty(bs, width)
    blocks: list = [None] * bs
    for rows, arrays in parts:
        if arrays.retrieve_index.shape != (len(rows), width):
            raise ValueError(f"a part of {len(rows)} requests has retrieve_index {tuple(arrays.retrieve_index.shape)}"
                             f", not ({len(rows)}, {width})")
        index = torch.tensor(rows, dtype=torch.long, device=tokens.device)
        tokens[index] = arrays.tokens.view(len(rows), width).to(tokens.dtype)
        positions[index] = arrays.positions.view(len(rows), width).to(positions.dtype)
        next_token[index] = arrays.retrieve_next_token.to(next_token.dtype)
        next_sibling[index] = arrays.retrieve_next_sibling.to(next_sibling.dtype)
        shift = (index - torch.arange(len(rows), device=index.device)) * width  # sub-batch place -> batch place
        retrieve_index[index] = (arrays.retrieve_index + shift[:, None]).to(retrieve_index.dtype)
        sizes = [width * width if mask_mode == "qlen_only" else width * (lens[b] + width) for b in rows]
        for b, block in zip(rows, arrays.mask[:sum(sizes)].split(sizes)):
            blocks[b] = block.to(first.mask.dtype)
    mask = torch.cat(blocks) if bs else first.mask.new_zeros(0)
    return VerifyArrays(tokens.reshape(-1), positions.reshape(-1), mask, retrieve_index, next_token, next_sibling)
