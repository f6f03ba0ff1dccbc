"""EAGLE-3 and DFlash on a tiny real target: KV-only prefill equals the full forward, drafting is lossless,
trees see exactly their ancestors, and checkpoints refuse a target they were not made for."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from whiflash_sgl.drafters import layers
from whiflash_sgl.drafters.base import SequenceState
from whiflash_sgl.drafters.checkpoint import dflash_config, eagle3_config, load_drafter_model, save_drafter
from whiflash_sgl.drafters.dflash import DFlashDrafter, DFlashModel, _marginal_tree
from whiflash_sgl.drafters.eagle3 import Eagle3Drafter, Eagle3Model, _best_subtree
from whiflash_sgl.engine import SpeculativeEngine
from whiflash_sgl.errors import WhiFlashError
from whiflash_sgl.kv_cache import KVCache
from whiflash_sgl.sampling import KeyedSampler, SamplingParams
from whiflash_sgl.target import Target
from whiflash_sgl.train.dflash import DFlashTrainer
from whiflash_sgl.train.eagle3 import Eagle3Trainer, set_vocabulary
from whiflash_sgl.train.train_drafter import default_layer_ids
from whiflash_sgl.tree import DraftTree

LAYERS = 6


@pytest.fixture(scope="module")
def target(tiny_tokenizer, make_model):
    return Target(make_model(len(tiny_tokenizer), num_hidden_layers=LAYERS), tiny_tokenizer, name="tiny6")


def _randomize(model: torch.nn.Module, seed: int = 1) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))


@pytest.fixture(scope="module")
def eagle(target):
    model = Eagle3Model(eagle3_config(target, draft_vocab_size=96, aux_layer_ids=default_layer_ids(LAYERS)))
    _randomize(model)
    set_vocabulary(model, torch.arange(0, 192, 2))
    return model


@pytest.fixture(scope="module")
def dflash(target):
    mask_id = target.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model = DFlashModel(dflash_config(target, 2, 6, default_layer_ids(LAYERS), mask_id))
    _randomize(model, seed=2)
    return model


def _state(target, layers, n=30):
    ids = [(7 * i + 3) % len(target.tokenizer) for i in range(n)]
    target.capture_layers = layers
    out = target.prefill(ids[:-1])
    return SequenceState(tokens=ids, prompt_len=n - 1, features=out.hidden, feature_layers=layers)


def test_eagle3_kv_only_prefill_equals_full_forward(target, eagle):
    drafter = Eagle3Drafter(eagle, target.model.get_input_embeddings())
    state = _state(target, drafter.feature_layers)
    drafter.start(state)
    drafter.catch_up(state)  # projections only
    kv_only = [t.clone() for t in (drafter.cache.layers[0].keys, drafter.cache.layers[0].values)]
    drafter.start(state)
    with torch.inference_mode():
        m = len(state.tokens) - 2
        x, hidden = drafter._pairs([state], [(0, m)])
        drafter._rows([drafter], x, hidden, torch.arange(m), [m], [None])  # the full layer, causal
    torch.testing.assert_close(kv_only[0], drafter.cache.layers[0].keys)
    torch.testing.assert_close(kv_only[1], drafter.cache.layers[0].values)


def test_eagle3_lazy_catch_up_matches_the_training_forward(target, eagle):
    drafter = Eagle3Drafter(eagle, target.model.get_input_embeddings(), depth=1, topk=1)
    state = _state(target, drafter.feature_layers)
    drafter.start(state)
    partial = SequenceState(state.tokens[:12], 11, state.features[:11], state.feature_layers)
    drafter.catch_up(partial)  # an earlier round caught up part of the sequence
    with torch.inference_mode():
        drafter.catch_up(state)
        n = len(state.tokens)
        x, hidden = drafter._pairs([state], [(n - 2, n - 1)])
        _, logp = drafter._rows([drafter], x, hidden, torch.tensor([n - 2]), [1], [None])
        tokens = torch.tensor(state.tokens + [0])  # one more token, so the newest pair has a label row
        feats = torch.cat([state.features, torch.zeros_like(state.features[:2])])
        step0_logits, _ = Eagle3Trainer(eagle, target.model.get_input_embeddings(), steps=1)._unroll(
            (tokens, feats, 0))[0]
    torch.testing.assert_close(logp[0], torch.log_softmax(step0_logits[n - 2], -1), atol=1e-4, rtol=1e-4)


def test_eagle3_catches_up_in_the_roots_pass_as_a_kv_only_prefill_before_it_would(target, eagle):
    """A proposal folds the catch-up into the pass over the roots: for sequences lagging by different amounts, the
    caches and trees equal those of a KV-only prefill first and the roots' pass alone; proposing again for the same
    tokens gives the same tree."""
    state = _state(target, Eagle3Drafter(eagle, target.model.get_input_embeddings()).feature_layers)
    other = SequenceState(state.tokens[:20], 19, state.features[:19], state.feature_layers)

    def batch(caught_up_first: bool):
        drafters = [Eagle3Drafter(eagle, target.model.get_input_embeddings(), depth=3, topk=2, budget=6)
                    for _ in range(2)]
        for d, s in zip(drafters, (state, other)):
            d.start(s)
        drafters[0].catch_up(SequenceState(state.tokens[:9], 8, state.features[:8], state.feature_layers))
        if caught_up_first:
            Eagle3Drafter.catch_up_batch(drafters, [state, other])
        trees = Eagle3Drafter.propose_batch(drafters, [state, other], [3, 3])
        return drafters, trees

    (folded, trees), (apart, expected) = batch(False), batch(True)
    assert [(t.tokens, t.parents) for t in trees] == [(t.tokens, t.parents) for t in expected]
    for t, e in zip(trees, expected):
        assert t.probs == pytest.approx(e.probs, abs=1e-5)
    for d, e, n in zip(folded, apart, (len(state.tokens), len(other.tokens))):
        assert d.frontier == e.frontier == n - 1 and d.cache.get_seq_length() == n - 1
        torch.testing.assert_close(d.cache.layers[0].keys, e.cache.layers[0].keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(d.cache.layers[0].values, e.cache.layers[0].values, atol=1e-5, rtol=1e-5)
    again = folded[0].propose(state, 3)
    assert (again.tokens, again.parents) == (trees[0].tokens, trees[0].parents)


def test_dflash_kv_only_prefill_matches_the_training_forward(target, dflash):
    embed, head = target.model.get_input_embeddings(), target.model.get_output_embeddings()
    drafter = DFlashDrafter(dflash, embed, head)
    state = _state(target, drafter.feature_layers)
    drafter.start(state)
    drafter.catch_up(SequenceState(state.tokens[:10], 9, state.features[:9], state.feature_layers))
    tree = drafter.propose(state, max_depth=10)  # catches up the rest lazily, then drafts
    n = len(state.tokens)
    trainer = DFlashTrainer(dflash, embed, head)
    with torch.inference_mode():
        feats = torch.cat([state.features, torch.zeros_like(state.features[:1])])
        logits, _ = trainer._blocks((torch.tensor(state.tokens + [0] * 8), torch.cat([feats] + [feats[:1]] * 8), 0),
                                    [n - 1])
    assert list(tree.tokens) == logits[0].argmax(-1).tolist()
    assert tree.is_chain and len(tree) == dflash.block_size - 1


def _path_scores(drafter: Eagle3Drafter, state: SequenceState, tree: DraftTree) -> list[float]:
    """Each node's cumulative log-prob, recomputed by drafting its root-to-node path alone as a chain."""
    scores = []
    for node in range(len(tree)):
        path = []
        j = node
        while j >= 0:
            path.append(j)
            j = tree.parents[j]
        path.reverse()
        drafter.start(state)
        with torch.inference_mode():
            drafter.catch_up(state)
            n = len(state.tokens)
            x, hidden = drafter._pairs([state], [(n - 2, n - 1)])
            out, logp = drafter._rows([drafter], x, hidden, torch.tensor([n - 2]), [1], [None])
            total = 0.0
            for depth, i in enumerate(path, start=1):
                draft_id = drafter.model.t2d[: tree.tokens[i]].sum()  # target id -> draft id
                total += float(logp[0, draft_id])
                if depth < len(path):
                    x = drafter.model.midlayer.attention_input(drafter.embed(torch.tensor([tree.tokens[i]])), out)
                    out, logp = drafter._rows([drafter], x, out, torch.tensor([n - 2 + depth]), [1], [None])
        scores.append(total)
    return scores


