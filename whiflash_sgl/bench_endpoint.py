"""``whiflash bench --endpoint``: the bench on running servers, through SGLang's native ``POST /generate``.

Each method label names one server (the embedded ``python -m whiflash_sgl.launch_server`` or SGLang's own). Prompts
are tokenized here with the target's chat template, exactly as the reference bench tokenizes them, and sent as
``input_ids``; methods run interleaved per prompt after one warm-up request each, and the rows and table are the
reference bench's (:func:`whiflash_sgl.bench.make_report`). ``seconds`` is the client's wall time per request;
``tau`` and ``rounds`` come from ``meta_info.spec_verify_ct`` (a server that does not speculate reports none: one
round per token). Drafting and verify times are not visible over HTTP and stay ``null``.

With ``--concurrency`` (:func:`endpoint_load_bench`) each server gets, per level, a closed loop of that many
client threads sending streaming requests (the next prompt, in file order and cycled as
:func:`whiflash_sgl.bench.request_prompts` says, as soon as a thread's request ends), and
the rows are the engine's concurrency rows (:func:`whiflash_sgl.bench.load_rows`). TTFT and ITL come from the stream:
a commit is a server-sent event that brings new text (a later event without new text, such as the final one carrying
only EOS, adds its tokens to the previous commit); its token count is ``meta_info.completion_tokens`` where the
server sends it in every chunk (SGLang), else the fewest output tokens whose decoded text covers the text streamed so
far. Greedy outputs are compared with the ``vanilla`` server's at concurrency 1; the near-tie check reads that
server's top log-probabilities at the first differing position (``return_logprob``, ``top_logprobs_num``): the gap
between two log-probabilities is the gap between their logits.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from whiflash_sgl.bench import (TOP_SCORES, LoadLevel, LoadRun, interleave, load_levels, load_requests,
                                make_load_report, make_report, request_prompts, settings, start_log, switches)
from whiflash_sgl.bench_log import LevelLog
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


@contextlib.contextmanager
def _open(endpoint: Endpoint, path: str, body: dict | None = None):
    """The response of GET (or POST ``body`` as JSON to) ``path``; HTTP and network failures, while opening or
    reading it, become one-line errors naming the server."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(endpoint.url + path, data=data, headers={"Content-Type": "application/json"})
    where = _where(endpoint)
    try:
        with _DIRECT.open(request, timeout=REQUEST_TIMEOUT_S) as response:
            yield response
    except urllib.error.HTTPError as exc:
        excerpt = exc.read().decode(errors="replace").strip().replace("\n", " ")[:300]
        raise WhiFlashError(f"{where} answered HTTP {exc.code} to {'POST' if data else 'GET'} {path}: "
                            f"{excerpt}") from exc
    except TimeoutError as exc:  # connected, but no answer in time (a refused connect is a URLError)
        raise WhiFlashError(f"{where} did not answer {path} within {REQUEST_TIMEOUT_S:.0f} s") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise WhiFlashError(f"cannot reach {where} ({reason}): {START_HINT}") from exc


def _where(endpoint: Endpoint) -> str:
    return f"{endpoint.method}'s server at {endpoint.url}"


def _json(endpoint: Endpoint, path: str, raw: bytes | str):
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise WhiFlashError(f"{_where(endpoint)} answered {path} with something that is not JSON: "
                            f"{raw[:200]!r}") from exc


