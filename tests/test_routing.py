"""WhiFlash routing on a tiny real target: every policy is lossless, hedges verify their paradigms' drafts as one
tree, faults fall back, policies load from entry points (including another distribution's), lazy and eager catch-up
agree, and the oracle bounds every paradigm."""

from __future__ import annotations

import collections
import logging
import threading
import time

import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency

from whiflash_sgl.cost_curve import CostCurve
from whiflash_sgl.drafters.base import RoundReport
from whiflash_sgl.drafters.checkpoint import dflash_config, eagle3_config
from whiflash_sgl.drafters.dflash import DFlashDrafter, DFlashModel
from whiflash_sgl.drafters.eagle3 import Eagle3Drafter, Eagle3Model
from whiflash_sgl.drafters.ngram import NgramDrafter
from whiflash_sgl.drafters.oracle import OracleDrafter
from whiflash_sgl.drafters.whiflash import QUIET_MAX, ROUTED_RUN, QuietRounds, WhiFlashDrafter
from whiflash_sgl.drafting_plan import (CALIBRATION_WINDOW, FIRST_STEP, FIRST_STEP_PROBE, FirstSteps,
                                       RoundTimes)
from whiflash_sgl.engine import SpeculativeEngine
from whiflash_sgl.errors import WhiFlashError
from whiflash_sgl.forward_price import TIMED
from whiflash_sgl.policies import load_policy
from whiflash_sgl import router as router_module
from whiflash_sgl.router import (NO_DRAFT, CostModel, Decision, PolicyWorker, RoundFeatures, Router,
                               best_paradigm, root_statistics, syntax_state)
from whiflash_sgl.sampling import SamplingParams
from whiflash_sgl.target import Target
from whiflash_sgl.train.eagle3 import set_vocabulary
from whiflash_sgl.train.train_drafter import default_layer_ids
from whiflash_sgl.tree import DraftTree

LAYERS = 6


@pytest.fixture(scope="module")
def target(tiny_tokenizer, make_model):
    return Target(make_model(len(tiny_tokenizer), num_hidden_layers=LAYERS, initializer_range=0.05),
                  tiny_tokenizer, name="tiny6")


@pytest.fixture(scope="module")
def models(target):
    torch.manual_seed(3)
    eagle = Eagle3Model(eagle3_config(target, 128, default_layer_ids(LAYERS)))
    set_vocabulary(eagle, torch.arange(128))
    mask_id = target.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    dflash = DFlashModel(dflash_config(target, 1, 5, default_layer_ids(LAYERS), mask_id))
    return eagle, dflash


def _drafters(target, models):
    eagle, dflash = models
    embed, head = target.model.get_input_embeddings(), target.model.get_output_embeddings()
    return {"eagle3": Eagle3Drafter(eagle, embed, depth=3, topk=2, budget=6),
            "dflash": DFlashDrafter(dflash, embed, head),
            "ngram": NgramDrafter(min_ngram=1)}


def _whiflash(target, models, policy, catch_up="lazy", deadline=0.05):
    drafters = _drafters(target, models)
    router = Router(policy, tuple(drafters), "eagle3", deadline_s=deadline, hedging=True)
    return WhiFlashDrafter(drafters, router, target.tokenizer, catch_up)


class Alternate:
    """A policy that switches every round, hedges included: the hardest case for catch-up."""

    def __init__(self):
        self.i = 0

    def decide(self, features):
        self.i += 1
        return ("eagle3", "dflash", "ngram", "ngram+eagle3", "dflash+eagle3+ngram")[self.i % 5]


@pytest.fixture
def prompt(tiny_tokenizer):
    return tiny_tokenizer("def add(a, b):\n    return a + b\n\ndef add(a, b):")["input_ids"]


@pytest.mark.parametrize("policy", ["heuristic", "entropy", "alternate"])
@pytest.mark.parametrize("catch_up", ["lazy", "eager"])
def test_every_policy_is_greedy_lossless(target, models, prompt, policy, catch_up):
    chosen = Alternate() if policy == "alternate" else load_policy(policy)
    drafter = _whiflash(target, models, chosen, catch_up)
    reference = SpeculativeEngine(target).generate(prompt, 48)
    result = SpeculativeEngine(target, drafter).generate(prompt, 48)
    assert result.tokens == reference.tokens
    routed = sum(drafter.router.stats.rounds.values())
    assert routed == len(result.paradigms) and result.rounds - 1 <= routed <= result.rounds
    if policy == "alternate":
        assert drafter.router.stats.switches == result.rounds - 1 and result.switch_seconds > 0


@pytest.mark.parametrize("temperature", [0.7, 1.0])
@pytest.mark.parametrize("method", ["eagle3", "dflash", "ngram", "heuristic", "entropy", "mlp", "alternate"])
def test_every_method_samples_vanilla_s_text_for_a_seed(target, models, prompt, method, temperature):
    """Keyed rule: one seed, one text, whatever drafts, routes or hedges (alternate switches every round)."""
    params = SamplingParams(temperature=temperature, top_p=0.9)
    if method in ("eagle3", "dflash", "ngram"):
        drafter = _drafters(target, models)[method]
    else:
        drafter = _whiflash(target, models, Alternate() if method == "alternate" else load_policy(method))
    seed = 2**63 + 11  # the high half of the seed in use
    reference = SpeculativeEngine(target, None, params, seed=seed).generate(prompt, 40)
    result = SpeculativeEngine(target, drafter, params, seed=seed).generate(prompt, 40)
    assert result.tokens == reference.tokens
    assert result.drafted > 0


