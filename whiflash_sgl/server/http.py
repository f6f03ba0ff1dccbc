"""The HTTP layer in front of both APIs: size limits, read deadlines, half-closed clients, and one account of every
response (a request id, its status counted in ``/metrics``, one log line for each failure).

Two pieces. :class:`Guard` wraps the ASGI application: it refuses a body over the cap from its ``Content-Length``
(413, before reading a byte) or as it streams in, gives the body a read deadline (408), counts every response by
status, logs one line per failed request (a traceback only for a server fault) and answers an unexpected exception
with a generic 500 naming the request id. :class:`Connection` is uvicorn's h11 protocol with what uvicorn leaves
out: a request head over the cap is a 431 and an unparsable one a 400 in this server's JSON shape, followed by a
lingering close so that the client reads the answer instead of a reset; a head must arrive within the read deadline
(408) and an idle connection closes after the keep-alive timeout, the first request included; and a client that
shut its write side after a complete request still gets the response.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus

import h11
from fastapi.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from whiflash_sgl.errors import WhiFlashError

log = logging.getLogger("whiflash_sgl.server")

CLIENT_CLOSED = 499  # nginx's code for a client that left; nobody reads it
LINGER_SECONDS = 2.0  # after refusing a request mid-upload: how long its remaining bytes are read and dropped
PROBE_SECONDS = 0.5  # interim-response interval for a half-closed client's request (see Connection.eof_received)


@dataclass(frozen=True)
class HttpLimits:
    """What one request may take of the server (``launch`` sets them from flags). The service refuses prompts over
    ``max_prompt_chars``; the HTTP layer enforces the rest."""

    max_request_bytes: int = 4 * 2**20  # a body; JSON of a full-context prompt is far smaller
    max_prompt_chars: int = 1_000_000  # one prompt (chat: all messages): ~300K tokens, about 2 s to tokenize
    max_header_bytes: int = 32 * 2**10  # request line and headers together
    timeout_keep_alive: float = 5.0  # idle connection, before its first request and between requests
    timeout_read: float = 30.0  # to send a request head once begun, and again to send its body

    def check(self) -> None:
        for name, value in vars(self).items():
            if not value > 0:
                raise WhiFlashError(f"--{name.replace('_', '-')} must be positive, got {value}")

    def uvicorn_settings(self, count: Callable[[int], None]) -> dict:
        """Keyword arguments for ``uvicorn.Config``/``uvicorn.run``; ``count(status)`` is called for each response
        the connection answers itself (malformed or oversized heads, read timeouts)."""
        return {"http": functools.partial(Connection, limits=self, count=count),
                "h11_max_incomplete_event_size": self.max_header_bytes,
                "timeout_keep_alive": self.timeout_keep_alive}


# --- errors -------------------------------------------------------------------------------------------------------


class HttpError(WhiFlashError):
    """A client fault, answered with ``status`` and this message."""

    status = 400
    kind = "invalid_request_error"


class TooLarge(HttpError):
    status = 413
    kind = "request_too_large"


class ReadTimeout(HttpError):
    status = 408
    kind = "request_timeout"


def error_body(status: int, message: str, kind: str) -> dict:
    """Every error's shape (OpenAI's, which SGLang's clients read too)."""
    return {"error": {"message": message, "type": kind, "code": status}}


def error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse(error_body(status, message, kind), status_code=status)


def failure(exc: BaseException, request_id: str) -> tuple[int, str, str]:
    """``(status, message, kind)`` for an exception: a client fault keeps its message; anything else is a 500 whose
    message names only the request id (the log has the detail)."""
    if isinstance(exc, WhiFlashError):
        return getattr(exc, "status", 400), str(exc), getattr(exc, "kind", "invalid_request_error")
    return 500, f"internal error; the server log has the details under request id {request_id}", "internal_error"