def _eagle3_tree(target, eagle, **settings):
    """An EAGLE-3 drafter (depth 3, top-3, budget 20 unless overridden), its state and its first tree."""
    drafter = Eagle3Drafter(eagle, target.model.get_input_embeddings(), **{"depth": 3, "topk": 3, "budget": 20,
                                                                           **settings})
    state = _state(target, drafter.feature_layers)
    drafter.start(state)
    return drafter, state, drafter.propose(state, max_depth=5)


def test_eagle3_tree_nodes_see_exactly_their_ancestors(target, eagle):
    drafter, state, tree = _eagle3_tree(target, eagle)
    assert len(tree) == 20 and tree.depth == 3 and not tree.is_chain
    assert drafter.cache.get_seq_length() == len(state.tokens) - 1  # tree rows dropped, committed kept
    expected = drafter.last_scores
    torch.testing.assert_close(torch.tensor(_path_scores(drafter, state, tree)), torch.tensor(expected),
                               atol=1e-4, rtol=1e-4)


def test_best_subtree_keeps_ancestors_and_orders_by_depth():
    nodes = [(-0.1, 1, -1, 5), (-2.0, 1, -1, 6), (-0.3, 2, 0, 7), (-0.3, 2, 0, 8), (-2.5, 2, 1, 9)]
    tree, scores = _best_subtree(nodes, 3)
    assert scores == [-0.1, -0.3, -0.3] and tree.tokens == (5, 7, 8) and tree.parents == (-1, 0, 0)


