"""``whiflash bench --endpoint``: the bench on running servers, through SGLang's native ``POST /generate``.

Each method label names one server (the embedded ``python -m whiflash_sgl.launch_server`` or SGLang's own). Prompts
are tokenized here with the target's chat template, exactly as the reference bench tokenizes them, and sent as
``input_ids``; methods run interleaved per prompt after one warm-up request each, and the rows and table are the
reference bench's (:func:`whiflash_sgl.bench.make_report`). ``seconds`` is the client's wall time per request;
``tau`` and ``rounds`` come from ``meta_info.spec_verify_ct`` (a server that does not speculate reports none: one
round per token). Drafting and verify times are not visible over HTTP and stay ``null``.
"""

from __future__ import annotations

from collections import Counter

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from whiflash_sgl.bench import interleave, make_report, switches
from whiflash_sgl.chat import ChatPrompt, encode_chat
from whiflash_sgl.errors import WhiFlashError
from whiflash_sgl.model_store import DEFAULT_MODEL, resolve_model
from whiflash_sgl.sampling import SamplingParams

REQUEST_TIMEOUT_S = 600.0
START_HINT = "start it first (python -m whiflash_sgl.launch_server --port PORT, or python -m sglang.launch_server)"
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # a proxy would distort the timings


@dataclass(frozen=True)
class Endpoint:
    method: str
    url: str


@dataclass
class EndpointRun:
    """One method's answer to one prompt, with the fields :func:`whiflash_sgl.bench.summarize` reads."""

    method: str
    prompt_id: str
    category: str
    new_tokens: int
    seconds: float  # client wall time of the request
    server_seconds: float | None  # meta_info.e2e_latency
    rounds: int
    tau: float
    identical_to_vanilla: bool | None
    paradigm_rounds: dict[str, int]
    switches: int | None
    switch_seconds: float | None
    text: str
    catchup_seconds: None = None  # not reported over HTTP
    draft_seconds: None = None
    verify_seconds: None = None


def parse_endpoints(values: list[str], methods: list[str] | None) -> list[Endpoint]:
    """``--endpoint`` values, each ``METHOD=URL`` or a plain URL; plain URLs take ``methods`` in order. With labels,
    ``methods`` (if given) picks the order and must name exactly the labelled methods."""
    labelled = [_split_label(v) for v in values]
    if all(label is None for label, _ in labelled):
        if not methods or len(methods) != len(values):
            raise WhiFlashError(f"{len(values)} plain --endpoint URL(s) need --methods with as many names, one per "
                                f"URL in order (or give each as METHOD=URL)")
        endpoints = [Endpoint(m, url) for m, (_, url) in zip(methods, labelled)]
    elif any(label is None for label, _ in labelled):
        raise WhiFlashError("give every --endpoint as METHOD=URL, or every one as a plain URL with --methods")
    else:
        endpoints = [Endpoint(label, url) for label, url in labelled]
    names = [e.method for e in endpoints]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise WhiFlashError(f"method label {', '.join(twice)} is given to more than one --endpoint; each label names "
                            f"one server")
    if methods and set(methods) != set(names):
        raise WhiFlashError(f"--methods {','.join(methods)} must name the --endpoint labels {','.join(names)}")
    order = methods or names
    return sorted(endpoints, key=lambda e: order.index(e.method))


def _split_label(value: str) -> tuple[str | None, str]:
    """``(label, url)`` of ``METHOD=URL``; ``(None, url)`` of a plain URL."""
    label, sep, url = value.partition("=")
    if not sep or "://" in label:
        label, url = None, value
    elif not label.strip():
        raise WhiFlashError(f"--endpoint {value!r} has an empty method label")
    if not url.startswith(("http://", "https://")):
        raise WhiFlashError(f"--endpoint {value!r}: expected http://HOST:PORT or METHOD=http://HOST:PORT")
    return (label.strip() if label else None), url.rstrip("/")


def call(endpoint: Endpoint, path: str, body: dict | None = None) -> dict:
    """GET (or POST ``body`` as JSON to) ``path`` on the endpoint's server and return its JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(endpoint.url + path, data=data, headers={"Content-Type": "application/json"})
    where = f"{endpoint.method}'s server at {endpoint.url}"
    try:
        with _DIRECT.open(request, timeout=REQUEST_TIMEOUT_S) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        excerpt = exc.read().decode(errors="replace").strip().replace("\n", " ")[:300]
        raise WhiFlashError(f"{where} answered HTTP {exc.code} to {'POST' if data else 'GET'} {path}: "
                            f"{excerpt}") from exc
    except TimeoutError as exc:  # connected, but no answer in time (a refused connect is a URLError)
        raise WhiFlashError(f"{where} did not answer {path} within {REQUEST_TIMEOUT_S:.0f} s") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise WhiFlashError(f"cannot reach {where} ({reason}): {START_HINT}") from exc
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise WhiFlashError(f"{where} answered {path} with something that is not JSON: {raw[:200]!r}") from exc


def model_info(endpoint: Endpoint) -> dict:
    """SGLang's ``/model_info`` (``/get_model_info`` on servers older than it)."""
    try:
        return call(endpoint, "/model_info")
    except WhiFlashError as exc:
        if "HTTP 404" not in str(exc):
            raise
        return call(endpoint, "/get_model_info")


