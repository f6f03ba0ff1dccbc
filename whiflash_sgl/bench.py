"""``whiflash bench``: every method on every prompt, the same prefill/verify code, one JSON report.

Methods run interleaved per prompt (so slow drifts of a shared machine hit all of them alike) after a short warm-up.
Rows are per method and category plus an ``all`` row; ``tau`` is committed tokens per target verify pass (bonus
included) and ``speedup_vs_vanilla`` is the ratio of tokens/s to ``vanilla``'s in the same category and run.

Sampled runs (T > 0) use the keyed rule, under which every method's text must equal vanilla's for the same seed
(``identical_to_vanilla``); each speculative method also runs under the rejection rule (rows ``<method>[rejection]``)
so that ``rule_comparison`` can set the two rules' tau side by side.

With ``--concurrency 1,4,8,16`` (:func:`load_bench`) every method runs at every level as a closed loop on one
batched engine per (method, level), ``max_running`` = the level: that many requests in flight, the next prompt (file
order) submitted as soon as one finishes, every prompt at least once (:func:`request_prompts`: the prompts are
cycled to a multiple of the level, so a small set still keeps every level full). Rows are per method, level and
category plus ``all``: ``tokens_per_s`` is generated tokens over the run's wall time (a category's: over its
requests' share of it, each instant split equally among the requests in flight), the ``all`` row's
``full_tokens_per_s`` the same over the part of the run that kept every slot busy (:func:`full_batch`), TTFT is from
submission to the first token, and ITL is per token (:data:`ITL_DEFINITION`): the gap between a request's
consecutive commits divided by the tokens the later commit carries, one sample per token, so a round that commits 4
tokens after 40 ms gives four samples of 10 ms (SGLang bench_serving's adjusted ITL; vLLM's per-chunk ITL would be
one sample of 40 ms). Greedy output of every request must equal vanilla's at concurrency 1 (run on its own when it
is not among the runs); a divergence where the reference's two best logits at the first differing position are
within ``NEAR_TIE`` of each other, and the two tokens are those, is a near tie (float rounding of another batch
shape), counted in ``near_ties``, not a failure. With ``--paired`` (:func:`paired_load`) a level's methods run
together, taking turns of a few seconds, each timed on a clock that runs only during its own rounds: the host's
drift then falls on every method alike, and the ratios between them hold from one run to the next.
"""

from __future__ import annotations

import platform
import sys
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from tqdm import tqdm

from whiflash_sgl.chat import ChatPrompt, encode_chat
from whiflash_sgl.config import WhiFlashConfig
from whiflash_sgl.errors import WhiFlashError
from whiflash_sgl.engine import SpeculativeEngine
from whiflash_sgl.methods import EngineMethod, make_method
from whiflash_sgl.sampling import SamplingParams
from whiflash_sgl.target import Target

if TYPE_CHECKING:
    from whiflash_sgl.bench_log import LevelLog

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


def settings(model: str, device: str, max_new_tokens: int, sampling: SamplingParams, seed: int, **extra) -> dict:
    """The run settings every bench JSON starts with, ``extra`` fields after the model and device."""
    return {
        "model": model,
        "device": device,
        **extra,
        "max_new_tokens": max_new_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "seed": seed,
    }