def test_a_hedge_accepts_the_longest_of_its_drafts_and_informs_each_paradigm(target, models, prompt):
    """A hedge's drafts are verified as one tree: each round accepts what the better of them would have, and both
    paradigms' tau statistics learn from the round while the idle one's stay put."""
    drafter = _whiflash(target, models, Fixed("ngram+eagle3"))
    reference = SpeculativeEngine(target).generate(prompt, 40)
    engine = SpeculativeEngine(target, drafter)
    request = engine.submit(prompt, 40)
    while request.result is None:
        engine.step()
    result = request.result
    assert result.tokens == reference.tokens
    assert set(drafter.router.stats.rounds) == {"eagle3+ngram"}  # canonical name
    alone = {}
    for paradigm in ("eagle3", "ngram"):
        single = SpeculativeEngine(target, _whiflash(target, models, Fixed(paradigm))).generate(prompt, 40)
        alone[paradigm] = single.rounds
    assert result.rounds <= min(alone.values())
    ema = request.drafter.router.ema_tau  # the request's own router state
    assert ema["dflash"] == 2.0 and ema["eagle3"] != 2.0 and ema["ngram"] != 2.0


def test_hedges_are_invalid_where_the_engine_cannot_verify_them(target, models, prompt):
    """The SGLang worker's router serves single paradigms only; a hedge there, or one naming an unknown paradigm,
    falls back like any invalid decision."""
    drafters = _drafters(target, models)
    for hedging, action in ((False, "eagle3+ngram"), (True, "eagle3+medusa")):
        router = Router(Fixed(action), tuple(drafters), "eagle3", hedging=hedging)
        drafter = WhiFlashDrafter(drafters, router, target.tokenizer)
        assert SpeculativeEngine(target, drafter).generate(prompt, 8).tokens == \
            SpeculativeEngine(target).generate(prompt, 8).tokens
        assert router.stats.faults == {"invalid": router.stats.rounds["eagle3"]}


def test_eager_keeps_every_drafter_current_and_lazy_does_not(target, models, prompt):
    """The idle DFlash backlog the policy sees: one round's tokens under eager catch-up, the whole sequence under
    lazy catch-up (DFlash is never chosen, so lazily it never catches up)."""
    backlogs = {}
    for mode in ("eager", "lazy"):
        policy = Fixed("eagle3")
        SpeculativeEngine(target, _whiflash(target, models, policy, mode)).generate(prompt, 24)
        backlogs[mode] = max(policy.seen_dflash_pending[1:])  # the first round sees the whole prompt
    assert backlogs["eager"] <= 4  # at most depth + 1 tokens commit per round
    assert backlogs["lazy"] >= len(prompt) + 10


class Fixed:
    def __init__(self, paradigm):
        self.paradigm, self.seen_dflash_pending = paradigm, []

    def decide(self, features):
        self.seen_dflash_pending.append(features.pending["dflash"])
        return Decision(self.paradigm)


def test_routing_keeps_the_sampling_distribution(target, models, prompt):
    """Second generated token (the first one a verify round emits) under routing vs plain sampling: a chi-square
    test of homogeneity over 1500 seeded runs each, at significance 0.001. The rejection rule: under the keyed rule
    the two are token-identical (test_every_method_samples_vanilla_s_text_for_a_seed)."""
    params = SamplingParams(temperature=1.5, rule="rejection")
    counts = {}
    for name in ("vanilla", "routed"):
        seen = collections.Counter()
        for seed in range(1500):
            drafter = None if name == "vanilla" else _whiflash(target, models, Alternate())
            tokens = SpeculativeEngine(target, drafter, params, seed=seed).generate(prompt, 2).tokens
            seen[tokens[1] if len(tokens) > 1 else -1] += 1  # -1: the first token was EOS
        counts[name] = seen
    tokens = [t for t in set(counts["vanilla"]) | set(counts["routed"])
              if counts["vanilla"][t] + counts["routed"][t] >= 20]
    table = np.array([[counts[n][t] for t in tokens] + [1500 - sum(counts[n][t] for t in tokens)]
                      for n in ("vanilla", "routed")])
    assert chi2_contingency(table).pvalue > 1e-3


class Raises:
    def decide(self, features):
        raise RuntimeError("policy bug")


class Hangs:
    def decide(self, features):
        time.sleep(0.3)
        return "dflash"


class Invalid:
    def decide(self, features):
        return "medusa"


class InvalidTau:
    def decide(self, features):
        return Decision("dflash", tau=float("nan"))


@pytest.mark.parametrize("policy, kind", [(Raises(), "raised"), (Hangs(), "timeout"), (Invalid(), "invalid"),
                                          (InvalidTau(), "invalid")])
