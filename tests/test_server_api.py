"""The embedded server over HTTP (loopback, a tiny WhiFlash model): SGLang's native API, streaming, concurrency,
bad input, client disconnects and /metrics."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch
from prometheus_client.parser import text_string_to_metric_families

from whiflash_sgl.chat import encode_chat
from whiflash_sgl.engine import SpeculativeEngine
from whiflash_sgl.target import Target

PROMPT = "def add(a, b):"


def post(server, path: str, body, **kwargs) -> requests.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(server.url + path, data=data, headers={"Content-Type": "application/json"}, timeout=60,
                         **kwargs)


def generate(server, text=PROMPT, **sampling) -> dict:
    response = post(server, "/generate", {"text": text, "sampling_params": {"temperature": 0, **sampling}})
    assert response.status_code == 200, response.text
    return response.json()


def sse_events(response: requests.Response) -> list[dict]:
    """The JSON payloads of a server-sent-event stream, which must end with ``data: [DONE]``."""
    lines = [line[len("data: "):] for line in response.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert lines and lines[-1] == "[DONE]", lines[-3:]
    return [json.loads(line) for line in lines[:-1]]


def metric_samples(server) -> dict:
    """``/metrics`` parsed by prometheus_client's own parser: {(name, labels): value}."""
    text = requests.get(server.url + "/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture(scope="module")
def target(served_dir):
    return Target.load(str(served_dir / "model"))


def test_generate_is_the_targets_greedy_output_with_sglang_meta_info(server, target):
    ids = target.tokenizer(PROMPT)["input_ids"]
    reference = SpeculativeEngine(target).generate(ids, 40)
    out = generate(server, max_new_tokens=40)
    assert out["output_ids"] == reference.tokens and out["text"] == reference.text
    meta = out["meta_info"]
    assert meta["prompt_tokens"] == len(ids) and meta["completion_tokens"] == 40
    assert meta["finish_reason"] == {"type": "length", "length": 40}
    assert meta["spec_accept_length"] == pytest.approx(40 / meta["spec_verify_ct"])
    assert sum(meta["spec_correct_drafts_histogram"]) == meta["spec_verify_ct"]
    rounds = meta["spec_paradigm_rounds"]
    assert set(rounds) <= {"eagle3", "dflash", "ngram"} and meta["spec_verify_ct"] - 1 <= sum(rounds.values())
    assert meta["spec_switches"] <= sum(rounds.values()) - 1
    by_ids = post(server, "/generate", {"input_ids": ids, "sampling_params": {"max_new_tokens": 40,
                                                                              "temperature": 0}}).json()
    assert by_ids["output_ids"] == out["output_ids"]


def test_a_seed_gives_one_text_and_it_is_vanilla_s(server, target):
    """The same seeded sampled request ten times through the routed, speculating server: one text, the reference
    engine's vanilla text for that seed; a seed differing only above bit 32 gives another text."""
    from whiflash_sgl.sampling import SamplingParams

    seed, ids = 2**40 + 3, target.tokenizer(PROMPT)["input_ids"]
    sampling = {"max_new_tokens": 32, "temperature": 0.8, "top_p": 0.9, "sampling_seed": seed}
    texts = {generate(server, **sampling)["text"] for _ in range(10)}
    reference = SpeculativeEngine(target, None, SamplingParams(0.8, 0.9), seed=seed).generate(ids, 32)
    assert texts == {reference.text}
    assert generate(server, **{**sampling, "sampling_seed": 3})["text"] != reference.text


def test_the_server_samples_by_the_rule_it_was_given(served_dir, target):
    """``--sampling-rule rejection`` reaches the engine: the routed server's sampled text then follows the drafts,
    not vanilla's keyed draw (the same seed, another text)."""
    from whiflash_sgl.sampling import SamplingParams
    from whiflash_sgl.server.model import GenerationParams, ServedModel

    model = ServedModel.load(str(served_dir / "model"), "WHIFLASH", "heuristic", str(served_dir / "whiflash.json"),
                             sampling_rule="rejection")
    ids, params = target.tokenizer(PROMPT)["input_ids"], SamplingParams(1.0)
    drawn = [model.generate(ids, GenerationParams(24, params, seed)).tokens for seed in range(4)]
    keyed = [SpeculativeEngine(target, None, params, seed=seed).generate(ids, 24).tokens for seed in range(4)]
    assert drawn != keyed


def assert_full_length_or_eos(output: dict, max_new_tokens: int, eos_ids) -> None:
    """A sampled answer runs to ``max_new_tokens`` unless it draws the end token first. Which sample a routed
    request draws depends on the router's latency-driven choices (see below), and one CI run drew it 18 tokens in."""
    ids = output["output_ids"]
    assert output["meta_info"]["completion_tokens"] == len(ids) <= max_new_tokens
    if len(ids) < max_new_tokens:
        assert ids[-1] in eos_ids
        assert output["meta_info"]["finish_reason"] == {"type": "stop", "matched": ids[-1]}


def test_generate_batches_stop_strings_and_sampling(server, target):
    texts = [PROMPT, "for i in range(10):", "The quick brown fox"]
    batch = post(server, "/generate", {"text": texts, "rid": ["a", "b", "c"], "sampling_params": [
        {"max_new_tokens": 16, "temperature": 0}, {"max_new_tokens": 8, "temperature": 0.8, "sampling_seed": 3},
        {"max_new_tokens": 12, "temperature": 0}]}).json()
    assert [o["meta_info"]["id"] for o in batch] == ["a", "b", "c"]
    assert [batch[0]["meta_info"]["completion_tokens"], batch[2]["meta_info"]["completion_tokens"]] == [16, 12]
    assert_full_length_or_eos(batch[1], 8, target.eos_token_ids)
    assert batch[0]["text"] == generate(server, max_new_tokens=16)["text"]
    full = generate(server, max_new_tokens=40)["text"]
    stop = full[10:13]
    cut = generate(server, max_new_tokens=40, stop=[stop])
    assert cut["text"] == full[:full.index(stop)]
    assert cut["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}


def test_streaming_equals_non_streaming(server, target):
    """Greedy, the streamed text is the whole text. A sampled request is an exact sample of the target, but under
    routing not always the same one: the acceptance rule draws per draft candidate and the router's choices use
    measured latencies (see the README); the stream must still add up."""
    for sampling in ({"temperature": 0}, {"temperature": 0.9, "sampling_seed": 11}):
        body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 30, **sampling}}
        whole = post(server, "/generate", body).json()
        with post(server, "/generate", {**body, "stream": True}, stream=True) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            events = sse_events(response)
        texts = [e["text"] for e in events]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # SGLang streams the text so far
        final = events[-1]
        assert_full_length_or_eos(final, 30, target.eos_token_ids)
        if sampling["temperature"] == 0:
            assert len(final["output_ids"]) == 30
            assert final["text"] == whole["text"] and final["output_ids"] == whole["output_ids"]
            assert final["meta_info"]["finish_reason"] == whole["meta_info"]["finish_reason"]
        assert all(e["meta_info"]["finish_reason"] is None for e in events[:-1])


