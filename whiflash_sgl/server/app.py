"""The ASGI application: both APIs, ``/metrics``, and one error shape for every failure.

Every error is ``{"error": {"message", "type", "code"}}`` (OpenAI's shape, which SGLang's clients read too): 400 for
bad input, 404 for an unknown model, 503 when the queue is full, 500 for a fault on the engine thread. A failure
in one request never stops the server.
"""

from __future__ import annotations

import contextlib
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from whiflash_sgl.errors import WhiFlashError
from whiflash_sgl.server import native, openai_api
from whiflash_sgl.server.metrics import CONTENT_TYPE
from whiflash_sgl.server.scheduler import QueueFull
from whiflash_sgl.server.service import ClientGone, Service

log = logging.getLogger("whiflash_sgl.server")

CLIENT_CLOSED = 499  # nginx's code for a client that left; nobody reads it


def error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def build_app(service: Service) -> FastAPI:
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

    @app.exception_handler(WhiFlashError)  # bad input, found by the schemas or by the model's checks
    async def bad_request(_request: Request, exc: WhiFlashError):
        service.metrics.refused.labels("400").inc()
        return error(400, str(exc), "invalid_request_error")

    @app.exception_handler(openai_api.ModelNotFound)
    async def model_not_found(_request: Request, exc: openai_api.ModelNotFound):
        service.metrics.refused.labels("404").inc()
        return error(404, str(exc), "model_not_found")

    @app.exception_handler(QueueFull)
    async def queue_full(_request: Request, exc: QueueFull):
        return error(503, str(exc), "server_busy")

    @app.exception_handler(ClientGone)
    async def client_gone(_request: Request, _exc: ClientGone):
        return Response(status_code=CLIENT_CLOSED)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def internal(_request: Request, exc: Exception):
        log.exception("request failed")
        return error(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error")

    return app
