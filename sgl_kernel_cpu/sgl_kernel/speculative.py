"""Speculative-decoding bookkeeping ops (EAGLE tree build/verify, draft cache locations, NGRAM tree rebuild).

Token trees use SGLang's linked representation, per request ``b`` with ``n`` draft tokens (node 0 = the root, i.e.
the last verified token): ``retrive_index[b, i] = b * n + i`` (flat index into the batch's draft tokens),
``retrive_next_token[b, i]`` = first child of node i, ``retrive_next_sibling[b, i]`` = next child of i's parent,
-1 for none.
"""

from __future__ import annotations

from typing import Optional

import torch

FULL_MASK, QLEN_ONLY, QLEN_ONLY_BITPACKING = 0, 1, 2


def _node_of(selected: list[int], topk: int, parents: list[int], i: int) -> Optional[int]:
    """Tree parent (0 = root) of draft node ``i`` >= 1, or None when its parent was not selected.

    Node i is the draft candidate ``selected[i - 1]``, an index into the flattened per-step top-k lists; its
    parent candidate is ``parents[selected[i - 1] // topk]`` (0 there means the root), found again among the
    selected candidates.
    """
    slot = selected[i - 1] // topk
    if slot == 0:
        return 0
    want = parents[slot]
    for pos, cand in enumerate(selected):
        if cand == want:
            return pos + 1
    return None


def build_tree_kernel_efficient_cpu(parent_list: torch.Tensor, selected_index: torch.Tensor,
                                    verified_seq_len: torch.Tensor, tree_mask: torch.Tensor,
                                    positions: torch.Tensor, retrive_index: torch.Tensor,
                                    retrive_next_token: torch.Tensor, retrive_next_sibling: torch.Tensor, topk: int,
                                    depth: int, draft_token_num: int, tree_mask_mode: int) -> None:
    """Build the EAGLE verify tree of each request from the draft's top-k bookkeeping (all outputs in place).

    ``selected_index`` [B, n-1]: the chosen candidates (sorted); ``parent_list`` [B, *]: each step's parent
    candidate ids. ``retrive_*`` must come in filled with -1; children are linked newest-first so that siblings end
    up in increasing node order. ``positions[b*n + i] = seq_len + depth(i)``. The mask row of node i marks the root,
    i itself and its ancestors; QLEN_ONLY: ``tree_mask`` is [B, n, n] flat; FULL_MASK: each request's rows are
    ``seq_len + n`` wide (prefix columns are left as the caller filled them).
    """
    mode = int(tree_mask_mode)
    if mode not in (FULL_MASK, QLEN_ONLY):
        raise NotImplementedError(f"sgl_kernel CPU stand-in: tree_mask_mode {mode} is not supported")
    n = draft_token_num
    seqs = verified_seq_len.tolist()
    nxt = retrive_next_token.view(-1, n)
    sib = retrive_next_sibling.view(-1, n)
    mask_base = 0
    for b, seq in enumerate(seqs):
        selected = selected_index[b].tolist()
        parents = parent_list[b].tolist() if parent_list.numel() else []
        tree_parent: list[Optional[int]] = [None] * n
        for i in range(n - 1, 0, -1):
            p = _node_of(selected, topk, parents, i)
            tree_parent[i] = p
            if p is None:
                continue
            if int(nxt[b, p]) != -1:
                sib[b, i] = nxt[b, p]
            nxt[b, p] = i
        retrive_index[b] = torch.arange(b * n, (b + 1) * n, dtype=retrive_index.dtype)

        width = n if mode == QLEN_ONLY else seq + n
        first_col = 0 if mode == QLEN_ONLY else seq
        rows = torch.zeros((n, n), dtype=torch.bool)
        rows[:, 0] = True
        for i in range(n):
            rows[i, i] = True
            level, node = 0, i
            # Walk up at most `depth` levels, as the kernel does (a tree is never deeper than the draft steps).
            while node > 0 and level < depth:
                level += 1
                node = tree_parent[node]
                if node is None:
                    break
                rows[i, node] = True
            positions[b * n + i] = seq + level
        block = tree_mask[mask_base:mask_base + n * width].view(n, width)
        block[:, first_col:] = rows.to(tree_mask.dtype)
        mask_base += n * width