def test_concurrent_requests_each_equal_their_solo_result(server):
    """Eight clients at once, chat and native, greedy (a routed sample is not one fixed sample: see above): each
    gets exactly what it got alone."""
    jobs = [("/generate", {"text": f"{PROMPT} {i}", "sampling_params": {"max_new_tokens": 12 + 3 * i,
                                                                       "temperature": 0}}) for i in range(5)]
    jobs += [("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": f"count {i}"}],
                                       "max_tokens": 10 + i, "temperature": 0}) for i in range(3)]

    def text(job):
        body = post(server, *job).json()
        return body["text"] if "text" in body else body["choices"][0]["message"]["content"]

    solo = [text(job) for job in jobs]
    barrier = threading.Barrier(len(jobs))

    def together(job):
        barrier.wait(timeout=30)
        return text(job)

    with ThreadPoolExecutor(len(jobs)) as pool:
        assert list(pool.map(together, jobs)) == solo


def test_logprobs_are_the_targets(server, target):
    """SGLang's logprob layout (first reported position without a logprob) with values from the target."""
    ids = target.tokenizer(PROMPT)["input_ids"]
    out = post(server, "/generate", {"input_ids": ids, "sampling_params": {"max_new_tokens": 4, "temperature": 0},
                                     "return_logprob": True, "logprob_start_len": 3, "top_logprobs_num": 2,
                                     "return_text_in_logprobs": True}).json()
    meta = out["meta_info"]
    sequence = ids + out["output_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(target.model(torch.tensor([sequence])).logits[0].float(), -1)
    inputs, outputs = meta["input_token_logprobs"], meta["output_token_logprobs"]
    assert [t for _, t, _ in inputs] == ids[3:] and [t for _, t, _ in outputs] == out["output_ids"]
    assert inputs[0][0] is None and meta["input_top_logprobs"][0] is None
    for position, (value, token, text) in enumerate(inputs[1:] + outputs, start=4):
        assert value == pytest.approx(logp[position - 1, token].item(), abs=1e-4)
        assert text == target.tokenizer.decode([token])
    for (value, token, _), top in zip(outputs, meta["output_top_logprobs"]):
        assert top[0][1] == token and top[0][0] == pytest.approx(value) and top[1][0] <= top[0][0]
    only_prompt = post(server, "/generate", {"text": PROMPT, "sampling_params": {"max_new_tokens": 0}}).json()
    assert only_prompt["text"] == "" and only_prompt["meta_info"]["prompt_tokens"] == len(ids)


BAD_REQUESTS = [
    ("/generate", b'{"text": "hi", "sampling_params": {', 400, "malformed JSON"),
    ("/generate", b"[1, 2]", 400, "valid dictionary"),
    ("/generate", {"text": "hi", "sampling_param": {}}, 400, "unknown field 'sampling_param'"),
    ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": "8"}}, 400, "max_new_tokens: Input should"),
    ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": -3}}, 400, "greater than or equal to 0"),
    ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 10**9}}, 400, "context window of 512"),
    ("/generate", {"text": "word " * 600}, 400, "exceed the model's context window of 512"),
    ("/generate", {"text": ""}, 400, "the prompt is empty"),
    ("/generate", {"input_ids": [1, 2, 100000]}, 400, "outside the vocabulary"),
    ("/generate", {"text": "hi", "input_ids": [1]}, 400, "exactly one of text and input_ids"),
    ("/generate", {"text": ["a", "b"], "rid": ["x"]}, 400, "rid has 1 entries for 2 prompt(s)"),
    ("/generate", {"text": "hi", "sampling_params": {"temperature": -1}}, 400, "temperature must be"),
    ("/generate", {"text": "hi", "sampling_params": {"top_p": 0}}, 400, "top_p must be"),
    ("/generate", {"text": "hi", "sampling_params": {"regex": "[a-z]+"}}, 400, "regex=\"[a-z]+\" is not supported"),
    ("/generate", {"text": "hi", "image_data": "x.png"}, 400, "image_data=\"x.png\" is not supported"),
    ("/generate", {"text": "hi", "return_logprob": True, "logprob_start_len": 50}, 400, "beyond the prompt"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "at least 1 item"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": 3}]}, 400, "content"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                              "max_tokens": 1.5}, 400, "max_tokens: Input should be a valid integer"),
    ("/v1/completions", {"model": "other", "prompt": "x"}, 404, "serves 'tiny'"),
    ("/v1/completions", {"prompt": "x"}, 400, "model: Field required"),
    ("/nowhere", {}, 404, "Not Found"),
]