def served_model(endpoints: list[Endpoint], model: str | None = None) -> tuple[str, str]:
    """``(model path, tokenizer path)`` that every endpoint serves, or ``(model, model)`` when the caller names it.
    Each endpoint is asked either way, so an unreachable one fails here, before anything is loaded."""
    infos = {e.method: model_info(e) for e in endpoints}
    if model:
        return model, model
    paths = {m: info.get("model_path") for m, info in infos.items()}
    if None in paths.values():
        raise WhiFlashError(f"the servers' /model_info names no model_path ({paths}): pass --model PATH")
    if len(set(paths.values())) > 1:
        raise WhiFlashError(f"the servers serve different models ({paths}); bench one target, or pass --model PATH "
                            f"when they are the same model under different names")
    info = next(iter(infos.values()))
    return info["model_path"], info.get("tokenizer_path") or info["model_path"]


def load_tokenizer(name_or_path: str):
    """The target's tokenizer: a local folder, the embedded default, or a hub id already in the local cache."""
    from transformers import AutoTokenizer

    local = name_or_path == DEFAULT_MODEL or Path(name_or_path).expanduser().is_dir()
    try:
        return AutoTokenizer.from_pretrained(resolve_model(name_or_path) if local else name_or_path)
    except (OSError, ValueError) as exc:
        raise WhiFlashError(f"cannot load the tokenizer of {name_or_path} here ({exc}); pass --model with a local "
                            f"folder of the served model") from exc


def sampling_body(max_new_tokens: int, sampling: SamplingParams, seed: int) -> dict:
    """SGLang ``sampling_params`` for the reference bench's settings (top_k 0 = off is SGLang's -1); a sampled
    request carries its seed (SGLang uses it with ``--enable-deterministic-inference``, the embedded server always)."""
    body = {"temperature": sampling.temperature, "max_new_tokens": max_new_tokens, "top_p": sampling.top_p,
            "top_k": sampling.top_k or -1}
    if not sampling.greedy:
        body["sampling_seed"] = seed
    return body


def generate(endpoint: Endpoint, ids: list[int], sampling_params: dict) -> tuple[dict, float]:
    """One ``/generate`` request: the response and its wall seconds."""
    start = time.perf_counter()
    response = call(endpoint, "/generate", {"input_ids": ids, "sampling_params": sampling_params,
                                           "return_logprob": False, "stream": False})
    return response, time.perf_counter() - start


def endpoint_run(method: str, prompt: ChatPrompt, response: dict, seconds: float) -> tuple[list[int], EndpointRun]:
    """The output ids and the run record of a ``/generate`` response."""
    if "output_ids" not in response:
        raise WhiFlashError(f"{method}'s server returned no output_ids: it must answer /generate as SGLang does")
    tokens = list(response["output_ids"])
    meta = response.get("meta_info") or {}
    new_tokens = meta.get("completion_tokens", len(tokens))
    verify_passes = meta.get("spec_verify_ct") or 0
    speculative = verify_passes > 0
    rounds = verify_passes if speculative else new_tokens
    paradigms = meta.get("spec_paradigms")  # WHIFLASH inside SGLang: the paradigm of every verify round
    return tokens, EndpointRun(
        method, prompt.id, prompt.category, new_tokens, seconds, meta.get("e2e_latency"), rounds,
        new_tokens / rounds if speculative else 1.0, None,
        meta.get("spec_paradigm_rounds") or (dict(Counter(paradigms)) if paradigms else {method: rounds}),
        meta.get("spec_switches", switches(paradigms) if paradigms else None if speculative else 0),
        meta.get("spec_switch_seconds", None if speculative else 0.0),
        response.get("text", ""),
    )


def run_endpoint_bench(
    endpoints: list[Endpoint],
    prompts: list[ChatPrompt],
    max_new_tokens: int,
    sampling: SamplingParams = SamplingParams(),
    seed: int = 0,
    model: str | None = None,
    progress: bool = True,
) -> dict:
    """The bench report of ``endpoints`` on ``prompts``; ``model`` (a folder or hub id) overrides the tokenizer the
    servers name. Sampled requests carry ``sampling_seed`` = ``seed`` + the prompt's index, as the reference bench
    seeds them."""
    if not prompts:
        raise WhiFlashError("no prompts to run")
    served, tokenizer_path = served_model(endpoints, model)
    tokenizer = load_tokenizer(tokenizer_path)
    encoded = [(p, encode_chat(tokenizer, p.messages)) for p in prompts]
    by_method = {e.method: e for e in endpoints}
    for endpoint in endpoints:  # warm-up
        generate(endpoint, encoded[0][1], sampling_body(8, sampling, seed))

    def run_one(method: str, index: int, prompt: ChatPrompt, ids: list[int]) -> tuple[list[int], EndpointRun]:
        params = sampling_body(max_new_tokens, sampling, seed + index)
        return endpoint_run(method, prompt, *generate(by_method[method], ids, params))

    methods = [e.method for e in endpoints]
    runs = interleave(encoded, methods, run_one, lambda _: sampling.greedy, progress=progress)
    urls = ", ".join(f"{e.method}={e.url}" for e in endpoints)
    return make_report(served, f"endpoint {urls}", max_new_tokens, sampling, seed, methods, runs,
                       endpoints={e.method: e.url for e in endpoints})