def verify_tree_greedy_cpu(predicts: torch.Tensor, accept_index: torch.Tensor, accept_token_num: torch.Tensor,
                           candidates: torch.Tensor, retrive_index: torch.Tensor, retrive_next_token: torch.Tensor,
                           retrive_next_sibling: torch.Tensor, target_predict: torch.Tensor) -> None:
    """Greedy acceptance down the tree (outputs in place).

    From the root, repeatedly look among the current node's children (first child, then its siblings) for the
    first whose token equals the target's prediction at the current node; accept it and descend. Per request:
    ``accept_index[b, :k+1]`` = flat indices of the root and the k accepted nodes, ``accept_token_num[b] = k``,
    ``predicts[idx]`` = the target token at every accepted node (the last one being the bonus token).
    ``accept_index.shape[1]`` bounds the path length.
    """
    bs, n = candidates.shape
    steps = accept_index.shape[1]
    target = target_predict.reshape(-1).tolist()
    flat_pred = predicts.view(-1)
    for b in range(bs):
        cand = candidates[b].tolist()
        ridx = retrive_index[b].tolist()
        child = retrive_next_token[b].tolist()
        sibling = retrive_next_sibling[b].tolist()
        last = ridx[0]
        accept_index[b, 0] = last
        accepted, node = 0, 0
        for _ in range(1, steps):
            want = target[last]
            c = child[node]
            while c != -1 and cand[c] != want:
                c = sibling[c]
            if c == -1:
                break
            flat_pred[last] = want
            accepted += 1
            accept_index[b, accepted] = ridx[c]
            last, node = ridx[c], c
        accept_token_num[b] = accepted
        flat_pred[last] = target[last]


def assign_draft_cache_locs_contiguous_cpu(req_pool_indices: torch.Tensor, req_to_token: torch.Tensor,
                                           seq_lens: torch.Tensor, out_cache_loc: torch.Tensor, pool_len: int,
                                           topk: int, num_cols: int) -> None:
    """``out[b*w : (b+1)*w] = req_to_token[rpi[b], seq[b] : seq[b] + w]`` with ``w = topk * num_cols``."""
    w = topk * num_cols
    for b, (row, seq) in enumerate(zip(req_pool_indices.tolist(), seq_lens.tolist())):
        out_cache_loc[b * w:(b + 1) * w] = req_to_token[row, seq:seq + w].to(out_cache_loc.dtype)


def assign_extend_cache_locs_cpu(req_pool_indices: torch.Tensor, req_to_token: torch.Tensor,
                                 start_offset: torch.Tensor, end_offset: torch.Tensor, out_cache_loc: torch.Tensor,
                                 pool_len: int) -> None:
    """Concatenate ``req_to_token[rpi[b], start[b]:end[b]]`` over the batch into ``out_cache_loc``."""
    off = 0
    for row, s, e in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()):
        if e > s:
            out_cache_loc[off:off + e - s] = req_to_token[row, s:e].to(out_cache_loc.dtype)
            off += e - s


def fill_accept_out_cache_loc_cpu(accept_index: torch.Tensor, out_cache_loc: torch.Tensor,
                                  accept_out_cache_loc: torch.Tensor) -> None:
    """Compaction: ``accept_out_cache_loc[:m] = out_cache_loc[a]`` for the m entries ``a != -1`` of
    ``accept_index``, in order."""
    idx = accept_index.reshape(-1).long()
    kept = idx[idx != -1]
    accept_out_cache_loc[:kept.numel()] = out_cache_loc[kept].to(accept_out_cache_loc.dtype)


def fill_bonus_tokens_cpu(accept_tokens: torch.Tensor, accept_lens: torch.Tensor, bonus_tokens: torch.Tensor,
                          accept_stride: int) -> None:
    """``bonus[b] = accept_tokens.flat[accept_stride * b + accept_lens[b] - 1]`` (the last accepted token)."""
    bs = bonus_tokens.numel()
    idx = torch.arange(bs, dtype=torch.int64) * accept_stride + accept_lens.reshape(-1)[:bs].long() - 1
    bonus_tokens.view(-1).copy_(accept_tokens.reshape(-1)[idx])


