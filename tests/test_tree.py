"""Draft trees: masks and positions for a hand-built case, tries, pruning, chains."""

from __future__ import annotations

import random

import pytest
import torch

from whiflash_sgl.drafters.base import SequenceState
from whiflash_sgl.drafters.ngram import NgramDrafter
from whiflash_sgl.tree import DraftTree


def test_hand_built_tree_mask_and_positions():
    #   root ─ a(0) ─ c(2) ─ e(4)
    #        └ b(1) ─ d(3)
    tree = DraftTree(tokens=(10, 11, 12, 13, 14), parents=(-1, -1, 0, 1, 2))
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 1, 0, 1, 0, 0],
        [1, 0, 1, 0, 1, 0],
        [1, 1, 0, 1, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(tree.ancestor_mask(), expected)
    assert tree.positions(7).tolist() == [7, 8, 8, 9, 9, 10]
    assert tree.depth == 3 and not tree.is_chain
    assert tree.children(-1) == [0, 1] and tree.children(0) == [2]


def test_chain_mask_is_causal():
    chain = DraftTree.chain([5, 6, 7, 8])
    assert chain.is_chain
    assert torch.equal(chain.ancestor_mask(), torch.ones(5, 5, dtype=torch.bool).tril())


def test_siblings_never_see_each_other():
    tree = DraftTree.from_paths([[1, 2], [1, 3], [4]])
    mask = tree.ancestor_mask()
    siblings = [(i, j) for i in range(len(tree)) for j in range(len(tree))
                if i != j and tree.parents[i] == tree.parents[j]]
    assert siblings and all(not mask[i + 1, j + 1] for i, j in siblings)


def test_from_paths_merges_shared_prefixes():
    tree = DraftTree.from_paths([[1, 2, 3], [1, 2, 4], [5]])
    assert tree.tokens == (1, 2, 3, 4, 5) and tree.parents == (-1, 0, 1, 1, -1)


def test_pruned_keeps_shallow_nodes_and_renumbers():
    tree = DraftTree(tokens=(10, 11, 12, 13, 14), parents=(-1, -1, 0, 1, 2))
    pruned = tree.pruned(2)
    assert pruned.tokens == (10, 11, 12, 13) and pruned.parents == (-1, -1, 0, 1)
    assert len(tree.pruned(0)) == 0


def test_parents_must_precede_children():
    with pytest.raises(ValueError, match="parent"):
        DraftTree(tokens=(1, 2), parents=(1, -1))


def test_ngram_proposes_the_continuation_of_the_latest_match():
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    drafter = NgramDrafter(max_ngram=3, min_ngram=2, num_tokens=3, width=2)
    tree = drafter.propose(SequenceState(tokens, prompt_len=5), max_depth=3)
    assert tree == DraftTree.from_paths([[7, 8, 5], [9, 1, 2]])
    assert len(drafter.propose(SequenceState([1, 2, 3, 4], prompt_len=4), max_depth=3)) == 0


def test_ngram_lookups_on_a_growing_sequence_match_a_full_scan():
    """The drafter indexes the sequence as it grows; every lookup must equal a scan of the whole sequence."""
    def scan(tokens, length, max_n, min_n, width):
        for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
            found = []
            for s in range(len(tokens) - n - 1, -1, -1):  # most recent first; the suffix itself excluded
                if tokens[s : s + n] == tokens[-n:] and tokens[s + n : s + n + length] not in found:
                    found.append(tokens[s + n : s + n + length])
                if len(found) == width:
                    break
            if found:
                return found
        return []

    rng = random.Random(0)
    drafter = NgramDrafter(max_ngram=3, min_ngram=1, num_tokens=4, width=2)
    tokens = [rng.randrange(6) for _ in range(5)]
    for _ in range(60):
        assert drafter.continuations(tokens, 4) == scan(tokens, 4, 3, 1, 2)
        tokens.extend(rng.randrange(6) for _ in range(rng.randrange(1, 4)))
