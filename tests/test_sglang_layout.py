"""The SGLang adapter's pure parts (no SGLang needed): settings, tree shape, capture layout, KV budget, verify input."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from whiflash_sgl.errors import WhiFlashError
from whiflash_sgl.sglang.layout import (
    aux_layout,
    cell_size_with_dflash,
    dflash_capture_layers,
    eagle3_capture_layers,
    kv_bytes_per_token,
    select_columns,
)
from whiflash_sgl.sglang.settings import (
    CONFIG_ENV,
    POLICY_ENV,
    RESOLVED_ENV,
    ServingSettings,
    publish,
    resolved_settings,
    settings_from_env,
)
from whiflash_sgl.sglang.launch import main as launch_main
from whiflash_sgl.sglang.launch import sglang_command
from whiflash_sgl.sglang.routing import STALE_ROUNDS, RequestRoutes
from whiflash_sgl.sglang.shape import resolve_tree_shape
from whiflash_sgl.sglang.verify_layout import Proposals, chain_proposals, merge_rows, verify_arrays
from whiflash_sgl.tree import DraftTree


# ---- settings -----------------------------------------------------------------------------------------------------

def test_settings_from_a_yaml_file_with_the_policy_env_overriding(tmp_path):
    path = tmp_path / "whiflash.yaml"
    path.write_text("dflash_path: z-lab/Qwen3-8B-DFlash-b16\npolicy: heuristic\npolicy_params: {hysteresis: 0.2}\n"
                    "policy_deadline_ms: 2\n")
    settings = settings_from_env({CONFIG_ENV: str(path), POLICY_ENV: "entropy"})
    assert settings.dflash_path == "z-lab/Qwen3-8B-DFlash-b16" and settings.policy == "entropy"
    assert settings.policy_params == {"hysteresis": 0.2} and settings.policy_deadline_ms == 2.0
    assert settings.catch_up == "eager" and settings.fallback == "eagle3"


def test_resolved_settings_round_trip_through_the_environment():
    environ = {}
    settings = ServingSettings(dflash_path="/d", dflash_block_size=16, policy="mlp", policy_params={"path": "/p"})
    publish(settings, environ)
    assert json.loads(environ[RESOLVED_ENV])["dflash_block_size"] == 16
    assert resolved_settings(environ) == settings


@pytest.mark.parametrize(("environ", "message"), [
    ({}, "WHIFLASH needs WHIFLASH_CONFIG"),
    ({CONFIG_ENV: "{not json"}, "invalid inline JSON"),
    ({CONFIG_ENV: "[1]"}, "does not exist"),
    ({CONFIG_ENV: "/nonexistent.yaml"}, "/nonexistent.yaml does not exist"),
    ({CONFIG_ENV: '{"policy": "entropy"}'}, "dflash_path is required"),
    ({CONFIG_ENV: '{"dflash_path": "/d", "fallback": "ngram"}'}, "fallback must be one of eagle3, dflash"),
    ({CONFIG_ENV: '{"dflash_path": "/d", "catch_up": "lazy"}'}, "lazy is not implemented by the SGLang worker"),
    ({CONFIG_ENV: '{"dflash_path": "/d", "dflash_block_size": "16"}'}, "dflash_block_size must be int"),
    ({CONFIG_ENV: '{"dflash_path": "/d", "policy_params": []}'}, "policy_params must be dict"),
    ({CONFIG_ENV: '{"dflash_path": "/d", "eagle3_path": "/e"}'},
     "eagle3_path is a reference-engine setting; with SGLang use --speculative-draft-model-path"),
    ({CONFIG_ENV: '{"dflash_path": "/d", "ngram_max": 3}'}, "ngram_max is a reference-engine setting"),
])
def test_bad_settings_name_the_problem(environ, message):
    with pytest.raises(WhiFlashError, match=message):
        settings_from_env(environ)


def test_resolved_settings_are_required_in_children():
    with pytest.raises(WhiFlashError, match="WHIFLASH_RESOLVED_CONFIG is not set"):
        resolved_settings({})


# ---- the launcher --------------------------------------------------------------------------------------------------

def test_launcher_puts_the_settings_in_the_environment_and_adds_the_algorithm(tmp_path):
    config = tmp_path / "whiflash.yaml"
    config.write_text("dflash_path: /models/dflash\n")
    environ = {}
    command = sglang_command(["--model-path", "Qwen/Qwen3-8B", "--whiflash-config", str(config), "--whiflash-policy",
                              "entropy", "--speculative-draft-model-path", "/models/eagle3"], environ)
    assert command[1:] == ["-m", "sglang.launch_server", "--model-path", "Qwen/Qwen3-8B",
                           "--speculative-draft-model-path", "/models/eagle3", "--speculative-algorithm", "WHIFLASH"]
    assert environ == {CONFIG_ENV: str(config.resolve()), POLICY_ENV: "entropy"}
    inline = '{"dflash_path": "/d"}'
    command = sglang_command(["--whiflash-config", inline, "--speculative-algorithm=whiflash"], environ)
    assert command[3:] == ["--speculative-algorithm=whiflash"] and environ[CONFIG_ENV] == inline


def test_launcher_refuses_before_starting_sglang(tmp_path, monkeypatch):
    monkeypatch.setenv(CONFIG_ENV, "")  # main() writes os.environ; monkeypatch restores it afterwards
    with pytest.raises(WhiFlashError, match="does not exist"):
        sglang_command(["--whiflash-config", str(tmp_path / "missing.yaml")], {})
    with pytest.raises(WhiFlashError, match="--speculative-algorithm EAGLE3 is not WHIFLASH"):
        sglang_command(["--whiflash-config", '{"dflash_path": "/d"}', "--speculative-algorithm", "EAGLE3"], {})
    assert launch_main(["--whiflash-config", str(tmp_path / "missing.yaml")]) == 2


# ---- per-request routing ------------------------------------------------------------------------------------------

class Recorder:
    """A policy that answers from each request's own state: the other paradigm than its last round's."""

    def __init__(self):
        self.seen = []

    def decide(self, features):
        self.seen.append(features)
        return "dflash" if features.last_paradigm == "eagle3" else "eagle3"


def test_each_request_routes_on_its_own_state_and_the_costs_are_shared():
    policy = Recorder()
    routes = RequestRoutes(policy, "eagle3", deadline_s=1.0, width=8)
    assert routes.route(["a"], [0.9]) == ["eagle3"]
    routes.observe(["a"], ["eagle3"], [4.0], [(0.5, 0.25)])
    routes.costs.observe_draft("dflash", 0.01)
    # "b" joins: a fresh state (neutral tau, no root statistics), while "a" goes on from its own
    assert routes.route(["a", "b"], [0.9, 0.1]) == ["dflash", "eagle3"]
    a, b = policy.seen[-2:]
    assert (a.last_tau, a.entropy, a.margin, a.eagle_top1) == (4.0, 0.5, 0.25, 0.9)
    assert (b.last_tau, b.entropy, b.last_paradigm, b.eagle_top1) == (1.0, 0.0, "", 0.1)
    assert a.ema_tau["eagle3"] > b.ema_tau["eagle3"]
    assert a.predicted_seconds == b.predicted_seconds and a.predicted_seconds["dflash"] > 0
    routes.drop("a")
    assert len(routes) == 1 and routes.route(["a"], [0.0]) == ["eagle3"]


def test_states_of_requests_gone_without_a_finish_report_are_forgotten():
    routes = RequestRoutes(Recorder(), "eagle3", deadline_s=1.0, width=8)
    routes.route(["gone", "stays"], [0.0, 0.0])
    for _ in range(STALE_ROUNDS + 1):
        routes.route(["stays"], [0.0])
    assert len(routes) == 1


# ---- tree shape ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "expected"), [
    ((16, None, None, None), (16, 6, 4)),
    ((16, 16, 5, 8), (16, 5, 8)),
    ((16, None, None, 1), (16, 15, 1)),
    ((16, None, 15, None), (16, 15, 1)),
    ((8, None, None, None), (8, 6, 4)),
    ((4, None, None, None), (4, 3, 4)),
])
def test_tree_shape_fills_the_block_width(args, expected):
    shape = resolve_tree_shape(*args)
    assert (shape.width, shape.steps, shape.topk) == expected


@pytest.mark.parametrize(("args", "message"), [
    ((16, 8, None, None), "--speculative-num-draft-tokens 8 differs from the DFlash block size 16"),
    ((16, None, 1, 4), "--speculative-num-steps 1 with --speculative-eagle-topk 4 drafts 4 candidates"),
    ((16, None, 4, 1), "set --speculative-num-steps 15"),
    ((1, None, None, None), "at least 2"),
])
def test_tree_shape_conflicts_name_the_flag(args, message):
    with pytest.raises(WhiFlashError, match=message):
        resolve_tree_shape(*args)


# ---- capture layout and KV budget ---------------------------------------------------------------------------------

def test_union_of_capture_layers_and_columns_for_a_qwen3_8b_pair():
    # Qwen3-8B: 36 layers; an EAGLE-3 drafter reading HF layers [1, 17, 32], DFlash-b16 reading [1, 9, 17, 25, 33]
    layout = aux_layout(eagle3_capture_layers([1, 17, 32], 36), dflash_capture_layers([1, 9, 17, 25, 33]), 36)
    assert layout.capture == (2, 10, 18, 26, 33, 34)
    assert layout.hf_layer_ids == [1, 9, 17, 25, 32, 33]
    assert layout.eagle3_columns == (0, 2, 4) and layout.columns("dflash") == (0, 1, 2, 3, 5)


def test_eagle3_default_capture_is_sglangs_triple_without_the_shift():
    assert eagle3_capture_layers(None, 36) == [2, 18, 33]
    assert aux_layout([2, 18, 33], [2, 18, 33], 36).eagle3_columns == (0, 1, 2)


def test_capture_layers_must_exist():
    with pytest.raises(ValueError, match="outside the target's 0..4"):
        aux_layout([1, 2], [5, 9], 4)
    with pytest.raises(ValueError, match="explicit target layer ids"):
        dflash_capture_layers(None)


def test_each_drafter_reads_exactly_what_it_would_capture_alone():
    hidden_size, rows, num_layers = 3, 5, 12
    per_layer = {b: torch.randn(rows, hidden_size) for b in range(num_layers + 1)}  # what "before layer b" holds

    def capture(layers):  # the target's concatenation, in layer order
        return torch.cat([per_layer[b] for b in sorted(set(layers))], dim=-1)

    eagle, dflash = eagle3_capture_layers([1, 5, 8], num_layers), dflash_capture_layers([5, 7, 10, 1])
    layout = aux_layout(eagle, dflash, num_layers)
    union = capture(layout.capture)
    assert torch.equal(select_columns(union, layout.eagle3_columns, len(layout.capture)), capture(eagle))
    assert torch.equal(select_columns(union, layout.dflash_columns, len(layout.capture)), capture(dflash))


def test_dflash_pool_bytes_are_added_to_the_target_cell():
    # Qwen3-8B bf16: 8 KV heads x (128 + 128) x 36 layers x 2 bytes = 147456 per token; EAGLE-3 adds 1/36 of it
    target = kv_bytes_per_token(8, 128, 128, 36, 2)
    assert target == 147456
    with_eagle = target + target // 36
    dflash = kv_bytes_per_token(8, 128, 128, 5, 2)
    assert cell_size_with_dflash(with_eagle, 36, 5, dflash) == with_eagle + 20480
    assert cell_size_with_dflash(with_eagle, 36, 5, None) == with_eagle + -(-with_eagle * 5 // 36)
    assert cell_size_with_dflash(with_eagle, 36, 0, None) == with_eagle


# ---- the verify input ---------------------------------------------------------------------------------------------

def greedy_accept(arrays, width, target_predict):
    """SGLang's greedy tree walk (verify_tree_greedy): from the root follow first-child links, trying siblings in
    order, while a candidate equals the target's prediction at the last accepted row."""
    accepted = []
    for b in range(arrays.retrieve_index.shape[0]):
        path, last = [0], 0
        child = int(arrays.retrieve_next_token[b, 0])
        while child != -1:
            while child != -1 and int(arrays.tokens[b * width + child]) != int(target_predict[b * width + last]):
                child = int(arrays.retrieve_next_sibling[b, child])
            if child == -1:
                break
            path.append(child)
            last = child
            child = int(arrays.retrieve_next_token[b, child])
        accepted.append(path)
    return accepted


