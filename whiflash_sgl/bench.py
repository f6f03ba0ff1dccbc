"""``whiflash bench``: every method on every prompt, the same prefill/verify code, one JSON report.

Methods run interleaved per prompt (so slow drifts of a shared machine hit all of them alike) after a short warm-up.
Rows are per method and category plus an ``all`` row; ``tau`` is committed tokens per target verify pass (bonus
included) and ``speedup_vs_vanilla`` is the ratio of tokens/s to ``vanilla``'s in the same category and run.

Sampled runs (T > 0) use the keyed rule, under which every method's text must equal vanilla's for the same seed
(``identical_to_vanilla``); each speculative method also runs under the rejection rule (rows ``<method>[rejection]``)
so that ``rule_comparison`` can set the two rules' tau side by side.
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Protocol

import torch
from tqdm import tqdm

from whiflash_sgl.chat import ChatPrompt, encode_chat
from whiflash_sgl.config import WhiFlashConfig
from whiflash_sgl.errors import WhiFlashError
from whiflash_sgl.methods import make_method
from whiflash_sgl.sampling import SamplingParams
from whiflash_sgl.target import Target

REJECTION = "[rejection]"  # suffix of the rows that sample with the rejection rule


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

    @property
    def paradigm_rounds(self) -> dict[str, int]:
        """Rounds per paradigm; a method without a routed paradigm per round is credited with all of them."""
        return dict(Counter(self.paradigms or [self.method] * self.rounds))

    @property
    def switches(self) -> int:
        return switches(self.paradigms)


def switches(paradigms: Sequence[str]) -> int:
    """How often consecutive rounds were drafted by different paradigms."""
    return sum(a != b for a, b in zip(paradigms, paradigms[1:]))


class RunFigures(Protocol):
    """What :func:`summarize` reads of one method's run on one prompt. A figure a run cannot know (an HTTP endpoint
    reports no drafting time) is ``None``, and so is any aggregate over it."""

    method: str
    category: str
    new_tokens: int
    seconds: float
    rounds: int
    tau: float
    identical_to_vanilla: bool | None
    paradigm_rounds: dict[str, int]
    switches: int | None
    switch_seconds: float | None
    catchup_seconds: float | None
    draft_seconds: float | None
    verify_seconds: float | None


def vanilla_first(methods: Sequence[str]) -> list[str]:
    """The per-prompt running order: ``vanilla`` first, so every other method's output can be compared with it."""
    return sorted(methods, key=lambda m: m != "vanilla")


def interleave(
    encoded: Sequence[tuple[ChatPrompt, list[int]]],
    methods: Sequence[str],
    run_one: Callable[[str, int, ChatPrompt, list[int]], tuple[list[int], RunFigures]],
    compared: Callable[[str], bool],
    reference: Callable[[int, list[int]], list[int]] | None = None,
    progress: bool = True,
) -> list[RunFigures]:
    """Every method on every prompt, methods interleaved per prompt. ``run_one(method, index, prompt, ids)`` returns
    the output token ids and the run's record, whose ``identical_to_vanilla`` is set here for the methods
    ``compared`` names (those whose output is a function of prompt and seed): whether the tokens equal ``vanilla``'s
    (or ``reference(index, ids)``'s when ``vanilla`` is not among the methods); ``None`` for the others or when
    there is nothing to compare with."""
    runs: list[RunFigures] = []
    bar = tqdm(total=len(encoded) * len(methods), desc="bench", disable=not progress, file=sys.stderr)
    for index, (prompt, ids) in enumerate(encoded):
        vanilla_tokens = reference(index, ids) if reference is not None else None
        for method in vanilla_first(methods):
            tokens, run = run_one(method, index, prompt, ids)
            if method == "vanilla":
                vanilla_tokens = tokens
            if compared(method) and vanilla_tokens is not None:
                run.identical_to_vanilla = tokens == vanilla_tokens
            runs.append(run)
            bar.update()
    bar.close()
    return runs


def make_report(model: str, device: str, max_new_tokens: int, sampling: SamplingParams, seed: int,
                methods: list[str], runs: list, **extra) -> dict:
    """The bench JSON: run settings, ``extra`` fields, the summary rows and the per-prompt records."""
    return {
        "model": model,
        "device": device,
        **extra,
        "max_new_tokens": max_new_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "seed": seed,
        "results": (results := summarize(runs, methods)),
        "rule_comparison": rule_comparison(results),
        "per_prompt": [asdict(r) for r in runs],
    }


