"""A fair FIFO queue in front of the continuous-batching engine, served by one engine thread.

The engine thread (a thread of its own, or the caller of :meth:`Scheduler.run`) owns one
:class:`~whiflash_sgl.engine.SpeculativeEngine` and runs a batch loop. At every round boundary it

1. admits queued jobs in arrival order while the batch has room (``max_running`` requests running or waiting for
   KV in the engine): each job's ``start`` submits its request to the engine with the request's own sampling, seed
   and stop strings (an error there, such as a request that can never fit the KV budget, is that job's error), or,
   for a job with nothing to generate (prompt-only, logprob-only), does all of its work at once;
2. cancels the engine requests of jobs whose clients left (the engine frees their batch place and KV at the next
   round boundary);
3. runs one :meth:`~whiflash_sgl.engine.SpeculativeEngine.step`, a round for every admitted request, in which the
   engine streams each request's new text to its job;
4. finishes the jobs whose requests left the engine: ``finish`` turns the result into the job's value (scoring
   logprobs there, between rounds, since scoring borrows KV slots) and posts it.

An exception inside ``step`` does not end the thread: the jobs in that round fail with it (a 500), and a fresh
engine and KV pool go on with the requests that were still waiting. A job still in the queue whose client left
gives its place up at once.

Jobs talk to the asyncio side through events posted onto the event loop that created them:
``("text", piece)`` while streaming, then one of ``("done", value)``, ``("error", exception)`` or
``("cancelled", None)``.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from whiflash_sgl.engine import GenerationResult, Request, SpeculativeEngine

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests are waiting than the server accepts: an HTTP 503."""


class Job:
    """One request's engine work, both halves on the engine thread: ``start(job, engine)`` submits it to the engine
    and returns the engine's :class:`Request`, or does all the work itself and returns None; ``finish(job, result)``
    turns the engine's result (None after such a start) into the job's value."""

    def __init__(self, start: Callable[["Job", SpeculativeEngine], Request | None],
                 finish: Callable[["Job", GenerationResult | None], Any]):
        self.start, self.finish = start, finish
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()
        self.request: Request | None = None  # in the engine, from admission until it finishes
        self.created = time.perf_counter()
        self.started: float | None = None  # joined the running batch
        self.finished: float | None = None

    def cancel(self) -> None:
        self._cancelled.set()

    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def post(self, kind: str, value: Any = None) -> None:
        """From the engine thread: hand an event to the request's coroutine."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: the server is shutting down and nobody is listening
            pass

    def push_text(self, piece: str) -> None:
        self.post("text", piece)

    async def stream(self) -> AsyncIterator[tuple[str, Any]]:
        """The job's events up to and including the final one."""
        while True:
            kind, value = await self.events.get()
            yield kind, value
            if kind != "text":
                return

    async def result(self) -> Any:
        async for kind, value in self.stream():
            if kind == "done":
                return value
            if kind == "error":
                raise value
            if kind == "cancelled":
                raise asyncio.CancelledError("the job was cancelled")