def _node_paths(tree) -> list[tuple[int, ...]]:
    """Each node's token path from the root."""
    paths = []
    for i in range(len(tree)):
        parent = tree.parents[i]
        paths.append((paths[parent] if parent >= 0 else ()) + (tree.tokens[i],))
    return paths


def test_eagle3_min_prob_keeps_only_likely_nodes(target, eagle):
    """With a probability floor the tree holds exactly the nodes of the full tree that clear it."""
    full, _, full_tree = _eagle3_tree(target, eagle)
    floor = sorted(full.last_scores)[len(full.last_scores) // 2]  # about half the nodes clear it
    pruned, _, tree = _eagle3_tree(target, eagle, min_prob=math.exp(floor) * (1 - 1e-6))
    kept = {p for p, score in zip(_node_paths(full_tree), full.last_scores) if score >= floor}
    assert 0 < len(tree) < len(full_tree) and set(_node_paths(tree)) == kept
    assert min(pruned.last_scores) >= floor - 1e-5
    with pytest.raises(ValueError, match="min_prob"):
        Eagle3Drafter(eagle, target.model.get_input_embeddings(), min_prob=1.0)


def test_eagle3_stops_growing_where_a_step_costs_more_than_it_brings(target, eagle):
    """With the batch's rate known (``SequenceState.commit_rate``), a depth step runs only while the tokens it is
    expected to bring are worth its time (``StepClock``, learned from the steps it ran); without a rate the tree is
    the whole one."""
    full, state, full_tree = _eagle3_tree(target, eagle)
    assert set(full.step_clock.seconds) == {1} and full.step_clock(8) == full.step_clock(1) > 0  # timed its steps
    for rate, depth in ((1e-9, full_tree.depth), (1e9, 1)):  # a step that costs nothing runs, one worth all stops
        state.commit_rate = rate
        tree = full.propose(state, max_depth=5)
        assert tree.depth == depth
        assert set(_node_paths(tree)) <= set(_node_paths(full_tree))
    assert len(tree) == 3  # the root's top-3 alone


def test_eagle3_drafts_nothing_below_the_rounds_bar(target, eagle):
    """The engine's bar for a node that can pay this round (``SequenceState.min_prob``) floors the tree as the
    drafter's own ``min_prob`` does, and the stricter of the two wins."""
    full, state, full_tree = _eagle3_tree(target, eagle)
    floor = sorted(full.last_scores)[len(full.last_scores) // 2]
    state.min_prob = math.exp(floor) * (1 - 1e-6)
    barred = Eagle3Drafter(eagle, target.model.get_input_embeddings(), depth=3, topk=3, budget=20)
    barred.start(state)
    tree = barred.propose(state, max_depth=5)
    kept = {p for p, score in zip(_node_paths(full_tree), full.last_scores) if score >= floor}
    assert 0 < len(tree) < len(full_tree) and set(_node_paths(tree)) == kept
    strict = Eagle3Drafter(eagle, target.model.get_input_embeddings(), depth=3, topk=3, budget=20, min_prob=0.999)
    strict.start(state)
    assert len(strict.propose(state, max_depth=5)) == 0


def test_marginal_tree_grows_best_first():
    top_p = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.5, 0.5]])
    top_ids = torch.tensor([[10, 11], [20, 21], [30, 31]])
    tree = _marginal_tree(top_p, top_ids, budget=4)
    # path probabilities: 10 .9, 10-20 .54, 10-21 .36, 10-20-30 .27 (ties 10-20-31; the first candidate wins), 11 .1
    assert tree.tokens == (10, 20, 21, 30) and tree.parents == (-1, 0, 0, 1)


