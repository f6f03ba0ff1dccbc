"""From validated prompts to engine jobs and back: queueing, client disconnects, logprobs, metrics.

Both APIs (SGLang-native and OpenAI) hand :class:`PromptRequest` objects to :class:`Service` and format the
:class:`Outcome` they get back; nothing here knows either wire format.
"""

from __future__ import annotations

import asyncio
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from whiflash_sgl.engine import GenerationResult, Request, SpeculativeEngine
from whiflash_sgl.router import NO_DRAFT, members
from whiflash_sgl.server.http import HttpLimits, TooLarge
from whiflash_sgl.server.metrics import ServerMetrics
from whiflash_sgl.server.model import GenerationParams, ServedModel, TokenLogprobs
from whiflash_sgl.server.scheduler import Job, Scheduler
from whiflash_sgl.server.stats import SpecStats

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before its result was ready; its jobs were cancelled."""


@dataclass(frozen=True)
class LogprobRequest:
    start: int  # first prompt position reported (SGLang's logprob_start_len, resolved)
    top_n: int = 0
    with_text: bool = False


@dataclass(frozen=True)
class PromptRequest:
    prompt_ids: list[int]
    params: GenerationParams
    rid: str = ""
    logprobs: LogprobRequest | None = None

    @property
    def needs_engine(self) -> bool:
        return self.params.max_new_tokens > 0 or self.logprobs is not None


@dataclass
class Outcome:
    request: PromptRequest
    result: GenerationResult
    latency: float  # arrival to last token
    queue_wait: float
    stats: SpecStats | None = None  # speculation statistics (speculative methods only)
    matched_stop: str | None = None  # the stop string that ended generation
    input_logprobs: TokenLogprobs | None = None
    output_logprobs: TokenLogprobs | None = None

    @property
    def finish_reason(self) -> dict:
        """SGLang's ``finish_reason`` object."""
        result = self.result
        if result.finish_reason == "eos":
            return {"type": "stop", "matched": result.tokens[-1]}
        if result.finish_reason == "stop":
            return {"type": "stop", "matched": self.matched_stop}
        if result.finish_reason == "abort":
            return {"type": "abort", "message": "the client disconnected"}
        return {"type": "length", "length": len(result.tokens)}


def new_rid() -> str:
    return uuid.uuid4().hex


