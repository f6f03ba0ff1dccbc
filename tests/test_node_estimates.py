"""Node estimates learned from verification: what became of each drafted node, the n-gram drafter's per-depth
rates, a draft network's calibrated probabilities, and an engine batch that stops verifying a lookup that never
pays while its output stays vanilla's."""

from __future__ import annotations

import pytest

from whiflash_sgl.cost_curve import CostCurve
from whiflash_sgl.drafters.base import RoundReport, SequenceState
from whiflash_sgl.drafters.ngram import NgramDrafter
from whiflash_sgl.drafters.node_estimates import ContinuationRates, ProbCalibration
from whiflash_sgl.engine import SpeculativeEngine
from whiflash_sgl.tree import DraftTree


def test_outcomes_follow_the_verified_tree_and_the_accepted_tokens():
    mine = DraftTree.from_paths([[5, 6, 7], [5, 8], [9]])  # nodes: 5, 6, 7, 8, 9
    # the verified tree dropped 7 and holds another drafter's 4 below 5; the target accepted 5, 8
    verified = DraftTree.from_paths([[5, 6], [5, 8], [5, 4], [9]])
    assert mine.outcomes(verified, [5, 8]) == [True, False, None, True, False]
    assert mine.outcomes(DraftTree(), []) == [None] * 5
    assert mine.outcomes(mine, []) == [False] * 5


def test_continuation_rates_are_beta_means_per_depth_given_the_parent():
    rates = ContinuationRates(prior=0.5, weight=2.0)
    chain = DraftTree.chain([1, 2, 3])
    for accepted in (0, 1, 2, 3):  # depth 1: 4 trials, 3 accepted; depth 2: 3 trials, 2; depth 3: 2 trials, 1
        rates.observe(chain, chain.outcomes(chain, [1, 2, 3][:accepted]))
    assert [rates.rate(d) for d in (1, 2, 3, 4)] == pytest.approx([4 / 6, 3 / 5, 2 / 4, 0.5])
    assert rates.apply(chain).probs == pytest.approx((4 / 6, 4 / 6 * 3 / 5, 4 / 6 * 3 / 5 * 2 / 4))


def test_a_calibration_scales_an_overconfident_drafter_and_keeps_children_below_parents():
    calibration = ProbCalibration(weight=2.0)
    tree = DraftTree((1, 2), (-1, 0), (0.65, 0.62))
    for i in range(100):  # nodes drafted at 0.6-0.7 are accepted 30% of the time
        accepted = [1] if i % 10 < 3 else []
        calibration.observe(tree.subtree([0]), [bool(accepted)])
    ratio = (30 + 2) / (65 + 2)
    assert calibration.ratio(0.64) == pytest.approx(ratio)
    assert calibration.ratio(0.95) == 1.0  # nothing seen there: the prior
    probs = calibration.apply(tree).probs
    assert probs == pytest.approx((0.65 * ratio, 0.62 * ratio))
    assert calibration.apply(DraftTree((1, 2), (-1, 0), (0.65, 0.95))).probs[1] == pytest.approx(0.65 * ratio)


def test_the_least_raw_probability_that_calibrates_to_a_bar():
    """What EAGLE-3 floors its own probabilities at, so that it drafts every node that could clear the round's bar
    and none that could not: below it every probability calibrates under the bar, at it the bar is reached."""
    calibration = ProbCalibration(weight=2.0)
    assert calibration.least_raw(0.25) == pytest.approx(0.25)  # nothing seen: probabilities are taken as they are
    for i in range(100):  # nodes drafted at 0.15-0.35 are accepted 10% of the time, at 0.45 60%
        for p in (0.15, 0.25, 0.35):
            calibration.observe(DraftTree((1,), (-1,), (p,)), [i % 10 == 0])
        calibration.observe(DraftTree((1,), (-1,), (0.45,)), [i % 10 < 6])
    assert calibration.ratio(0.35) < 0.5 < 1 < calibration.ratio(0.45)
    assert calibration.least_raw(0.15) == pytest.approx(0.4)  # 0.15-0.4 never calibrates to 0.15; 0.4 does
    grid = [k / 1000 for k in range(1001)]
    for bar in (0.01, 0.05, 0.1, 0.2, 0.5, 0.9):
        raw = calibration.least_raw(bar)
        assert raw * calibration.ratio(raw) >= bar * (1 - 1e-9)
        assert all(p * calibration.ratio(p) < bar for p in grid if p < raw - 1e-9)
    assert calibration.least_raw(1.5) == 1.0  # nothing reaches it


def test_the_ngram_drafter_learns_from_the_rounds_it_is_verified_in():
    drafter = NgramDrafter(max_ngram=2, min_ngram=2, num_tokens=2)
    twin = drafter.fork()
    state = SequenceState([1, 2, 3, 4, 1, 2], prompt_len=6)
    tree = twin.propose(state, 2)
    assert (tree.tokens, tree.probs) == ((3, 4), pytest.approx((0.5, 0.25)))  # the prior before any round
    twin.observe(RoundReport(tree, [0], [3, 9], 0.1))  # 3 accepted, 4 rejected (the target said 9)
    assert drafter.estimates.trials == [1, 1] and drafter.estimates.accepted == [1, 0]  # forks share what they learn
    twin.observe(RoundReport(tree, [0], [3, 9], 0.1))  # no new proposal since: nothing more to learn
    assert drafter.estimates.trials == [1, 1]


def _batch(target, prompt_ids, n=4, tokens=48):
    engine = SpeculativeEngine(target, NgramDrafter(min_ngram=1, num_tokens=4))
    requests = [engine.submit(prompt_ids, tokens) for _ in range(n)]
    while any(r.result is None for r in requests):
        engine.step()
    return requests


def test_a_batch_stops_verifying_a_lookup_that_never_pays(tiny_target, prompt_ids):
    """On a curve where a row must bring about 0.3 tokens, the n-gram drafter starts at its prior (0.5 per depth),
    learns from the first round's rejections and its rows leave the forward; without a curve its trees are verified
    whole every round. Greedy output stays vanilla's either way."""
    reference = SpeculativeEngine(tiny_target).generate(prompt_ids, 48).tokens
    whole = _batch(tiny_target, prompt_ids)
    tiny_target.cost_curve = CostCurve((1, 64), (0.1, 0.1 + 63 * 0.03 / 4))
    try:
        trimmed = _batch(tiny_target, prompt_ids)
    finally:
        tiny_target.cost_curve = None
    assert all(r.result.tokens == reference for r in whole + trimmed)
    assert all(r.result.drafted > 20 for r in whole)
    rates = trimmed[0].drafter.estimates
    assert rates.trials[0] == 4 and rates.accepted[0] == 0 and rates.rate(1) == pytest.approx(1 / 6)
    assert [r.result.drafted for r in trimmed] == [1] * 4  # one node each in the first round, then none
