"""The batch-aware cost model: the measured curve, trees trimmed to the rows that pay as the batch grows, the router
pricing actions on top of the rest of the batch, and the round's plan drafting for the requests where that is faster
(together, sharing a drafter call) and for nobody where it is not; none of it changes the output."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from whiflash_sgl.cost_curve import MAX_ROWS, ROWS_EACH, SEQUENCES, CostCurve, measure, trim_to_value, value_bar
from whiflash_sgl.drafters.ngram import NgramDrafter
from whiflash_sgl.engine import SpeculativeEngine
from whiflash_sgl.errors import WhiFlashError
from whiflash_sgl.forward_price import CURVE_WINDOW, TIMED, ScaledCurve
from whiflash_sgl.drafting_plan import (IDLE_EVERY, PAIRED, TIME_WINDOW, Calibration, RoundTimes, Wish, explore, plan,
                                        round_seconds)
from whiflash_sgl.router import NO_DRAFT, BatchLoad, CostModel, Router
from whiflash_sgl.tree import DraftTree

# weight-bound up to 16 rows (each extra row almost free), then every row pays its share: a CPU's shape
CURVE = CostCurve((1, 16, 64, 256), (0.100, 0.110, 0.200, 0.600))


def test_the_curve_interpolates_and_extrapolates():
    assert CURVE(0) == 0.0 and CURVE(1) == pytest.approx(0.1) and CURVE(40) == pytest.approx(0.155)
    assert CURVE(512) == pytest.approx(1.1333, abs=1e-3)  # the last segment's slope
    assert CURVE(65) - CURVE(64) == pytest.approx(0.4 / 192)


def test_a_measured_dip_is_pooled_away_so_no_rows_look_free():
    noisy = CostCurve((1, 8, 12, 16, 32), (0.15, 0.25, 0.45, 0.35, 0.40))  # 12 rows measured slower than 16
    assert noisy.seconds == pytest.approx((0.15, 0.25, 0.40, 0.40, 0.40))
    assert all(noisy(base + 4) >= noisy(base) for base in range(1, 40))
    assert CURVE.seconds == (0.100, 0.110, 0.200, 0.600)  # a curve that never dips stays as measured


# measured on a 2-core CPU: each sequence costs its own attention, extra rows of the same sequences much less
BY_SEQUENCES = CostCurve((1, 4, 8, 8, 32, 64), (0.037, 0.053, 0.076, 0.076, 0.095, 0.137), (1, 1, 1, 8, 8, 8))


def test_a_curve_per_sequence_count_prices_rows_at_the_batch_shape():
    assert BY_SEQUENCES(8, 8) == pytest.approx(0.076) and BY_SEQUENCES(4, 1) == pytest.approx(0.053)
    assert BY_SEQUENCES(16, 8) - BY_SEQUENCES(8, 8) == pytest.approx(0.019 * 8 / 24)  # 8 more rows, same 8 sequences
    assert BY_SEQUENCES(16, 4) == pytest.approx((4 * BY_SEQUENCES(16, 1) + 3 * BY_SEQUENCES(16, 8)) / 7)  # 1..8
    assert BY_SEQUENCES(64, 16) == BY_SEQUENCES(64, 8)  # beyond the last count measured: its curve
    trimmed = trim_to_value([_chain([0.3, 0.2])] * 8, BY_SEQUENCES)
    assert [len(t) for t in trimmed] == [2] * 8  # rows priced at 8 sequences are cheap: the chains pay
    bar, rate = value_bar(trimmed, BY_SEQUENCES)  # what one more node would need: 12 tokens' worth of its row's cost
    assert bar == pytest.approx(12 * (BY_SEQUENCES(25, 8) - BY_SEQUENCES(24, 8)) / BY_SEQUENCES(24, 8))
    assert rate == pytest.approx(12 / BY_SEQUENCES(24, 8))  # and the tokens per second the round expects
    assert len(trim_to_value([_chain([0.3, 0.2, bar * 1.01])] + [_chain([0.3, 0.2])] * 7, BY_SEQUENCES)[0]) == 3
    assert len(trim_to_value([_chain([0.3, 0.2, bar * 0.99])] + [_chain([0.3, 0.2])] * 7, BY_SEQUENCES)[0]) == 2
    assert [len(t) for t in trim_to_value([_chain([0.3, 0.2])] * 8, CostCurve((1, 4, 8), (0.037, 0.053, 0.076)))] \
        == [0] * 8  # priced as if each row brought a sequence of its own, none would


def test_a_curve_round_trips_and_bad_files_are_clear_errors(tmp_path):
    BY_SEQUENCES.save(tmp_path / "s.json")
    assert CostCurve.load(tmp_path / "s.json") == BY_SEQUENCES
    CURVE.save(tmp_path / "c.json", model="m")
    assert CostCurve.load(tmp_path / "c.json") == CURVE
    (tmp_path / "bad.json").write_text(json.dumps({"rows": [4, 2], "seconds": [1, 2]}))
    with pytest.raises(WhiFlashError, match="ascending"):
        CostCurve.load(tmp_path / "bad.json")
    with pytest.raises(WhiFlashError, match="whiflash cost-curve"):
        CostCurve.load(tmp_path / "missing.json")


def _chain(probs):
    return DraftTree(tuple(range(len(probs))), tuple(range(-1, len(probs) - 1)), tuple(probs))


def test_trees_shrink_as_the_batch_grows_down_to_no_draft():
    probs = [0.9, 0.7, 0.5, 0.3, 0.15, 0.08]
    alone = trim_to_value([_chain(probs)], CURVE)[0]
    assert len(alone) == 6  # extra rows are nearly free at batch 1: only a long shot would be cut
    batch = trim_to_value([_chain(probs)] * 16, CURVE)
    assert 0 < sum(map(len, batch)) < 16 * 6 and all(t.probs == tuple(probs[: len(t)]) for t in batch)
    steep = CostCurve((1, 2), (0.100, 0.200))  # every row costs a whole forward: nothing pays
    assert [len(t) for t in trim_to_value([_chain(probs)] * 4, steep)] == [0] * 4


def test_trimming_keeps_ancestors_and_trees_without_estimates():
    tree = DraftTree((5, 6, 7, 8), (-1, -1, 0, 2), (0.6, 0.3, 0.4, 0.35))
    kept = trim_to_value([tree, DraftTree.chain([1, 2, 3])], CostCurve((1, 4, 8), (0.1, 0.1 + 3e-3, 0.2)))
    assert kept[1] == DraftTree.chain([1, 2, 3])
    assert kept[0].tokens[:1] == (5,) and all(p < i for i, p in enumerate(kept[0].parents))


def test_the_router_prices_actions_on_top_of_the_batch():
    class Eagle:
        def decide(self, features):
            return "eagle3"

    router = Router(Eagle(), ("eagle3", "ngram"), "eagle3", curve=CURVE)
    router.costs.observe_draft("eagle3", 0.05, sequences=8)
    router.costs.observe_draft("eagle3", 0.09, sequences=16)
    args = ((0.0, 0.0), "", {"eagle3": 0, "ngram": 0}, {"eagle3": 12, "ngram": 0}, [], 0.5, 0)
    alone = router.features(*args)
    assert alone.predicted_seconds["eagle3"] == pytest.approx(CURVE(13) + 0.015)  # the draft line at one sequence
    assert router.decide(alone) == "eagle3"
    load = BatchLoad(rows=240, tokens=20.0, draft_seconds=0.09)
    crowded = router.features(*args, batch=load)
    assert crowded.predicted_seconds["eagle3"] == pytest.approx(CURVE(253) - CURVE(240) + 0.09 / 16)
    assert crowded.batch_seconds == pytest.approx(CURVE(240) + 0.09)


LINE = CostCurve((1, 2), (0.101, 0.102))  # 0.1 s a forward, plus 1 ms a row


def _costs() -> CostModel:
    costs = CostModel(LINE)
    costs.observe_draft("eagle3", 0.041, sequences=1)  # 40 ms a call, plus 1 ms a sequence
    costs.observe_draft("eagle3", 0.042, sequences=2)
    return costs


def test_the_plan_drafts_together_what_no_request_would_draft_alone():
    costs = _costs()
    # alone, a request pays the drafter's whole fixed part for one more token: 9 tokens in 151 ms < 8 in 108 ms
    one = [Wish("eagle3", 2.0, 2, {})] + [Wish("eagle3", 1.0, 2, {})] * 7
    assert plan(one, costs, base_rows=8) == [False] * 8
    # eight share it: 16 tokens in 172 ms
    assert plan([Wish("eagle3", 2.0, 2, {})] * 8, costs, base_rows=8) == [True] * 8
    assert round_seconds([Wish("eagle3", 2.0, 2, {})] * 8, [True] * 8, costs, 8) == pytest.approx(0.172)


def test_the_plan_keeps_the_prefix_that_pays_and_always_drafts_probes():
    costs = _costs()
    strong, weak = Wish("eagle3", 3.0, 2, {}), Wish("eagle3", 1.05, 2, {})
    assert plan([weak, strong] * 4, costs, base_rows=8) == [False, True] * 4  # 16 tokens in 160 ms, not 16.2 in 172
    costs.observe_catchup("eagle3", 10, 0.001)  # 0.1 ms a position
    costs.observe_catchup("eagle3", 20, 0.002)
    slow = Wish("eagle3", 3.0, 2, {"eagle3": 10_000})  # a catch-up that costs more than the round is worth
    assert plan([slow, strong], costs, base_rows=2) == [False, True]
    # ... unless the request has the rounds left to spread it over: its first 32 positions whole, the rest /1000
    patient = Wish("eagle3", 3.0, 2, {"eagle3": 10_000}, rounds_left=1000)
    assert plan([patient, strong], costs, base_rows=2) == [True, True]
    assert round_seconds([patient], [True], costs, 1) == pytest.approx(
        round_seconds([strong], [True], costs, 1) + 0.0001 * (32 + 9968 / 1000))
    probe, weaker = Wish("eagle3", 1.0, 2, {}, forced=True), Wish("eagle3", 1.01, 2, {})
    assert plan([probe, weaker], costs, base_rows=2) == [True, False]
    assert plan([probe, weak], costs, base_rows=2) == [True, True]  # the probe's call is paid: 3 ms for 0.05 tokens


def test_the_plan_counts_what_drafting_adds_over_each_requests_fallback():
    costs = _costs()
    drafted = [Wish("eagle3", 3.0, 4, {})] * 8  # 24 tokens in 180 ms against 8 in 108 ms
    assert plan(drafted, costs, base_rows=8) == [True] * 8
    # left out, each drafts a lookup of 2 rows committing 2.5 tokens (20 in 124 ms): the trees' 4 more tokens are
    # not worth their call and rows
    looked_up = [replace(w, fallback_tau=2.5, fallback_rows=2) for w in drafted]
    assert plan(looked_up, costs, base_rows=8) == [False] * 8
    assert round_seconds(looked_up, [False] * 8, costs, 8) == pytest.approx(0.124)
    assert round_seconds(looked_up, [True] + [False] * 7, costs, 8) == pytest.approx(0.124 + 0.041 + 0.002)
    # where the fallback brings little, the same trees pay again
    assert plan([replace(w, fallback_tau=1.2, fallback_rows=1) for w in drafted], costs, base_rows=8) == [True] * 8
    # one drafts in any case, to measure drafting, and with its call paid the others' trees pay: 24 tokens in 188 ms
    assert explore(looked_up, costs, base_rows=8) == [True] * 8
    assert explore([replace(w, fallback_tau=3.0) for w in drafted], costs, base_rows=8) == [False] * 8  # no gain


def test_an_idle_request_probes_less_often_while_probes_find_nothing():
    router = Router(None, ("eagle3",), "eagle3")
    pattern = []
    for _ in range(4 + 1 + 8 + 1 + 16 + 1):
        probe = router.probe_due
        pattern.append(router.settle("eagle3" if probe else NO_DRAFT, probe=probe))
    assert pattern == [NO_DRAFT] * 4 + ["eagle3"] + [NO_DRAFT] * 8 + ["eagle3"] + [NO_DRAFT] * 16 + ["eagle3"]
    router.settle("eagle3")  # the plan chose it on its merits: the next probe comes after 4 idle rounds again
    assert [router.probe_due for _ in range(5) if router.settle(NO_DRAFT)] == [False] * 3 + [True] * 2


class _Seq:
    def __init__(self):
        self.tokens = [0]


_AS_DRAFTS = object()


def _round(times: RoundTimes, states, clock: float, drafts: bool, forward: float, drafting: float, rest: float,
           decode_only: bool = True, routed=_AS_DRAFTS, tokens: int = 1) -> float:
    """One round of ``states`` from ``clock``: a forward, drafter calls and catch-up of those seconds, and ``rest``
    per sequence around them, each sequence committing ``tokens`` (routed: when it drafts, unless told; None: a
    round of the roots alone, measured); the next round starts at the clock it returns."""
    times.start(states, decode_only, clock)
    times.ran(drafts, drafts if routed is _AS_DRAFTS else routed)
    times.spent(drafting)
    for _ in states:
        times.forwarded(forward, prefilled=False)
        times.committed(tokens)
    return clock + forward + drafting + rest * len(states)


def test_round_times_measure_what_a_round_costs_beyond_the_cost_model():
    """A round's rest is its time from its start to the next one's less its forward, drafter calls and catch-up;
    rounds after a prefill or over other sequences are not measured; a batch that keeps drafting
    verifies its roots alone every IDLE_EVERY + 1 rounds; a size's figures stand for it after ``TIMED`` rounds."""
    times, states = RoundTimes(), [_Seq(), _Seq()]
    assert times.extra(2) == (0.0, 0.0)
    clock, did = 0.0, []
    for k in range(2 * (IDLE_EVERY + 1)):
        drafts = not times.idle_due
        did.append(drafts)
        clock = _round(times, states, clock, drafts, 0.03, 0.01 if drafts else 0.0, 0.004 if drafts else 0.001,
                       decode_only=k > 1)  # the first two rounds follow a prefill
        if k == IDLE_EVERY + 1:
            assert times.extra(2) == pytest.approx((0.008, 0.008))  # rounds without drafts not measured yet
    assert did == ([True] * IDLE_EVERY + [False]) * 2
    times.start(states, True, clock)  # measures the last round: the second without drafts
    assert times.extra(2) == pytest.approx((0.008, 0.008))  # two are not enough to stand for the size
    for _ in range(TIMED - 2):
        clock = _round(times, states, clock, False, 0.03, 0.0, 0.001)
    times.start(states, True, clock)
    assert times.extra(2) == pytest.approx((0.002, 0.008))
    measured = {key: len(window) for key, window in times.rest.items()}
    assert measured == {(False, 2): TIMED, (True, 2): 2 * IDLE_EVERY - 1}  # the first round followed a prefill
    clock = _round(times, [_Seq(), *states], clock, True, 0.03, 0.01, 0.004)  # a request joined: not measured
    assert {key: len(window) for key, window in times.rest.items()} == measured