def test_faulty_policies_fall_back_and_are_logged_once(target, models, prompt, policy, kind, caplog):
    drafter = _whiflash(target, models, policy, deadline=0.02)
    reference = SpeculativeEngine(target).generate(prompt, 16)
    with caplog.at_level(logging.WARNING, logger="whiflash_sgl.router"):
        result = SpeculativeEngine(target, drafter).generate(prompt, 16)
    assert result.tokens == reference.tokens
    assert drafter.router.stats.faults[kind] >= 1
    assert set(drafter.router.stats.rounds) == {"eagle3"}  # the fallback drafted every faulty round
    assert len([r for r in caplog.records if kind in r.getMessage()]) == 1


def test_policy_calls_share_one_thread_that_ends_when_idle(monkeypatch):
    monkeypatch.setattr(router_module, "POLICY_IDLE_EXIT_S", 0.1)
    threads = []

    class Where:
        def decide(self, features):
            threads.append(threading.current_thread())
            return "eagle3"

    worker = PolicyWorker(Where().decide)
    assert [worker.call([None], 1.0) for _ in range(20)] == [["eagle3"]] * 20
    assert worker.call([None] * 8, 1.0) == ["eagle3"] * 8  # a batch's decisions in one hand-off
    assert len(set(threads)) == 1 and threads[0] is not threading.current_thread()
    threads[0].join(2.0)
    assert not threads[0].is_alive()  # ended after its idle time; the next call starts another
    assert worker.call([None], 1.0) == ["eagle3"] and threads[-1] is not threads[0]


def test_the_policy_thread_runs_torch_on_one_thread_and_leaves_every_other_threads_count():
    """A second thread's parallel torch ops slowed every later forward of the caller by a quarter on 2 cores."""
    counts = []
    worker = PolicyWorker(lambda features: counts.append(torch.get_num_threads()) or "eagle3")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert worker.call([None], 1.0) == ["eagle3"]
        later = []
        thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert counts == [1] and torch.get_num_threads() == 2 and later == [2]
    finally:
        torch.set_num_threads(before)


def test_root_statistics_are_each_rows_entropy_and_top2_margin():
    logits = torch.randn(3, 50, dtype=torch.bfloat16) * 4
    logits[1] = 0.0  # uniform: entropy log(50), margin 0
    for (entropy, margin), row in zip(root_statistics(logits), logits.float()):
        probs = torch.softmax(row, -1)
        top = probs.sort(descending=True).values
        assert entropy == pytest.approx(float(-(probs * probs.log()).sum()), abs=1e-5)
        assert margin == pytest.approx(float(top[0] - top[1]), abs=1e-6)
    assert root_statistics(logits)[1] == pytest.approx((np.log(50), 0.0), abs=1e-5)
    assert root_statistics(list(logits)) == root_statistics(logits) and root_statistics([]) == []


def test_oracle_accepts_the_best_paradigm_each_round(target, models, prompt):
    drafters = _drafters(target, models)
    oracle = OracleDrafter(drafters, Router(None, tuple(drafters), "eagle3"), target.tokenizer)
    reference = SpeculativeEngine(target).generate(prompt, 40)
    result = SpeculativeEngine(target, oracle).generate(prompt, 40)
    assert result.tokens == reference.tokens
    assert result.rounds - 1 <= len(oracle.traces) <= result.rounds
    for row, accepted in zip(oracle.traces, result.accept_lengths):
        assert max(row["accepted"].values()) == accepted
        assert row["features"].ngram_draft == row["draft_tokens"]["ngram"]  # the peeked proposal is the one drafted
    assert any(row["features"].ngram_draft for row in oracle.traces)


def test_unknown_policy_lists_the_installed_ones():
    with pytest.raises(WhiFlashError, match="unknown routing policy 'nope'; installed policies: .*entropy.*heuristic"):
        load_policy("nope")
    with pytest.raises(WhiFlashError, match="bad parameters for policy 'entropy'"):
        load_policy("entropy", {"no_such_knob": 1})


def test_a_policy_from_another_distribution_is_found_by_name(tmp_path, monkeypatch, target, models, prompt):
    """A real (tiny) installed distribution: a module and a dist-info whose entry point names it."""
    (tmp_path / "acme_router.py").write_text(
        "class AlwaysDFlash:\n    def __init__(self, note=''):\n        self.note = note\n"
        "    def decide(self, features):\n        return 'dflash'\n")
    info = tmp_path / "acme_router-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-router\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[whiflash_sgl.policies]\nalways-dflash = acme_router:AlwaysDFlash\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    policy = load_policy("always-dflash", {"note": "x"})
    drafter = _whiflash(target, models, policy)
    result = SpeculativeEngine(target, drafter).generate(prompt, 16)
    assert set(result.paradigms) == {"dflash"}