class Service:
    """Owns the served model, the scheduler (its engine thread batches up to ``max_running`` requests), the metrics
    and the thread that prepares requests.

    Preparing a request (parsing its body, tokenizing its prompts, checking them) is work in proportion to its
    size, so it runs on that thread, off the event loop, one request at a time; prompts longer than
    ``max_prompt_chars`` characters are refused before they are tokenized."""

    def __init__(self, model: ServedModel, max_waiting: int = 256,
                 max_prompt_chars: int = HttpLimits.max_prompt_chars, max_running: int = 16,
                 engine_thread: bool = True):
        self.model = model
        self.max_prompt_chars = max_prompt_chars
        self.max_running = max_running
        model.target.pool  # made now, with the budget in force, before two threads could both make it
        # engine_thread=False: the owner runs the batch loop (``scheduler.run()``) on a thread of its choosing
        self.scheduler = Scheduler(lambda: model.engine(max_running), max_waiting, self._count_rounds, engine_thread)
        self._preparer: ThreadPoolExecutor | None = None
        self.metrics = ServerMetrics(
            {"model": model.served_name, "speculative_algorithm": model.algorithm or "none",
             "policy": model.policy, "backend": "reference"},
            waiting=lambda: self.scheduler.waiting,
            running=lambda: self.scheduler.running,
        )
        self.started = time.time()
        self.last_throughput = 0.0  # tokens/s of the last finished generation
        self.accept_lengths: list[float] = []  # spec_accept_length of recent requests, for /server_info
        self._paradigms_seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # engine thread only

    def start(self) -> None:
        self._preparer = ThreadPoolExecutor(1, thread_name_prefix="whiflash-prepare")
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()
        if self._preparer is not None:
            self._preparer.shutdown(wait=False, cancel_futures=True)
            self._preparer = None

    # --- building requests (on the preparing thread) --------------------------------------------------------

    async def prepare(self, work: Callable[..., T], *args) -> T:
        """``work(*args)`` on the preparing thread: the event loop keeps serving other clients meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self._preparer, work, *args)

    def check_batch(self, prompts: int) -> None:
        """A batch must fit the queue whole (checked before its prompts are tokenized)."""
        limit = self.scheduler.max_waiting
        if prompts > limit:
            raise TooLarge(f"the request has {prompts} prompts, but at most {limit} can wait for the engine "
                           f"(--max-queued-requests): send at most {limit} per request")

    def _check_length(self, chars: int) -> None:
        if chars > self.max_prompt_chars:
            raise TooLarge(f"the prompt has {chars} characters; this server takes at most {self.max_prompt_chars} "
                           f"(--max-prompt-chars)")

    def encode_text(self, text: str) -> list[int]:
        self._check_length(len(text))
        return self.model.encode_text(text)

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        self._check_length(sum(len(m["content"]) for m in messages))
        return self.model.encode_chat(messages)

    def prompt_request(self, prompt_ids: Sequence[int], params: GenerationParams, rid: str | None = None,
                       logprobs: LogprobRequest | None = None) -> PromptRequest:
        """A checked request; :class:`WhiFlashError` (a 400) when the model cannot take it."""
        ids = list(prompt_ids)
        self.model.check(ids, params.max_new_tokens)
        return PromptRequest(ids, params, rid or new_rid(), logprobs)

    # --- running --------------------------------------------------------------------------------------------

    async def complete(self, http_request, requests: Sequence[PromptRequest]) -> list[Outcome]:
        """Run ``requests`` (queued in order) and return their outcomes; :class:`ClientGone` if the client left."""
        jobs = self._submit([r for r in requests if r.needs_engine], stream=False)
        values = iter(zip(jobs, await self._wait(http_request, jobs) if jobs else []))
        return [self._outcome(r, *next(values)) if r.needs_engine else self._outcome(r, None, None)
                for r in requests]

    async def _wait(self, http_request, jobs: list[Job]) -> list:
        results = asyncio.ensure_future(_results(jobs))
        watcher = asyncio.ensure_future(_disconnected(http_request))
        try:
            done, _ = await asyncio.wait({results, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if results not in done:
                self._count_aborted(jobs)
                raise ClientGone()
            return results.result()
        finally:
            watcher.cancel()
            results.cancel()
            for job in jobs:
                job.cancel()  # frees the queue and the engine if the client left or a batch failed half-way

    def submit_stream(self, request: PromptRequest) -> Job:
        """Queue a streaming request now, so that a full queue is refused before the response starts."""
        return self._submit([request], stream=True)[0]

    async def stream(self, request: PromptRequest, job: Job) -> AsyncIterator[tuple[str, object]]:
        """``("text", piece)`` as text is committed, then ``("done", Outcome)``. Leaving early cancels the job."""
        try:
            async for kind, value in job.stream():
                if kind == "text":
                    yield kind, value
                elif kind == "done":
                    yield kind, self._outcome(request, job, value)
                elif kind == "error":
                    raise value
        finally:
            if job.finished is None:
                self._count_aborted([job])
            job.cancel()

    def _submit(self, requests: Sequence[PromptRequest], stream: bool) -> list[Job]:
        jobs = [Job(lambda job, engine, r=r: self._start(job, engine, r, stream),
                    lambda job, result, r=r: self._finish(job, result, r)) for r in requests]
        self.scheduler.submit(jobs)
        return jobs

    def _start(self, job: Job, engine: SpeculativeEngine, request: PromptRequest, stream: bool) -> Request | None:
        """On the engine thread, at admission: the request into the engine's batch (None: no tokens to generate)."""
        return self.model.submit(engine, request.prompt_ids, request.params, job.push_text if stream else None)

    def _finish(self, job: Job, result: GenerationResult | None, request: PromptRequest):
        """On the engine thread, between rounds: the job's value; the tokens are scored when logprobs were asked."""
        model = self.model
        if result is None:
            result = model.prompt_only(len(request.prompt_ids))
        if request.logprobs is None or result.finish_reason == "abort" or job.cancelled():
            return result, None, None
        lp = request.logprobs
        prompt_len = len(request.prompt_ids)
        first = lp.start + 1 if lp.start < prompt_len else prompt_len
        scored = model.logprobs(request.prompt_ids + result.tokens, first, lp.top_n, lp.with_text, job.cancelled)
        if job.cancelled():
            return result, None, None
        n_in = prompt_len - first  # scored prompt positions
        inputs = TokenLogprobs(scored.tokens[:n_in], scored.top[:n_in])
        if lp.start < prompt_len:  # SGLang reports the first position with no logprob
            token = request.prompt_ids[lp.start]
            inputs.tokens.insert(0, (None, token, model.decode([token]) if lp.with_text else None))
            if lp.top_n:
                inputs.top.insert(0, None)
        outputs = TokenLogprobs(scored.tokens[n_in:], scored.top[n_in:])
        return result, inputs, outputs

    def _count_rounds(self, requests: list[Request]) -> None:
        """After each engine round: which paradigms drafted in it, each request's own choice for that round."""
        drafted = set()
        for request in requests:
            paradigms = self.model.round_paradigms(request)
            drafted.update(p for action in paradigms[self._paradigms_seen.get(request, 0):] for p in members(action)
                           if p != NO_DRAFT)
            self._paradigms_seen[request] = len(paradigms)
        self.metrics.count_round(drafted)

    def _outcome(self, request: PromptRequest, job: Job | None, value) -> Outcome:
        if job is None:  # max_new_tokens=0 without logprobs: tokenization only, no engine work
            result, inputs, outputs = self.model.prompt_only(len(request.prompt_ids)), None, None
            latency = queue_wait = 0.0
        else:
            result, inputs, outputs = value
            latency, queue_wait = job.finished - job.created, job.started - job.created
        stats = None
        if self.model.speculative and result.rounds:
            stats = SpecStats.of(result, self.model.single_paradigm)
            self.accept_lengths = (self.accept_lengths + [stats.accept_length])[-64:]
        if result.tokens:
            self.last_throughput = len(result.tokens) / result.seconds if result.seconds else 0.0
            self.metrics.record(result.finish_reason, result.prompt_tokens, len(result.tokens), result.seconds,
                                latency, queue_wait, stats)
        return Outcome(request, result, latency, queue_wait, stats, self._matched_stop(request, result),
                       inputs, outputs)

    def _matched_stop(self, request: PromptRequest, result: GenerationResult) -> str | None:
        """The engine cuts the text before the stop string and keeps the fewest tokens that reach into it, so the
        kept tokens decode to the text plus the start of the stop string that matched."""
        if result.finish_reason != "stop":
            return None
        tail = self.model.decode(result.tokens)[len(result.text):]
        stops = [s for s in request.params.stop if s]
        return next((s for s in stops if tail and (tail.startswith(s) or s.startswith(tail))), stops[0])

    def _count_aborted(self, jobs: Sequence[Job]) -> None:
        for job in jobs:
            if job.finished is None:
                self.metrics.finished.labels("abort").inc()


async def _results(jobs: Sequence[Job]) -> list:
    """The jobs' values, in order (they run in one batch and may finish in any order: all are awaited anyway)."""
    return [await job.result() for job in jobs]


async def _disconnected(http_request) -> None:
    """Returns when the client of ``http_request`` (whose body was already read) disconnects."""
    while (await http_request.receive())["type"] != "http.disconnect":
        pass