def log_failure(request_id: str, what: str, status: int, message: str, exc: BaseException | None = None) -> None:
    """The one log line of a failed request; with the traceback only for a server fault."""
    level = {500: logging.ERROR, CLIENT_CLOSED: logging.INFO}.get(status, logging.WARNING)
    log.log(level, "request %s %s: %d %s", request_id, what, status, message, exc_info=exc)


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id(scope: dict) -> str:
    return scope["state"]["request_id"]


# --- the ASGI side ------------------------------------------------------------------------------------------------


class Guard:
    """ASGI wrapper: request ids, the body cap and deadline, response accounting, the last resort for exceptions.

    The request id is ``request.state.request_id`` and the ``X-Request-Id`` response header; a handler that answers
    a server fault puts the exception in ``request.state.exception`` for the log line."""

    def __init__(self, app, limits: HttpLimits, count: Callable[[int], None]):
        self.app, self.limits, self.count = app, limits, count

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = new_request_id()
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        what = f"{scope['method']} {scope['path']}"
        status = 0
        error_text = bytearray()

        async def send_(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                self.count(status)
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            elif message["type"] == "http.response.body" and status >= 400:
                error_text.extend(message.get("body", b"")[:4096 - len(error_text)])
                if not message.get("more_body", False):
                    log_failure(rid, what, status, _error_message(bytes(error_text), status),
                                state.get("exception"))
            await send(message)

        cap = self.limits.max_request_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and int(declared) > cap:  # h11 has checked that it is a number
            await error(TooLarge.status, _too_large(cap, int(declared)), TooLarge.kind)(scope, receive, send_)
            return

        deadline = time.monotonic() + self.limits.timeout_read
        received = 0
        body_done = False

        async def receive_():
            nonlocal received, body_done
            if body_done:  # afterwards the app only listens for a disconnect, as long as it likes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
            except asyncio.TimeoutError:
                raise ReadTimeout(f"the request body did not arrive within {self.limits.timeout_read:g} s "
                                  f"(--timeout-read)") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    raise TooLarge(_too_large(cap))
                body_done = not message.get("more_body", False)
            return message

        try:
            await self.app(scope, receive_, send_)
        except Exception as exc:  # noqa: BLE001 - the last resort: no exception leaves the server
            if state.get("exception") is exc:  # Starlette re-raises a fault its handler has answered (and logged)
                return
            if status:  # too late for a status: the client sees the response cut short
                log_failure(rid, what, 500, "failed after the response started", exc)
                return
            state["exception"] = exc
            code, message, kind = failure(exc, rid)
            await error(code, message, kind)(scope, receive, send_)


def _too_large(cap: int, size: int | None = None) -> str:
    """``size``: the declared size, if any (a streamed body is refused as soon as it passes the cap)."""
    return (f"the request body has {f'more than {cap}' if size is None else size} bytes; this server takes at most "
            f"{cap} (--max-request-bytes)")


def _error_message(body: bytes, status: int) -> str:
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return "the client disconnected" if status == CLIENT_CLOSED else body.decode("utf-8", "replace")


# --- the connection -----------------------------------------------------------------------------------------------


class _Parser(h11.Connection):
    """h11's server side; a request it cannot parse goes to ``reject`` (which answers it) and then reads as "need
    more data" to uvicorn, whose own answer would be a bare 400 followed by a reset."""

    def __init__(self, max_header_bytes: int, reject: Callable[[int, str], None]):
        super().__init__(h11.SERVER, max_incomplete_event_size=max_header_bytes)
        self.max_header_bytes, self.reject = max_header_bytes, reject

    def next_event(self):
        try:
            return super().next_event()
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            self.reject(status, f"the request head is over this server's limit of {self.max_header_bytes} bytes "
                                f"(--max-header-bytes)" if status == 431 else f"malformed HTTP request: {exc}")
            return h11.NEED_DATA


class Connection(H11Protocol):
    """uvicorn's h11 protocol with this server's limits (see the module docstring)."""

    def __init__(self, *args, limits: HttpLimits, count: Callable[[int], None], **kwargs):
        super().__init__(*args, **kwargs)
        self.limits, self.count = limits, count
        self.conn = _Parser(limits.max_header_bytes, self._reject)
        self._deadline: asyncio.TimerHandle | None = None  # bytes owed: a head begun, or a refused body's rest
        self._probe: asyncio.TimerHandle | None = None
        self._lingering = False

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def connection_lost(self, exc) -> None:
        super().connection_lost(exc)
        self._stop_timers()

    def data_received(self, data: bytes) -> None:
        if self._lingering:  # answered and closing: drop what the client still sends
            return
        super().data_received(data)
        self._watch_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_deadline()

    def eof_received(self) -> bool | None:
        """The client shut its write side. A complete request still gets its response (the connection closes after
        it); a half-sent one never will, and an idle connection is done: both close now, as uvicorn does.

        A client that shut only its write side still reads, but one that closed its socket answers the next write
        with a reset. So until the response starts, an interim ``100 Continue`` (which HTTP/1.1 clients skip) goes
        out every ``PROBE_SECONDS``: for a closed client the write after a reset fails, which ends the connection
        and cancels its request as any disconnect does."""
        cycle = self.cycle
        complete = self.conn.their_state in (h11.DONE, h11.MUST_CLOSE)
        if self._lingering or cycle is None or cycle.response_complete or not complete:
            return None
        cycle.keep_alive = False
        self._send_probe()
        return True

    def _send_probe(self) -> None:
        if self.transport.is_closing() or self.cycle.response_started:
            self._probe = None
            return
        self.transport.write(self.conn.send(h11.InformationalResponse(status_code=100, headers=[],
                                                                      reason=b"Continue")))
        self._probe = self.loop.call_later(PROBE_SECONDS, self._send_probe)

    def _watch_deadline(self) -> None:
        """Arm the read deadline while the client owes bytes that no handler is waiting for (a head it has begun,
        or the rest of a body refused before it was read); disarm it when it owes none."""
        state = self.conn.their_state
        owed = (bool(self.conn.trailing_data[0]) if state is h11.IDLE else
                state is h11.SEND_BODY and (self.cycle is None or self.cycle.response_complete))
        if owed and self._deadline is None:
            self._deadline = self.loop.call_later(self.limits.timeout_read, self._read_timeout)
        elif not owed and self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _read_timeout(self) -> None:
        self._deadline = None
        if self.conn.their_state is h11.IDLE:
            self._reject(408, f"the request head did not arrive within {self.limits.timeout_read:g} s "
                              f"(--timeout-read)")
        else:  # the rest of a body already answered: nobody waits for it
            self.transport.close()

    def _reject(self, status: int, message: str) -> None:
        """Answer a request the application never saw, then close without a reset: our side is shut at once, what
        the client still sends is read and dropped until it closes or ``LINGER_SECONDS`` pass."""
        if self._lingering:
            return
        self._lingering = True
        self._stop_timers()
        if self.cycle is not None and not self.cycle.response_complete:  # a body broke off: its handler is done
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        rid = new_request_id()
        self.count(status)
        log_failure(rid, "(connection)", status, message)
        phrase = HTTPStatus(status).phrase
        kind = "invalid_request_error" if status == 400 else phrase.lower().replace(" ", "_")
        body = json.dumps(error_body(status, message, kind)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close"), (b"x-request-id", rid.encode())]
        response = h11.Response(status_code=status, headers=headers, reason=phrase.encode())
        try:
            self.transport.write(self.conn.send(response) + self.conn.send(h11.Data(data=body))
                                 + self.conn.send(h11.EndOfMessage()))
        except h11.LocalProtocolError:  # a response was under way (the next, pipelined request is garbled)
            self.transport.close()
            return
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_SECONDS, self.transport.close)

    def _stop_timers(self) -> None:
        self._unset_keepalive_if_required()
        for handle in (self._deadline, self._probe):
            if handle is not None:
                handle.cancel()
        self._deadline = self._probe = None