def tree_proposals(root: int, tree: DraftTree, width: int) -> Proposals:
    """One core draft tree (``whiflash_sgl.tree``) below its root, padded to ``width`` rows."""
    tokens = torch.full((1, width), root)
    parents = torch.zeros(1, width, dtype=torch.long)
    tokens[0, 1:len(tree) + 1] = torch.tensor(tree.tokens)
    parents[0, 1:len(tree) + 1] = torch.tensor(tree.parents) + 1
    return Proposals(tokens, parents, torch.tensor([len(tree) + 1]))


def test_tree_proposal_matches_the_core_tree_mask_and_positions():
    tree = DraftTree((11, 12, 13, 14, 15), (-1, -1, 0, 0, 2))
    proposals = tree_proposals(10, tree, width=8)
    arrays = verify_arrays(proposals, torch.tensor([7]), mask_mode="qlen_only")
    mask = arrays.mask.reshape(8, 8)
    assert torch.equal(mask[:6, :6], tree.ancestor_mask())
    assert torch.equal(arrays.positions[:6], tree.positions(7))
    assert arrays.tokens[:6].tolist() == [10, 11, 12, 13, 14, 15]
    assert arrays.retrieve_next_token[0].tolist() == [1, 3, -1, 5, -1, -1, -1, -1]
    assert arrays.retrieve_next_sibling[0].tolist() == [-1, 2, -1, 4, -1, -1, -1, -1]
    assert arrays.retrieve_index[0].tolist() == list(range(8))