def release_openmp_workers() -> None:
    """Hand back the calling thread's pool of OpenMP workers (libgomp's ``omp_pause_resource_all``), so that another
    thread's pool, the engine's, is the only one and its workers spin between parallel regions (:class:`Scheduler`).
    The caller gets a new pool the next time it runs a parallel region. Nothing happens off Linux or where torch's
    OpenMP runtime is not libgomp."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return
    mapped = {fields[5] for fields in (line.split(maxsplit=5) for line in maps.read_text().splitlines())
              if len(fields) == 6 and "/libgomp" in fields[5]}
    for libgomp in mapped:  # torch's own copy, and the system's where something else loaded it too
        ctypes.CDLL(libgomp).omp_pause_resource_all(1)  # omp_pause_soft


class Scheduler:
    """FIFO over :class:`Job` into the batch of an engine from ``make_engine``; ``start`` launches the engine thread,
    ``stop`` ends it at the next round boundary. ``on_step(requests)``, when given, is called on the engine thread
    after every round with the engine requests of the jobs in the batch.

    ``own_thread=False``: the batch loop runs on whichever thread calls :meth:`run`, and ``start`` launches nothing.
    A server process gives it the thread that loaded the model: libgomp keeps a pool of OpenMP workers per thread
    that ran a parallel region, and once the process's workers outnumber the CPUs it has them sleep, rather than
    spin, between regions, so an engine thread beside the loading thread's idle pool paid a wake-up at each of a
    forward's hundreds of regions (on 2 cores, vanilla at 8 requests: 136 tok/s on a second thread, 224 on the
    first). Where the engine does get a thread of its own, the thread that loaded the model hands its pool back
    first (:func:`release_openmp_workers`)."""

    def __init__(self, make_engine: Callable[[], SpeculativeEngine], max_waiting: int = 256,
                 on_step: Callable[[list[Request]], None] | None = None, own_thread: bool = True):
        self.make_engine, self.max_waiting, self.on_step = make_engine, max_waiting, on_step
        self.own_thread = own_thread
        self._queue: deque[Job] = deque()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._active: list[Job] = []  # engine thread only: jobs whose requests are in the engine
        self._running = 0  # published by the engine thread at every round boundary
        self._held = 0  # in the engine but not yet admitted into the running batch (waiting for KV)
        self._finishing = 0  # a job being finished (scoring logprobs) or done at start, between rounds
        self.engine: SpeculativeEngine | None = None

    @property
    def waiting(self) -> int:
        """Jobs submitted and not yet in the running batch: queued here, or in the engine waiting for KV."""
        with self._changed:
            self._drop_cancelled()
            return len(self._queue) + self._held

    @property
    def running(self) -> int:
        """Requests in the engine's running batch (prefilling or decoding), and one being scored between rounds."""
        return self._running + self._finishing

    def start(self) -> None:
        if self.own_thread and self._thread is None:
            self._closing = False
            self._thread = threading.Thread(target=self.run, name="whiflash-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel everything queued and running, then end the batch loop after the round under way (its own thread
        is joined; a caller's :meth:`run` returns)."""
        with self._changed:
            self._closing = True
            while self._queue:
                self._queue.popleft().post("cancelled")
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue all of ``jobs`` (one request's prompts, kept together) or, when they do not fit, none."""
        with self._changed:
            self._drop_cancelled()
            waiting = len(self._queue) + self._held
            if waiting + len(jobs) > self.max_waiting:
                raise QueueFull(f"{waiting} requests are already waiting (--max-queued-requests "
                                f"{self.max_waiting}); retry later")
            self._queue.extend(jobs)
            self._changed.notify()

    def _drop_cancelled(self) -> None:
        """Under the lock: forget the waiting jobs whose clients left."""
        if any(job.cancelled() for job in self._queue):
            kept = deque()
            for job in self._queue:
                if job.cancelled():
                    job.post("cancelled")
                else:
                    kept.append(job)
            self._queue = kept

    # ---- the engine thread ----------------------------------------------------------------------------------

    def run(self) -> None:
        """The batch loop, on the calling thread, until :meth:`stop`."""
        engine = self.engine = self.make_engine()
        while self._admit(engine):
            for job in self._active:
                if job.cancelled() and not job.request.cancelled:
                    engine.cancel(job.request)
            if engine.busy:
                try:
                    engine.step()
                except Exception as exc:  # a failed round must not take the engine thread down
                    engine = self._recover(engine, exc)
                else:
                    if self.on_step is not None:
                        self.on_step([job.request for job in self._active])
            self._collect(engine)
        self._shutdown(engine)

    def _admit(self, engine: SpeculativeEngine) -> bool:
        """Start queued jobs while the batch has room; wait while there is nothing to do. False: closing."""
        while True:
            with self._changed:
                self._drop_cancelled()
                if self._closing:
                    return False
                if not self._queue:
                    if self._active:
                        return True
                    self._changed.wait()
                    continue
                if len(engine.running) + len(engine.waiting) >= engine.max_running:
                    return True
                job = self._queue.popleft()
            self._start(job, engine)
            self._publish(engine)

    def _start(self, job: Job, engine: SpeculativeEngine) -> None:
        try:
            request = job.start(job, engine)
        except Exception as exc:  # a request the engine refuses (e.g. more KV than the pool holds)
            job.finished = time.perf_counter()
            job.post("error", exc)
            return
        if request is None:
            job.started = time.perf_counter()
            self._complete(job, None)
        else:
            job.request = request
            self._active.append(job)

    def _collect(self, engine: SpeculativeEngine) -> None:
        """Between rounds: note the jobs that joined the running batch, finish those whose requests left it."""
        now = time.perf_counter()
        for job in list(self._active):
            request = job.request
            if job.started is None and (request.state is not None or request.result is not None):
                job.started = now
            if request.result is not None:
                self._active.remove(job)
                self._complete(job, request.result)
        self._publish(engine)

    def _complete(self, job: Job, result: GenerationResult | None) -> None:
        self._finishing = 1
        try:
            value = job.finish(job, result)
        except Exception as exc:  # one bad request must not take the engine thread down
            job.finished = time.perf_counter()
            job.post("error", exc)
        else:
            job.finished = time.perf_counter()
            job.post("cancelled" if job.cancelled() else "done", value)
        finally:
            self._finishing = 0

    def _publish(self, engine: SpeculativeEngine) -> None:
        with self._changed:
            self._running, self._held = len(engine.running), len(engine.waiting)

    def _recover(self, engine: SpeculativeEngine, exc: Exception) -> SpeculativeEngine:
        """``step`` raised: every request in the round fails with ``exc``; the requests still waiting for KV go on
        in a fresh engine, over a fresh KV pool (the failed round may have left rows it allocated behind)."""
        waiting = list(engine.waiting)
        failed = [job for job in self._active
                  if job.request.result is None and not any(job.request is r for r in waiting)]
        log.warning("an engine round failed (%s: %s); its %d request(s) fail, the engine starts afresh",
                    type(exc).__name__, exc, len(failed))
        now = time.perf_counter()
        for job in failed:
            self._active.remove(job)
            job.started = job.started or now
            job.finished = now
            job.post("error", exc)
        engine.target.reset_pool()  # no request holds KV any more
        fresh = self.engine = self.make_engine()
        fresh.waiting.extend(waiting)
        return fresh

    def _shutdown(self, engine: SpeculativeEngine) -> None:
        """Closing: cancel what the engine holds, free its KV with one more step, tell the clients."""
        for job in self._active:
            engine.cancel(job.request)
        try:
            engine.step()
        except Exception:  # the server is going away; the pool is rebuilt with the next engine anyway
            pass
        for job in self._active:
            job.finished = time.perf_counter()
            job.post("cancelled")
        self._active = []
        self._publish(engine)