def test_cost_model_fits_verify_time_and_predicts():
    costs = CostModel()
    for n in (1, 4, 8, 16):
        costs.observe_verify(n, 0.040 + 0.002 * n)
    assert costs.verify_seconds(10) == pytest.approx(0.060)
    costs.observe_draft("dflash", 0.010)
    costs.observe_catchup("dflash", 20, 0.002)
    sizes = {"dflash": 15, "eagle3": 0, "ngram": 4}
    assert costs.predict("dflash", sizes, {"dflash": 30}) == pytest.approx(0.010 + 0.072 + 0.002)  # one size seen
    costs.observe_catchup("dflash", 2, 0.0011)  # mostly fixed overhead: 1 ms + 0.05 ms per position
    costs.observe_catchup("dflash", 200, 0.011)
    assert costs.predict("dflash", sizes, {"dflash": 400}) == pytest.approx(0.010 + 0.072 + 0.021, rel=0.02)
    assert costs.predict("eagle3", sizes, {"eagle3": 400}) == pytest.approx(0.042)  # nothing measured: verify
    costs.observe_draft("ngram", 0.001)
    # a hedge: both drafts, both catch-ups, one verify of all their tokens
    assert costs.predict("dflash+ngram", sizes, {"dflash": 400, "ngram": 0}) == pytest.approx(
        0.010 + 0.001 + 0.080 + 0.021, rel=0.02)


def test_objective_and_syntax_features():
    expected, seconds = {"eagle3": 3.0, "dflash": 4.0}, {"eagle3": 0.050, "dflash": 0.080}
    assert best_paradigm(expected, seconds, None) == "eagle3"  # 60 vs 50 tokens per second
    assert best_paradigm(expected, seconds, 0.0) == "dflash"  # latency ignored
    assert syntax_state('Sure:\n```python\nx = {"a": [1, ') == (True, True, 2)
    assert syntax_state("Plain prose (done).") == (False, False, 0)


@pytest.mark.parametrize("policy", ["heuristic", "entropy"])
def test_ngram_without_a_proposal_is_never_chosen(policy):
    """An n-gram round with nothing to propose commits one token however well n-gram did before."""
    features = RoundFeatures(
        entropy=0.5, margin=0.5, last_tau=3.0, last_paradigm="ngram", ema_tau={"eagle3": 2.0, "ngram": 4.0},
        pending={"eagle3": 0, "ngram": 0}, predicted_seconds={"eagle3": 0.050, "ngram": 0.035}, dflash_expected=0.0,
        eagle_top1=0.6, ngram_draft=0, in_code=False, in_json=False, bracket_depth=0)
    assert features.expected_tau()["ngram"] == 1.0
    assert load_policy(policy, {}).decide(features).paradigm == "eagle3"
    features.ngram_draft = 6
    assert load_policy(policy, {}).decide(features).paradigm == "ngram"


def test_each_request_routes_on_its_own_and_mixed_paradigms_verify_in_one_forward(target, models, prompt,
                                                                                    tiny_tokenizer, monkeypatch):
    """Batched requests: ``Alternate`` is one policy object for every request's router, so within a round
    consecutive requests get different actions; each round is still one target forward for all of them, and one
    EAGLE-3 KV-only prefill for all the requests whose action includes it; every output equals the request's solo
    vanilla output, and every request, switching every round, is charged its share of the catch-up. (The batch's
    plan is told to let everyone draft: with a tiny target, no draft pays.)"""
    monkeypatch.setattr("whiflash_sgl.drafters.whiflash.plan", lambda wishes, *args: [True] * len(wishes))
    prompts = [prompt] + [tiny_tokenizer(t)["input_ids"] for t in ("The quick brown fox", "for i in range(10):\n")]
    solo = [SpeculativeEngine(target).generate(p, 24).tokens for p in prompts]
    engine = SpeculativeEngine(target, _whiflash(target, models, Alternate()))
    forwards, prefills = [], []
    forward = target.forward
    target.forward = lambda chunks: forwards.append(len(chunks)) or forward(chunks)
    context_kv = Eagle3Drafter._context_kv
    monkeypatch.setattr(Eagle3Drafter, "_context_kv",
                        lambda self, *a: prefills.append(len(a[0])) or context_kv(self, *a))
    try:
        requests = [engine.submit(p, 24) for p in prompts]
        steps = 0
        while any(r.result is None for r in requests):
            engine.step()
            steps += 1
    finally:
        del target.forward
    assert [r.result.tokens for r in requests] == solo
    assert len(forwards) == steps and max(forwards) == 3  # one forward per round, all three requests in it
    assert len(prefills) <= steps and max(prefills) >= 2  # one catch-up a round, several requests in one
    assert all(r.result.switch_seconds > 0 for r in requests)
    paradigms = [r.result.paradigms for r in requests]
    mixed = [k for k in range(min(map(len, paradigms))) if len({p[k] for p in paradigms}) > 1]
    assert len(mixed) >= 3