def rotate_input_ids_cpu(input_ids: torch.Tensor, extend_start_loc: torch.Tensor, extend_seq_lens: torch.Tensor,
                         topk_index: torch.Tensor, select_index: Optional[torch.Tensor] = None) -> None:
    """Per request: shift ``input_ids[start:start+len]`` left by one and put ``topk_index[b]`` at
    ``select_index[b]`` (an absolute index into ``input_ids``), or at the request's last slot."""
    new_tokens = topk_index.reshape(-1).tolist()
    selects = select_index.reshape(-1).tolist() if select_index is not None else None
    for b, (start, length) in enumerate(zip(extend_start_loc.tolist(), extend_seq_lens.tolist())):
        if length <= 0:
            continue
        seg = input_ids[start:start + length]
        seg[:-1] = seg[1:].clone()
        where = selects[b] if selects is not None else start + length - 1
        input_ids[where] = new_tokens[b]


def build_draft_decode_metadata_cpu(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                                    seq_lens: torch.Tensor, topk: int, num_steps: int,
                                    pool_len: int) -> torch.Tensor:
    """A req_to_token table for multi-step draft decoding, one row per (request, branch): row ``b*topk + t`` holds
    the request's ``seq`` committed slots, then branch t's ``num_steps`` draft slots (which follow the committed
    ones, branch after branch, in the request's own row)."""
    bs = seq_lens.numel()
    out = torch.zeros((bs * topk, pool_len), dtype=req_to_token.dtype)
    for b, (row, seq) in enumerate(zip(req_pool_indices.tolist(), seq_lens.tolist())):
        src = req_to_token[row]
        for t in range(topk):
            r = b * topk + t
            out[r, :seq] = src[:seq]
            lo = seq + t * num_steps
            out[r, seq:seq + num_steps] = src[lo:lo + num_steps]
    return out


def reconstruct_indices_from_tree_mask_cpu(tree_mask: torch.Tensor, verified_seq_len: torch.Tensor,
                                           positions: torch.Tensor, retrive_index: torch.Tensor,
                                           retrive_next_token: torch.Tensor, retrive_next_sibling: torch.Tensor,
                                           batch_size: int, draft_token_num: int) -> None:
    """Rebuild positions and the linked tree from a QLEN_ONLY ancestor mask (NGRAM), in place.

    ``mask[b, i, j]`` with j < i marks j as an ancestor of i. depth(i) = number of ancestors; parent(i) = the
    largest ancestor; first child of i = the smallest node having i as ancestor; next sibling of i = the next node
    after i with the same parent (none for the root).
    """
    n = draft_token_num
    if batch_size == 0:
        return
    m = tree_mask.reshape(batch_size, n, n).bool()
    ar = torch.arange(n)
    anc = m & (ar.view(1, 1, n) < ar.view(1, n, 1))  # [b, i, j]: j < i and j is an ancestor of i
    depth = anc.sum(-1)
    positions.view(batch_size, n).copy_(depth + verified_seq_len.view(-1, 1).long())
    retrive_index.view(batch_size, n).copy_(torch.arange(batch_size * n).view(batch_size, n))
    big = n
    parent = torch.where(anc, ar.view(1, 1, n), -1).amax(-1)  # [b, i]
    has_child = anc.any(1)  # [b, j]
    first_child = torch.where(anc, ar.view(1, n, 1), big).amin(1)  # [b, j]
    retrive_next_token.view(batch_size, n).copy_(torch.where(has_child, first_child, -1))
    same = (parent.unsqueeze(2) == parent.unsqueeze(1)) & (ar.view(1, n, 1) > ar.view(1, 1, n))  # [b, k, i]: k>i
    first_sib = torch.where(same, ar.view(1, n, 1), big).amin(1)  # [b, i]
    ok = (parent >= 0) & (first_sib < big)
    retrive_next_sibling.view(batch_size, n).copy_(torch.where(ok, first_sib, -1))


def reconstruct_indices_from_tree_mask(tree_mask: torch.Tensor, verified_seq_len: torch.Tensor,
                                       positions: torch.Tensor, retrive_index: torch.Tensor,
                                       retrive_next_token: torch.Tensor, retrive_next_sibling: torch.Tensor,
                                       batch_size: int, draft_token_num: int) -> None:
    """The name SGLang imports from ``sgl_kernel.speculative``; CPU tensors only."""
    reconstruct_indices_from_tree_mask_cpu(tree_mask, verified_seq_len, positions, retrive_index,
                                           retrive_next_token, retrive_next_sibling, batch_size, draft_token_num)