def call(endpoint: Endpoint, path: str, body: dict | None = None) -> dict:
    """GET (or POST ``body`` as JSON to) ``path`` on the endpoint's server and return its JSON answer."""
    with _open(endpoint, path, body) as response:
        raw = response.read()
    return _json(endpoint, path, raw)


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
    levels: Sequence[int] | None = None,
    log: LevelLog | None = None,
) -> dict:
    """The bench report of ``endpoints`` on ``prompts``; ``model`` (a folder or hub id) overrides the tokenizer the
    servers name. Sampled requests carry ``sampling_seed`` = ``seed`` + the prompt's index, as the reference bench
    seeds them. With concurrency ``levels``, the concurrency bench's report (:func:`endpoint_load_bench`, kept in
    ``log``)."""
    if not prompts:
        raise WhiFlashError("no prompts to run")
    served, tokenizer_path = served_model(endpoints, model)
    tokenizer = load_tokenizer(tokenizer_path)
    encoded = [(p, encode_chat(tokenizer, p.messages)) for p in prompts]
    by_method = {e.method: e for e in endpoints}
    for endpoint in endpoints:  # warm-up
        generate(endpoint, encoded[0][1], sampling_body(8, sampling, seed))
    urls = ", ".join(f"{e.method}={e.url}" for e in endpoints)
    head = settings(served, f"endpoint {urls}", max_new_tokens, sampling, seed,
                    endpoints={e.method: e.url for e in endpoints})
    if levels:
        return endpoint_load_bench(endpoints, encoded, levels, max_new_tokens, sampling, seed, tokenizer, head,
                                   progress, log)

    def run_one(method: str, index: int, prompt: ChatPrompt, ids: list[int]) -> tuple[list[int], EndpointRun]:
        params = sampling_body(max_new_tokens, sampling, seed + index)
        return endpoint_run(method, prompt, *generate(by_method[method], ids, params))

    methods = [e.method for e in endpoints]
    runs = interleave(encoded, methods, run_one, lambda _: sampling.greedy, progress=progress)
    return make_report(head, methods, runs)


# ---- load: closed-loop concurrency with streaming clients (``--concurrency``) ------------------------------------


def stream(endpoint: Endpoint, ids: list[int], sampling_params: dict) -> tuple[list[tuple[float, dict]], float]:
    """One streaming ``/generate``: every server-sent event's object with its seconds since the request went out,
    and the request's wall seconds."""
    body = {"input_ids": ids, "sampling_params": sampling_params, "return_logprob": False, "stream": True}
    events = []
    start = time.perf_counter()
    with _open(endpoint, "/generate", body) as response:
        for line in response:
            line = line.decode(errors="replace").strip()
            if not line.startswith("data:"):
                continue
            data = line.removeprefix("data:").strip()
            if data == "[DONE]":
                break
            event = _json(endpoint, "/generate", data)
            if "error" in event:
                error = event["error"]
                raise WhiFlashError(f"{_where(endpoint)} failed a streaming /generate: "
                                    f"{error.get('message', error) if isinstance(error, dict) else error}")
            events.append((time.perf_counter() - start, event))
    if not events:
        raise WhiFlashError(f"{_where(endpoint)} answered a streaming /generate with no events")
    return events, time.perf_counter() - start


def stream_tokens(events: list[tuple[float, dict]]) -> list[int]:
    """The output ids of a stream: the final event's, or every event's concatenated where the server streams them
    incrementally."""
    final = events[-1][1]
    tokens = list(final.get("output_ids") or [])
    total = (final.get("meta_info") or {}).get("completion_tokens", len(tokens))
    if len(tokens) != total:
        tokens = [t for _, event in events for t in event.get("output_ids") or []]
    return tokens


def stream_commits(events: list[tuple[float, dict]], tokens: list[int], tokenizer) -> tuple[list[float], list[int]]:
    """Commit times (since the request went out) and tokens per commit of a stream (see the module docstring)."""
    decoded: list[int] = []  # decoded[n]: length of the text of the first n tokens, computed as far as needed

    def covering(length: int) -> int:
        """The fewest tokens whose text is at least ``length`` characters long."""
        n = next((n for n, chars in enumerate(decoded) if chars >= length), None)
        while n is None and len(decoded) <= len(tokens):
            decoded.append(len(tokenizer.decode(tokens[: len(decoded)], skip_special_tokens=True)))
            n = len(decoded) - 1 if decoded[-1] >= length else None
        return len(tokens) if n is None else n

    times: list[float] = []
    counts: list[int] = []
    seen = shown = 0
    for seconds, event in events:
        text = event.get("text") or ""
        count = (event.get("meta_info") or {}).get("completion_tokens")
        count = min(len(tokens), max(seen, covering(len(text)) if count is None else count))
        if count == seen:
            continue
        if len(text) > shown or not times:
            times.append(seconds)
            counts.append(count - seen)
        else:
            counts[-1] += count - seen
        seen, shown = count, max(shown, len(text))
    if times and seen < len(tokens):
        counts[-1] += len(tokens) - seen
    return times, counts