def _two_requests_whose_plan_is(drafts: bool, tokens: int, target, models, prompt, tiny_tokenizer, monkeypatch,
                                pays: bool | None = None):
    """Two requests batched under a plan that always (``drafts``) or never lets them draft, each checked against its
    solo vanilla output. Routing is taken to pay (``pays``) when it drafts unless told (tiny drafters' rounds would
    not, as measured)."""
    for module in ("whiflash_sgl.drafters.whiflash", "whiflash_sgl.drafting_plan"):  # the plan, and explore's
        monkeypatch.setattr(f"{module}.plan", lambda wishes, *args: [drafts] * len(wishes))
    monkeypatch.setattr(RoundTimes, "routing_pays", lambda self, sequences: drafts if pays is None else pays)
    prompts = [prompt, tiny_tokenizer("The quick brown fox")["input_ids"]]
    solo = [SpeculativeEngine(target).generate(p, tokens).tokens for p in prompts]
    engine = SpeculativeEngine(target, _whiflash(target, models, Fixed("eagle3")))
    requests = [engine.submit(p, tokens) for p in prompts]
    while any(r.result is None for r in requests):
        engine.step()
    assert [r.result.tokens for r in requests] == solo
    return requests


def test_the_cost_model_learns_from_verify_forwards_only(target, models, prompt, tiny_tokenizer, monkeypatch):
    """A request whose prompt is prefilled in the same forward as the others' verify: that forward's time is mostly
    the prompt's, which says nothing about draft rows (prompt chunks of hundreds of rows had outweighed every draft
    row in the pooled draft-row scale), so the cost model learns only from forwards that verified and nothing else."""
    monkeypatch.setattr("whiflash_sgl.drafters.whiflash.plan", lambda wishes, *args: [True] * len(wishes))
    engine = SpeculativeEngine(target, _whiflash(target, models, Fixed("eagle3")))
    learned, forwards = [], []
    observe = CostModel.observe_verify
    monkeypatch.setattr(CostModel, "observe_verify",
                        lambda self, rows, *args: learned.append(rows) or observe(self, rows, *args))
    forward = target.forward
    target.forward = lambda chunks: forwards.append(
        (sum(len(c.tokens) for c in chunks), any(c.logits < len(c.tokens) for c in chunks))) or forward(chunks)
    try:
        first = engine.submit(prompt, 16)
        engine.step()
        engine.step()
        second = engine.submit(tiny_tokenizer("The quick brown fox jumps over the lazy dog. " * 4)["input_ids"], 8)
        while first.result is None or second.result is None:
            engine.step()
    finally:
        del target.forward
    with_prefill = {rows for rows, prefill in forwards if prefill}
    verify_only = {rows for rows, prefill in forwards if not prefill}
    assert max(with_prefill) > max(verify_only) and len(verify_only) > 1
    assert len(set(learned)) > 1 and set(learned) <= verify_only


def test_a_batch_verifies_its_roots_alone_first_at_a_size_not_timed_yet(target, models, prompt, tiny_tokenizer,
                                                                       monkeypatch):
    """With a cost curve to scale, what a round without drafts costs at a batch size is the plan's yardstick, so a
    batch of a size whose roots alone were not timed ``TIMED`` times verifies them alone until they were (the first
    such forward after a prefill can run half again as long as the next ones)."""
    monkeypatch.setattr("whiflash_sgl.drafters.whiflash.plan", lambda wishes, *args: [True] * len(wishes))
    monkeypatch.setattr(RoundTimes, "routing_pays", lambda self, sequences: True)  # tiny drafters' rounds do not
    monkeypatch.setattr("whiflash_sgl.drafters.whiflash.ROUTED_RUN", 1000)  # every round after those routes
    drafters = _drafters(target, models)
    router = Router(Fixed("eagle3"), tuple(drafters), "eagle3", curve=CostCurve((1, 8), (0.010, 0.012)))
    engine = SpeculativeEngine(target, WhiFlashDrafter(drafters, router, target.tokenizer))
    prompts = [prompt, tiny_tokenizer("The quick brown fox")["input_ids"]]
    solo = [SpeculativeEngine(target).generate(p, 16).tokens for p in prompts]
    requests = [engine.submit(p, 16) for p in prompts]
    while any(r.result is None for r in requests):
        engine.step()
    assert [r.result.tokens for r in requests] == solo
    rounds = ["".join(sorted(set(actions))) for actions in zip(*(r.result.paradigms for r in requests))]
    assert rounds[:TIMED] == [NO_DRAFT] * TIMED and set(rounds[TIMED:]) == {"eagle3"}
    assert len(rounds) > TIMED + 2
    assert router.costs.knows_roots(2) and not router.costs.knows_roots(3)
    for _ in range(TIMED):  # between two counts timed, the scale is interpolated
        router.costs.observe_verify(5, 0.013 + 0.0001 * _, 5)
    assert [router.costs.knows_roots(n) for n in range(1, 7)] == [False, True, True, True, True, False]


def test_a_batch_that_always_drafts_verifies_its_roots_alone_now_and_then(target, models, prompt, tiny_tokenizer,
                                                                          monkeypatch):
    """A plan that always drafts: after every ``IDLE_EVERY`` drafting rounds the batch still verifies its roots
    alone, once, which is how it measures its rounds without drafts against their predicted time; the output stays
    vanilla's."""
    monkeypatch.setattr("whiflash_sgl.drafting_plan.IDLE_EVERY", 5)
    monkeypatch.setattr("whiflash_sgl.drafters.whiflash.ROUTED_RUN", 1000)  # no round goes without routing
    requests = _two_requests_whose_plan_is(True, 32, target, models, prompt, tiny_tokenizer, monkeypatch)
    rounds = ["".join(sorted(set(actions))) for actions in zip(*(r.result.paradigms for r in requests))]
    assert len(rounds) > 12 and set(rounds) == {"eagle3", NO_DRAFT}
    assert all(action == (NO_DRAFT if k % 6 == 5 else "eagle3") for k, action in enumerate(rounds))
    times = requests[0].drafter.times
    assert len(times.rest[True, 2]) >= 8 and len(times.rest[False, 2]) >= 1