def test_rounds_of_lookups_are_priced_by_no_plan_and_leave_the_drafting_streak_as_it_is():
    """A round without routing whose requests drafted their n-gram lookups costs what no plan prices (no routing):
    it is not measured as a round with drafts, and it neither adds to the streak of drafting rounds that brings a
    round of the roots alone nor ends it; one whose lookups found nothing is a round without drafts."""
    times, clock, states = RoundTimes(), 0.0, [_Seq(), _Seq()]
    for _ in range(3):
        clock = _round(times, states, clock, True, 0.03, 0.01, 0.004)
    for _ in range(5):
        clock = _round(times, states, clock, True, 0.03, 0.0, 0.001, routed=False)
    times.start(states, True, clock)
    assert times.drafting_streak == 3 and set(times.rest) == {(True, 2)} and len(times.rest[True, 2]) == 3
    clock = _round(times, states, clock, False, 0.03, 0.0, 0.001, routed=False)
    times.start(states, True, clock)
    assert times.drafting_streak == 0 and len(times.rest[False, 2]) == 1


def test_round_times_are_kept_per_batch_size():
    """Each size keeps its own figures (rounds with drafts cost 8 ms beyond the cost model at 2 sequences, 16 ms at
    8), a size between two measured is interpolated, one beyond them takes the nearest's (not scaled per sequence:
    much of a round's rest is paid once a round), and rounds are not measured against the plan's prediction, so the
    cost model's corrections do not count twice."""
    times, clock = RoundTimes(), 0.0
    for sequences, drafted, idle in ((2, 0.004, 0.002), (8, 0.002, 0.001)):
        states = [_Seq() for _ in range(sequences)]
        for drafts, rest in ((True, drafted), (False, idle)):
            for _ in range(TIMED):
                clock = _round(times, states, clock, drafts, 0.03, 0.01 if drafts else 0.0, rest)
            times.start(states, True, clock)  # measures the last round
    assert times.extra(2) == pytest.approx((0.004, 0.008))
    assert times.extra(8) == pytest.approx((0.008, 0.016))
    assert times.extra(5) == pytest.approx((0.006, 0.012))
    assert times.extra(16) == pytest.approx((0.008, 0.016))
    assert times.extra(1) == pytest.approx((0.004, 0.008))


