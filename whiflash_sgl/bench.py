"""``whiflash bench``: every method on every prompt, the same prefill/verify code, one JSON report.

Methods run interleaved per prompt (so slow drifts of a shared machine hit all of them alike) after a short warm-up.
Rows are per method and category plus an ``all`` row; ``tau`` is committed tokens per target verify pass (bonus
included) and ``speedup_vs_vanilla`` is the ratio of tokens/s to ``vanilla``'s in the same category and run.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from whiflash_sgl.chat import ChatPrompt, encode_chat
from whiflash_sgl.config import WhiFlashConfig
from whiflash_sgl.errors import WhiFlashError
from whiflash_sgl.methods import make_method
from whiflash_sgl.target import Target
from whiflash_sgl.verify import SamplingParams


@dataclass
class PromptRun:
    method: str
    prompt_id: str
    category: str
    new_tokens: int
    seconds: float
    rounds: int
    tau: float
    identical_to_vanilla: bool | None
    accept_lengths: list[int]
    draft_seconds: float
    verify_seconds: float
    paradigms: list[str]
    switch_seconds: float
    catchup_seconds: float
    paradigm_accepts: list[dict]
    text: str


def run_bench(
    target: Target,
    prompts: list[ChatPrompt],
    methods: list[str],
    max_new_tokens: int,
    sampling: SamplingParams = SamplingParams(),
    seed: int = 0,
    config: WhiFlashConfig = WhiFlashConfig(),
    progress: bool = True,
    policy_params: dict | None = None,
) -> dict:
    if not prompts:
        raise WhiFlashError("no prompts to run")
    runners = [make_method(m, target, config, policy_params) for m in methods]
    reference = None if "vanilla" in methods else make_method("vanilla", target)
    encoded = [(p, encode_chat(target.tokenizer, p.messages)) for p in prompts]
    for p, ids in encoded:
        if len(ids) + max_new_tokens > target.context_length:
            raise WhiFlashError(f"prompt {p.id} has {len(ids)} tokens: with max_new_tokens it exceeds the context")
    for runner in runners:  # warm-up: first-call allocations and kernel selection stay out of the figures
        runner.generate(encoded[0][1], 8, sampling, seed)

    runs: list[PromptRun] = []
    bar = tqdm(total=len(encoded) * len(runners), desc="bench", disable=not progress, file=sys.stderr)
    for index, (prompt, ids) in enumerate(encoded):
        vanilla_tokens = None
        if reference is not None and sampling.greedy:
            vanilla_tokens = reference.generate(ids, max_new_tokens, sampling, seed + index).tokens
        for runner in runners:
            result = runner.generate(ids, max_new_tokens, sampling, seed + index)
            if runner.name == "vanilla":
                vanilla_tokens = result.tokens
            identical = (result.tokens == vanilla_tokens) if sampling.greedy else None
            runs.append(PromptRun(
                runner.name, prompt.id, prompt.category, len(result.tokens), result.seconds, result.rounds,
                result.tau, identical, result.accept_lengths, result.draft_seconds, result.verify_seconds,
                result.paradigms, result.switch_seconds, result.catchup_seconds, result.paradigm_accepts, result.text,
            ))
            bar.update()
    bar.close()
    return {
        "model": target.name,
        "device": str(target.device),
        "dtype": str(target.model.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "max_new_tokens": max_new_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "seed": seed,
        "results": summarize(runs, methods),
        "per_prompt": [asdict(r) for r in runs],
    }


def _paradigm_rounds(group: list[PromptRun], method: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for run in group:
        for paradigm in run.paradigms or [method] * run.rounds:
            counts[paradigm] = counts.get(paradigm, 0) + 1
    return counts


def summarize(runs: list[PromptRun], methods: list[str]) -> list[dict]:
    groups: dict[tuple[str, str], list[PromptRun]] = defaultdict(list)
    for run in runs:
        groups[(run.method, run.category)].append(run)
        groups[(run.method, "all")].append(run)
    categories = sorted({c for _, c in groups} - {"all"}) + ["all"]
    rows = []
    for method in methods:
        for category in categories:
            group = groups[(method, category)]
            new_tokens = sum(r.new_tokens for r in group)
            seconds = sum(r.seconds for r in group)
            rounds = sum(r.rounds for r in group)
            verified_tokens = sum(r.tau * r.rounds for r in group)
            identical = [r.identical_to_vanilla for r in group]
            rows.append({
                "method": method,
                "category": category,
                "prompts": len(group),
                "new_tokens": new_tokens,
                "seconds": round(seconds, 4),
                "tokens_per_s": round(new_tokens / seconds, 3) if seconds else None,
                "tau": round(verified_tokens / rounds, 4) if rounds else None,
                "rounds": rounds,
                "speedup_vs_vanilla": None,
                "identical_to_vanilla": None if None in identical else all(identical),
                "paradigm_rounds": _paradigm_rounds(group, method),
                "switches": sum(sum(a != b for a, b in zip(r.paradigms, r.paradigms[1:])) for r in group),
                "switch_overhead_frac": round(sum(r.switch_seconds for r in group) / seconds, 5) if seconds else 0.0,
                "catchup_frac": round(sum(r.catchup_seconds for r in group) / seconds, 5) if seconds else 0.0,
                "draft_ms_per_round": round(1000 * sum(r.draft_seconds for r in group) / rounds, 2) if rounds else None,
                "verify_ms_per_round": round(1000 * sum(r.verify_seconds for r in group) / rounds, 2) if rounds else None,
            })
    vanilla = {r["category"]: r["tokens_per_s"] for r in rows if r["method"] == "vanilla"}
    for row in rows:
        base = vanilla.get(row["category"])
        if base and row["tokens_per_s"]:
            row["speedup_vs_vanilla"] = round(row["tokens_per_s"] / base, 4)
    return rows


def format_table(report: dict) -> str:
    header = ("method", "category", "prompts", "tokens", "tok/s", "tau", "speedup", "identical", "draft ms",
              "verify ms")
    lines = [header]
    for r in report["results"]:
        lines.append((
            r["method"], r["category"], str(r["prompts"]), str(r["new_tokens"]),
            f"{r['tokens_per_s']:.2f}" if r["tokens_per_s"] else "-",
            f"{r['tau']:.2f}" if r["tau"] else "-",
            f"{r['speedup_vs_vanilla']:.2f}x" if r["speedup_vs_vanilla"] else "-",
            {True: "yes", False: "NO", None: "-"}[r["identical_to_vanilla"]],
            f"{r['draft_ms_per_round']:.1f}" if r["draft_ms_per_round"] is not None else "-",
            f"{r['verify_ms_per_round']:.1f}" if r["verify_ms_per_round"] is not None else "-",
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)