def rule_comparison(results: list[dict]) -> list[dict]:
    """tau of each method under the keyed rule next to its ``[rejection]`` row, per category (empty when greedy)."""
    rejection = {(r["method"].removesuffix(REJECTION), r["category"]): r["tau"] for r in results
                 if r["method"].endswith(REJECTION)}
    return [{"method": r["method"], "category": r["category"], "tau_keyed": r["tau"],
             "tau_rejection": rejection[(r["method"], r["category"])],
             "keyed_vs_rejection": round(r["tau"] / rejection[(r["method"], r["category"])], 4)}
            for r in results if (r["method"], r["category"]) in rejection and r["tau"]]


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
    rules = {m: sampling for m in methods}
    if not sampling.greedy and sampling.rule == "keyed":
        rules.update({m + REJECTION: replace(sampling, rule="rejection") for m in methods if m != "vanilla"})
    runners = {m: make_method(m, target, config, policy_params) for m in methods}
    reference = None if "vanilla" in methods else make_method("vanilla", target)
    encoded = [(p, encode_chat(target.tokenizer, p.messages)) for p in prompts]
    for p, ids in encoded:
        if len(ids) + max_new_tokens > target.context_length:
            raise WhiFlashError(f"prompt {p.id} has {len(ids)} tokens: with max_new_tokens it exceeds the context")
    for runner in runners.values():  # warm-up: first-call allocations and kernel selection stay out of the figures
        runner.generate(encoded[0][1], 8, sampling, seed)

    def run_one(label: str, index: int, prompt: ChatPrompt, ids: list[int]) -> tuple[list[int], PromptRun]:
        result = runners[label.removesuffix(REJECTION)].generate(ids, max_new_tokens, rules[label], seed + index)
        return result.tokens, PromptRun(
            label, prompt.id, prompt.category, len(result.tokens), result.seconds, result.rounds, result.tau,
            None, result.accept_lengths, result.draft_seconds, result.verify_seconds, result.paradigms,
            result.switch_seconds, result.catchup_seconds, result.paradigm_accepts, result.text,
        )

    def vanilla_tokens(index: int, ids: list[int]) -> list[int]:
        return reference.generate(ids, max_new_tokens, sampling, seed + index).tokens

    def compared(label: str) -> bool:  # greedy and keyed output is a function of (prompt, seed)
        return rules[label].greedy or rules[label].rule == "keyed"

    runs = interleave(encoded, list(rules), run_one, compared, vanilla_tokens if reference else None, progress)
    return make_report(target.name, str(target.device), max_new_tokens, sampling, seed, list(rules), runs,
                       dtype=str(target.model.dtype).removeprefix("torch."), threads=torch.get_num_threads())


def _sum(values) -> float | None:
    """The total, or ``None`` when some run did not report the figure."""
    values = list(values)
    return None if None in values else sum(values)


def _per(total: float | None, count: float, scale: float = 1.0, digits: int = 5) -> float | None:
    return round(scale * total / count, digits) if total is not None and count else None


def _row(method: str, category: str, group: list[RunFigures]) -> dict:
    new_tokens = sum(r.new_tokens for r in group)
    seconds = sum(r.seconds for r in group)
    rounds = sum(r.rounds for r in group)
    verified_tokens = sum(r.tau * r.rounds for r in group)
    identical = [r.identical_to_vanilla for r in group]
    paradigm_rounds: Counter = Counter()
    for run in group:
        paradigm_rounds.update(run.paradigm_rounds)
    return {
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
        "paradigm_rounds": dict(paradigm_rounds),
        "switches": _sum(r.switches for r in group),
        "switch_overhead_frac": _per(_sum(r.switch_seconds for r in group), seconds),
        "catchup_frac": _per(_sum(r.catchup_seconds for r in group), seconds),
        "draft_ms_per_round": _per(_sum(r.draft_seconds for r in group), rounds, 1000, 2),
        "verify_ms_per_round": _per(_sum(r.verify_seconds for r in group), rounds, 1000, 2),
    }


def summarize(runs: list[RunFigures], methods: list[str]) -> list[dict]:
    """One row per method and category, then an ``all`` row per method; speedups against ``vanilla``'s row."""
    groups: dict[tuple[str, str], list[RunFigures]] = defaultdict(list)
    for run in runs:
        groups[(run.method, run.category)].append(run)
        groups[(run.method, "all")].append(run)
    categories = sorted({c for _, c in groups} - {"all"}) + ["all"]
    rows = [_row(method, category, groups[(method, category)]) for method in methods for category in categories]
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
    table = _columns(lines)
    comparison = report.get("rule_comparison")
    if comparison:
        rows = [("method", "category", "tau keyed", "tau rejection", "keyed/rejection")]
        rows += [(r["method"], r["category"], f"{r['tau_keyed']:.2f}", f"{r['tau_rejection']:.2f}",
                  f"{r['keyed_vs_rejection']:.2f}") for r in comparison]
        table += "\n\nsampling rules (tau: committed tokens per verify)\n" + _columns(rows)
    return table


def _columns(lines: list[tuple[str, ...]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)