def test_routing_pays_while_routed_rounds_commit_what_rounds_without_it_just_before_would_have():
    """Outcome against outcome, per batch size. Rounds without routing (lookups) are measured first: until ``TIMED``
    were, routing does not pay; then it does until ``TIMED`` routed rounds were compared. Routed rounds of 2 sequences
    committing 4 tokens in 58-60 ms against 2 in 30 without routing pay; against 2 in 20 they do not. Each
    routed round counts against the rounds without routing measured before it: both kinds slow down as contexts
    grow, and rounds without routing measured later do not make earlier routed ones look slow. A round of the roots
    alone, timed for the cost model, is neither kind."""
    times, clock, states = RoundTimes(), 0.0, [_Seq(), _Seq()]
    for _ in range(TIMED):
        times.start(states, True, clock)
        assert not times.routing_pays(2)
        clock = _round(times, states, clock, False, 0.03, 0.0, 0.0, routed=None)  # roots alone, measured
        clock = _round(times, states, clock, True, 0.03, 0.0, 0.0, routed=False, tokens=1)  # lookups, none accepted
    times.start(states, True, clock)  # measures the last one
    assert len(times.quiet[2]) == TIMED and not times.paired
    for _ in range(TIMED - 1):
        clock = _round(times, states, clock, True, 0.03, 0.02, 0.005, tokens=2)
    times.start(states, True, clock)
    assert times.routing_pays(2) and len(times.paired[2]) == TIMED - 1  # not compared enough yet
    clock = _round(times, states, clock, True, 0.03, 0.018, 0.005, tokens=2)
    times.start(states, True, clock)
    assert times.routing_pays(2)  # 4 tokens in 60 ms twice and in 58 once: faster than 2 in 30 without routing
    for _ in range(PAIRED):  # later rounds without routing run faster: 2 tokens in 20 ms
        clock = _round(times, states, clock, True, 0.02, 0.0, 0.0, routed=False, tokens=1)
    times.start(states, True, clock)
    assert times.routing_pays(2)  # the routed rounds so far ran as fast as those before them
    for _ in range(TIME_WINDOW):
        clock = _round(times, states, clock, True, 0.03, 0.02, 0.005, tokens=2)
    times.start(states, True, clock)
    assert not times.routing_pays(2)  # 4 tokens in 60 ms against 2 in 20
    assert not times.routing_pays(4)  # another size: nothing measured there