def test_padding_rows_see_only_the_root_and_are_never_accepted():
    roots = torch.tensor([5, 6])
    drafts = torch.tensor([[7, 8, 9], [1, 2, 3]])
    proposals = chain_proposals(roots, drafts, width=6, lengths=torch.tensor([4, 2]))
    arrays = verify_arrays(proposals, torch.tensor([3, 10]), mask_mode="qlen_only")
    mask = arrays.mask.reshape(2, 6, 6)
    for b, used in ((0, 4), (1, 2)):
        for row in range(used, 6):
            assert mask[b, row].nonzero().flatten().tolist() == [0, row]
            assert arrays.retrieve_next_token[b, row] == -1 and arrays.retrieve_next_sibling[b, row] == -1
        assert -1 not in arrays.retrieve_next_token[b, : used - 1].tolist()
    # a target that agrees with every row, padding included: acceptance still stops at the real tokens
    predict = torch.zeros(12, dtype=torch.long)
    for b in range(2):
        row_tokens = arrays.tokens[b * 6:(b + 1) * 6]
        predict[b * 6:(b + 1) * 6 - 1] = row_tokens[1:]
        predict[(b + 1) * 6 - 1] = row_tokens[-1]
    assert greedy_accept(arrays, 6, predict) == [[0, 1, 2, 3], [0, 1]]


