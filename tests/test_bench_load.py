"""``whiflash bench --concurrency``: closed-loop load on the batched engine and on running servers (streaming
clients), its JSON rows and table, the plot, identity against vanilla at concurrency 1 with near ties told apart,
and the per-token ITL, commit and time-share arithmetic on constructed runs."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from whiflash_sgl.bench import (ClosedLoop, LoadLevel, LoadRun, commit_tokens, engine_load, full_batch, judge,
                                load_rows, near_tie, paired_load, time_shares)
from whiflash_sgl.bench_endpoint import stream_commits
from whiflash_sgl.chat import ChatPrompt, encode_chat
from whiflash_sgl.drafters.ngram import NgramDrafter
from whiflash_sgl.engine import SpeculativeEngine
from whiflash_sgl.kv_pool import TokenPool
from whiflash_sgl.methods import EngineMethod
from whiflash_sgl.sampling import SamplingParams

LOAD_KEYS = ("method", "category", "concurrency", "prompts", "new_tokens", "tokens_per_s", "speedup_vs_vanilla",
             "tau", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "identical_to_vanilla", "near_ties",
             "paradigm_rounds", "paradigm_shares")




def _check_rows(report: dict, methods: tuple[str, ...], levels: tuple[int, ...]) -> dict:
    rows = {(r["method"], r["category"], r["concurrency"]): r for r in report["results"]}
    assert set(rows) == {(m, c, n) for m in methods for c in ("chat", "code", "all") for n in levels}
    for row in rows.values():
        assert set(LOAD_KEYS) <= set(row)
        assert row["identical_to_vanilla"] is True and row["near_ties"] == 0
        assert row["tokens_per_s"] > 0 and row["ttft_p50_ms"] <= row["ttft_p99_ms"]
        assert row["itl_p50_ms"] <= row["itl_p99_ms"]
        assert abs(sum(row["paradigm_shares"].values()) - 1) < 1e-3
    for level in levels:
        assert rows[("vanilla", "all", level)]["speedup_vs_vanilla"] == 1.0
        assert rows[(methods[-1], "all", level)]["prompts"] == 3
        assert rows[(methods[-1], "all", level)]["requests"] == -(-3 // level) * level  # level 2: 4 requests
    assert report["concurrency"] == sorted(levels) and "per token" in report["itl_definition"]
    assert len(report["per_prompt"]) == len(methods) * sum(-(-3 // level) * level for level in levels)
    return rows


def test_engine_concurrency_bench_rows_table_and_plot(run_cli, served_dir, prompts, tmp_path):
    out_json = tmp_path / "load.json"
    code, out, err = run_cli("bench", "--model", served_dir / "model", "--config", served_dir / "whiflash.json",
                          "--prompts", prompts, "--methods", "vanilla,whiflash:heuristic", "--concurrency", "1,3",
                          "--max-new-tokens", 6, "--out", out_json, "--plot")
    assert code == 0, err
    assert "ttft p50/p99 ms" in out and "itl p50/p99 ms" in out and "near ties" in out
    report = json.loads(out_json.read_text())
    rows = _check_rows(report, ("vanilla", "whiflash:heuristic"), (1, 3))
    routed = rows[("whiflash:heuristic", "all", 3)]
    assert set(routed["paradigm_shares"]) <= {"eagle3", "eagle3:first", "dflash", "ngram", "none"}
    assert routed["tau"] >= 1
    assert rows[("vanilla", "all", 3)]["paradigm_shares"] == {"vanilla": 1.0}
    assert {r["peak_running"] for r in report["runs"] if r["concurrency"] == 3} == {3}
    assert (tmp_path / "load.png").stat().st_size > 0


def test_without_vanilla_at_concurrency_1_the_reference_runs_alone(run_cli, tiny_model_dir, prompts, tmp_path):
    """Also: 3 prompts at level 2 run as 4 requests (the first prompt twice, with its output) to keep 2 in flight."""
    out_json = tmp_path / "load.json"
    code, out, err = run_cli("bench", "--model", tiny_model_dir, "--prompts", prompts, "--methods", "ngram",
                          "--concurrency", "2", "--max-new-tokens", 6, "--out", out_json)
    assert code == 0, err
    report = json.loads(out_json.read_text())
    rows = report["results"]
    assert [(r["method"], r["category"], r["concurrency"]) for r in rows] == [
        ("ngram", "chat", 2), ("ngram", "code", 2), ("ngram", "all", 2)]
    assert all(r["identical_to_vanilla"] is True and r["speedup_vs_vanilla"] is None for r in rows)
    assert (rows[-1]["prompts"], rows[-1]["requests"], report["runs"][0]["peak_running"]) == (3, 4, 2)
    first = [r for r in report["per_prompt"] if r["index"] == 0]
    assert len(first) == 2 and first[0]["text"] == first[1]["text"]


def test_a_paired_bench_says_so_and_its_runs_are_judged(run_cli, tiny_model_dir, prompts, tmp_path):
    out_json = tmp_path / "load.json"
    code, out, err = run_cli("bench", "--model", tiny_model_dir, "--prompts", prompts, "--methods", "vanilla,ngram",
                          "--concurrency", "1,2", "--max-new-tokens", 6, "--out", out_json, "--paired")
    assert code == 0, err
    report = json.loads(out_json.read_text())
    assert report["paired"] is True
    _check_rows(report, ("vanilla", "ngram"), (1, 2))


def test_resume_runs_only_what_the_log_lacks(run_cli, tiny_model_dir, prompts, tmp_path):
    """An interrupted bench (its log cut after two runs, mid-line) goes on: the logged runs are reused, the rest
    run and are judged against the logged vanilla reference; a log of other settings is refused."""
    out_json, log = tmp_path / "load.json", tmp_path / "load.levels.jsonl"
    bench = ("bench", "--model", tiny_model_dir, "--prompts", prompts, "--methods", "vanilla,ngram",
             "--concurrency", "1,2", "--max-new-tokens", 6, "--out", out_json)
    code, _, err = run_cli(*bench)
    assert code == 0, err
    first = json.loads(out_json.read_text())
    assert first["processor"]  # a log from another CPU is refused like any other setting
    lines = log.read_text().splitlines()
    assert len(lines) == 5  # the settings, then (vanilla, 1), (ngram, 1), (vanilla, 2), (ngram, 2)
    log.write_text("\n".join(lines[:3]) + "\n" + lines[3][:100])

    code, out, err = run_cli(*bench, "--resume")
    assert code == 0, err
    assert "--resume: 2 runs from" in err and "vanilla at 1, ngram at 1" in err
    report = json.loads(out_json.read_text())
    walls = [{(r["method"], r["concurrency"]): r["wall_seconds"] for r in rep["runs"]} for rep in (first, report)]
    assert walls[1][("vanilla", 1)] == walls[0][("vanilla", 1)] and walls[1][("ngram", 1)] == walls[0][("ngram", 1)]
    assert walls[1][("vanilla", 2)] != walls[0][("vanilla", 2)]  # run again
    _check_rows(report, ("vanilla", "ngram"), (1, 2))  # the new runs are judged identical to the logged reference
    assert len(log.read_text().splitlines()) == 5

    code, out, err = run_cli(*bench[:-4], "--max-new-tokens", 5, "--out", out_json, "--resume")
    assert code == 2 and "other settings (max_new_tokens)" in err and "Traceback" not in err


def _pair(tiny_target, tiny_tokenizer):
    prompts = [ChatPrompt(f"p{i}", "chat", ({"role": "user", "content": f"count to {i + 3}"},)) for i in range(3)]
    encoded = [(prompt, encode_chat(tiny_tokenizer, prompt.messages)) for prompt in prompts]
    return encoded, {"vanilla": EngineMethod("vanilla", tiny_target),
                     "ngram": EngineMethod("ngram", tiny_target, NgramDrafter(min_ngram=1))}


@pytest.mark.parametrize("turn_seconds", [0.0, 60.0])
def test_paired_runs_take_turns_each_on_a_clock_of_its_own(tiny_target, tiny_tokenizer, turn_seconds):
    """A level's methods run together, taking turns: every request's output is the one it has run alone, and each
    method's clock ran only in its own rounds, so their wall times add up to no more than the time the pair took (on
    one shared clock each would be about all of it)."""
    encoded, methods = _pair(tiny_target, tiny_tokenizer)
    alone = engine_load(methods["vanilla"], encoded, 12, SamplingParams(), 0, 2)
    tic = time.perf_counter()
    paired = paired_load(methods, encoded, 12, SamplingParams(), 0, 2, turn_seconds=turn_seconds)
    together = time.perf_counter() - tic
    for level in paired.values():
        assert [run.tokens for run in level.runs] == [run.tokens for run in alone.runs]
        assert level.peak_running == 2 and all(run.end <= level.wall_seconds for run in level.runs)
    assert sum(level.wall_seconds for level in paired.values()) <= together
    assert min(level.wall_seconds for level in paired.values()) > 0.2 * together


def test_paired_methods_take_turns_of_seconds_not_of_rounds(tiny_target, tiny_tokenizer, monkeypatch):
    """Each method runs rounds until its own clock has moved ``turn_seconds`` (one round at least) before the next
    takes over: with turns of no time the methods alternate round by round, with turns longer than the run the first
    runs to its end before the second starts."""
    encoded, methods = _pair(tiny_target, tiny_tokenizer)
    order, turn = [], ClosedLoop.turn

    def recorded(loop):
        order.append(loop.method.name)
        turn(loop)

    monkeypatch.setattr(ClosedLoop, "turn", recorded)
    paired_load(methods, encoded, 12, SamplingParams(), 0, 2, turn_seconds=0.0)
    vanilla_rounds = order.count("vanilla")
    assert order[:4] == ["vanilla", "ngram", "vanilla", "ngram"]
    order.clear()
    paired_load(methods, encoded, 12, SamplingParams(), 0, 2, turn_seconds=60.0)
    assert order == ["vanilla"] * vanilla_rounds + ["ngram"] * (len(order) - vanilla_rounds)


def test_paired_loops_on_one_target_each_hold_the_kv_they_would_alone(tiny_target, tiny_tokenizer):
    """Two loops of 2 requests on a budget that holds 3 of their requests: alone, both of a loop's requests start
    in its first round, and paired they still do (on one budget the second loop's first turn found room for one,
    and its other request waited for the first loop's to finish); afterwards the budget is the target's own again."""
    prompt = ChatPrompt("p", "chat", ({"role": "user", "content": "count to five"},))
    encoded = [(prompt, encode_chat(tiny_tokenizer, prompt.messages))] * 2
    per_token = TokenPool.bytes_per_token(tiny_target.config.num_hidden_layers, tiny_target._heads["num_kv_heads"],
                                          tiny_target._heads["head_dim"], tiny_target.model.dtype)
    methods = {"vanilla": EngineMethod("vanilla", tiny_target),
               "ngram": EngineMethod("ngram", tiny_target, NgramDrafter(min_ngram=1))}

    def started_together(level) -> bool:  # every request's first token before any request's second
        return (max(run.start + run.commit_seconds[0] for run in level.runs)
                < min(run.start + run.commit_seconds[1] for run in level.runs))

    budget, three = tiny_target.kv_budget, 3 * SpeculativeEngine._reservation(len(encoded[0][1]), 6) * per_token
    tiny_target.set_kv_budget(three)
    try:
        assert started_together(engine_load(methods["ngram"], encoded, 6, SamplingParams(), 0, 2))
        paired = paired_load(methods, encoded, 6, SamplingParams(), 0, 2, turn_seconds=0.0)  # both loops in flight
        assert all(started_together(level) for level in paired.values())
        assert tiny_target.kv_budget == three
    finally:
        tiny_target.set_kv_budget(budget)


@pytest.mark.parametrize("flags, message", [
    (["--resume", "--out", "x.json"], "--resume goes on with a --concurrency bench"),
    (["--paired"], "--paired runs the closed loops of --concurrency together"),
    (["--paired", "--methods", "vanilla,hf-generate", "--concurrency", "1"], "and without --paired"),
    (["--methods", "vanilla,hf-generate", "--concurrency", "1,2"], "run one request at a time (hf-generate)"),
    (["--concurrency", "0,2"], "--concurrency takes distinct positive integers"),
    (["--concurrency", "2,2"], "--concurrency takes distinct positive integers"),
    (["--concurrency", "a"], "--concurrency takes distinct positive integers"),
])
def test_bad_concurrency_is_a_clear_error(run_cli, tiny_model_dir, prompts, flags, message):
    code, out, err = run_cli("bench", "--model", tiny_model_dir, "--prompts", prompts, *flags)
    assert code == 2 and message in err and "Traceback" not in err and out == ""


def test_endpoint_concurrency_bench_streams(run_cli, server, served_dir, prompts, tmp_path):
    """The WhiFlash server against itself labelled vanilla too: the same rows from streaming clients."""
    out_json = tmp_path / "load.json"
    code, out, err = run_cli("bench", "--prompts", prompts, "--max-new-tokens", 8, "--concurrency", "1,2",
                          "--endpoint", f"vanilla={server.url}", "--endpoint", f"whiflash:heuristic={server.url}",
                          "--out", out_json, "--plot")
    assert code == 0, err
    report = json.loads(out_json.read_text())
    rows = _check_rows(report, ("vanilla", "whiflash:heuristic"), (1, 2))
    assert rows[("whiflash:heuristic", "all", 2)]["tau"] > 1  # spec_verify_ct of the final event
    for record in report["per_prompt"]:
        assert sum(record["commit_tokens"]) == record["new_tokens"] and record["commit_seconds"][0] > 0
    assert (tmp_path / "load.png").exists()


# ---- the arithmetic, on constructed data ----------------------------------------------------------------------


def _load_run(index: int, tokens: list[int], category: str = "a", start: float = 0.0, end: float = 1.0,
              commits: tuple[list[float], list[int]] = ([0.1], [1])) -> LoadRun:
    return LoadRun("m", 2, index, f"p{index}", category, len(tokens), start, end, commits[0], commits[1], 1, 1.0,
                   {"m": 1}, "", tokens)


def test_near_tie_is_both_tokens_within_the_threshold_of_the_best():
    logits = torch.tensor([5.0, 5.0004, 1.0, 4.0])
    values, tokens = logits.topk(3)
    scores = dict(zip(tokens.tolist(), values.tolist()))
    tie, gap = near_tie(scores, 1, 0)
    assert tie and gap == pytest.approx(4e-4, abs=1e-6)
    assert near_tie(scores, 0, 1)[0]  # either way round
    assert near_tie(scores, 1, 3) == (False, pytest.approx(1.0004))  # the third-best token: a real divergence
    assert near_tie(scores, 1, 2) == (False, None)  # not among the scores at all
    assert not near_tie({7: 2.0, 8: 1.998}, 7, 8)[0]  # a 2e-3 gap is no tie


def test_judge_counts_near_ties_and_fails_real_divergences():
    reference = [[1, 2, 3], [1, 2, 3], [4, 5]]
    runs = [_load_run(0, [1, 2, 3]), _load_run(1, [1, 9, 3]), _load_run(2, [4, 6])]
    asked = []

    def top_scores(ids):  # prompt 1 diverges at a tie of 2 and 9; prompt 2 where 5 is far ahead of 6
        asked.append(ids)
        return {2: 0.0, 9: -5e-4} if ids[-1] == 1 else {5: 0.0, 6: -0.5}

    judge(runs, [[100], [101], [102]], reference, top_scores)
    assert asked == [[101, 1], [102, 4]]  # the prompt and the reference up to the first differing position
    assert [(r.identical_to_vanilla, r.near_tie) for r in runs] == [(True, None), (False, True), (False, False)]
    assert runs[1].divergence == {"position": 1, "reference_token": 2, "token": 9, "gap": pytest.approx(5e-4)}
    rows = {r["category"]: r for r in load_rows([("m", 2, LoadLevel(runs[:2], 1.0, 2))])}
    assert rows["all"]["identical_to_vanilla"] is True and rows["all"]["near_ties"] == 1
    rows = {r["category"]: r for r in load_rows([("m", 2, LoadLevel(runs, 1.0, 2))])}
    assert rows["all"]["identical_to_vanilla"] is False and rows["all"]["near_ties"] == 1
    judge(runs[1:2], [[101]], [None, [1, 2, 3]], None)  # sampled runs: no divergence is a tie
    assert runs[1].near_tie is False


def test_itl_is_per_token_and_commits_follow_the_rounds():
    result = SimpleNamespace(tokens=list(range(6)), accept_lengths=[2, 0, 3], commit_seconds=[0.1, 0.4, 0.5, 0.9])
    assert commit_tokens(result) == [1, 3, 1, 1]  # the last round's 4 cut to the 6 tokens generated
    run = _load_run(0, result.tokens, commits=(result.commit_seconds, commit_tokens(result)))
    assert run.ttft == 0.1 and run.itl == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.4])


def test_time_shares_split_each_instant_among_the_requests_in_flight():
    runs = [_load_run(0, [1], start=0, end=4), _load_run(1, [1], start=1, end=3), _load_run(2, [1], start=5, end=6)]
    assert time_shares(runs) == pytest.approx([3.0, 1.0, 1.0])


def test_the_full_part_of_a_closed_loop_ends_when_the_batch_starts_to_drain():
    """Level 2: requests 0 and 1 start at 0; request 2 takes request 1's slot at 2; from request 0's end at 4 only
    one runs. The full part is [0, 4] with 8 of the 9 tokens (request 2's last came at 5)."""
    runs = [_load_run(0, [1] * 4, start=0, end=4, commits=([1, 2, 3, 4], [1, 1, 1, 1])),
            _load_run(1, [1] * 2, start=0, end=2, commits=([1, 2], [1, 1])),
            _load_run(2, [1] * 3, start=2, end=5, commits=([1, 2, 3], [1, 1, 1]))]
    assert full_batch(runs, 2) == {"full_seconds": 4, "full_tokens_per_s": 2.0, "full_speedup_vs_vanilla": None}
    assert full_batch(runs, 4)["full_tokens_per_s"] is None  # never full
    slower = [replace(r, method="vanilla", end=2 * r.end, start=2 * r.start,
                      commit_seconds=[2 * t for t in r.commit_seconds]) for r in runs]
    rows = {r["method"]: r for r in load_rows([("vanilla", 2, LoadLevel(slower, 10.0, 2)),
                                               ("m", 2, LoadLevel(runs, 5.0, 2))]) if r["category"] == "all"}
    assert rows["m"]["speedup_vs_vanilla"] == 2.0 and rows["m"]["full_speedup_vs_vanilla"] == 2.0
    assert rows["m"]["tokens_per_s"] == 1.8 and rows["vanilla"]["full_tokens_per_s"] == 1.0


def test_stream_commits_from_text_fold_a_final_event_without_new_text(tiny_tokenizer):
    tokens = tiny_tokenizer("def add(a, b):")["input_ids"] + [tiny_tokenizer.eos_token_id]
    text = tiny_tokenizer.decode(tokens, skip_special_tokens=True)
    first = len(tiny_tokenizer.decode(tokens[:2]))
    events = [(0.1, {"text": text[:first]}), (0.3, {"text": text}),
              (0.31, {"text": text, "output_ids": tokens, "meta_info": {"completion_tokens": len(tokens)}})]
    times, counts = stream_commits(events, tokens, tiny_tokenizer)
    assert times == [0.1, 0.3] and counts == [2, len(tokens) - 2]  # the EOS came with the last text
    events = [(0.1, {"text": "x", "meta_info": {"completion_tokens": 3}}),
              (0.2, {"text": "xy", "meta_info": {"completion_tokens": 5}})]
    assert stream_commits(events, list(range(5)), tiny_tokenizer) == ([0.1, 0.2], [3, 2])