def test_the_plan_adds_what_rounds_cost_beyond_the_cost_model():
    costs = _costs()
    wishes = [Wish("eagle3", 2.0, 2, {})] * 8  # 16 tokens in 172 ms against 8 in 108 ms
    assert plan(wishes, costs, base_rows=8) == [True] * 8
    assert plan(wishes, costs, base_rows=8, extra=(0.0, 0.07)) == [False] * 8  # 16 tokens in 242 ms


def test_calibration_scales_predictions_to_what_was_accepted():
    calibration = Calibration(prior=1.0, prior_ratio=1.0)
    assert calibration(3.0) == 3.0
    for _ in range(99):
        calibration.observe(predicted_tau=3.0, tau=2.0)  # half the predicted draft tokens accepted
    assert calibration(3.0) == pytest.approx(1 + 2 * (1 + 99) / (1 + 198))
    assert Calibration()(3.0) == 2.0  # nothing verified yet: half the predicted draft tokens
    recent = Calibration(prior=1.0, window=10, prior_ratio=1.0)
    for tau in [3.0] * 50 + [1.5] * 10:  # all accepted, then a quarter: only the last 10 rounds count
        recent.observe(predicted_tau=3.0, tau=tau)
    assert recent(3.0) == pytest.approx(1 + 2 * (1 + 5) / (1 + 20))