def test_full_mask_prefixes_each_request_with_its_committed_length():
    proposals = chain_proposals(torch.tensor([1, 2]), torch.tensor([[3, 4], [5, 6]]), width=4)
    arrays = verify_arrays(proposals, torch.tensor([2, 5]))
    assert arrays.mask.numel() == 4 * (2 + 4) + 4 * (5 + 4)
    first = arrays.mask[: 4 * 6].reshape(4, 6)
    second = arrays.mask[4 * 6:].reshape(4, 9)
    assert first[:, :2].all() and second[:, :5].all()
    assert torch.equal(first[:3, 2:5], torch.tril(torch.ones(3, 3, dtype=torch.bool)))
    assert arrays.positions.tolist() == [2, 3, 4, 3, 5, 6, 7, 6]


def test_proposals_that_do_not_fit_the_width_are_refused():
    with pytest.raises(ValueError, match="more than the width 3"):
        chain_proposals(torch.tensor([1]), torch.tensor([[2, 3, 4]]), width=3)


# ---- one verify input for a batch routed per request ---------------------------------------------------------------

def stacked(proposals: list[Proposals]) -> Proposals:
    return Proposals(*(torch.cat([getattr(p, f) for p in proposals]) for f in ("tokens", "parents", "lengths")))


@pytest.mark.parametrize("mask_mode", ["full", "qlen_only"])
def test_eagle_trees_and_padded_dflash_chains_merge_into_one_batch(mask_mode):
    """Requests 0 and 3 chose EAGLE-3 (a top-k tree), 1 and 2 DFlash (a chain, padded to the width): the merged
    arrays are exactly those of the batch laid out in one piece, and the greedy walk accepts each request's own path."""
    width = 8
    trees = {0: tree_proposals(10, DraftTree((11, 12, 13, 14, 15), (-1, -1, 0, 0, 2)), width),
             3: tree_proposals(40, DraftTree((41, 42, 43), (-1, 0, 0)), width)}
    chains = chain_proposals(torch.tensor([20, 30]), torch.tensor([[21, 22, 23, 24, 25], [31, 32, 33, 34, 35]]),
                             width, lengths=torch.tensor([6, 4]))
    seq_lens = torch.tensor([7, 3, 12, 5])
    eagle_rows, dflash_rows = [0, 3], [1, 2]
    eagle = verify_arrays(stacked(list(trees.values())), seq_lens[eagle_rows], mask_mode)
    # SGLang may allocate EAGLE's mask past its blocks (an upper bound on the committed lengths): ignored
    eagle = dataclasses.replace(eagle, mask=torch.cat([eagle.mask, eagle.mask.new_ones(7)]))
    dflash = verify_arrays(chains, seq_lens[dflash_rows], mask_mode)
    merged = merge_rows([(eagle_rows, eagle), (dflash_rows, dflash)], seq_lens, mask_mode)

    one_piece = stacked([trees[0], Proposals(chains.tokens[:1], chains.parents[:1], chains.lengths[:1]),
                         Proposals(chains.tokens[1:], chains.parents[1:], chains.lengths[1:]), trees[3]])
    expected = verify_arrays(one_piece, seq_lens, mask_mode)
    for field in ("tokens", "positions", "mask", "retrieve_index", "retrieve_next_token", "retrieve_next_sibling"):
        assert torch.equal(getattr(merged, field), getattr(expected, field)), field

    # the target agrees with: tree 0 down 11 -> 13 -> 15, chains 1 and 2 on three tokens each, tree 3 down 41 -> 43
    predict = torch.full((4 * width,), -1)
    predict[0], predict[3], predict[5] = 11, 15, 99  # rows of tree 0: root, 11 (row 1), 13 (row 3), 15 (row 5)
    predict[1] = 13
    predict[width:width + 4] = torch.tensor([21, 22, 23, 77])
    predict[2 * width:2 * width + 4] = torch.tensor([31, 32, 33, 88])
    predict[3 * width:3 * width + 2] = torch.tensor([41, 43])  # tree 3: 41, then its second child
    assert greedy_accept(merged, width, predict) == [[0, 1, 3, 5], [0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 3]]


def test_merging_refuses_parts_that_do_not_cover_the_batch_once():
    arrays = verify_arrays(chain_proposals(torch.tensor([1]), torch.tensor([[2]]), 4), torch.tensor([3]))
    with pytest.raises(ValueError, match="do not cover a batch of 2 once"):
        merge_rows([([0], arrays), ([0], arrays)], torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="has retrieve_index"):
        merge_rows([([0, 1], arrays)], torch.tensor([3, 3]))
