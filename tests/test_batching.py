"""Continuous batching on a tiny real target: every request's output equals its output alone, whoever else runs,
joins or leaves; cancelling frees the request's KV at the next round; the KV budget makes requests wait or refuses
the ones that can never fit; chunked prefill changes nothing."""

from __future__ import annotations

import pytest
import torch

from whiflash_sgl.cpu_linears import bf16_products_run_here
from whiflash_sgl.drafters.ngram import NgramDrafter
from whiflash_sgl.engine import MAX_TREE_NODES, SpeculativeEngine
from whiflash_sgl.errors import WhiFlashError
from whiflash_sgl.kv_pool import TokenPool
from whiflash_sgl.sampling import SamplingParams
from whiflash_sgl.target import Target

PROMPTS = ["def add(a, b):\n    return", "The quick brown fox", '{"name": "get_weather", "arguments": {',
           "for i in range(10):\n", "Speculative decoding drafts tokens"]


@pytest.fixture(scope="module")
def target(tiny_tokenizer, make_model):
    """Loops (small weights), so n-gram drafts trees that get accepted."""
    return Target(make_model(len(tiny_tokenizer), initializer_range=0.02), tiny_tokenizer, name="looping")


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    return [tiny_tokenizer(p)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="module")
def solo(target, prompts):
    """Each prompt's greedy output generated alone, 40 tokens."""
    return [SpeculativeEngine(target).generate(p, 40).tokens for p in prompts]


def _run(engine: SpeculativeEngine, requests) -> list:
    while any(r.result is None for r in requests):
        engine.step()
    return [r.result for r in requests]


def _drafter():
    return NgramDrafter(min_ngram=1, width=2)


@pytest.mark.parametrize("drafter", [None, "ngram"])
def test_every_request_in_a_batch_matches_its_solo_output(target, prompts, solo, drafter):
    engine = SpeculativeEngine(target, _drafter() if drafter else None)
    results = _run(engine, [engine.submit(p, 40) for p in prompts])
    assert [r.tokens for r in results] == solo
    assert target.pool.reserved == 0 and target.pool.free_slots == target.pool.capacity
    if drafter:
        assert sum(r.tau for r in results) / len(results) > 1.2  # the trees were verified together, and accepted


@pytest.mark.skipif(not bf16_products_run_here(), reason="needs a CPU with AMX or AVX512-BF16 and a C++ compiler")
def test_with_bf16_products_every_request_in_a_batch_matches_its_solo_output(tiny_tokenizer, make_model, prompts):
    """The bf16 kernel's rows do not depend on the batch: drafted trees verified together give each request its
    text alone."""
    target = Target(make_model(len(tiny_tokenizer), initializer_range=0.02), tiny_tokenizer, matmul="bfloat16")
    alone = [SpeculativeEngine(target).generate(p, 40).tokens for p in prompts]
    engine = SpeculativeEngine(target, _drafter())
    results = _run(engine, [engine.submit(p, 40) for p in prompts])
    assert [r.tokens for r in results] == alone
    assert sum(r.tau for r in results) / len(results) > 1.2


def test_requests_join_and_leave_mid_flight(target, prompts, solo):
    """A joins; B joins rounds later; C (short) joins and leaves while A and B run; D joins after A leaves."""
    engine = SpeculativeEngine(target, _drafter())
    a = engine.submit(prompts[0], 40)
    for _ in range(3):
        engine.step()
    assert len(a.result.tokens if a.result else a.out.tokens) > 1 and a.result is None
    b = engine.submit(prompts[1], 40)
    c = engine.submit(prompts[2], 3)
    engine.step()
    assert {id(r) for r in engine.running} == {id(a), id(b), id(c)}
    while c.result is None:
        engine.step()
    assert a.result is None and b.result is None  # C left while both still run
    while a.result is None:
        engine.step()
    d = engine.submit(prompts[3], 40)
    _run(engine, [b, d])
    assert [r.result.tokens for r in (a, b, d)] == [solo[0], solo[1], solo[3]]
    assert c.result.tokens == solo[2][: len(c.result.tokens)] and c.result.finish_reason in ("length", "eos")


def test_a_cancelled_request_frees_its_kv_at_the_next_round(target, prompts, solo):
    engine = SpeculativeEngine(target, _drafter())
    pool = target.pool
    a, b = engine.submit(prompts[0], 40), engine.submit(prompts[1], 40)
    for _ in range(4):
        engine.step()
    held_by_b = len(b.slots)
    assert held_by_b > len(prompts[1])
    free_before, reserved_before = pool.free_slots, pool.reserved
    engine.cancel(b)
    finished = engine.step()
    assert b in finished and b.result.finish_reason == "abort"
    assert b.result.tokens == solo[1][: len(b.result.tokens)]
    # the next round freed B's slots and reservation (A's own usage moved by one round meanwhile)
    assert pool.reserved == reserved_before - b.reserved
    assert pool.free_slots >= free_before + held_by_b - (len(a.slots) - len(a.prompt_ids))
    assert b not in engine.running
    _run(engine, [a])
    assert a.result.tokens == solo[0]
    assert pool.free_slots == pool.capacity and pool.reserved == 0