def test_a_curve_is_scaled_to_the_forwards_this_machine_runs():
    """Before the batch's roots alone were seen, one median ratio (an outlier ignored) scales every forward; a
    forward that each of its sequences reports counts once."""
    forwards = ScaledCurve(BY_SEQUENCES)
    assert forwards(16, 8) == BY_SEQUENCES(16, 8)  # nothing seen yet: as measured
    for rows, factor in ((16, 2.1), (32, 1.9), (64, 2.0), (24, 5.0), (16, 2.0)):  # one slow outlier ...
        for _ in range(8 if factor == 5.0 else 1):  # ... that all 8 sequences of its forward report
            forwards.observe(rows, BY_SEQUENCES(rows, 8) * factor, sequences=8)
    assert forwards(8, 8) == pytest.approx(2 * BY_SEQUENCES(8, 8))
    assert forwards(32, 8) == pytest.approx(2 * BY_SEQUENCES(32, 8))


def test_the_roots_alone_and_the_draft_rows_on_top_are_scaled_apart():
    """Served draft rows that cost three times what the curve says, on roots that cost what it says: the roots alone
    stay at their price (one ratio for the whole forward would make them 2-3x dearer, and not drafting look slower
    than it is), and the rows on top are priced at three times theirs."""
    forwards, roots = ScaledCurve(BY_SEQUENCES), BY_SEQUENCES(8, 8)
    for rows in (16, 32, 64, 32):
        forwards.observe(rows, roots + 3 * (BY_SEQUENCES(rows, 8) - roots), sequences=8)
    assert forwards(8, 8) > 1.3 * roots  # the roots alone not seen yet: one ratio for everything
    for _ in range(2):
        forwards.observe(8, roots, sequences=8)
    assert forwards(8, 8) == pytest.approx(roots)
    assert forwards(48, 8) == pytest.approx(roots + 3 * (BY_SEQUENCES(48, 8) - roots))