def processor() -> str:
    """The CPU's model name and the instruction sets the kernels are chosen by, e.g. "AMD EPYC, AVX512, AVX512-BF16":
    figures from different CPUs differ by 2x and more, and a resumed bench must not mix them (a virtual machine names
    an AVX2-only EPYC and a Zen 4 alike)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []

    def field(key: str) -> str:
        return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(key)), "")

    flags = set(field("flags").split())
    extras = [label for flag, label in (("avx512_bf16", "AVX512-BF16"), ("amx_tile", "AMX")) if flag in flags]
    name = field("model name") or platform.processor() or platform.machine()
    return ", ".join([name, torch.backends.cpu.get_cpu_capability(), *extras])


def make_report(head: dict, methods: list[str], runs: list) -> dict:
    """The bench JSON: ``head`` (the run settings), the summary rows and the per-prompt records."""
    return {
        **head,
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
    levels: Sequence[int] | None = None,
    log: LevelLog | None = None,
    paired: bool = False,
) -> dict:
    """The bench report; with concurrency ``levels``, the concurrency bench's (:func:`load_bench`, kept in
    ``log``; ``paired``: the methods of a level run together, :func:`paired_load`)."""
    if not prompts:
        raise WhiFlashError("no prompts to run")
    if paired and not levels:
        raise WhiFlashError("--paired runs the closed loops of --concurrency together; without --concurrency the "
                            "methods already run interleaved per prompt")
    runners = {m: make_method(m, target, config, policy_params) for m in methods}
    one_at_a_time = [m for m, runner in runners.items() if not isinstance(runner, EngineMethod)]
    if levels and (paired or max(levels) > 1) and one_at_a_time:
        raise WhiFlashError(f"methods off the engine run one request at a time ({', '.join(one_at_a_time)}): bench "
                            f"them at --concurrency 1 only and without --paired, or leave them out")
    encoded = [(p, encode_chat(target.tokenizer, p.messages)) for p in prompts]
    for p, ids in encoded:
        if len(ids) + max_new_tokens > target.context_length:
            raise WhiFlashError(f"prompt {p.id} has {len(ids)} tokens: with max_new_tokens it exceeds the context")
    for runner in runners.values():  # warm-up: first-call allocations and kernel selection stay out of the figures
        runner.generate(encoded[0][1], 8, sampling, seed)
    head = settings(target.name, str(target.device), max_new_tokens, sampling, seed, processor=processor(),
                    dtype=str(target.model.dtype).removeprefix("torch."), matmul=target.matmul,
                    threads=torch.get_num_threads(), **({"paired": True} if paired else {}))
    if levels:
        return load_bench(target, runners, encoded, levels, max_new_tokens, sampling, seed, head, progress, log,
                          paired)
    rules = {m: sampling for m in methods}
    if not sampling.greedy and sampling.rule == "keyed":
        rules.update({m + REJECTION: replace(sampling, rule="rejection") for m in methods if m != "vanilla"})
    reference = None if "vanilla" in methods else make_method("vanilla", target, config)

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
    return make_report(head, list(rules), runs)


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
    paradigm_rounds = _paradigm_rounds(r.paradigm_rounds for r in group)
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
        "paradigm_rounds": paradigm_rounds,
        "switches": _sum(r.switches for r in group),
        "switch_overhead_frac": _per(_sum(r.switch_seconds for r in group), seconds),
        "catchup_frac": _per(_sum(r.catchup_seconds for r in group), seconds),
        "draft_ms_per_round": _per(_sum(r.draft_seconds for r in group), rounds, 1000, 2),
        "verify_ms_per_round": _per(_sum(r.verify_seconds for r in group), rounds, 1000, 2),
    }


def _paradigm_rounds(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: Counter = Counter()
    for count in counts:
        total.update(count)
    return dict(total)


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
    if "concurrency" in report:
        return format_load_table(report)
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


# ---- load: closed-loop concurrency against the batched engine (``--concurrency``) ------------------------------

NEAR_TIE = 1e-3  # a divergence between two tokens whose logits (or log-probabilities) differ by less is a near tie
TOP_SCORES = 4  # how many of the reference's best tokens the near-tie check looks at
ITL_DEFINITION = (
    "per token: the gap between a request's consecutive commits (engine rounds, or stream chunks over HTTP) is "
    "shared equally by the tokens the later commit carries, one sample per generated token after the first "
    "(SGLang bench_serving's adjusted ITL); TTFT is from submission to the first commit"
)


@dataclass
class LoadRun:
    """One request of a closed-loop (method, concurrency) run. Times are seconds: ``start`` and ``end`` since the
    run began, ``commit_seconds`` since the request's submission (each engine round, or stream chunk, that brought
    tokens), ``commit_tokens`` how many tokens each commit carried; ``index`` is the prompt's in the set (a prompt
    may run more than once: :func:`request_prompts`)."""

    method: str
    concurrency: int
    index: int
    prompt_id: str
    category: str
    new_tokens: int
    start: float
    end: float
    commit_seconds: list[float]
    commit_tokens: list[int]
    rounds: int
    tau: float
    paradigm_rounds: dict[str, int]
    text: str
    tokens: list[int] = field(repr=False)
    identical_to_vanilla: bool | None = None
    near_tie: bool | None = None  # it diverged from the reference, at a near tie (None: identical, or not compared)
    divergence: dict | None = None  # where it diverged: position, the reference's and its token, the score gap

    @property
    def ttft(self) -> float | None:
        return self.commit_seconds[0] if self.commit_seconds else None

    @property
    def itl(self) -> list[float]:
        """Inter-token latencies as :data:`ITL_DEFINITION` defines them."""
        samples = []
        for t0, t1, n in zip(self.commit_seconds, self.commit_seconds[1:], self.commit_tokens[1:]):
            samples += [(t1 - t0) / n] * n
        return samples

    def record(self) -> dict:
        """The JSON record (without the token ids)."""
        record = asdict(self)
        del record["tokens"]
        return record


@dataclass
class LoadLevel:
    """All requests of one (method, concurrency) run, its wall seconds and the most requests that ran at once
    (``None`` where it is not visible, over HTTP)."""

    runs: list[LoadRun]
    wall_seconds: float
    peak_running: int | None


def commit_tokens(result) -> list[int]:
    """Tokens per commit of an engine result: the prefill's one, then each round's accepted drafts and bonus, the
    last cut where generation stopped."""
    counts, left = [], len(result.tokens)
    for n in [1, *(a + 1 for a in result.accept_lengths)][: len(result.commit_seconds)]:
        counts.append(min(n, left))
        left -= counts[-1]
    return counts


def load_run(method: str, concurrency: int, index: int, prompt: ChatPrompt, result, start: float) -> LoadRun:
    """The record of an engine ``GenerationResult`` submitted ``start`` seconds into the run."""
    return LoadRun(
        method, concurrency, index, prompt.id, prompt.category, len(result.tokens), start, start + result.seconds,
        list(result.commit_seconds), commit_tokens(result), result.rounds, result.tau,
        dict(Counter(result.paradigms or [method] * result.rounds)), result.text, list(result.tokens),
    )


def request_prompts(prompts: int, level: int) -> list[int]:
    """The prompt index of each request of a closed loop at ``level``: the prompts in file order, cycled up to the
    first multiple of ``level`` that covers them all. Without the repeats a set small next to the level would
    measure a lower level: 12 prompts at level 8 end in a wave of 4, and at level 16 never run more than 12 at once.
    A repeated prompt keeps its seed, so its output is its first run's."""
    return [j % prompts for j in range(-(-prompts // level) * level)]


TURN_SECONDS = 5.0  # how long each method of a paired run runs before the next: see ``paired_load``


class StepClock:
    """A clock that runs only while its method works (``with clock:`` around each of its turns): in a paired run each
    method's figures are on its own clock, as if it had had the machine alone, and a slow spell of the host falls
    on every method alike instead of on whichever ran then."""

    def __init__(self) -> None:
        self.elapsed, self._since = 0.0, None

    def __call__(self) -> float:
        return self.elapsed + (time.perf_counter() - self._since if self._since is not None else 0.0)

    def __enter__(self) -> "StepClock":
        self._since = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.elapsed, self._since = self(), None


class ClosedLoop:
    """One engine method's closed loop: ``concurrency`` requests in flight on its own batched engine, the next of
    :func:`request_prompts` submitted as soon as one finishes (prompt ``i`` seeded ``seed + i``); each :meth:`turn`
    submits into the free slots and runs one round. Times are on ``clock``."""

    def __init__(self, method: EngineMethod, encoded: Sequence[tuple[ChatPrompt, list[int]]], max_new_tokens: int,
                 sampling: SamplingParams, seed: int, concurrency: int, bar=None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.method, self.encoded, self.max_new_tokens, self.seed = method, encoded, max_new_tokens, seed
        self.concurrency, self.bar, self.clock = concurrency, bar, clock
        self.engine = SpeculativeEngine(method.target, method.drafter, sampling, seed, max_running=concurrency,
                                        clock=clock)
        self.waiting = deque(enumerate(request_prompts(len(encoded), concurrency)))
        self.flight: dict = {}
        self.runs: dict[int, LoadRun] = {}
        self.peak, self.start = 0, clock()

    @property
    def done(self) -> bool:
        return not (self.waiting or self.flight)

    def turn(self) -> None:
        method = self.method
        with nullcontext() if method.attention is None else method.target.attention_path(method.attention):
            while self.waiting and len(self.flight) < self.concurrency:
                j, i = self.waiting.popleft()
                self.flight[self.engine.submit(self.encoded[i][1], self.max_new_tokens, seed=self.seed + i)] = j, i
            finished = self.engine.step()
        self.peak = max(self.peak, len(self.engine.running) + len(finished))
        for request in finished:
            j, i = self.flight.pop(request)
            self.runs[j] = load_run(method.name, self.concurrency, i, self.encoded[i][0], request.result,
                                    request.submitted - self.start)
            if self.bar is not None:
                self.bar.update()

    def level(self) -> LoadLevel:
        return LoadLevel([self.runs[j] for j in sorted(self.runs)], self.clock() - self.start, self.peak)


def engine_load(method, encoded: Sequence[tuple[ChatPrompt, list[int]]], max_new_tokens: int,
                sampling: SamplingParams, seed: int, concurrency: int, bar=None) -> LoadLevel:
    """The :class:`ClosedLoop` of ``method`` at ``concurrency``, run to its end. A method off the engine
    (transformers' loop) runs its prompts one after another, at concurrency 1 only."""
    if isinstance(method, EngineMethod):
        loop = ClosedLoop(method, encoded, max_new_tokens, sampling, seed, concurrency, bar)
        while not loop.done:
            loop.turn()
        return loop.level()
    if concurrency != 1:
        raise WhiFlashError(f"{method.name} generates one request at a time: bench it at --concurrency 1 only")
    runs, t0 = [], time.perf_counter()
    for i, (prompt, ids) in enumerate(encoded):
        start = time.perf_counter() - t0
        runs.append(load_run(method.name, 1, i, prompt, method.generate(ids, max_new_tokens, sampling, seed + i),
                             start))
        if bar is not None:
            bar.update()
    return LoadLevel(runs, time.perf_counter() - t0, 1)


def paired_load(methods: dict[str, EngineMethod], encoded: Sequence[tuple[ChatPrompt, list[int]]],
                max_new_tokens: int, sampling: SamplingParams, seed: int, concurrency: int,
                bar=None, turn_seconds: float = TURN_SECONDS) -> dict[str, LoadLevel]:
    """Every method's :class:`ClosedLoop` at ``concurrency`` at once, taking turns of ``turn_seconds`` of its own
    :class:`StepClock` (at least one round each): their ratios no longer depend on when each ran. On a 2-core host,
    six runs of the lookup alone at 16 requests over the same 160 prompts, one after another and alike to the round,
    ran 240-285 tok/s; paired, two copies of vanilla ran 0.6% apart, two of the lookup 1.4% (each learns its own
    prices).

    Turns of seconds, not of one round: a method with drafters pays outside the forward for rounds that follow
    other engines' rounds (likely its data gone from the caches). At 16 requests whiflash:mlp spent 2.2-2.4 s there
    run alone, 4.0-4.3 s with vanilla and the lookup taking turns round by round (the lookup 1.2-1.6 s either way),
    and 2.7-2.8 s in turns of 5 s, where it ran level with the lookup instead of 0.96-1.01x it; two copies of
    vanilla in turns of 1 s still ran 0.1% apart.

    Loops on one target share its KV pool, so for the run it holds each loop's budget: on one budget four loops of
    16 requests had taken turns at the free slots in the summarization prompts' stretch (a request reserves its
    prompt and output), and requests of the speculative methods, later in each turn, waited 20-28 s of their own
    clock for a first token against vanilla's 7 s, at fewer requests than the level."""
    clocks = {name: StepClock() for name in methods}
    loops_on = Counter(method.target for method in methods.values())
    budgets = {target: target.kv_budget for target in loops_on}
    for target, count in loops_on.items():
        target.set_kv_budget(budgets[target] * count)
    try:
        loops = {name: ClosedLoop(method, encoded, max_new_tokens, sampling, seed, concurrency, bar, clocks[name])
                 for name, method in methods.items()}
        while not all(loop.done for loop in loops.values()):
            for name, loop in loops.items():
                start = clocks[name]()
                while not loop.done:
                    with clocks[name]:
                        loop.turn()
                    if clocks[name]() - start >= turn_seconds:
                        break
    finally:
        for target, budget in budgets.items():
            target.reset_pool()  # a loop cut off mid-run leaves reservations that no request records any more
            target.set_kv_budget(budget)
    return {name: loop.level() for name, loop in loops.items()}


def near_tie(scores: dict[int, float], reference_token: int, token: int,
             threshold: float = NEAR_TIE) -> tuple[bool, float | None]:
    """Whether a divergence from ``reference_token`` to ``token`` is a near tie of the reference's ``scores`` (its
    best tokens' logits or log-probabilities): both tokens score within ``threshold`` of the best, so the top-2 gap
    is below it. Returns that and the larger of the two tokens' distances to the best (None when one of them is not
    among ``scores``)."""
    if reference_token not in scores or token not in scores:
        return False, None
    best = max(scores.values())
    gap = best - min(scores[reference_token], scores[token])
    return gap < threshold, gap


def target_top_scores(target: Target) -> Callable[[list[int]], dict[int, float]]:
    """The target's best logits after ``ids``, from one forward over them (a sequence of its own)."""

    def top(ids: list[int]) -> dict[int, float]:
        values, tokens = target.score(ids, 1)[-1].float().topk(TOP_SCORES)
        return dict(zip(tokens.tolist(), values.tolist()))

    return top


def judge(runs: list[LoadRun], prompt_ids: Sequence[list[int]], reference: Sequence[list[int]],
          top_scores: Callable[[list[int]], dict[int, float]] | None) -> None:
    """Set each run's ``identical_to_vanilla`` against the reference's tokens of its prompt, and for a divergence
    whether it is a near tie of the reference's scores at the first differing position (``top_scores`` of the
    prompt and the reference's tokens before it; None: no divergence is a near tie, as for sampled runs)."""
    for run in runs:
        ref = reference[run.index]
        run.identical_to_vanilla = run.tokens == ref
        if run.identical_to_vanilla:
            continue
        k = next((i for i, (a, b) in enumerate(zip(ref, run.tokens)) if a != b), min(len(ref), len(run.tokens)))
        both = k < min(len(ref), len(run.tokens))
        tie, gap = (near_tie(top_scores(prompt_ids[run.index] + ref[:k]), ref[k], run.tokens[k])
                    if both and top_scores is not None else (False, None))
        run.near_tie = tie
        run.divergence = {"position": k, "reference_token": ref[k] if k < len(ref) else None,
                          "token": run.tokens[k] if k < len(run.tokens) else None, "gap": gap}


def load_levels(methods: Sequence[str], levels: Sequence[int], run_level: Callable[[str, int], LoadLevel],
                prompt_ids: Sequence[list[int]], compared: Callable[[str], bool],
                reference: Callable[[], list[list[int]]] | None,
                top_scores: Callable[[list[int]], dict[int, float]] | None,
                logged: dict[tuple[str, int], LoadLevel] | None = None,
                log: Callable[[str, int, LoadLevel], None] | None = None) -> list[tuple[str, int, LoadLevel]]:
    """Every (method, level) run, levels ascending and ``vanilla`` first in each. Runs of the methods ``compared``
    names are judged against vanilla at concurrency 1, which ``reference()`` produces beforehand when that run is
    not among them (``reference`` None: nothing to compare with). A run in ``logged`` (a resumed bench's, judged
    when it ran) is taken from there; each new one goes to ``log`` once judged."""
    done, tokens, logged = [], None, logged or {}
    if reference is not None and not ("vanilla" in methods and 1 in levels):
        tokens = reference()
    for level in sorted(levels):
        for method in vanilla_first(methods):
            result = logged.get((method, level)) or run_level(method, level)
            if tokens is None and method == "vanilla" and level == 1:
                tokens = [r.tokens for r in result.runs]
            if (method, level) not in logged:
                if tokens is not None and compared(method):
                    judge(result.runs, prompt_ids, tokens, top_scores)
                if log is not None:
                    log(method, level, result)
            running = result.peak_running
            if running is not None and running < level:
                print(f"warning: {method} at concurrency {level}: at most {running} requests ran at once (the KV "
                      f"pool holds no more of them)", file=sys.stderr)
            done.append((method, level, result))
    return done


def load_requests(prompts: int, levels: Sequence[int]) -> int:
    """How many requests one method sends over all ``levels`` (for progress bars)."""
    return sum(len(request_prompts(prompts, level)) for level in levels)


def start_log(log: LevelLog | None, head: dict, encoded: Sequence[tuple[ChatPrompt, list[int]]],
              methods: Sequence[str], levels: Sequence[int]) -> tuple[dict[tuple[str, int], LoadLevel], int]:
    """The runs ``log`` holds for this bench (none without a log, or unless it resumes) and how many requests
    of the bench they hold."""
    logged = log.start(head, [p.id for p, _ in encoded]) if log else {}
    return logged, sum(len(r.runs) for (m, c), r in logged.items() if m in methods and c in levels)


def load_bench(target: Target, runners: dict, encoded: list[tuple[ChatPrompt, list[int]]], levels: Sequence[int],
               max_new_tokens: int, sampling: SamplingParams, seed: int, head: dict, progress: bool,
               log: LevelLog | None = None, paired: bool = False) -> dict:
    """The concurrency bench on the engine: every method (``runners``) at every level (:func:`engine_load`, or
    with ``paired`` all of a level's at once, :func:`paired_load`), each run kept in ``log`` and, when resuming,
    taken from it."""
    logged, requests = start_log(log, head, encoded, list(runners), levels)
    bar = tqdm(total=load_requests(len(encoded), levels) * len(runners), desc="bench", disable=not progress,
               file=sys.stderr, initial=requests)
    ran: dict[tuple[str, int], LoadLevel] = {}  # paired runs of a level not handed out yet

    def run_level(method: str, level: int) -> LoadLevel:
        if not paired:
            return engine_load(runners[method], encoded, max_new_tokens, sampling, seed, level, bar)
        if not any(key[1] == level for key in ran):  # the level's first run asked for: all it lacks, together
            lacking = {m: runner for m, runner in runners.items() if (m, level) not in logged}
            ran.update({(m, level): result for m, result in
                        paired_load(lacking, encoded, max_new_tokens, sampling, seed, level, bar).items()})
        return ran.pop((method, level))

    def reference() -> list[list[int]]:
        vanilla = EngineMethod("vanilla", target)  # no make_method: the run's cost curve stays
        return [r.tokens for r in engine_load(vanilla, encoded, max_new_tokens, sampling, seed, 1).runs]

    keyed = sampling.greedy or sampling.rule == "keyed"
    done = load_levels(list(runners), levels, run_level, [ids for _, ids in encoded], lambda m: keyed or m == "vanilla",
                       reference, target_top_scores(target) if sampling.greedy else None, logged, log and log.add)
    bar.close()
    return make_load_report(head, levels, done)


def make_load_report(head: dict, levels: list[int], done: list[tuple[str, int, LoadLevel]]) -> dict:
    """The concurrency bench JSON: ``head`` (the settings), the levels, the rows, each run's wall time and peak,
    and the per-request records."""
    return {
        **head,
        "concurrency": sorted(levels),
        "itl_definition": ITL_DEFINITION,
        "near_tie_threshold": NEAR_TIE,
        "results": load_rows(done),
        "runs": [{"method": m, "concurrency": c, "wall_seconds": round(r.wall_seconds, 4),
                  "peak_running": r.peak_running} for m, c, r in done],
        "per_prompt": [run.record() for _, _, r in done for run in r.runs],
    }


def time_shares(runs: Sequence[LoadRun]) -> list[float]:
    """Each request's share of its run's time: every instant is split equally among the requests in flight."""
    edges = sorted({t for r in runs for t in (r.start, r.end)})
    shares = [0.0] * len(runs)
    for a, b in zip(edges, edges[1:]):
        active = [i for i, r in enumerate(runs) if r.start <= a and r.end >= b]
        for i in active:
            shares[i] += (b - a) / len(active)
    return shares


def full_batch(runs: Sequence[LoadRun], level: int) -> dict:
    """The closed loop's full part, where all ``level`` slots are busy: from the first submission until the first
    request to finish after the last one was submitted; then the queue is empty and the batch drains. How the drain
    goes depends on how the requests' lengths and speeds line up at the end, and a speculative method's requests
    finish less in step than vanilla's; a run of few requests per slot is mostly drain, a long one hardly at all. So
    the bench reports both: ``tokens_per_s`` over the whole run, ``full_tokens_per_s`` (tokens committed in the
    full part over its length) for what a server under steady load would see."""
    if len(runs) < level:
        return {"full_seconds": None, "full_tokens_per_s": None, "full_speedup_vs_vanilla": None}
    first, last_start = min(r.start for r in runs), max(r.start for r in runs)
    end = min((r.end for r in runs if r.end > last_start), default=last_start)
    tokens = sum(n for r in runs for t, n in zip(r.commit_seconds, r.commit_tokens) if r.start + t <= end)
    seconds = end - first
    return {"full_seconds": round(seconds, 4), "full_tokens_per_s": round(tokens / seconds, 3) if seconds else None,
            "full_speedup_vs_vanilla": None}


def _ms(values: list[float], q: float) -> float | None:
    return round(1000 * float(np.percentile(values, q)), 3) if values else None


def _load_row(method: str, category: str, level: int, group: list[LoadRun], seconds: float,
              peak: int | None) -> dict:
    new_tokens = sum(r.new_tokens for r in group)
    rounds = sum(r.rounds for r in group)
    ttft = [r.ttft for r in group if r.ttft is not None]
    itl = [x for r in group for x in r.itl]
    compared = [r.identical_to_vanilla for r in group]
    paradigm_rounds = _paradigm_rounds(r.paradigm_rounds for r in group)
    total = sum(paradigm_rounds.values())
    return {
        "method": method,
        "category": category,
        "concurrency": level,
        "prompts": len({r.index for r in group}),
        "requests": len(group),
        "new_tokens": new_tokens,
        "seconds": round(seconds, 4),
        "tokens_per_s": round(new_tokens / seconds, 3) if seconds else None,
        "speedup_vs_vanilla": None,
        "tau": round(sum(r.tau * r.rounds for r in group) / rounds, 4) if rounds else None,
        "rounds": rounds,
        "ttft_p50_ms": _ms(ttft, 50),
        "ttft_p99_ms": _ms(ttft, 99),
        "itl_p50_ms": _ms(itl, 50),
        "itl_p99_ms": _ms(itl, 99),
        "identical_to_vanilla": None if None in compared else all(r.identical_to_vanilla or r.near_tie
                                                                  for r in group),
        "near_ties": None if None in compared else sum(bool(r.near_tie) for r in group),
        "paradigm_rounds": paradigm_rounds,
        "paradigm_shares": {p: round(n / total, 4) for p, n in paradigm_rounds.items()},
        "peak_running": peak,
    }


def load_rows(done: list[tuple[str, int, LoadLevel]]) -> list[dict]:
    """Per (method, level): a row per category, then ``all``. ``all`` divides the tokens by the run's wall time; a
    category by its requests' :func:`time_shares`. Speedups are against ``vanilla`` at the same level and category."""
    rows = []
    for method, level, result in done:
        shares = dict(zip(map(id, result.runs), time_shares(result.runs)))
        by_category: dict[str, list[LoadRun]] = defaultdict(list)
        for run in result.runs:
            by_category[run.category].append(run)
        for category in sorted(by_category):
            group = by_category[category]
            rows.append(_load_row(method, category, level, group, sum(shares[id(r)] for r in group),
                                  result.peak_running))
        rows.append({**_load_row(method, "all", level, result.runs, result.wall_seconds, result.peak_running),
                     **full_batch(result.runs, level)})
    for rate, speedup in (("tokens_per_s", "speedup_vs_vanilla"), ("full_tokens_per_s", "full_speedup_vs_vanilla")):
        vanilla = {(r["concurrency"], r["category"]): r.get(rate) for r in rows if r["method"] == "vanilla"}
        for row in rows:
            base = vanilla.get((row["concurrency"], row["category"]))
            if base and row.get(rate):
                row[speedup] = round(row[rate] / base, 4)
    return rows


def format_load_table(report: dict) -> str:
    """The ``all`` rows of a concurrency report (the categories' rows are in the JSON)."""
    lines = [("method", "concurrency", "tok/s", "speedup", "full tok/s", "tau", "ttft p50/p99 ms", "itl p50/p99 ms",
              "identical", "near ties")]
    for r in report["results"]:
        if r["category"] != "all":
            continue
        lines.append((
            r["method"], str(r["concurrency"]),
            f"{r['tokens_per_s']:.2f}" if r["tokens_per_s"] else "-",
            f"{r['speedup_vs_vanilla']:.2f}x" if r["speedup_vs_vanilla"] else "-",
            "-" if r["full_tokens_per_s"] is None else f"{r['full_tokens_per_s']:.2f}" + (
                f" ({r['full_speedup_vs_vanilla']:.2f}x)" if r["full_speedup_vs_vanilla"] else ""),
            f"{r['tau']:.2f}" if r["tau"] else "-",
            _pair(r["ttft_p50_ms"], r["ttft_p99_ms"]), _pair(r["itl_p50_ms"], r["itl_p99_ms"]),
            {True: "yes", False: "NO", None: "-"}[r["identical_to_vanilla"]],
            "-" if r["near_ties"] is None else str(r["near_ties"]),
        ))
    return _columns(lines)


def _pair(a: float | None, b: float | None) -> str:
    return "-" if a is None else f"{a:.1f}/{b:.1f}"