class Predicting:
    """EAGLE-3 with a prediction of its tau, as a learned policy gives: no probes."""

    def decide(self, features):
        return Decision("eagle3", 5.0)  # 3.0 as calibrated before any draft: more than a lookup of one row commits


def test_a_batch_whose_plan_drafts_nothing_explores_drafting_now_and_then(target, models, prompt, tiny_tokenizer,
                                                                          monkeypatch):
    """A plan that finds drafting never pays rests on prices it no longer measures (one slow round had kept a
    4-request batch from drafting for the rest of its run): once its quiet gap is at ``QUIET_MAX``, each plan lets
    the request expecting most draft anyway, alone here (the other drafts its n-gram lookup, if it finds one); the
    output stays vanilla's."""
    monkeypatch.setattr("whiflash_sgl.drafters.whiflash.QUIET_MAX", 4)
    for module in ("whiflash_sgl.drafters.whiflash", "whiflash_sgl.drafting_plan"):  # the plan, and explore's
        monkeypatch.setattr(f"{module}.plan", lambda wishes, *args: [w.forced for w in wishes])
    monkeypatch.setattr(FirstSteps, "pays", lambda self, *args: False)  # a request left out falls back to its root
    prompts = [prompt, tiny_tokenizer("The quick brown fox")["input_ids"]]
    solo = [SpeculativeEngine(target).generate(p, 40).tokens for p in prompts]
    engine = SpeculativeEngine(target, _whiflash(target, models, Predicting()))
    requests = [engine.submit(p, 40) for p in prompts]
    while any(r.result is None for r in requests):
        engine.step()
    assert [r.result.tokens for r in requests] == solo
    rounds = [sorted(actions) for actions in zip(*(r.result.paradigms for r in requests))]
    explored = [k for k, actions in enumerate(rounds) if "eagle3" in actions]  # the others: lookups at most
    assert len(explored) >= 2 and all(rounds[k].count("eagle3") == 1 for k in explored)  # one request drafts
    assert ["eagle3", "ngram"] in [rounds[k] for k in explored]  # ... and the other its lookup
    # a plan, then 4 rounds without routing, in which both requests draft their lookups now and then
    assert {b - a for a, b in zip(explored, explored[1:])} == {4 + 1}
    assert any(actions == ["ngram", "ngram"] for actions in rounds)


def test_a_wish_counts_the_rows_its_tree_keeps_at_the_bar_and_the_tau_they_hold(target, models):
    """A learned policy predicts what a whole tree accepts; cut to the nodes that clear the batch's bar, the tree
    keeps the share of its expected acceptance those nodes hold, and the plan counts on that (calibrated)."""
    whiflash = _whiflash(target, models, Fixed("eagle3"))
    whiflash.latest["eagle3"] = DraftTree((5, 6, 7, 8), (-1, 0, 1, 0), (0.9, 0.5, 0.2, 0.1))
    features = RoundFeatures(
        entropy=0.5, margin=0.5, last_tau=1.0, last_paradigm="", ema_tau={"eagle3": 2.0}, pending={"eagle3": 3},
        predicted_seconds={}, dflash_expected=0.0, eagle_top1=0.6, ngram_draft=0, in_code=False, in_json=False,
        bracket_depth=0)
    wish = whiflash._wish(features, Decision("eagle3", 3.0), False, bar=0.3, tokens_left=60)
    assert wish.rows == 2 and wish.backlog == {"eagle3": 3}
    assert wish.rounds_left == pytest.approx(60 / wish.tau)  # over which a long catch-up is spread
    assert wish.predicted == pytest.approx(1 + 2.0 * 1.4 / 1.7)
    assert wish.tau == pytest.approx(1 + (wish.predicted - 1) / 2)  # nothing verified yet: calibration halves it
    assert whiflash._wish(features, Decision("eagle3", 3.0), False, 0.0, 60).predicted == pytest.approx(3.0)
    assert whiflash._wish(features, Decision("eagle3"), False, 0.3, 60).tau == 2.0  # no prediction: its EMA
    for _ in range(50):  # drafts accepted far more than predicted ...
        whiflash.calibration.observe(2.0, 4.0)
    wish = whiflash._wish(features, Decision("eagle3", 5.0), False, bar=0.85, tokens_left=60)
    assert wish.rows == 1 and wish.tau == 2.0  # ... but a draft row accepts one token at most