def test_the_curve_is_scaled_per_number_of_sequences():
    """Roots-only forwards that ran 1.4x the curve with 1 and 8 sequences and 1.1x with 16: each count keeps its
    ratio, a count between two seen is interpolated, one beyond them takes the nearest (one median over all would
    price 16 sequences' roots 27% too dear, and not drafting as slower than it is); and so do the draft rows on top
    of each count's roots."""
    forwards = ScaledCurve(BY_SEQUENCES)
    for i in range(3):
        for sequences, ratio in ((1, 1.4), (8, 1.4), (16, 1.1)):
            forwards.observe(sequences, ratio * BY_SEQUENCES(sequences, sequences) + 1e-6 * i, sequences)
    assert forwards(8, 8) == pytest.approx(1.4 * BY_SEQUENCES(8, 8), rel=1e-3)
    assert forwards(16, 16) == pytest.approx(1.1 * BY_SEQUENCES(16, 16), rel=1e-3)
    assert forwards(12, 12) == pytest.approx(1.25 * BY_SEQUENCES(12, 12), rel=1e-3)
    assert forwards(32, 32) == pytest.approx(1.1 * BY_SEQUENCES(32, 32), rel=1e-3)
    for sequences, ratio in ((8, 3.0), (16, 2.0)):  # draft rows at three times the curve with 8, twice with 16
        roots = BY_SEQUENCES(sequences, sequences)
        for i in range(TIMED):
            forwards.observe(48, forwards(sequences, sequences) + 1e-9 * i
                                 + ratio * (BY_SEQUENCES(48, sequences) - roots), sequences)
    for sequences, ratio in ((8, 3.0), (12, 2.5), (16, 2.0)):
        roots = BY_SEQUENCES(sequences, sequences)
        assert forwards(40, sequences) - forwards(sequences, sequences) == pytest.approx(
            ratio * (BY_SEQUENCES(40, sequences) - roots), rel=1e-3)


