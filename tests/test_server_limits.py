"""The embedded server under hostile or careless input: every bad request is a prompt 4xx that names the problem,
nothing stalls the other clients, nothing leaks (queue places, engine time, internals), and the HTTP layer has
limits and timeouts. The server here has small limits so that each one is quick to reach."""

from __future__ import annotations

import json
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from whiflash_sgl.engine import SpeculativeEngine
from whiflash_sgl.server.http import HttpLimits
from whiflash_sgl.server.schemas import MAX_TOP_LOGPROBS

PROMPT = "def add(a, b):"
MAX_WAITING = 4
MAX_PROMPT_CHARS = 20_000
LIMITS = HttpLimits(max_request_bytes=4 * 2**20, max_prompt_chars=MAX_PROMPT_CHARS, max_header_bytes=16 * 2**10,
                    timeout_keep_alive=1.0, timeout_read=2.0)


@pytest.fixture(scope="module")
def limited(served_dir):
    """The embedded server (no speculation) with a batch of one (so that requests queue), a 4-place queue,
    20,000-character prompts and short timeouts."""
    from whiflash_sgl.server.launch import start_background
    from whiflash_sgl.server.model import ServedModel
    from whiflash_sgl.server.service import Service

    model = ServedModel.load(str(served_dir / "model"), None, served_name="tiny")
    running = start_background(Service(model, MAX_WAITING, LIMITS.max_prompt_chars, max_running=1), limits=LIMITS)
    yield running
    running.stop()


def post(server, path: str, body, headers: dict | None = None, **kwargs) -> requests.Response:
    data = body if isinstance(body, (bytes, str)) or body is None or hasattr(body, "__next__") else json.dumps(body)
    return requests.post(server.url + path, data=data, timeout=60,
                         headers={"Content-Type": "application/json", **(headers or {})}, **kwargs)


def generate_body(max_new_tokens: int = 8, **fields) -> dict:
    return {"text": PROMPT, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0}, **fields}


def address(server) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


def http_request(path: str, body: bytes) -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (path.encode(), len(body), body))


def read_all(conn: socket.socket, timeout: float = 30) -> bytes:
    conn.settimeout(timeout)
    chunks = []
    while chunk := conn.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def final_response(raw: bytes) -> tuple[int, dict]:
    """Status and JSON body of the last response in ``raw``, past any interim 1xx responses."""
    while raw.startswith(b"HTTP/1.1 1"):
        raw = raw.split(b"\r\n\r\n", 1)[1]
    head, body = raw.split(b"\r\n\r\n", 1)
    return int(head.split(b" ")[1]), json.loads(body)