@pytest.mark.parametrize("path, body, status, message", BAD_REQUESTS, ids=[str(i) for i in range(len(BAD_REQUESTS))])
def test_bad_input_is_a_4xx_with_a_message(server, path, body, status, message):
    response = post(server, path, body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]


def responses(server, status: int) -> float:
    return metric_samples(server).get(("whiflash_http_responses_total", (("status", str(status)),)), 0)


def test_the_server_survives_bad_input_and_counts_it(server):
    before = {status: responses(server, status) for status in (400, 404)}
    for path, body, *_ in BAD_REQUESTS:
        post(server, path, body)
    for status in before:
        assert responses(server, status) - before[status] == sum(s == status for *_, s, _ in BAD_REQUESTS)
    assert generate(server, max_new_tokens=5)["meta_info"]["completion_tokens"] == 5


@pytest.fixture
def slow_engine(server, monkeypatch):
    """Each engine round takes 100 ms longer, so a long request is still running when its client leaves: the tiny
    model's repetitive text is drafted well (τ up to ~8), so 400 tokens can take only some 50 rounds, which at 20 ms
    a round sometimes ended before the server noticed the disconnect."""
    step = SpeculativeEngine.step

    def slowly(engine):
        time.sleep(0.1)
        return step(engine)

    monkeypatch.setattr(SpeculativeEngine, "step", slowly)


def _aborted(server) -> float:
    return metric_samples(server).get(("whiflash_requests_total", (("finish_reason", "abort"),)), 0)


