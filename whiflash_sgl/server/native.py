"""SGLang's native API: ``/generate`` (batches, streaming, logprobs), model and server info, health, cache flush.

Responses follow SGLang 0.5.23's shapes: ``{"text", "output_ids", "meta_info"}`` (a list of them for a batch);
a stream is server-sent events ``data: {...}`` whose ``text`` is the text so far, ending with ``data: [DONE]``.
"""

from __future__ import annotations

import json
from importlib.metadata import version

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from whiflash_sgl.server.http import error_body, failure, log_failure, request_id
from whiflash_sgl.server.model import GenerationParams, generation_params
from whiflash_sgl.server.schemas import (NATIVE_DEFAULT_MAX_NEW_TOKENS, BadRequest, GenerateBody, SamplingParamsBody,
                                         parse)
from whiflash_sgl.server.service import LogprobRequest, Outcome, PromptRequest, Service

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_error(exc: Exception, request: Request) -> str:
    """A failure after a stream's status line went out: logged, and told in the stream in the errors' shape."""
    rid = request_id(request.scope)
    status, message, kind = failure(exc, rid)
    log_failure(rid, f"{request.method} {request.url.path}", status, message, exc if status >= 500 else None)
    return sse(error_body(status, message, kind))


def _params(body: SamplingParamsBody | None) -> GenerationParams:
    body = body or SamplingParamsBody()
    max_new_tokens = NATIVE_DEFAULT_MAX_NEW_TOKENS if body.max_new_tokens is None else body.max_new_tokens
    return generation_params(max_new_tokens, body.temperature, body.top_p, body.top_k, body.stop, body.sampling_seed)


def _logprob_request(body: GenerateBody, index: int, prompt_len: int) -> LogprobRequest | None:
    if not body.item("return_logprob", index):
        return None
    start = body.item("logprob_start_len", index)
    if start is not None and start != -1 and start >= prompt_len:
        raise BadRequest(f"logprob_start_len={start} is beyond the prompt's {prompt_len} tokens: give -1 (output "
                         f"logprobs only) or a prompt position in [0, {prompt_len})")
    return LogprobRequest(start=prompt_len if start in (None, -1) else start,
                          top_n=body.item("top_logprobs_num", index) or 0,
                          with_text=body.return_text_in_logprobs)


def _triples(logprobs) -> list:
    return [list(entry) for entry in logprobs.tokens]


def _tops(logprobs) -> list:
    return [None if top is None else [list(entry) for entry in top] for top in logprobs.top]


def meta_info(outcome: Outcome) -> dict:
    result = outcome.result
    meta = {
        "id": outcome.request.rid,
        "finish_reason": outcome.finish_reason,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": len(result.tokens),
        "cached_tokens": 0,  # the reference engine has no prefix cache
        "e2e_latency": round(outcome.latency, 6),
        "queue_time": round(outcome.queue_wait, 6),
    }
    if outcome.stats is not None:
        meta.update(outcome.stats.meta_info())
    logprobs = outcome.request.logprobs
    if logprobs is not None:
        meta["input_token_logprobs"] = _triples(outcome.input_logprobs)
        meta["output_token_logprobs"] = _triples(outcome.output_logprobs)
        if logprobs.top_n:
            meta["input_top_logprobs"] = _tops(outcome.input_logprobs)
            meta["output_top_logprobs"] = _tops(outcome.output_logprobs)
    return meta


def response_object(outcome: Outcome) -> dict:
    return {"text": outcome.result.text, "output_ids": outcome.result.tokens, "meta_info": meta_info(outcome)}


def router(service: Service) -> APIRouter:
    api = APIRouter()
    model = service.model

    def prepare(raw: bytes) -> tuple[GenerateBody, list[PromptRequest]]:
        body = parse(GenerateBody, raw)
        texts = body.prompts()
        service.check_batch(len(texts))
        prompts: list[PromptRequest] = []
        for i, prompt in enumerate(texts):
            ids = service.encode_text(prompt) if isinstance(prompt, str) else list(prompt)
            prompts.append(service.prompt_request(ids, _params(body.item("sampling_params", i)),
                                                  body.item("rid", i), _logprob_request(body, i, len(ids))))
        return body, prompts

    @api.post("/generate")
    async def generate(request: Request):
        body, prompts = await service.prepare(prepare, await request.body())
        if body.stream:
            return _stream(service, prompts[0], request)
        outcomes = await service.complete(request, prompts)
        objects = [response_object(o) for o in outcomes]
        return JSONResponse(objects if body.batch_size is not None else objects[0])

    @api.get("/health")
    async def health():
        return Response(status_code=200)

    @api.get("/health_generate")
    async def health_generate(request: Request):
        """Generates one token through the queue, as SGLang's does."""
        ids = model.encode_text("Hi") or [0]
        await service.complete(request, [service.prompt_request(ids, GenerationParams(max_new_tokens=1))])
        return Response(status_code=200)

    @api.get("/model_info")
    @api.get("/get_model_info")
    async def model_info():
        return model.describe()

    @api.get("/server_info")
    @api.get("/get_server_info")
    async def server_info():
        accept = service.accept_lengths
        return {
            **model.describe(),
            "backend": "reference",
            "speculative_algorithm": model.algorithm or None,
            "whiflash_policy": model.policy or None,
            "engine_method": model.method.name,
            "max_queued_requests": service.scheduler.max_waiting,
            "max_running_requests": service.max_running,
            "version": version("whiflash-sgl"),
            "startup_time": service.started,
            "internal_states": [{
                "avg_spec_accept_length": sum(accept) / len(accept) if accept else None,
                "last_gen_throughput": service.last_throughput,
                "waiting_requests": service.scheduler.waiting,
                "running_requests": service.scheduler.running,
            }],
        }

    @api.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache():
        return PlainTextResponse("Cache flushed.\n(The reference engine keeps no prefix cache between requests: "
                                 "there was nothing to flush.)\n")

    return api


def _stream(service: Service, prompt: PromptRequest, request: Request) -> StreamingResponse:
    job = service.submit_stream(prompt)

    async def events():
        text = ""
        try:
            async for kind, value in service.stream(prompt, job):
                if kind == "text":
                    text += value
                    yield sse({"text": text, "output_ids": [], "meta_info": {
                        "id": prompt.rid, "finish_reason": None, "prompt_tokens": len(prompt.prompt_ids)}})
                else:
                    yield sse(response_object(value))
        except Exception as exc:  # the status line is gone: report in the stream
            yield sse_error(exc, request)
        yield SSE_DONE

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

