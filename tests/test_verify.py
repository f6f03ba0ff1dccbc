"""The acceptance rules: greedy walks the argmax, and sampling emits exactly the target's distribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from whiflash_sgl.tree import DraftTree
from whiflash_sgl.sampling import SamplingParams, target_probs
from whiflash_sgl.verify import accept_greedy, accept_sampled

# vocabulary of 5; the root has three candidate children (tokens 1, 3, 0) and node 0 has two (tokens 2, 4)
TREE = DraftTree(tokens=(1, 3, 0, 2, 4), parents=(-1, -1, -1, 0, 0))
PROBS = torch.tensor([
    [0.10, 0.35, 0.05, 0.30, 0.20],  # root
    [0.25, 0.05, 0.40, 0.10, 0.20],  # after token 1 (node 0)
    [0.20, 0.20, 0.20, 0.20, 0.20],  # after 3 (node 1)
    [0.50, 0.10, 0.10, 0.10, 0.20],  # after 0 (node 2)
    [0.30, 0.30, 0.10, 0.10, 0.20],  # after 1, 2 (node 3)
    [0.10, 0.10, 0.10, 0.60, 0.10],  # after 1, 4 (node 4)
])


def test_greedy_follows_the_argmax_and_returns_the_bonus():
    logits = torch.log(PROBS)
    path, bonus = accept_greedy(TREE, logits)
    assert path == [0, 3] and bonus == 0  # root argmax 1 -> node 0; its argmax 2 -> node 3; then argmax 0


def test_greedy_with_no_matching_child_emits_the_argmax():
    logits = torch.log(PROBS)
    path, bonus = accept_greedy(DraftTree.chain([4, 4]), logits[:3])
    assert path == [] and bonus == 1


def _emitted_pairs(samples: int, seed: int = 0):
    """First two emitted tokens (the second only when the first came from a tree node with children)."""
    g = torch.Generator().manual_seed(seed)
    firsts, seconds = [], {}
    for _ in range(samples):
        path, bonus = accept_sampled(TREE, PROBS, g)
        emitted = [TREE.tokens[i] for i in path] + [bonus]
        firsts.append(emitted[0])
        if path:
            seconds.setdefault(path[0], []).append(emitted[1])
    return np.array(firsts), seconds


def test_sampling_rule_reproduces_the_target_distribution():
    """Chi-square goodness of fit at significance 0.001 with 40k samples: a rule that skips the renormalisation
    after a rejection, or that samples the bonus from p instead of the residual, fails this by a wide margin
    (checked by hand: p-values below 1e-30)."""
    n = 40_000
    firsts, seconds = _emitted_pairs(n)
    observed = np.bincount(firsts, minlength=5)
    assert chisquare(observed, PROBS[0].numpy() * n).pvalue > 1e-3
    # below an accepted node the next token follows that node's row, its children tried in draft order
    after_node0 = np.array(seconds[0])
    observed = np.bincount(after_node0, minlength=5)
    assert chisquare(observed, PROBS[1].numpy() * len(after_node0)).pvalue > 1e-3


def test_sampling_is_deterministic_for_a_seed():
    a = [accept_sampled(TREE, PROBS, torch.Generator().manual_seed(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]


def test_target_probs_temperature_top_k_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    base = torch.softmax(logits / 0.5, -1)
    torch.testing.assert_close(target_probs(logits, SamplingParams(temperature=0.5)), base)
    top2 = target_probs(logits, SamplingParams(temperature=0.5, top_k=2))
    assert (top2[0, 2:] == 0).all()
    torch.testing.assert_close(top2[0, :2], base[0, :2] / base[0, :2].sum())
    nucleus = target_probs(logits, SamplingParams(temperature=1.0, top_p=0.7))
    p = torch.softmax(logits, -1)[0]  # 0.61, 0.22, ...: the first two tokens are needed to reach 0.7
    assert (nucleus[0, 2:] == 0).all() and nucleus[0, :2].sum().item() == pytest.approx(1.0)
    assert nucleus[0, 0].item() == pytest.approx((p[0] / p[:2].sum()).item())


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2},
                                    {"temperature": float("nan")}])
def test_bad_sampling_params_are_rejected(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