@pytest.mark.parametrize("stream", [True, False])
def test_a_disconnecting_client_frees_the_engine(server, slow_engine, stream):
    """A 400-token request (several seconds at 100 ms a round) whose client hangs up after 0.3 s is cancelled: the
    next request is served at once, the abort is counted, and the engine drops the request at its next round. The
    request is greedy: sampled without a seed (SGLang's default temperature is 1) it ended at an EOS within 25-60
    tokens for 1 seed in 5 or so, before the disconnect was noticed, and finished as "stop", not "abort"."""
    before = _aborted(server)
    body = json.dumps({"text": PROMPT, "stream": stream,
                       "sampling_params": {"max_new_tokens": 400, "temperature": 0}}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        if stream:
            assert conn.recv(1024).startswith(b"HTTP/1.1 200")
        time.sleep(0.3)
    tic = time.monotonic()
    assert generate(server, max_new_tokens=3)["meta_info"]["completion_tokens"] == 3
    assert time.monotonic() - tic < 4
    deadline = time.monotonic() + 5
    while _aborted(server) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _aborted(server) == before + 1
    deadline = time.monotonic() + 1  # uncancelled, the request would run for seconds yet
    while metric_samples(server)[("whiflash_running_requests", ())] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric_samples(server)[("whiflash_running_requests", ())] == 0


def test_metrics_parse_and_count_speculation(server):
    for i in range(3):
        generate(server, text=f"{PROMPT} {i}", max_new_tokens=20)
    samples = metric_samples(server)
    paradigms = {dict(labels)["paradigm"] for name, labels in samples
                 if name == "whiflash_spec_accept_length_count"}
    # "none": rounds the router drafted nothing for (it may, in a batch, when drafting does not pay); "eagle3:first":
    # EAGLE-3's first step alone, which a request in a batch drafts by default where it finds no lookup
    assert paradigms and paradigms <= {"eagle3", "eagle3:first", "dflash", "ngram", "none"}
    drafted = {dict(labels)["paradigm"] for name, labels in samples if name == "whiflash_paradigm_rounds_total"}
    assert drafted and drafted <= {"eagle3", "eagle3:first", "dflash", "ngram"}
    assert samples[("whiflash_batch_rounds_total", ())] >= max(
        samples[("whiflash_paradigm_rounds_total", (("paradigm", p),))] for p in drafted)
    assert samples[("whiflash_running_requests", ())] == samples[("whiflash_queued_requests", ())] == 0
    rounds = sum(samples[("whiflash_spec_accept_length_count", (("paradigm", p),))] for p in paradigms)
    committed = sum(samples[("whiflash_spec_accept_length_sum", (("paradigm", p),))] for p in paradigms)
    assert committed >= rounds > 0
    assert samples[("whiflash_request_latency_seconds_count", ())] >= 3
    assert samples[("whiflash_generation_tokens_total", ())] >= 60
    assert samples[("whiflash_spec_verify_total", ())] >= rounds
    assert 0 <= samples[("whiflash_spec_switch_overhead_ratio", ())] < 1
    assert ("whiflash_spec_switches_total", ()) in samples
    info = [labels for name, labels in samples if name == "whiflash_server_info"]
    assert dict(info[0])["speculative_algorithm"] == "WHIFLASH" and dict(info[0])["policy"] == "heuristic"


def test_info_endpoints(server, served_dir, target):
    model_info = requests.get(server.url + "/get_model_info", timeout=10).json()
    assert model_info["model_path"] == str(served_dir / "model") and model_info["is_generation"] is True
    info = requests.get(server.url + "/server_info", timeout=10).json()
    assert info["backend"] == "reference" and info["speculative_algorithm"] == "WHIFLASH"
    assert info["engine_method"] == "whiflash:heuristic" and info["context_length"] == 512
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    assert requests.get(server.url + "/health_generate", timeout=10).status_code == 200
    assert requests.post(server.url + "/flush_cache", timeout=10).status_code == 200
    models = requests.get(server.url + "/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    chat = post(server, "/v1/chat/completions", {"model": "default", "max_tokens": 6, "temperature": 0,
                                                 "messages": [{"role": "user", "content": PROMPT}]}).json()
    ids = encode_chat(target.tokenizer, [{"role": "user", "content": PROMPT}])
    assert chat["choices"][0]["message"]["content"] == SpeculativeEngine(target).generate(ids, 6).text


def test_the_engine_stops_at_the_round_after_cancel(target):
    ids = target.tokenizer(PROMPT)["input_ids"]
    asked = []

    def cancelled():
        asked.append(True)
        return len(asked) > 3

    result = SpeculativeEngine(target).generate(ids, 50, cancelled=cancelled)
    # asked before the prefill's step and two rounds: the prefill's token and one per round
    assert result.finish_reason == "abort" and result.rounds == 2 and len(result.tokens) == 3
    assert result.tokens == SpeculativeEngine(target).generate(ids, 3).tokens
