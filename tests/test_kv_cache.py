"""KV compaction to a scattered tree path gives the logits of a from-scratch forward over the accepted sequence."""

from __future__ import annotations

import torch

from whiflash_sgl.tree import DraftTree


def test_compaction_to_a_non_contiguous_path_matches_recompute(tiny_target, prompt_ids):
    target = tiny_target
    prompt, root = list(prompt_ids[:-1]), prompt_ids[-1]
    target.prefill(prompt)
    #        node: 0    1    2    3    4    5
    tree = DraftTree(tokens=(11, 12, 13, 14, 15, 16), parents=(-1, -1, 1, 0, 2, 4))
    start = target.cache.get_seq_length()
    target.verify(root, tree)
    path = [1, 2, 4, 5]  # rows 2, 3, 5, 6: not contiguous, skipping the decoy branch at rows 1 and 4
    target.commit(start, path)
    accepted = [root, *(tree.tokens[i] for i in path)]
    assert target.cache.get_seq_length() == len(prompt) + len(accepted)
    after = target.verify(99, DraftTree.chain([98, 97])).logits

    target.prefill(prompt + accepted + [99, 98, 97])
    with torch.inference_mode():
        full = target.model(torch.tensor([prompt + accepted + [99, 98, 97]])).logits[0, -3:]
    torch.testing.assert_close(after, full, atol=1e-5, rtol=1e-5)


def test_truncate_then_extend_matches_recompute(tiny_target, prompt_ids):
    target = tiny_target
    ids = list(prompt_ids)
    target.prefill(ids + [5, 6, 7])
    target.cache.truncate(len(ids))
    again = target.verify(8, DraftTree.chain([9])).logits
    target.prefill(ids)
    fresh = target.verify(8, DraftTree.chain([9])).logits
    torch.testing.assert_close(again, fresh)