def test_a_wish_counts_on_its_lookup_else_a_first_step_when_the_plan_leaves_it_out(target, models):
    """What drafting adds is counted over what the request drafts without it: its lookup (the rows it keeps at the
    bar, at the tau its lookups reached), else EAGLE-3's first step, as the batch's first steps did while they
    paid, else its root alone."""
    whiflash = _whiflash(target, models, Fixed("eagle3"))
    features = RoundFeatures(
        entropy=0.5, margin=0.5, last_tau=1.0, last_paradigm="", ema_tau={"eagle3": 2.0, "ngram": 2.5},
        pending={"eagle3": 3, "ngram": 0}, predicted_seconds={}, dflash_expected=0.0, eagle_top1=0.6, ngram_draft=3,
        in_code=False, in_json=False, bracket_depth=0)

    def fallback():
        wish = whiflash._wish(features, Decision("eagle3", 3.0), False, bar=0.5, tokens_left=60)
        return wish.fallback_tau, wish.fallback_rows

    whiflash.drafted["ngram"] = DraftTree((5, 6, 7), (-1, 0, 1), (0.9, 0.6, 0.2))
    assert fallback() == (2.5, 2)
    whiflash.drafted["ngram"] = DraftTree((5,), (-1,), (0.9,))
    assert fallback() == (2.0, 1)  # a row accepts one token at most
    del whiflash.drafted["ngram"]
    assert fallback() == (1.0, 0.0)  # no first step measured yet
    for accepted in (0, 1) * TIMED:
        whiflash.first_steps.observe(accepted, 2)
    assert fallback() == (1.5, 2.0)
    whiflash.first_steps.declined = 1  # the latest decision found that they do not pay
    assert fallback() == (1.0, 0.0)


def test_a_tree_that_keeps_nothing_at_the_bar_or_went_stale_does_not_stand_for_this_round(target, models):
    """Its own tree from the last round stands for a request's next one; where none of its nodes clears the bar,
    the latest tree of any sequence stands in, and where none of that one's does either, the size last verified,
    whole; a request that did not draft with a paradigm this round has no tree of its own for it next round."""
    whiflash = _whiflash(target, models, Fixed("eagle3"))
    whiflash.tree_size["eagle3"] = 5
    own, latest = DraftTree((5, 6), (-1, 0), (0.2, 0.1)), DraftTree((5, 6, 7), (-1, 0, 0), (0.9, 0.6, 0.3))
    whiflash.drafted["eagle3"], whiflash.latest["eagle3"] = own, latest
    assert whiflash._kept("eagle3", 0.15) == (1, pytest.approx(2 / 3))  # its own
    assert whiflash._kept("eagle3", 0.5) == (2, pytest.approx(1.5 / 1.8))  # its own keeps nothing: the latest
    assert whiflash._kept("eagle3", 0.95) == (5, 1.0)  # neither keeps anything
    whiflash._take(Decision("eagle3"), False, False)  # it does not draft this round
    assert "eagle3" not in whiflash.drafted and whiflash._kept("eagle3", 0.15) == (3, 1.0)
    whiflash._take(Decision("eagle3"), True, False)
    whiflash._trees = {"eagle3": own}
    whiflash.observe(RoundReport(DraftTree(), [], [9], verify_seconds=0.01))  # the engine cut its tree away
    assert whiflash.tree_size["eagle3"] == 5  # the size it last verified of one still stands


def test_quiet_rounds_double_after_each_plan_without_drafts_and_end_when_it_drafts_or_the_batch_shrinks_or_grows(
        monkeypatch):
    monkeypatch.setattr("whiflash_sgl.drafters.whiflash.QUIET_MAX", 8)
    quiet = QuietRounds()
    pattern = []
    for drafts in (False, False, False, False, False, True, False):
        skipped = 0
        while quiet.skip(8):
            skipped += 1
        pattern.append(skipped)
        quiet.planned(drafts)
    assert pattern == [0, 1, 2, 4, 8, 8, 0] and quiet.left == 1
    for _ in range(3):
        quiet.planned(False)
    assert quiet.skip(8) and quiet.skip(10) and quiet.skip(7)  # a request or two joined or left: routing waits
    assert not quiet.skip(6)  # the batch is a quarter smaller than when it last routed: route now
    quiet.planned(False)
    assert quiet.skip(6) and not quiet.skip(8)  # ... or a third larger


def test_a_batch_that_routes_round_after_round_goes_one_round_without_now_and_then():
    """Rounds without routing are measured too (``RoundTimes.routing_pays`` compares them with routed ones): after
    ``ROUTED_RUN`` routed rounds in a row, one goes without."""
    quiet = QuietRounds()
    pattern = []
    for _ in range(3 * (ROUTED_RUN + 1)):
        pattern.append(quiet.skip(8))
        if not pattern[-1]:
            quiet.planned(True)
    assert pattern == ([False] * ROUTED_RUN + [True]) * 3


def test_a_batch_whose_routed_rounds_run_slower_routes_less_and_less_often_though_its_plan_drafts(
        target, models, prompt, tiny_tokenizer, monkeypatch):
    """Routed rounds measured to commit more slowly than rounds without routing: the plan drafts in every round it
    is asked, yet after each the batch goes 1, 2, 4, ... rounds without routing, as after a plan without drafts."""
    requests = _two_requests_whose_plan_is(True, 48, target, models, prompt, tiny_tokenizer, monkeypatch, pays=False)
    rounds = ["".join(sorted(set(actions))) for actions in zip(*(r.result.paradigms for r in requests))]
    assert [k for k, action in enumerate(rounds) if "eagle3" in action][:4] == [0, 2, 5, 10]