def _states(target, layers, lengths, keyed=()):
    """Sequences of the given lengths (different tokens each); those at indices ``keyed`` sample with a keyed draw."""
    target.capture_layers = layers
    states = []
    for j, n in enumerate(lengths):
        ids = [(7 * i + 3 + 5 * j) % len(target.tokenizer) for i in range(n)]
        sampler = KeyedSampler(SamplingParams(temperature=0.8), seed=j) if j in keyed else None
        states.append(SequenceState(ids, n - 1, target.prefill(ids[:-1]).hidden, layers, sampler=sampler))
    return states


def _prefix(state: SequenceState, n: int) -> SequenceState:
    """The sequence as it stood when it was ``n`` tokens long (an earlier round)."""
    return SequenceState(state.tokens[:n], state.prompt_len, state.features[: n - 1], state.feature_layers,
                         sampler=state.sampler)


def _assert_batched_equals_solo(make, states, depths, last):
    """Two rounds (the second after a different backlog per sequence): ``propose_batch`` gives each sequence the
    tree, scores (``last``) and cache length that ``propose`` gives it alone."""
    solo, batched = make(), make()
    for d, s in zip(solo + batched, states + states):
        d.start(_prefix(s, len(s.tokens) // 2))
    for round_states in ([_prefix(s, len(s.tokens) // 2) for s in states], states):
        alone = [d.propose(s, depth) for d, s, depth in zip(solo, round_states, depths)]
        together = type(batched[0]).propose_batch(batched, round_states, depths)
        for i, (a, b, d, e) in enumerate(zip(alone, together, solo, batched)):
            assert (a.tokens, a.parents) == (b.tokens, b.parents), i
            torch.testing.assert_close(torch.tensor(getattr(d, last)), torch.tensor(getattr(e, last)),
                                       atol=1e-5, rtol=1e-5)
            assert d.cache.get_seq_length() == e.cache.get_seq_length() and d.frontier == e.frontier
    return together


def test_eagle3_batched_trees_equal_solo_trees(target, eagle):
    embed = target.model.get_input_embeddings()
    settings = [dict(depth=3, topk=3, budget=20), dict(depth=5, topk=2, budget=10, min_prob=0.01),
                dict(depth=4, topk=4, budget=16), dict(depth=6, topk=1), dict(depth=3, topk=3, budget=8),
                dict(depth=4, topk=3, budget=12)]
    states = _states(target, Eagle3Drafter(eagle, embed).feature_layers, [30, 17, 41, 23, 12, 26], keyed=(2, 3))
    depths = [5, 5, 2, 6, 0, 4]  # a shorter depth than the drafter's, and a sequence that wants no draft
    trees = _assert_batched_equals_solo(lambda: [Eagle3Drafter(eagle, embed, **kw) for kw in settings], states,
                                        depths, "last_scores")
    assert [t.depth for t in trees][2:5] == [2, 6, 0]  # cut to its max depth; a chain; no draft
    assert len(trees[0]) == 20 and not trees[0].is_chain and len(trees[1]) < 10  # min_prob prunes


def test_dflash_batched_drafts_equal_solo_drafts(target, dflash):
    embed, head = target.model.get_input_embeddings(), target.model.get_output_embeddings()
    settings = [dict(), dict(tree_topk=2, tree_budget=8), dict(block_size=4, tree_topk=3), dict(), dict(),
                dict(block_size=3)]
    states = _states(target, DFlashDrafter(dflash, embed, head).feature_layers, [30, 17, 41, 23, 12, 26],
                     keyed=(1, 3))
    depths = [10, 10, 10, 2, 0, 10]
    trees = _assert_batched_equals_solo(lambda: [DFlashDrafter(dflash, embed, head, **kw) for kw in settings],
                                        states, depths, "last_confidences")
    assert [len(t) for t in trees] == [5, 8, 6, 2, 0, 2] and not trees[1].is_chain and trees[0].is_chain


@pytest.mark.parametrize("kind", ["eagle3-tree", "eagle3-chain", "dflash-chain", "dflash-tree"])
def test_drafters_are_lossless_in_the_engine(target, eagle, dflash, kind, tiny_tokenizer):
    embed, head = target.model.get_input_embeddings(), target.model.get_output_embeddings()
    drafter = {
        "eagle3-tree": lambda: Eagle3Drafter(eagle, embed, depth=4, topk=3, budget=12),
        "eagle3-chain": lambda: Eagle3Drafter(eagle, embed, depth=5, topk=1),
        "dflash-chain": lambda: DFlashDrafter(dflash, embed, head),
        "dflash-tree": lambda: DFlashDrafter(dflash, embed, head, tree_topk=2, tree_budget=8),
    }[kind]()
    prompt = tiny_tokenizer("def add(a, b):\n    return")["input_ids"]
    reference = SpeculativeEngine(target).generate(prompt, 40)
    result = SpeculativeEngine(target, drafter).generate(prompt, 40)
    assert result.tokens == reference.tokens and result.drafted > 0


def test_checkpoint_round_trip_and_mismatch_errors(target, eagle, dflash, tiny_target, tmp_path):
    for kind, model in (("eagle3", eagle), ("dflash", dflash)):
        save_drafter(model, tmp_path / kind, target)
        loaded = load_drafter_model(kind, tmp_path / kind, target)
        for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
            torch.testing.assert_close(a.to(b.dtype), b, atol=1e-2, rtol=1e-2, msg=name)  # bf16 on disk
    with pytest.raises(WhiFlashError, match="target layer count is 6 for the drafter but 2 for the target"):
        load_drafter_model("eagle3", tmp_path / "eagle3", tiny_target)
    with pytest.raises(WhiFlashError, match="not a dflash drafter"):
        load_drafter_model("dflash", tmp_path / "eagle3", target)
    config = json.loads((tmp_path / "dflash" / "config.json").read_text())
    config["whiflash"]["target_tokenizer"] = "0123456789abcdef"
    (tmp_path / "dflash" / "config.json").write_text(json.dumps(config))
    with pytest.raises(WhiFlashError, match="tokenizer fingerprint is 0123456789abcdef for the drafter"):
        load_drafter_model("dflash", tmp_path / "dflash", target)
    (tmp_path / "eagle3" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WhiFlashError, match="cannot read drafter weights .*eagle3/model.safetensors"):
        load_drafter_model("eagle3", tmp_path / "eagle3", target)
    with pytest.raises(WhiFlashError, match="missing"):
        load_drafter_model("eagle3", tmp_path / "nowhere", target)


def test_appended_features_equal_their_concatenation():
    """The engine appends each round's features into a doubling buffer; every view equals the plain concatenation."""
    gen = torch.Generator().manual_seed(0)
    chunks = [torch.randn(n, 3, 4, generator=gen) for n in (40, 1, 3, 30, 2, 70)]
    state = SequenceState([0], 0)
    for i, chunk in enumerate(chunks):
        state.add_features(chunk)
        assert torch.equal(state.features, torch.cat(chunks[: i + 1]))
    given = SequenceState([0], 0, features=chunks[0].clone())
    given.add_features(chunks[1])
    assert torch.equal(given.features, torch.cat(chunks[:2]))


def test_a_kv_cache_with_a_dtype_stores_in_it():
    cache = KVCache(torch.float32)
    k, v = (torch.randn(1, 2, 3, 8).to(torch.bfloat16) for _ in range(2))
    keys, values = cache.update(k, v, 0)
    assert keys.dtype == values.dtype == torch.float32
    assert torch.equal(keys, k.float()) and torch.equal(values, v.float())


@pytest.mark.parametrize("float32_pays", [True, False])
def test_a_bf16_eagle3_keeps_its_cache_in_the_faster_dtype_and_drafts_alike(target, eagle, monkeypatch, float32_pays):
    model, embed = copy.deepcopy(eagle).to(torch.bfloat16), copy.deepcopy(target.model.get_input_embeddings())
    reference = Eagle3Drafter(model, embed.to(torch.bfloat16), depth=2, topk=3)
    state = _state(target, reference.feature_layers)
    monkeypatch.setattr(layers, "float32_attention_pays", lambda *shape: False)
    reference.start(state)
    expected = reference.propose(state, 2)
    monkeypatch.setattr(layers, "float32_attention_pays", lambda *shape: float32_pays)
    drafter = Eagle3Drafter(model, embed.to(torch.bfloat16), depth=2, topk=3)
    drafter.start(state)
    tree = drafter.propose(state, 2)
    assert drafter.cache.layers[0].keys.dtype == (torch.float32 if float32_pays else torch.bfloat16)
    assert tree.tokens[:3] == expected.tokens[:3]  # the root's children
    torch.testing.assert_close(torch.tensor(drafter.last_scores), torch.tensor(reference.last_scores), atol=0.05,
                               rtol=0.05)