def endpoint_load(endpoint: Endpoint, encoded: list[tuple[ChatPrompt, list[int]]], params, level: int, tokenizer,
                  bar=None) -> LoadLevel:
    """Closed loop: ``level`` client threads, each streaming the next of :func:`request_prompts` as soon as its
    request ends; ``params(i)`` is prompt ``i``'s ``sampling_params``."""
    runs: dict[int, LoadRun] = {}
    lock, failed = threading.Lock(), threading.Event()
    order = enumerate(request_prompts(len(encoded), level))

    def client() -> None:
        while not failed.is_set():
            with lock:
                j, i = next(order, (None, None))
            if j is None:
                return
            prompt, ids = encoded[i]
            start = time.perf_counter() - t0
            try:
                events, seconds = stream(endpoint, ids, params(i))
            except BaseException:
                failed.set()
                raise
            tokens = stream_tokens(events)
            _, run = endpoint_run(endpoint.method, prompt, {**events[-1][1], "output_ids": tokens}, seconds)
            times, counts = stream_commits(events, tokens, tokenizer)
            with lock:
                runs[j] = LoadRun(endpoint.method, level, i, prompt.id, prompt.category, run.new_tokens, start,
                                  start + seconds, times, counts, run.rounds, run.tau, run.paradigm_rounds,
                                  run.text, tokens)
                if bar is not None:
                    bar.update()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(level) as pool:
        clients = [pool.submit(client) for _ in range(level)]
    wall = time.perf_counter() - t0
    for future in clients:
        future.result()  # the first failure, raised here
    return LoadLevel([runs[i] for i in sorted(runs)], wall, None)


def endpoint_top_scores(endpoint: Endpoint):
    """The server's best log-probabilities of the next token after ``ids`` (one greedy token with logprobs)."""

    def top(ids: list[int]) -> dict[int, float]:
        response = call(endpoint, "/generate", {
            "input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": 1}, "return_logprob": True,
            "top_logprobs_num": TOP_SCORES, "stream": False})
        entries = ((response.get("meta_info") or {}).get("output_top_logprobs") or [None])[0]
        if not entries:
            raise WhiFlashError(f"{_where(endpoint)} returned no output_top_logprobs: the near-tie check needs "
                                f"them")
        return {int(entry[1]): float(entry[0]) for entry in entries}

    return top


def endpoint_load_bench(endpoints: list[Endpoint], encoded: list[tuple[ChatPrompt, list[int]]], levels: Sequence[int],
                        max_new_tokens: int, sampling: SamplingParams, seed: int, tokenizer, head: dict,
                        progress: bool, log: LevelLog | None = None) -> dict:
    """The concurrency bench on running servers: every endpoint at every level (:func:`endpoint_load`), each run
    kept in ``log`` and, when resuming, taken from it."""
    from tqdm import tqdm

    by_method = {e.method: e for e in endpoints}
    logged, requests = start_log(log, head, encoded, list(by_method), levels)
    bar = tqdm(total=load_requests(len(encoded), levels) * len(endpoints), desc="bench", disable=not progress,
               initial=requests)

    def params(i: int) -> dict:
        return sampling_body(max_new_tokens, sampling, seed + i)

    def run_level(method: str, level: int) -> LoadLevel:
        return endpoint_load(by_method[method], encoded, params, level, tokenizer, bar)

    def reference() -> list[list[int]]:
        return [list(generate(by_method["vanilla"], ids, params(i))[0]["output_ids"])
                for i, (_, ids) in enumerate(encoded)]

    vanilla = "vanilla" in by_method
    done = load_levels(list(by_method), levels, run_level, [ids for _, ids in encoded], lambda _: sampling.greedy,
                       reference if vanilla else None,
                       endpoint_top_scores(by_method["vanilla"]) if vanilla and sampling.greedy else None, logged,
                       log and log.add)
    bar.close()
    return make_load_report(head, levels, done)
