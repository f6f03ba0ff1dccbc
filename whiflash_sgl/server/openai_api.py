"""OpenAI-compatible ``/v1/completions``, ``/v1/chat/completions`` (both streaming too) and ``/v1/models``.

Defaults are OpenAI's: temperature 1, ``max_tokens`` 16 for completions and the rest of the context window for chat.
Chat messages go through the model's own chat template, exactly as ``whiflash generate`` applies it. The ``model``
field must name the served model (its ``--served-model-name``, its path, or ``default``).
"""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from whiflash_sgl.server.http import HttpError
from whiflash_sgl.server.model import GenerationParams, generation_params
from whiflash_sgl.server.native import SSE_DONE, SSE_HEADERS, sse, sse_error
from whiflash_sgl.server.schemas import COMPLETIONS_DEFAULT_MAX_TOKENS, ChatCompletionBody, CompletionBody, parse
from whiflash_sgl.server.service import Outcome, PromptRequest, Service


class ModelNotFound(HttpError):
    """The request names another model than the one served."""

    status = 404
    kind = "model_not_found"


def _finish_reason(outcome: Outcome) -> str:
    return "length" if outcome.result.finish_reason == "length" else "stop"


def _usage(outcomes: list[Outcome]) -> dict:
    prompt = sum(o.result.prompt_tokens for o in outcomes)
    completion = sum(len(o.result.tokens) for o in outcomes)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def router(service: Service) -> APIRouter:
    api = APIRouter()
    model = service.model

    def check_model(name: str) -> None:
        if name not in (model.served_name, model.model_path, "default"):
            raise ModelNotFound(f"the model {name!r} does not exist here; this server serves {model.served_name!r}")

    def params(body, max_tokens: int) -> GenerationParams:
        return generation_params(max_tokens, body.temperature, body.top_p, body.top_k, body.stop, body.seed)

    @api.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": model.served_name, "object": "model", "created": int(service.started), "owned_by": "whiflash-sgl",
            "root": model.model_path, "max_model_len": model.context_length,
        }]}

    def prepare_completion(raw: bytes) -> tuple[CompletionBody, list[PromptRequest]]:
        body = parse(CompletionBody, raw)
        check_model(body.model)
        budget = COMPLETIONS_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        texts = body.prompts()
        service.check_batch(len(texts))
        prompts = []
        for prompt in texts:
            ids = service.encode_text(prompt) if isinstance(prompt, str) else list(prompt)
            prompts.append(service.prompt_request(ids, params(body, budget)))
        return body, prompts

    def prepare_chat(raw: bytes) -> tuple[ChatCompletionBody, PromptRequest]:
        body = parse(ChatCompletionBody, raw)
        check_model(body.model)
        ids = service.encode_chat([m.as_template_message() for m in body.messages])
        budget = body.token_budget
        if budget is None:  # OpenAI's default: as much as the context window leaves
            budget = max(model.context_length - len(ids), 0)
        return body, service.prompt_request(ids, params(body, budget))

    @api.post("/v1/completions")
    async def completions(request: Request):
        body, prompts = await service.prepare(prepare_completion, await request.body())
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.model}
        if body.stream:
            return _stream(service, prompts[0], head, body, request, chat=False)
        outcomes = await service.complete(request, prompts)
        choices = [{"index": i, "text": o.result.text, "logprobs": None, "finish_reason": _finish_reason(o),
                    "matched_stop": o.matched_stop} for i, o in enumerate(outcomes)]
        return JSONResponse({**head, "choices": choices, "usage": _usage(outcomes)})

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body, prompt = await service.prepare(prepare_chat, await request.body())
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": body.model}
        if body.stream:
            return _stream(service, prompt, {**head, "object": "chat.completion.chunk"}, body, request, chat=True)
        (outcome,) = await service.complete(request, [prompt])
        choice = {"index": 0, "message": {"role": "assistant", "content": outcome.result.text}, "logprobs": None,
                  "finish_reason": _finish_reason(outcome), "matched_stop": outcome.matched_stop}
        return JSONResponse({**head, "choices": [choice], "usage": _usage([outcome])})

    return api


def _stream(service: Service, prompt: PromptRequest, head: dict, body, request: Request,
            chat: bool) -> StreamingResponse:
    job = service.submit_stream(prompt)
    include_usage = body.stream_options is not None and body.stream_options.include_usage

    def chunk(piece: str | None, finish: str | None = None) -> str:
        if chat:
            delta = {} if piece is None else {"content": piece}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
        return sse({**head, "choices": [choice]})

    async def events():
        try:
            if chat:
                yield sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}]})
            async for kind, value in service.stream(prompt, job):
                if kind == "text":
                    yield chunk(value)
                else:
                    yield chunk(None, _finish_reason(value))
                    if include_usage:
                        yield sse({**head, "choices": [], "usage": _usage([value])})
        except Exception as exc:  # the status line is gone: report in the stream
            yield sse_error(exc, request)
        yield SSE_DONE

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)