def test_a_draft_rows_price_is_set_neither_by_a_rows_jitter_nor_by_one_slow_forward():
    """Forwards with one draft row carry a round's jitter (4 ms) over a row the curve prices at under a millisecond,
    and one forward in a few may run slow: the draft rows' scale is the median of the forwards' ratios weighted by
    their draft rows' price, 1.2 here, where a plain median (6, 6, 6, 1.2, 1.2, 1.2) would price every draft row at
    3.6 times the curve and pooled sums (the slow one included) at 1.74; and a size drafted fewer than ``TIMED``
    times is priced at its roots' ratio."""
    forwards, roots = ScaledCurve(BY_SEQUENCES), BY_SEQUENCES(8, 8)
    forwards.observe(8, roots, sequences=8)
    extra = BY_SEQUENCES(40, 8) - roots
    forwards.observe(40, roots + 3.0 * extra, sequences=8)  # the first forward with drafts ran slow
    assert forwards(40, 8) - roots == pytest.approx(extra)  # one forward does not stand for the size
    for i in range(3):
        forwards.observe(9, BY_SEQUENCES(9, 8) + 0.004 + 1e-6 * i, sequences=8)
        forwards.observe(40, roots + 1.2 * extra + 1e-6 * i, sequences=8)
    assert forwards(40, 8) - roots == pytest.approx(1.2 * extra, rel=1e-3)
    forwards.observe(16, 1.3 * BY_SEQUENCES(16, 16), sequences=16)  # beyond the sizes that drafted: no borrowing
    assert forwards(48, 16) == pytest.approx(1.3 * BY_SEQUENCES(48, 16))


def test_cost_model_without_a_curve_learns_the_verify_line():
    costs = CostModel()
    for rows, seconds in ((1, 0.1), (9, 0.14), (17, 0.18)):
        costs.observe_verify(rows, seconds)
    assert costs.verify(5) == pytest.approx(0.12) and costs.verify(0) == 0.0
    once, repeated = CostModel(), CostModel()
    for rows, seconds, sequences in ((1, 0.1, 1), (9, 0.14, 1), (16, 0.5, 16)):
        once.observe_verify(rows, seconds, sequences)
        for _ in range(sequences):  # each sequence of the forward reports it: it counts once
            repeated.observe_verify(rows, seconds, sequences)
    assert repeated.verify(5) == pytest.approx(once.verify(5)) and once.verify(5) != pytest.approx(0.12)


def test_measured_curve_drives_a_batch_that_stays_lossless(tiny_target, prompt_ids):
    curve = measure(tiny_target, prefix=8, repeats=1, progress=False)
    assert [count for count, _, _ in curve.lines] == list(SEQUENCES) and all(s > 0 for s in curve.seconds)
    assert all(rows == tuple(count * k for k in ROWS_EACH if count * k <= MAX_ROWS) for count, rows, _ in curve.lines)
    assert tiny_target.pool.reserved == 0 and tiny_target.pool.free_slots == tiny_target.pool.capacity
    reference = SpeculativeEngine(tiny_target).generate(prompt_ids, 24).tokens
    tiny_target.cost_curve = CostCurve((1, 2), (0.1, 0.2))  # nothing pays: trees with estimates are cut to nothing
    try:
        engine = SpeculativeEngine(tiny_target, NgramDrafter(min_ngram=1))
        requests = [engine.submit(prompt_ids, 24) for _ in range(3)]
        while any(r.result is None for r in requests):
            engine.step()
    finally:
        tiny_target.cost_curve = None
    assert all(r.result.tokens == reference for r in requests)


