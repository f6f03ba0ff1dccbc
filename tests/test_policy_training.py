"""Oracle traces, the learned routing policy and the figures, end to end on a tiny target with tiny drafters."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from whiflash_sgl.bench import run_bench
from whiflash_sgl.chat import load_prompts
from whiflash_sgl.config import WhiFlashConfig
from whiflash_sgl.drafters.checkpoint import dflash_config, eagle3_config, save_drafter
from whiflash_sgl.drafters.dflash import DFlashModel
from whiflash_sgl.drafters.eagle3 import Eagle3Model
from whiflash_sgl.errors import WhiFlashError
from whiflash_sgl.plots import write_plots
from whiflash_sgl.policies import load_policy
from whiflash_sgl.policies.mlp import RouterMLP
from whiflash_sgl.router import RoundFeatures
from whiflash_sgl.target import Target
from whiflash_sgl.train.eagle3 import set_vocabulary
from whiflash_sgl.train.router_policy import collect_traces, train_policy
from whiflash_sgl.train.train_drafter import default_layer_ids


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer, make_model):
    root = tmp_path_factory.mktemp("routing")
    target = Target(make_model(len(tiny_tokenizer), num_hidden_layers=6, initializer_range=0.05), tiny_tokenizer,
                    name="tiny6")
    torch.manual_seed(0)
    eagle = Eagle3Model(eagle3_config(target, 128, default_layer_ids(6)))
    set_vocabulary(eagle, torch.arange(128))
    dflash = DFlashModel(dflash_config(target, 1, 5, default_layer_ids(6), 0))
    save_drafter(eagle, root / "eagle3", target)
    save_drafter(dflash, root / "dflash", target)
    config = WhiFlashConfig(eagle3_path=str(root / "eagle3"), dflash_path=str(root / "dflash"), eagle3_depth=3,
                            eagle3_topk=2, eagle3_budget=6, ngram_min=1)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "category": ["code", "chat"][i % 2], "messages": [
        {"role": "user", "content": f"def f{i}(x):\n    return x + {i}\n\ndef f{i}("}]}) + "\n" for i in range(12)))
    return target, config, prompts, root


def test_traces_train_an_mlp_policy_that_routes_losslessly(setup):
    target, config, prompts, root = setup
    rows = collect_traces(target, prompts, root / "traces.jsonl", config, limit=12, max_new_tokens=24)
    first = json.loads((root / "traces.jsonl").read_text().splitlines()[0])
    assert rows >= 50 and set(first["accepted"]) == {"eagle3", "dflash", "ngram"}
    metrics = train_policy(root / "traces.jsonl", root / "mlp", epochs=50, hedges=["ngram+eagle3"])
    assert metrics["rounds"] == rows and 0 <= metrics["heldout_pick_best"] <= 1
    assert metrics["actions"] == ["dflash", "eagle3", "ngram", "eagle3+ngram"]
    assert metrics["heldout_tau_oracle"] >= max(metrics[f"heldout_tau_always_{p}"] for p in metrics["paradigms"])
    report = run_bench(target, load_prompts(prompts, limit=2), ["vanilla", "whiflash:mlp", "oracle",
                                                                 "whiflash:heuristic"],
                       16, config=config, progress=False, policy_params={"mlp": {"path": str(root / "mlp")}})
    rows = {(r["method"], r["category"]): r for r in report["results"]}
    assert all(r["identical_to_vanilla"] for r in report["results"])
    assert sum(rows[("whiflash:mlp", "all")]["paradigm_rounds"].values()) >= rows[("whiflash:mlp", "all")]["rounds"] - 4
    figures = write_plots(report, root / "bench.json")
    assert [p.name for p in figures] == ["bench_throughput.png", "bench_routing.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in figures)


def test_a_hedge_of_untraced_paradigms_is_refused(tmp_path):
    traces = tmp_path / "traces.jsonl"
    traces.write_text((json.dumps({"accepted": {"eagle3": 1, "ngram": 0}}) + "\n") * 60)
    for bad in ("eagle3+medusa", "eagle3"):
        message = f"hedge {bad!r} must join two or more of the traced paradigms"
        with pytest.raises(WhiFlashError, match=re.escape(message)):
            train_policy(traces, tmp_path / "mlp", epochs=1, hedges=[bad])


def test_mlp_policy_without_weights_names_the_fix(tmp_path):
    with pytest.raises(WhiFlashError, match="train one with `whiflash train-policy`"):
        load_policy("mlp", {"path": str(tmp_path)})
    with pytest.raises(WhiFlashError, match="missing.jsonl does not exist; make one with `whiflash collect-traces`"):
        train_policy(tmp_path / "missing.jsonl", tmp_path / "mlp")


def test_the_committed_router_mlp_routes_copy_spans_to_ngram():
    """The packaged MLP loads by name and reads today's feature vector; what it learned from the traces holds: with
    an n-gram proposal in hand the copy paradigm wins, without one it is never picked."""
    policy = load_policy("mlp", {})
    features = RoundFeatures(
        entropy=0.3, margin=0.8, last_tau=2.0, last_paradigm="eagle3",
        ema_tau={"eagle3": 2.0, "dflash": 2.0, "ngram": 2.0}, pending={"eagle3": 0, "dflash": 0, "ngram": 0},
        predicted_seconds={"eagle3": 0.045, "dflash": 0.045, "ngram": 0.045}, dflash_expected=1.0, eagle_top1=0.6,
        ngram_draft=8, in_code=False, in_json=False, bracket_depth=0)
    copying = policy.decide(features)
    assert copying.paradigm == "ngram" and copying.tau > 1  # with its predicted tau, which the batch's plan reads
    without = dataclasses.replace(features, ngram_draft=0)
    assert policy.decide(without).paradigm != "ngram"
    batched = policy.decide_batch([features, without])  # one forward, the same answers (to float rounding)
    assert [d.paradigm for d in batched] == [copying.paradigm, policy.decide(without).paradigm]
    assert batched[0].tau == pytest.approx(copying.tau)


def test_the_mlp_routes_among_what_the_router_serves(tmp_path):
    """A router without the n-gram paradigm (SGLang's worker serves eagle3 and dflash) gets the better of those two,
    not a fallback every round; a router serving none of the MLP's actions gets a clear error."""
    path = _fixed_mlp(tmp_path / "mlp", {"dflash": 2.5, "eagle3": 2.0, "ngram": 3.0, "eagle3+ngram": 3.4})
    features = RoundFeatures(
        entropy=0.5, margin=0.5, last_tau=2.0, last_paradigm="eagle3", ema_tau={"eagle3": 2.0, "dflash": 2.0},
        pending={"eagle3": 0, "dflash": 0}, predicted_seconds={"eagle3": 0.05, "dflash": 0.05}, dflash_expected=0.0,
        eagle_top1=0.6, ngram_draft=6, in_code=False, in_json=False, bracket_depth=0)
    policy = load_policy("mlp", {"path": str(path)})
    assert policy.decide(features).paradigm == "dflash"
    features.predicted_seconds = {"medusa": 0.05}
    with pytest.raises(ValueError, match="none of which the router serves"):
        policy.decide(features)


def _fixed_mlp(path, tau: dict[str, float]):
    """A router MLP whose prediction is ``tau`` whatever the features (zero weights, biases inverting softplus)."""
    model = RouterMLP(len(RoundFeatures.VECTOR_FIELDS), list(tau))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.net[-1].bias.copy_(torch.tensor([t - 1 for t in tau.values()]).expm1().log())
    model.save(path, {})
    return path


@pytest.mark.parametrize("margin, served, chosen", [
    (None, True, "ngram"),             # tau/T alone: 3.0 / 40 ms beats 3.4 / 55 ms
    (0.3, True, "eagle3+ngram"),       # the hedge adds 0.4 tokens over n-gram alone
    (0.5, True, "ngram"),              # ... which is under this margin
    (0.3, False, "ngram"),             # never a hedge the router cannot serve
])
def test_the_mlp_takes_a_hedge_over_its_choice_when_it_accepts_clearly_more(tmp_path, margin, served, chosen):
    path = _fixed_mlp(tmp_path / "mlp", {"dflash": 1.5, "eagle3": 2.0, "ngram": 3.0, "eagle3+ngram": 3.4})
    seconds = {"eagle3": 0.050, "dflash": 0.050, "ngram": 0.040} | ({"eagle3+ngram": 0.055} if served else {})
    features = RoundFeatures(
        entropy=0.5, margin=0.5, last_tau=2.0, last_paradigm="ngram", ema_tau={"eagle3": 2.0, "dflash": 2.0,
        "ngram": 2.0}, pending={"eagle3": 0, "dflash": 0, "ngram": 0}, predicted_seconds=seconds, dflash_expected=0.0,
        eagle_top1=0.6, ngram_draft=6, in_code=False, in_json=True, bracket_depth=1)
    policy = load_policy("mlp", {"path": str(path), "hedge_margin": margin})
    assert policy.decide(features).paradigm == chosen
