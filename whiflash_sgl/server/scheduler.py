"""A fair FIFO queue in front of the single-sequence engine, served by one engine thread.

The reference engine holds one sequence's KV caches (target and drafters), so requests run one at a time, in
arrival order. A request waiting in the queue or running can be cancelled (its client left): a waiting one leaves
the queue (its place is free for another request at once), a running one stops at its next round, and the engine
moves on to the next request.

Jobs talk to the asyncio side through events posted onto the event loop that created them:
``("text", piece)`` while streaming, then one of ``("done", value)``, ``("error", exception)`` or
``("cancelled", None)``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any


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
        self._queue: deque[Job] = deque()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self.running: Job | None = None

    @property
    def waiting(self) -> int:
        with self._changed:
            self._drop_cancelled()
            return len(self._queue)

    def start(self) -> None:
        if self._thread is None:
            self._closing = False
            self._thread = threading.Thread(target=self._serve, name="whiflash-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel the running job and everything queued, then end the thread."""
        if self._thread is not None:
            with self._changed:
                self._closing = True
                if (running := self.running) is not None:
                    running.cancel()
                while self._queue:
                    self._queue.popleft().post("cancelled")
                self._changed.notify_all()
            self._thread.join(timeout)
            self._thread = None

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue all of ``jobs`` (one request's prompts, kept together) or, when they do not fit, none."""
        with self._changed:
            self._drop_cancelled()
            if len(self._queue) + len(jobs) > self.max_waiting:
                raise QueueFull(f"{len(self._queue)} requests are already waiting (--max-queued-requests "
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

    def _next(self) -> Job | None:
        with self._changed:
            while True:
                self._drop_cancelled()
                if self._closing:
                    return None
                if self._queue:
                    self.running = job = self._queue.popleft()
                    return job
                self._changed.wait()

    def _serve(self) -> None:
        while (job := self._next()) is not None:
            job.started = time.perf_counter()
            try:
                value = job.work(job)
            except Exception as exc:  # one bad request must not take the engine thread down
                job.finished = time.perf_counter()
                job.post("error", exc)
            else:
                job.finished = time.perf_counter()
                job.post("cancelled" if job.cancelled() else "done", value)
            finally:
                self.running = None
