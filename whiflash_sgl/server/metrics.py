"""``/metrics``: Prometheus text exposition of the server's requests and of WhiFlash's speculation.

Each server has its own registry (several can run in one process, as in the tests). Accepted length per paradigm
is a histogram of tokens committed per round of each request, by the paradigm that request chose for that round
(``none`` where the router drafted nothing, ``eagle3:first`` for EAGLE-3's first step alone), so ``_sum / _count``
is the mean and the buckets its spread; switch overhead is catch-up time spent on rounds that changed paradigm,
over the engine's generation time. The batch: ``whiflash_running_requests`` are in the
engine's running batch, ``whiflash_queued_requests`` submitted and not yet in it (queued, or waiting for KV);
``whiflash_batch_rounds`` counts engine rounds (one target forward for the whole batch),
``whiflash_paradigm_rounds{paradigm}`` those in which the paradigm drafted for at least one request and
``whiflash_mixed_rounds`` those in which several paradigms did, as the SGLang worker counts them.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from whiflash_sgl.server.stats import SpecStats

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256)
ACCEPT_BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 24, 32)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    def __init__(self, info: dict[str, str], waiting: Callable[[], int], running: Callable[[], int]):
        r = self.registry = CollectorRegistry()
        Info("whiflash_server", "What this server runs", registry=r).info(info)
        Gauge("whiflash_running_requests", "Requests in the engine's running batch", registry=r).set_function(running)
        Gauge("whiflash_queued_requests", "Requests submitted and not yet in the running batch (queued, or waiting "
              "for KV)", registry=r).set_function(waiting)
        # the names of the one-request-at-a-time server, kept for its dashboards
        Gauge("whiflash_queue_waiting_requests", "Requests waiting for the engine (as whiflash_queued_requests)",
              registry=r).set_function(waiting)
        Gauge("whiflash_queue_running_requests", "Requests on the engine (as whiflash_running_requests)",
              registry=r).set_function(running)
        self.finished = Counter("whiflash_requests", "Generation requests that finished, by finish reason",
                                ["finish_reason"], registry=r)
        self.responses = Counter("whiflash_http_responses", "HTTP responses by status, on every route (499: the "
                                 "client left before its answer)", ["status"], registry=r)
        self.latency = Histogram("whiflash_request_latency_seconds", "Arrival to last token, per prompt",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("whiflash_queue_wait_seconds", "Time waiting for the engine, per prompt",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("whiflash_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("whiflash_generation_tokens", "Tokens generated", registry=r)
        self.generation_seconds = Counter("whiflash_generation_seconds", "Seconds each request spent generating, "
                                          "summed over requests (the requests of one batch overlap, so this "
                                          "outgrows wall time)", registry=r)
        self.verify = Counter("whiflash_spec_verify", "Verify rounds summed over requests (one batched target "
                              "forward verifies a round of every running request; whiflash_batch_rounds counts "
                              "the forwards)", registry=r)
        self.accept_length = Histogram("whiflash_spec_accept_length",
                                       "Tokens committed per round (accepted draft tokens + bonus), by the "
                                       "paradigm its request chose (none: the router drafted nothing)",
                                       ["paradigm"], buckets=ACCEPT_BUCKETS, registry=r)
        self.switches = Counter("whiflash_spec_switches", "Rounds drafted by another paradigm than the last",
                                registry=r)
        self.switch_seconds = Counter("whiflash_spec_switch_seconds",
                                      "Catch-up (KV-only prefill) time spent on switching rounds", registry=r)
        self.batch_rounds = Counter("whiflash_batch_rounds", "Engine rounds: one target forward for every running "
                                    "request", registry=r)
        self.paradigm_rounds = Counter("whiflash_paradigm_rounds", "Engine rounds in which the paradigm drafted for "
                                       "at least one request", ["paradigm"], registry=r)
        self.mixed_rounds = Counter("whiflash_mixed_rounds", "Engine rounds in which several paradigms drafted (for "
                                    "different requests or a hedge), all verified in one target forward", registry=r)
        Gauge("whiflash_spec_switch_overhead_ratio", "Switch catch-up time over generation time",
              registry=r).set_function(self._switch_overhead)

        self._totals = {"generation": 0.0, "switch": 0.0}  # the ratio's terms (counters expose no public read)

    def _switch_overhead(self) -> float:
        seconds = self._totals["generation"]
        return self._totals["switch"] / seconds if seconds else 0.0

    def record(self, finish_reason: str, prompt_tokens: int, completion_tokens: int, seconds: float,
               latency: float, queue_wait: float, stats: SpecStats | None) -> None:
        self.finished.labels(finish_reason).inc()
        self.latency.observe(latency)
        self.queue_wait.observe(queue_wait)
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        self.generation_seconds.inc(seconds)
        self._totals["generation"] += seconds
        if stats is not None:
            self.verify.inc(stats.verify_ct)
            for paradigm, committed in stats.rounds:
                self.accept_length.labels(paradigm).observe(committed)
            self.switches.inc(stats.switches)
            self.switch_seconds.inc(stats.switch_seconds)
            self._totals["switch"] += stats.switch_seconds

    def count_round(self, paradigms: set[str]) -> None:
        """One engine round, in which ``paradigms`` drafted."""
        self.batch_rounds.inc()
        for paradigm in paradigms:
            self.paradigm_rounds.labels(paradigm).inc()
        if len(paradigms) > 1:
            self.mixed_rounds.inc()

    def count_response(self, status: int) -> None:
        self.responses.labels(str(status)).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