def test_a_waiting_request_can_be_cancelled(target, prompts):
    engine = SpeculativeEngine(target, max_running=1)
    a, b = engine.submit(prompts[0], 8), engine.submit(prompts[1], 8)
    engine.cancel(b)
    assert engine.step() == [b] and b.result.tokens == [] and b.result.finish_reason == "abort"
    _run(engine, [a])


def test_the_kv_budget_makes_requests_wait_and_refuses_what_never_fits(tiny_tokenizer, make_model, prompts, solo):
    target = Target(make_model(len(tiny_tokenizer), initializer_range=0.02), tiny_tokenizer)
    need = len(prompts[0]) + 40 + MAX_TREE_NODES + 1
    per_token = TokenPool.bytes_per_token(2, 2, 16, torch.float32)
    target.set_kv_budget(per_token * (need + 10))  # room for one such request, not two
    engine = SpeculativeEngine(target, _drafter())
    first, second = engine.submit(prompts[0], 40), engine.submit(prompts[0], 40)
    engine.step()
    assert engine.running == [first] and list(engine.waiting) == [second]
    assert [r.tokens for r in _run(engine, [first, second])] == [solo[0], solo[0]]
    with pytest.raises(WhiFlashError, match=r"needs \d+ KV slots .* KV pool holds \d+: raise the KV budget"):
        engine.submit(prompts[0], 200)
    with pytest.raises(WhiFlashError, match="holds no token"):
        target.set_kv_budget(per_token - 1)


def test_chunked_prefill_gives_the_same_output(target, prompts, solo):
    engine = SpeculativeEngine(target, _drafter(), prefill_chunk=3)
    requests = [engine.submit(p, 40) for p in prompts[:3]]
    engine.step()
    assert all(len(r.slots) <= 3 for r in requests)  # three tokens of prefill in the first round, all to the first
    assert [r.tokens for r in _run(engine, requests)] == solo[:3]


def test_a_round_that_prefills_a_prompt_chunk_drafts_nothing(target, prompts, solo, monkeypatch):
    """While B's prompt is prefilled two tokens a round, A (decoding, with a drafter whose trees get accepted) verifies
    its root alone in those forwards, and drafts again once B decodes; both outputs stay their solo ones."""
    engine = SpeculativeEngine(target, _drafter(), prefill_chunk=2)
    chunks_of, forward = engine._prefill_chunks, target.forward
    prefilling, rounds = [], []  # per round: its prompt chunks; (how many, the rows of each verify chunk)
    monkeypatch.setattr(engine, "_prefill_chunks", lambda: prefilling.append(chunks_of()) or prefilling[-1])
    monkeypatch.setattr(target, "forward", lambda chunks: rounds.append(
        (len(prefilling[-1]), [len(c.tokens) for c in chunks[len(prefilling[-1]):]])) or forward(chunks))
    a = engine.submit(prompts[0], 40)
    while not a.decoding:
        engine.step()
    b = engine.submit(prompts[4], 40)
    assert [r.tokens for r in _run(engine, [a, b])] == [solo[0], solo[4]]
    shared = [rows for chunks, rows in rounds if chunks and rows]  # B's prefill with A's verify
    assert len(shared) >= len(prompts[4]) // 2 - 1 and all(rows == [1] for rows in shared)
    assert any(max(rows) > 1 for chunks, rows in rounds if not chunks)  # A and B draft in the other rounds


def test_seeded_sampling_is_batch_invariant(target, prompts):
    """Keyed sampling: a request's text is its seed's, alone or in a batch with others of other seeds."""
    params = SamplingParams(0.9, 0.95)
    alone = [SpeculativeEngine(target, None, params, seed=s).generate(p, 24).tokens
             for s, p in enumerate(prompts[:3])]
    engine = SpeculativeEngine(target, _drafter(), params)
    requests = [engine.submit(p, 24, seed=s) for s, p in enumerate(prompts[:3])]
    assert [r.tokens for r in _run(engine, requests)] == alone


def test_token_pool_reserves_regions_and_takes_back_rows():
    """A reservation is a region of rows, contiguous where a free run is long enough, else the lowest free rows; a
    region hands out its rows lowest first and reuses freed ones next; releasing it returns all of them."""
    pool = TokenPool(1, 1, 2, 10, torch.float32)
    a, b = pool.reserve(4), pool.reserve(3)
    assert a.rows == [0, 1, 2, 3] and b.rows == [4, 5, 6] and pool.reserve(4) is None
    rows = a.alloc(3)
    assert rows.tolist() == [0, 1, 2] and pool.free_slots == 7
    a.free(rows[[1, 2]])
    assert a.alloc(3).tolist() == [1, 2, 3] and pool.free_slots == 6
    with pytest.raises(RuntimeError, match="exhausted"):
        a.alloc(1)
    b.alloc(2)
    pool.release(a)
    assert pool.reserved == 3 and pool.free_slots == 8
    c = pool.reserve(7)  # rows 0-3 and 7-9: no run of 7 is free
    assert c.rows == [0, 1, 2, 3, 7, 8, 9]
    pool.release(b)
    pool.release(c)
    assert pool.reserved == 0 and pool.free_slots == 10 and pool.reserve(10).rows == list(range(10))
