"""The ASGI application: both APIs, ``/metrics``, and one error shape for every failure.

Every error is ``{"error": {"message", "type", "code"}}`` (OpenAI's shape, which SGLang's clients read too): 400 for
bad input, 404 for an unknown model or route, 408 for a request that did not arrive in time, 413 for a body, prompt
or batch over the server's limits, 431 for oversized headers, 503 when the queue is full, and 500, with only a
request id, for a fault on the server's side (its detail goes to the log under that id). A failure in one request
never stops the server. The application is wrapped in :class:`~whiflash_sgl.server.http.Guard`.
"""

from __future__ import annotations

import contextlib

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from whiflash_sgl.errors import WhiFlashError
from whiflash_sgl.server import native, openai_api
from whiflash_sgl.server.http import CLIENT_CLOSED, Guard, HttpLimits, error, failure, request_id
from whiflash_sgl.server.metrics import CONTENT_TYPE
from whiflash_sgl.server.scheduler import QueueFull
from whiflash_sgl.server.service import ClientGone, Service


def build_app(service: Service, limits: HttpLimits = HttpLimits()) -> Guard:
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        service.start()
        try:
            yield
        finally:
            service.stop()

    app = FastAPI(title="whiflash-sgl", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(native.router(service))
    app.include_router(openai_api.router(service))

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.exposition(), media_type=CONTENT_TYPE)

    @app.exception_handler(WhiFlashError)  # bad input, found by the schemas, the limits or the model's checks
    @app.exception_handler(Exception)  # a fault on our side: Starlette re-raises it afterwards, the Guard drops it
    async def failed(request: Request, exc: Exception):
        status, message, kind = failure(exc, request_id(request.scope))
        if status >= 500:
            request.state.exception = exc  # for the Guard's log line
        return error(status, message, kind)

    @app.exception_handler(QueueFull)
    async def queue_full(_request: Request, exc: QueueFull):
        return error(503, str(exc), "server_busy")

    @app.exception_handler(ClientGone)
    @app.exception_handler(ClientDisconnect)  # the client left while its body was being read
    async def client_gone(_request: Request, _exc: Exception):
        return Response(status_code=CLIENT_CLOSED)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail), "invalid_request_error")

    return Guard(app, limits, service.metrics.count_response)
