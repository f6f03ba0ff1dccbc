"""Property-based fuzzing of the request schemas: whatever the body, ``/generate``, ``/v1/completions`` and
``/v1/chat/completions`` answer 2xx, or a 4xx with the JSON error shape, never a 500 (in a stream neither), and the
server still serves a normal request afterwards.

Bodies come in three kinds, about equally often: plausible ones (every field of its type, most values in range,
so that many are served), wild ones (any field may hold any JSON: NaN, huge or 64-bit-edge integers, lone
surrogates, wrong types; plus an unknown field now and then) and raw bytes. Token budgets are always given and
small, so that a served request stays cheap."""

from __future__ import annotations

import json

import requests
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

SETTINGS = settings(max_examples=60, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

TEXT = st.text(min_size=1, max_size=12)
SURROGATE = st.sampled_from(["\ud800", "a\udfffb", "\udc00\ud800"])
NUMBER = st.integers() | st.floats() | st.sampled_from([-(2**63) - 1, -(2**63), 2**64 - 1, 2**64])
JSON = st.recursive(st.none() | st.booleans() | NUMBER | TEXT | SURROGATE,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT | SURROGATE, inner, max_size=3),
                    max_leaves=6)
BUDGET = st.integers(0, 3)  # never absent: the defaults generate 128 tokens or the whole context
WILD_BUDGET = st.integers(-2, 3) | st.integers(min_value=10**5) | st.sampled_from(["2", 1.5, True, [1], {}])
STOP = TEXT | st.lists(TEXT, max_size=2)
SAMPLING = {"temperature": st.floats(0, 2), "top_p": st.floats(1e-6, 1), "top_k": st.integers(-1, 50), "stop": STOP}
SEED = st.integers(-(2**63), 2**64 - 1)
IDS = st.lists(st.integers(0, 300), min_size=1, max_size=6)


def wild(fields: dict) -> dict:
    return {name: strategy | JSON for name, strategy in fields.items()}


def bodies(plausible: st.SearchStrategy, wild_object: st.SearchStrategy) -> st.SearchStrategy:
    """Encoded bodies of the three kinds; a wild object may carry an unknown field too."""
    unknown = st.dictionaries(st.text(min_size=1, max_size=6), JSON, max_size=1)
    wilder = st.tuples(unknown, wild_object).map(lambda pair: {**pair[0], **pair[1]})
    return (plausible | wilder).map(lambda obj: json.dumps(obj).encode()) | st.binary(max_size=40)


def sampling_params(budget: st.SearchStrategy, values: dict) -> st.SearchStrategy:
    one = st.fixed_dictionaries({"max_new_tokens": budget}, optional=values)
    return one | st.lists(one, min_size=1, max_size=3)


SAMPLING_OPTIONAL = {**SAMPLING, "sampling_seed": SEED, "n": st.just(1), "ignore_eos": st.just(False)}
PROMPTS = {"text": TEXT | st.lists(TEXT, min_size=1, max_size=3), "input_ids": IDS | st.lists(IDS, min_size=1,
                                                                                              max_size=3)}
GENERATE_OPTIONAL = {"rid": TEXT, "stream": st.booleans(), "return_logprob": st.booleans(),
                     "logprob_start_len": st.integers(-1, 8), "top_logprobs_num": st.integers(0, 20),
                     "return_text_in_logprobs": st.booleans()}
GENERATE = bodies(
    st.tuples(st.one_of([st.fixed_dictionaries({name: value}) for name, value in PROMPTS.items()]),
              st.fixed_dictionaries({"sampling_params": sampling_params(BUDGET, SAMPLING_OPTIONAL)},
                                    optional=GENERATE_OPTIONAL)).map(lambda pair: {**pair[0], **pair[1]}),
    st.fixed_dictionaries({"sampling_params": sampling_params(WILD_BUDGET, wild(SAMPLING_OPTIONAL))},
                          optional=wild({**PROMPTS, **GENERATE_OPTIONAL})))
OPENAI = {**SAMPLING, "seed": SEED, "stream": st.booleans(), "n": st.just(1), "user": TEXT,
          "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()})}
COMPLETION_FIELDS = {"model": st.sampled_from(["tiny", "default"]),
                     "prompt": TEXT | st.lists(TEXT, min_size=1, max_size=3) | IDS}
COMPLETIONS = bodies(
    st.fixed_dictionaries({"max_tokens": BUDGET, **COMPLETION_FIELDS}, optional={**OPENAI, "echo": st.just(False)}),
    st.fixed_dictionaries({"max_tokens": WILD_BUDGET}, optional=wild({**COMPLETION_FIELDS, **OPENAI})))
MESSAGE = st.fixed_dictionaries({
    "role": st.sampled_from(["system", "developer", "user", "assistant"]),
    "content": TEXT | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), min_size=1,
                               max_size=2)})
CHAT_FIELDS = {"model": COMPLETION_FIELDS["model"], "messages": st.lists(MESSAGE, min_size=1, max_size=3)}
CHAT_OPTIONAL = {**OPENAI, "logprobs": st.just(False), "response_format": st.just({"type": "text"})}
CHAT = bodies(
    st.fixed_dictionaries({"max_tokens": BUDGET, **CHAT_FIELDS},
                          optional={**CHAT_OPTIONAL, "max_completion_tokens": BUDGET}),
    st.fixed_dictionaries({"max_tokens": WILD_BUDGET},
                          optional={**wild({**CHAT_FIELDS, **CHAT_OPTIONAL}), "max_completion_tokens": WILD_BUDGET}))


def check(server, path: str, raw: bytes) -> None:
    response = requests.post(server.url + path, data=raw, headers={"Content-Type": "application/json"}, timeout=60)
    event(f"HTTP {response.status_code}")
    assert response.status_code < 500, (raw, response.text)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "code"} and error["code"] == response.status_code, error
        assert error["message"]
    elif response.headers["content-type"].startswith("text/event-stream"):
        events = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", events
        assert all("error" not in json.loads(e) or json.loads(e)["error"]["code"] < 500 for e in events[:-1]), events
    else:
        response.json()


@SETTINGS
@given(raw=GENERATE)
def test_generate_never_fails_on_the_servers_side(server, raw):
    check(server, "/generate", raw)


@SETTINGS
@given(raw=COMPLETIONS)
def test_completions_never_fail_on_the_servers_side(server, raw):
    check(server, "/v1/completions", raw)


@SETTINGS
@given(raw=CHAT)
def test_chat_completions_never_fail_on_the_servers_side(server, raw):
    check(server, "/v1/chat/completions", raw)


def test_the_server_still_serves_after_the_fuzzing(server):
    reply = requests.post(server.url + "/generate", timeout=60, json={
        "text": "def add(a, b):", "sampling_params": {"max_new_tokens": 3, "temperature": 0}})
    assert reply.status_code == 200 and reply.json()["meta_info"]["completion_tokens"] == 3