def test_trees_are_trimmed_at_the_price_rows_have_on_this_machine():
    """The curve's rows were measured elsewhere: where draft rows run four times the curve's (roots alone as it
    says), the scaled curve cuts chains the curve would have verified."""
    forwards = ScaledCurve(BY_SEQUENCES)
    for _ in range(TIMED):
        forwards.observe(8, BY_SEQUENCES(8, 8), 8)
        forwards.observe(24, BY_SEQUENCES(8, 8) + 4 * (BY_SEQUENCES(24, 8) - BY_SEQUENCES(8, 8)), 8)
    chains = [_chain([0.3, 0.2])] * 8
    assert [len(t) for t in trim_to_value(chains, BY_SEQUENCES)] == [2] * 8
    assert [len(t) for t in trim_to_value(chains, forwards)] == [0] * 8
    assert value_bar(chains, forwards)[0] > 2 * value_bar(chains, BY_SEQUENCES)[0]


SLOPED = CostCurve((1, 64), (0.1, 0.1063))  # a row costs a thousandth of a forward: every lookup pays


class _Told(ScaledCurve):
    """``SLOPED`` scaled by a full window of forwards whose draft rows ran 2000 times the curve's on roots as it
    says (so a row costs two forwards, and a short generation's own forwards do not outvote them); it records the
    forwards it is told of later."""

    def __init__(self):
        super().__init__(SLOPED)
        for i in range(CURVE_WINDOW):
            self.observe(1, SLOPED(1) + 1e-9 * i)
            self.observe(16, SLOPED(1) + 2000 * (SLOPED(16) - SLOPED(1)) + 1e-9 * i)
        self.told = []

    def observe(self, rows, seconds, sequences=1):
        getattr(self, "told", []).append((rows, sequences))
        super().observe(rows, seconds, sequences)


class _PricedNgram(NgramDrafter):
    price = None

    def forward_price(self):
        return self.price


def test_the_engine_trims_by_the_drafters_price_where_it_has_one(tiny_target, prompt_ids):
    tiny_target.cost_curve = CostCurve((1, 64), (0.1, 0.1))  # rows free: every node pays
    drafter = _PricedNgram(min_ngram=1)
    drafter.price = _Told()
    try:
        free = SpeculativeEngine(tiny_target, NgramDrafter(min_ngram=1)).generate(prompt_ids, 24)
        priced = SpeculativeEngine(tiny_target, drafter).generate(prompt_ids, 24)
    finally:
        tiny_target.cost_curve = None
    assert free.drafted > 0 and priced.drafted == 0 and priced.tokens == free.tokens
    assert drafter.price.told == [(1, 1)] * priced.rounds  # the engine told it of every forward but the prefill


def test_an_engine_scales_the_curve_itself_for_a_drafter_without_a_price(tiny_target, prompt_ids):
    """Plain EAGLE-3 or DFlash keep no cost model: the engine scales the target's curve to the forwards it runs, so
    their rows too are priced as this machine runs them, not as the machine that measured the curve did."""
    tiny_target.cost_curve = SLOPED
    try:
        engines = [SpeculativeEngine(tiny_target, NgramDrafter(min_ngram=1)) for _ in range(2)]
    finally:
        tiny_target.cost_curve = None
    assert isinstance(engines[0].forward_price, ScaledCurve) and engines[0].forward_price.curve is SLOPED
    engines[1].forward_price = told = _Told()
    fresh, scaled = (engine.generate(prompt_ids, 24) for engine in engines)
    assert fresh.drafted > 0 and scaled.drafted == 0 and scaled.tokens == fresh.tokens
    assert told.told == [(1, 1)] * scaled.rounds