def test_a_batch_whose_plan_drafts_nothing_routes_less_and_less_often(target, models, prompt, tiny_tokenizer,
                                                                     monkeypatch):
    """A plan that never drafts: the batch skips routing (features, policy, plan) on 1, 2, 4, ... rounds in between,
    up to ``QUIET_MAX``; in every round each request drafts its n-gram lookup where it finds one, else EAGLE-3's first
    step (in a routed round, each the plan leaves out), and every output stays vanilla's."""
    routed = []
    features = WhiFlashDrafter._features
    monkeypatch.setattr(WhiFlashDrafter, "_features", lambda self, *a: routed.append(1) or features(self, *a))
    requests = _two_requests_whose_plan_is(False, 48, target, models, prompt, tiny_tokenizer, monkeypatch)
    rounds = min(len(r.result.paradigms) for r in requests)
    due, gap, at = 0, 0, 0  # routed at rounds 0, 2, 5, 10, 19, 36, ...: each gap twice the last, up to QUIET_MAX
    while at < rounds:
        due, gap = due + 1, min(max(2 * gap, 1), QUIET_MAX)
        at += 1 + gap
    assert len(routed) / len(requests) <= due + 1  # and once more where one request finished first
    assert all(set(r.result.paradigms[:rounds]) <= {NO_DRAFT, "ngram", FIRST_STEP} for r in requests)
    assert {"ngram", FIRST_STEP} <= {p for r in requests for p in r.result.paradigms}


def test_requests_without_a_lookup_draft_eagle3s_first_step_alone(target, models, prompt, tiny_tokenizer,
                                                                  monkeypatch):
    """A plan that never drafts: a request whose lookup finds nothing drafts EAGLE-3's first step (every EAGLE-3 call
    is of depth 1), priced as a call of its own; what it brings is measured, and it leaves the routing's own
    estimates of EAGLE-3's trees (their sizes, the latest tree) alone. Outputs stay vanilla's."""
    depths = []
    propose_batch = Eagle3Drafter.propose_batch.__func__
    monkeypatch.setattr(Eagle3Drafter, "propose_batch", classmethod(
        lambda cls, drafters, states, max_depths: depths.append(list(max_depths)) or propose_batch(
            cls, drafters, states, max_depths)))
    requests = _two_requests_whose_plan_is(False, 32, target, models, prompt, tiny_tokenizer, monkeypatch)
    drafter = requests[0].drafter
    firsts = sum(r.result.paradigms.count(FIRST_STEP) for r in requests)
    assert firsts >= 1 and sum(map(len, depths)) == firsts and {d for call in depths for d in call} == {1}
    assert len(drafter.first_steps.drafts) == firsts
    assert all(0 <= accepted <= rows for accepted, rows in drafter.first_steps.drafts)
    assert FIRST_STEP in drafter.router.costs.draft and "eagle3" not in drafter.router.costs.draft
    assert "eagle3" not in drafter.latest and all(r.drafter.tree_size["eagle3"] == 8 for r in requests)


def test_where_first_steps_do_not_pay_requests_without_a_lookup_verify_their_roots_alone(
        target, models, prompt, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(FirstSteps, "pays", lambda self, *args: False)
    requests = _two_requests_whose_plan_is(False, 32, target, models, prompt, tiny_tokenizer, monkeypatch)
    assert {p for r in requests for p in r.result.paradigms} == {NO_DRAFT, "ngram"}


def test_first_steps_pay_while_their_tokens_come_at_the_rounds_rate_and_are_probed_when_not():
    """Until ``TIMED`` first steps were verified, or without a rate or a timed call, they draft; then they do while
    the tokens they got accepted, per request, beat their call's and rows' time at the round's rate; and when they
    do not, once every ``FIRST_STEP_PROBE`` rounds all the same."""
    costs = CostModel(CostCurve((1, 8, 64), (0.010, 0.012, 0.040)))
    steps = FirstSteps()
    assert steps.pays(4, costs, 8, 8, 250.0)  # nothing measured
    for _ in range(TIMED):
        steps.observe(1, 2)
    assert steps.pays(4, costs, 8, 8, 250.0)  # no call timed
    costs.observe_draft(FIRST_STEP, 0.004, 4)
    costs.observe_draft(FIRST_STEP, 0.004, 4)
    # 4 tokens against (4 ms + 8 rows at 0.5 ms) x 250 tok/s = 2 tokens' time
    assert steps.pays(4, costs, 8, 8, 250.0) and not steps.pays(4, costs, 8, 8, 600.0)
    assert steps.pays(4, costs, 8, 8, 0.0)  # no rate known
    for _ in range(CALIBRATION_WINDOW):
        steps.observe(0, 2)  # nothing accepted any more
    pattern = [steps.pays(4, costs, 8, 8, 250.0) for _ in range(2 * FIRST_STEP_PROBE + 2)]
    assert pattern == ([False] * FIRST_STEP_PROBE + [True]) * 2