def responses(server) -> dict[str, float]:
    """``whiflash_http_responses_total`` by status, from one read of ``/metrics``."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(server.url + "/metrics", timeout=10).text
    return {s.labels["status"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "whiflash_http_responses_total"}


@pytest.fixture
def slow_engine(limited, monkeypatch):
    """Each engine round, and each scored logprob position, takes 20 ms longer; ``calls`` counts both."""
    model = limited.service.model
    calls = {"rounds": 0, "positions": 0}

    def slowed(cancelled, kind):
        def check():
            calls[kind] += 1
            time.sleep(0.02)
            return cancelled()
        return check

    step, logprobs_ = SpeculativeEngine.step, model.logprobs
    slow_round = slowed(lambda: False, "rounds")
    monkeypatch.setattr(SpeculativeEngine, "step", lambda engine: slow_round() or step(engine))
    monkeypatch.setattr(model, "logprobs", lambda *a: logprobs_(*a[:-1], slowed(a[-1], "positions")))
    return calls


@pytest.fixture
def server_log(caplog):
    """Every record of the server, uvicorn's own included (its loggers do not propagate to pytest's handler)."""
    uvicorn_log = logging.getLogger("uvicorn")
    uvicorn_log.addHandler(caplog.handler)
    caplog.set_level(logging.INFO)
    yield caplog
    uvicorn_log.removeHandler(caplog.handler)


# --- 1. size limits, tokenization off the event loop ---------------------------------------------------------------


def test_a_huge_body_is_refused_before_it_is_read(limited):
    huge = b'{"text": "' + b"a" * 50_000_000 + b'"}'
    tic = time.monotonic()
    response = post(limited, "/generate", huge)
    assert response.status_code == 413 and time.monotonic() - tic < 5
    assert "at most 4194304 (--max-request-bytes)" in response.json()["error"]["message"]
    chunked = post(limited, "/generate", iter([b'{"text": "', *[b"a" * 2**20] * 8, b'"}']))  # no Content-Length
    assert chunked.status_code == 413 and "more than 4194304 bytes" in chunked.json()["error"]["message"]
    assert post(limited, "/generate", generate_body()).status_code == 200  # the connection pool still works


@pytest.mark.parametrize("path, body", [
    ("/generate", {"text": "a" * (MAX_PROMPT_CHARS + 1)}),
    ("/generate", {"text": ["hi", "a" * (MAX_PROMPT_CHARS + 1)]}),
    ("/v1/completions", {"model": "tiny", "prompt": "a" * (MAX_PROMPT_CHARS + 1)}),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "a" * MAX_PROMPT_CHARS},
                                                            {"role": "user", "content": "b"}]}),
])
def test_a_prompt_over_the_character_cap_is_refused_before_tokenization(limited, monkeypatch, path, body):
    model = limited.service.model
    tokenized = []
    encode_text, encode_chat = model.encode_text, model.encode_chat
    monkeypatch.setattr(model, "encode_text", lambda text: tokenized.append(len(text)) or encode_text(text))
    monkeypatch.setattr(model, "encode_chat", lambda messages: tokenized.append(-1) or encode_chat(messages))
    response = post(limited, path, body)
    assert response.status_code == 413
    assert f"at most {MAX_PROMPT_CHARS} (--max-prompt-chars)" in response.json()["error"]["message"]
    assert all(0 <= n <= MAX_PROMPT_CHARS for n in tokenized)


def test_tokenization_runs_off_the_event_loop(limited, monkeypatch):
    """A prompt that takes 2 s to tokenize does not hold up a health check or the metrics."""
    model = limited.service.model
    encode = model.encode_text
    monkeypatch.setattr(model, "encode_text", lambda text: time.sleep(2) or encode(text))
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(post, limited, "/generate", generate_body(max_new_tokens=2))
        time.sleep(0.3)
        tic = time.monotonic()
        assert requests.get(limited.url + "/health", timeout=10).status_code == 200
        assert requests.get(limited.url + "/metrics", timeout=10).status_code == 200
        assert time.monotonic() - tic < 1 and not slow.done()
        assert slow.result().status_code == 200


# --- 2. top logprobs: capped, and stopped with the client -------------------------------------------------------


def test_top_logprobs_are_capped(limited):
    over = post(limited, "/generate", generate_body(return_logprob=True, top_logprobs_num=49152))
    assert over.status_code == 400
    message = over.json()["error"]["message"]
    assert f"top_logprobs_num: Input should be less than or equal to {MAX_TOP_LOGPROBS}" in message
    at = post(limited, "/generate", generate_body(max_new_tokens=2, return_logprob=True,
                                                  top_logprobs_num=MAX_TOP_LOGPROBS)).json()
    assert [len(top) for top in at["meta_info"]["output_top_logprobs"]] == [MAX_TOP_LOGPROBS] * 2


def test_a_client_that_leaves_during_scoring_stops_it(limited, slow_engine, wait_until):
    """Scoring 400 prompt positions at 20 ms each would take 8 s; the client leaves after 0.5 s."""
    body = json.dumps({"input_ids": [5] * 400, "sampling_params": {"max_new_tokens": 1}, "return_logprob": True,
                       "logprob_start_len": 0, "top_logprobs_num": MAX_TOP_LOGPROBS}).encode()
    with socket.create_connection(address(limited), timeout=10) as conn:
        conn.sendall(http_request("/generate", body))
        assert wait_until(lambda: slow_engine["positions"] > 0)
        time.sleep(0.5)
    assert wait_until(lambda: limited.service.scheduler.running == 0, timeout=3)
    assert slow_engine["positions"] < 200
    assert post(limited, "/generate", generate_body(max_new_tokens=2)).status_code == 200


# --- 3, 5, 9: bad values are 400s that name the field --------------------------------------------------------------

DEEP = b'{"text": "hi", "sampling_params": {"custom_params": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}"
BAD_VALUES = [
    (generate_body(return_logprob=True, logprob_start_len=-2), "logprob_start_len: Input should be greater than"),
    (generate_body(return_logprob=True, logprob_start_len=-5), "logprob_start_len: Input should be greater than"),
    ({"input_ids": [5, 6, 7], "return_logprob": True, "logprob_start_len": 3},
     "logprob_start_len=3 is beyond the prompt's 3 tokens: give -1 (output logprobs only) or a prompt position in "
     "[0, 3)"),
    ({"text": "hi", "sampling_params": {"sampling_seed": 2**64}}, "sampling_params.sampling_seed: must be an integer "
                                                                  "in [-2**63, 2**64)"),
    ({"text": "hi", "sampling_params": {"sampling_seed": -(2**63) - 1}}, "sampling_seed: must be an integer"),
    ({"text": "hi", "sampling_params": {"sampling_seed": 1.5}}, "sampling_seed: Input should be a valid integer"),
    (b'{"text": "hi", "sampling_params": {"sampling_seed": 1' + b"0" * 5000 + b"}}",
     "sampling_params.sampling_seed: is an integer of 5001 digits"),
    (DEEP, "malformed JSON body: nested far deeper than the 32 levels allowed"),
    (b'{"text": "hi", "sampling_params": {"custom_params": {"a": ' + b"[" * 40 + b"]" * 40 + b"}}}",
     "sampling_params.custom_params.a: nested deeper than 32 levels"),
    (b'{"text": "caf\\ud800"}', "text: is not valid Unicode: it holds a lone surrogate"),
    (b'{"text": ["ok", "\\udfff"]}', "text.1: is not valid Unicode"),
    (b'{"text": "hi", "rid": "\\ud800"}', "rid: is not valid Unicode"),
    (b'{"text": "hi", "\\ud800": 1}', "the body: a field name is not valid Unicode"),
    ({"text": "hi", "sampling_params": {"top_p": 1e-46}}, "top_p must be in [1e-06, 1], got 1e-46"),
    ({"text": "hi", "sampling_params": {"top_p": 0}}, "top_p must be in [1e-06, 1], got 0"),
    (b'{"text": "hi", "sampling_params": {"temperature": NaN}}', "sampling_params.temperature: must be a finite "
                                                                 "number"),
    (b'{"text": "hi", "sampling_params": {"top_p": 1e999}}', "sampling_params.top_p: must be a finite number"),
    ({"text": []}, "text: List should have at least 1 item"),
    (generate_body(return_logprob=True, top_logprobs_num=-1), "top_logprobs_num: Input should be greater than or "
                                                              "equal to 0"),
]


@pytest.mark.parametrize("body, message", BAD_VALUES, ids=[str(i) for i in range(len(BAD_VALUES))])
def test_bad_values_are_400s_naming_the_field(limited, server_log, body, message):
    response = post(limited, "/generate", body)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]
    assert not [r for r in server_log.records if r.exc_info]  # a client fault logs no traceback


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 1, "seed": 2**64}),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                              "seed": -(2**63) - 1}),
])
def test_openai_seeds_outside_64_bits_are_400s(limited, path, body):
    response = post(limited, path, body)
    assert response.status_code == 400 and "seed: must be an integer in [-2**63, 2**64)" in response.text


def test_seeds_reach_the_engine_as_64_bit_ints_and_a_missing_one_is_random(limited, monkeypatch):
    seeds = []
    submit = SpeculativeEngine.submit
    monkeypatch.setattr(SpeculativeEngine, "submit", lambda engine, ids, n, **kwargs: seeds.append(kwargs["seed"])
                        or submit(engine, ids, n, **kwargs))
    for seed in (-(2**63), 2**64 - 1, 0):
        assert post(limited, "/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 1,
                                                                          "sampling_seed": seed}}).status_code == 200
    assert seeds == [-(2**63), 2**64 - 1, 0]
    sampled = {"max_new_tokens": 12, "temperature": 1.0}
    texts = [post(limited, "/generate", {"text": PROMPT, "sampling_params": sampled}).json()["output_ids"]
             for _ in range(2)]
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    assert post(limited, "/v1/chat/completions", chat).status_code == 200
    fresh = seeds[3:]
    assert len(fresh) == 3 and len(set(fresh)) == 3
    assert all(type(s) is int and 0 <= s < 2**64 for s in fresh)
    assert texts[0] != texts[1]  # unseeded sampled requests differ


# --- 4, 7: the queue ----------------------------------------------------------------------------------------------


def test_clients_that_leave_while_queued_free_their_places(limited, slow_engine, server_log, wait_until):
    host, port = address(limited)
    long = json.dumps(generate_body(max_new_tokens=200)).encode()
    conns = [socket.create_connection((host, port), timeout=10) for _ in range(1 + MAX_WAITING)]
    scheduler = limited.service.scheduler
    conns[0].sendall(http_request("/generate", long))
    assert wait_until(lambda: scheduler.running == 1)  # before the others, which would otherwise fill the queue first
    for conn in conns[1:]:
        conn.sendall(http_request("/generate", long))
    assert wait_until(lambda: scheduler.running == 1 and scheduler.waiting == MAX_WAITING)
    assert post(limited, "/generate", generate_body()).status_code == 503  # full, truly
    for conn in conns[1:]:
        conn.close()
    assert wait_until(lambda: scheduler.waiting == 0, timeout=5)
    with ThreadPoolExecutor(MAX_WAITING) as pool:  # the places are free again: no false 503
        queued = [pool.submit(post, limited, "/generate", generate_body(max_new_tokens=2)) for _ in conns[1:]]
        assert wait_until(lambda: scheduler.waiting == MAX_WAITING), [f.result().text for f in queued if f.done()]
        conns[0].close()
        assert [f.result().status_code for f in queued] == [200] * MAX_WAITING
    assert not [r for r in server_log.records if r.name == "asyncio" or r.exc_info]


def test_a_batch_larger_than_the_queue_is_413(limited):
    response = post(limited, "/generate", {"text": ["hi"] * (MAX_WAITING + 1)})
    assert response.status_code == 413
    assert (f"the request has {MAX_WAITING + 1} prompts, but at most {MAX_WAITING} can wait for the engine "
            f"(--max-queued-requests)") in response.json()["error"]["message"]
    completions = post(limited, "/v1/completions", {"model": "tiny", "prompt": ["hi"] * (MAX_WAITING + 1)})
    assert completions.status_code == 413


# --- 6, 8: accounting, logging, no internals in a 500 ---------------------------------------------------------------


def test_a_server_fault_is_a_generic_500_with_a_request_id_and_a_logged_traceback(limited, monkeypatch,
                                                                                  server_log):
    def broken(*_args, **_kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(limited.service.model.target, "forward", broken)  # inside the engine's round
    before = responses(limited).get("500", 0)
    response = post(limited, "/generate", generate_body())
    assert response.status_code == 500
    error = response.json()["error"]
    rid = response.headers["x-request-id"]
    assert error["type"] == "internal_error" and rid in error["message"]
    assert "secret" not in response.text and "RuntimeError" not in response.text
    assert responses(limited)["500"] == before + 1
    logged = [r for r in server_log.records if rid in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info and "secret internal detail" in str(logged[0].exc_info[1])
    assert not [r for r in server_log.records if r.name.startswith("uvicorn")]  # no second traceback
    with post(limited, "/generate", {**generate_body(), "stream": True}, stream=True) as streamed:
        events = [line for line in streamed.iter_lines() if line.startswith(b"data: {")]
    assert json.loads(events[-1][len(b"data: "):])["error"]["code"] == 500 and b"secret" not in events[-1]


def test_every_response_is_counted_by_status_and_each_failure_logged_once(limited, server_log):
    before = responses(limited)
    assert post(limited, "/generate", generate_body(max_new_tokens=1)).status_code == 200
    assert post(limited, "/generate", b"{").status_code == 400
    assert requests.get(limited.url + "/nowhere", timeout=10).status_code == 404
    assert post(limited, "/generate", {"text": ["a"] * (MAX_WAITING + 1)}).status_code == 413
    assert post(limited, "/generate", generate_body(), headers={"X-Big": "x" * 200_000}).status_code == 431
    after = responses(limited)
    # the first /metrics read is a 200 too
    counted = {status: n - before.get(status, 0) for status, n in after.items() if n != before.get(status, 0)}
    assert counted == {"200": 2, "400": 1, "404": 1, "413": 1, "431": 1}
    failures = [r for r in server_log.records if r.name == "whiflash_sgl.server"]
    assert [int(r.getMessage().split(": ")[1].split()[0]) for r in failures] == [400, 404, 413, 431]
    assert not [r for r in server_log.records if r.exc_info or r.name.startswith("uvicorn")]


# --- 10: the HTTP connection ----------------------------------------------------------------------------------


def test_a_half_closed_client_gets_its_response(limited):
    with socket.create_connection(address(limited), timeout=10) as conn:
        conn.sendall(http_request("/generate", json.dumps(generate_body(max_new_tokens=4)).encode()))
        conn.shutdown(socket.SHUT_WR)
        status, body = final_response(read_all(conn))
    assert status == 200 and body["meta_info"]["completion_tokens"] == 4


def test_a_client_that_closed_while_queued_is_still_noticed(limited, slow_engine, wait_until):
    """A full close looks like a half close until a write is answered with a reset: the queued request must still
    be cancelled (the interim 100 Continue probes find it)."""
    host, port = address(limited)
    running = socket.create_connection((host, port), timeout=10)
    running.sendall(http_request("/generate", json.dumps(generate_body(max_new_tokens=200)).encode()))
    scheduler = limited.service.scheduler
    assert wait_until(lambda: scheduler.running == 1)
    with socket.create_connection((host, port), timeout=10) as queued:
        queued.sendall(http_request("/generate", json.dumps(generate_body()).encode()))
        assert wait_until(lambda: scheduler.waiting == 1)
    assert wait_until(lambda: scheduler.waiting == 0, timeout=5)
    running.close()


def test_oversized_headers_are_431_and_a_slow_head_408(limited):
    response = post(limited, "/generate", generate_body(), headers={"X-Big": "x" * 200_000})
    assert response.status_code == 431
    assert "over this server's limit of 16384 bytes (--max-header-bytes)" in response.json()["error"]["message"]
    with socket.create_connection(address(limited), timeout=10) as conn:
        conn.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\n")
        tic = time.monotonic()
        status, body = final_response(read_all(conn))
    assert status == 408 and "within 2 s (--timeout-read)" in body["error"]["message"]
    assert LIMITS.timeout_read - 0.2 < time.monotonic() - tic < LIMITS.timeout_read + 2


def test_a_slow_body_is_408_and_an_idle_connection_closes(limited):
    with socket.create_connection(address(limited), timeout=10) as conn:
        conn.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        status, body = final_response(read_all(conn))
    assert status == 408 and "request body did not arrive within 2 s" in body["error"]["message"]
    with socket.create_connection(address(limited), timeout=10) as conn:
        tic = time.monotonic()
        assert read_all(conn) == b""  # closed by the server, not by the test's timeout
        assert time.monotonic() - tic < LIMITS.timeout_keep_alive + 2


# --- acceptance: every case above, timed, while a normal request is served --------------------------------------

ACCEPTANCE = [
    ("1 50 MB body", "/generate", b'{"text": "' + b"a" * 50_000_000 + b'"}', {}, 413),
    ("1 prompt over --max-prompt-chars", "/generate", {"text": "a" * 50_000}, {}, 413),
    ("2 top_logprobs_num=49152", "/generate", generate_body(return_logprob=True, top_logprobs_num=49152), {}, 400),
    ("3 logprob_start_len=-2", "/generate", generate_body(return_logprob=True, logprob_start_len=-2), {}, 400),
    ("3 logprob_start_len=-5", "/generate", generate_body(return_logprob=True, logprob_start_len=-5), {}, 400),
    ("5 seed 2**64", "/generate", {"text": "hi", "sampling_params": {"sampling_seed": 2**64}}, {}, 400),
    ("5 nested JSON", "/generate", DEEP, {}, 400),
    ("5 int of 5001 digits", "/generate", b'{"text": "hi", "sampling_params": {"sampling_seed": 1' + b"0" * 5000
     + b"}}", {}, 400),
    ("5 lone surrogate", "/generate", b'{"text": "\\ud800"}', {}, 400),
    ("5 top_p=1e-46", "/generate", {"text": "hi", "sampling_params": {"top_p": 1e-46}}, {}, 400),
    ("5 OpenAI seed 2**64", "/v1/chat/completions", {"model": "tiny", "seed": 2**64, "messages": [
        {"role": "user", "content": "hi"}]}, {}, 400),
    ("7 batch larger than the queue", "/generate", {"text": ["hi"] * (MAX_WAITING + 1)}, {}, 413),
    ("9 text: []", "/generate", {"text": []}, {}, 400),
    ("9 top_logprobs_num=-1", "/generate", generate_body(return_logprob=True, top_logprobs_num=-1), {}, 400),
    ("10 200 KB header", "/generate", generate_body(), {"X-Big": "x" * 200_000}, 431),
]


def test_acceptance_every_case_is_a_prompt_4xx_while_a_normal_request_is_served(limited, capsys):
    times = []
    with ThreadPoolExecutor(1) as pool:
        for name, path, body, headers, status in ACCEPTANCE:
            normal = pool.submit(post, limited, "/generate", generate_body(max_new_tokens=24))
            tic = time.monotonic()
            response = post(limited, path, body, headers)
            seconds = time.monotonic() - tic
            times.append((name, response.status_code, seconds))
            assert response.status_code == status, (name, response.text)
            assert normal.result().status_code == 200, name
        with socket.create_connection(address(limited), timeout=10) as conn:  # 10: the half-closed client
            normal = pool.submit(post, limited, "/generate", generate_body(max_new_tokens=24))
            tic = time.monotonic()
            conn.sendall(http_request("/generate", json.dumps(generate_body(max_new_tokens=1)).encode()))
            conn.shutdown(socket.SHUT_WR)
            half_closed = final_response(read_all(conn))[0]
            times.append(("10 half-closed client (answered)", half_closed, time.monotonic() - tic))
            assert half_closed == 200 and normal.result().status_code == 200
    with capsys.disabled():
        print("\ncase | status | seconds")
        for name, code, seconds in times:
            print(f"{name} | {code} | {seconds:.3f}")
    assert all(seconds < 1 for name, _, seconds in times if not name.startswith("10 half")), times
