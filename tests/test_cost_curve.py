"""The batch-aware cost model: the measured curve, trees trimmed to the rows that pay as the batch grows, the router
pricing actions on top of the rest of the batch and drafting nothing where that is faster; none of it changes the
output."""

from __future__ import annotations

import json

import pytest

from whiflash_sgl.cost_curve import CostCurve, measure, trim_to_value
from whiflash_sgl.drafters.ngram import NgramDrafter
from whiflash_sgl.engine import SpeculativeEngine
from whiflash_sgl.errors import WhiFlashError
from whiflash_sgl.router import NO_DRAFT, BatchLoad, CostModel, Router
from whiflash_sgl.tree import DraftTree

# weight-bound up to 16 rows (each extra row almost free), then every row pays its share: a CPU's shape
CURVE = CostCurve((1, 16, 64, 256), (0.100, 0.110, 0.200, 0.600))


def test_the_curve_interpolates_and_extrapolates():
    assert CURVE(0) == 0.0 and CURVE(1) == pytest.approx(0.1) and CURVE(40) == pytest.approx(0.155)
    assert CURVE(512) == pytest.approx(1.1333, abs=1e-3)  # the last segment's slope
    assert CURVE.added(0, 4) == CURVE(4) and CURVE.added(64, 1) == pytest.approx(0.4 / 192)


def test_a_measured_dip_is_pooled_away_so_no_rows_look_free():
    noisy = CostCurve((1, 8, 12, 16, 32), (0.15, 0.25, 0.45, 0.35, 0.40))  # 12 rows measured slower than 16
    assert noisy.seconds == pytest.approx((0.15, 0.25, 0.40, 0.40, 0.40))
    assert all(noisy.added(base, 4) >= 0 for base in range(1, 40))
    assert CURVE.seconds == (0.100, 0.110, 0.200, 0.600)  # a curve that never dips stays as measured


def test_a_curve_round_trips_and_bad_files_are_clear_errors(tmp_path):
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


def test_the_router_prices_actions_on_top_of_the_batch_and_idles_where_drafting_does_not_pay():
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
    assert crowded.predicted_seconds["eagle3"] == pytest.approx(CURVE.added(240, 13) + 0.09 / 16)
    assert crowded.batch_seconds == pytest.approx(CURVE(240) + 0.09)
    router.ema_tau["eagle3"] = 1.1  # drafting barely pays off: 0.1 tokens for 13 rows at a compute-bound batch
    crowded = router.features(*args, batch=load)
    decisions = [router.decide(crowded) for _ in range(4 + 1 + 8 + 1 + 16 + 1)]
    # a probe after 4 idle rounds, then after twice as many each time it finds drafting still does not pay
    assert decisions == [NO_DRAFT] * 4 + ["eagle3"] + [NO_DRAFT] * 8 + ["eagle3"] + [NO_DRAFT] * 16 + ["eagle3"]
    router.ema_tau["eagle3"] = 4.0
    assert router.decide(router.features(*args, batch=load)) == "eagle3"
    router.ema_tau["eagle3"] = 1.1  # when drafting paid, the next probe comes after 4 idle rounds again
    crowded = router.features(*args, batch=load)
    assert [router.decide(crowded) for _ in range(4 + 1)] == [NO_DRAFT] * 4 + ["eagle3"]


def test_cost_model_without_a_curve_learns_the_verify_line():
    costs = CostModel()
    for rows, seconds in ((1, 0.1), (9, 0.14), (17, 0.18)):
        costs.observe_verify(rows, seconds)
    assert costs.verify(5) == pytest.approx(0.12) and costs.verify(0) == 0.0


def test_measured_curve_drives_a_batch_that_stays_lossless(tiny_target, prompt_ids):
    curve = measure(tiny_target, rows=(1, 4, 16), prefix=8, repeats=1, progress=False)
    assert curve.rows == (1, 4, 16) and all(s > 0 for s in curve.seconds)
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
