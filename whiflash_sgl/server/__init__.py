"""The embedded server: SGLang's HTTP API (native ``/generate`` and OpenAI-compatible routes) on the reference
engine, so SGLang frontend programs and OpenAI clients run WhiFlash where SGLang itself cannot (no GPU).

Modules, one job each: ``schemas`` (request validation), ``model`` (the served target and method, tokenization,
the batching engine, logprobs), ``scheduler`` (the FIFO queue and the engine thread's batch loop: continuous
batching of up to ``--max-running-requests`` requests), ``service`` (requests to jobs and back, client
disconnects), ``stats`` and ``metrics`` (speculation statistics, Prometheus), ``native`` and ``openai_api`` (the
two wire formats), ``app`` (the ASGI application and its errors), ``http`` (the HTTP layer: limits, timeouts,
half-closed clients, request ids, response accounting), ``launch`` (flags, foreground and background serving) and
``load`` (a load generator for throughput and latency at several concurrencies).
"""
