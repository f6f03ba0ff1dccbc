"""A fair FIFO queue in front of the single-sequence engine, served by one engine thread.

The reference engine holds one sequence's KV caches (target and drafters), so requests run one at a time, in
arrival order. A request waiting in the queue or running can be cancelled (its client left): a waiting one is
skipped, a running one stops at its next round, and the engine moves on to the next request.

Jobs talk to the asyncio side through events posted onto the event loop that created them:
``("text", piece)`` while streaming, then one of ``("done", value)``, ``("error", exception)`` or
``("cancelled", None)``.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

log = logging.getLogger("whiflash_sgl.server")


class QueueFull(Exception):
    """More requests are waiting than the server accepts: an HTTP 503."""


class Job:
    """One unit of engine work: ``work(job)`` runs on the engine thread and returns the result."""

    def __init__(self, work: Callable[["Job"], Any]):
        self.work = work
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()
        self.created = time.perf_counter()
        self.started: float | None = None
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


class Scheduler:
    """FIFO over :class:`Job`; ``start`` launches the engine thread, ``stop`` ends it after the running job."""

    def __init__(self, max_waiting: int = 256):
        self.max_waiting = max_waiting
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._closing = False
        self.running: Job | None = None

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="whiflash-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel the running job and everything queued, then end the thread."""
        if self._thread is not None:
            self._closing = True
            if (running := self.running) is not None:
                running.cancel()
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def submit(self, job: Job) -> None:
        if self._queue.qsize() >= self.max_waiting:
            raise QueueFull(f"{self._queue.qsize()} requests are already waiting (--max-queued-requests "
                            f"{self.max_waiting}); retry later")
        self._queue.put(job)

    def _serve(self) -> None:
        while (job := self._queue.get()) is not None:
            if job.cancelled() or self._closing:
                job.post("cancelled")
                continue
            self.running = job
            job.started = time.perf_counter()
            try:
                value = job.work(job)
            except Exception as exc:  # one bad request must not take the engine thread down
                log.exception("request failed on the engine thread")
                job.finished = time.perf_counter()
                job.post("error", exc)
            else:
                job.finished = time.perf_counter()
                job.post("cancelled" if job.cancelled() else "done", value)
            finally:
                self.running = None
