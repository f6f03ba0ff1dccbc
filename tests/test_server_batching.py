"""The embedded server batches: sixteen OpenAI clients at once run in one engine batch (the /metrics gauge sees them
together) and each gets exactly its solo greedy output; a client that leaves mid-stream frees its batch place and
KV; a request the KV budget can never hold is a clear 400, and requests that do not fit yet wait for KV."""

from __future__ import annotations

import functools
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from whiflash_sgl.engine import MAX_TREE_NODES, SpeculativeEngine
from whiflash_sgl.target import Target

openai = pytest.importorskip("openai", reason="the openai client is a dev dependency: pip install -e .[dev]")

CLIENTS = 16
TOKENS = 64
DISTINCT = ["def add(a, b):", "The quick brown fox", "for i in range(10):", '{"name": "get_weather",']
PROMPTS = [DISTINCT[i % len(DISTINCT)] for i in range(CLIENTS)]  # each streamed by some clients, not by others


def metric_samples(url: str) -> dict:
    text = requests.get(url + "/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def start(model, **service_args):
    from whiflash_sgl.server.launch import start_background
    from whiflash_sgl.server.service import Service

    return start_background(Service(model, **service_args))


@pytest.fixture(scope="module")
def batching(served_dir):
    """The embedded server (WhiFlash, heuristic policy: every request routes on its own) with a batch of 16."""
    from whiflash_sgl.server.model import ServedModel

    model = ServedModel.load(str(served_dir / "model"), "WHIFLASH", "heuristic", str(served_dir / "whiflash.json"),
                             served_name="tiny")
    running = start(model, max_waiting=64, max_running=CLIENTS)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def reference(served_dir):
    """The served weights in a target of their own: greedy output alone, with plain decoding."""
    target = Target.load(str(served_dir / "model"))

    @functools.cache
    def solo(prompt: str, max_new_tokens: int) -> str:
        return SpeculativeEngine(target).generate(target.tokenizer(prompt)["input_ids"], max_new_tokens).text

    return solo


def client(server) -> "openai.OpenAI":
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


class GaugeWatcher:
    """Polls /metrics from a thread of its own and keeps the largest ``whiflash_running_requests`` it read."""

    def __init__(self, url: str):
        self.url, self.most, self.reads = url, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            running = metric_samples(self.url).get(("whiflash_running_requests", ()), 0)
            self.most, self.reads = max(self.most, int(running)), self.reads + 1
            time.sleep(0.01)

    def __enter__(self) -> "GaugeWatcher":
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join(10)


def test_sixteen_clients_run_together_and_each_gets_its_solo_output(batching, reference, capsys):
    solo = [reference(p, TOKENS) for p in PROMPTS]
    api = client(batching)
    barrier = threading.Barrier(CLIENTS)

    def ask(i: int) -> str:
        kwargs = dict(model="tiny", prompt=PROMPTS[i], max_tokens=TOKENS, temperature=0)
        barrier.wait(timeout=60)
        if i % 2:  # half of them stream
            return "".join(c.choices[0].text for c in api.completions.create(**kwargs, stream=True) if c.choices)
        return api.completions.create(**kwargs).choices[0].text

    before = metric_samples(batching.url)
    tic = time.monotonic()
    with GaugeWatcher(batching.url) as watcher, ThreadPoolExecutor(CLIENTS) as pool:
        texts = list(pool.map(ask, range(CLIENTS)))
    seconds = time.monotonic() - tic
    with capsys.disabled():
        print(f"\n{CLIENTS} clients x {TOKENS} tokens: {seconds:.1f} s, most running at once (from /metrics, "
              f"{watcher.reads} reads): {watcher.most}")
    assert texts == solo
    assert watcher.most >= 8
    after = metric_samples(batching.url)
    rounds = after[("whiflash_batch_rounds_total", ())] - before.get(("whiflash_batch_rounds_total", ()), 0)
    paradigms = {dict(labels)["paradigm"] for name, labels in after if name == "whiflash_paradigm_rounds_total"}
    # "none" (the router drafted nothing) is none; "eagle3:first" is EAGLE-3's first step alone
    assert paradigms and paradigms <= {"eagle3", "eagle3:first", "dflash", "ngram"}
    drafted = [after[("whiflash_paradigm_rounds_total", (("paradigm", p),))]
               - before.get(("whiflash_paradigm_rounds_total", (("paradigm", p),)), 0) for p in paradigms]
    # fewer engine rounds than the requests' rounds together: they shared target forwards
    assert 0 < max(drafted) <= rounds < CLIENTS * TOKENS / 2
    assert after[("whiflash_running_requests", ())] == 0 and after[("whiflash_queued_requests", ())] == 0
    pool = batching.service.model.target.pool
    assert pool.reserved == 0 and pool.free_slots == pool.capacity


def test_each_request_of_a_batch_has_its_own_speculation_stats(batching):
    """Native /generate in a batch: SGLang's meta_info figures hold per request, as alone."""
    def generate(i: int) -> dict:
        body = {"text": PROMPTS[i], "sampling_params": {"max_new_tokens": 24 + 8 * i, "temperature": 0}}
        return requests.post(batching.url + "/generate", json=body, timeout=300).json()

    with ThreadPoolExecutor(4) as pool:
        outputs = list(pool.map(generate, range(4)))
    for i, out in enumerate(outputs):
        meta = out["meta_info"]
        assert meta["completion_tokens"] == len(out["output_ids"]) == 24 + 8 * i
        assert meta["spec_accept_length"] == pytest.approx(meta["completion_tokens"] / meta["spec_verify_ct"])
        assert sum(meta["spec_correct_drafts_histogram"]) == meta["spec_verify_ct"]
        assert meta["spec_verify_ct"] - 1 <= sum(meta["spec_paradigm_rounds"].values()) <= meta["spec_verify_ct"]
        assert meta["spec_num_correct_drafts"] <= meta["spec_num_proposed_drafts"]


def test_a_client_leaving_mid_stream_frees_its_place_and_kv(batching, reference, wait_until):
    running = lambda: metric_samples(batching.url)[("whiflash_running_requests", ())]  # noqa: E731
    aborted = lambda: metric_samples(batching.url).get(  # noqa: E731
        ("whiflash_requests_total", (("finish_reason", "abort"),)), 0)
    before = aborted()
    api = client(batching)
    with ThreadPoolExecutor(1) as pool:
        companion = pool.submit(lambda: api.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=TOKENS,
                                                               temperature=0).choices[0].text)
        stream = api.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=400, temperature=0, stream=True)
        pieces = iter(stream)
        next(pieces), next(pieces)  # it is in the batch, streaming
        assert running() >= 1
        stream.close()
        assert wait_until(lambda: aborted() == before + 1)  # it left while its request ran
        assert wait_until(lambda: running() == 0, timeout=30)
        assert companion.result() == reference(PROMPTS[1], TOKENS)  # the other request did not notice
    pool = batching.service.model.target.pool
    assert pool.reserved == 0 and pool.free_slots == pool.capacity


def test_kv_budget_refuses_what_never_fits_and_makes_the_rest_wait(served_dir, reference):
    from whiflash_sgl.server.model import ServedModel

    model = ServedModel.load(str(served_dir / "model"), None, served_name="tiny")
    target = model.target
    prompt_tokens = len(target.tokenizer(PROMPTS[0])["input_ids"])
    need = prompt_tokens + TOKENS + MAX_TREE_NODES + 1  # one request's reservation
    keys = target.pool.keys  # [layers, slots, kv heads, head dim]
    per_token = 2 * keys[:, 0].numel() * keys.element_size()
    target.set_kv_budget(per_token * (2 * need + 20))  # two such requests at a time
    server = start(model, max_running=CLIENTS)
    try:
        api = client(server)
        with pytest.raises(openai.BadRequestError, match=r"needs \d+ KV slots .* the KV pool holds \d+: raise the "
                                                         r"KV budget \(--kv-budget-mb\)"):
            api.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=400)
        prompts = [p for p in DISTINCT if len(target.tokenizer(p)["input_ids"]) <= prompt_tokens + 10]
        with GaugeWatcher(server.url) as watcher, ThreadPoolExecutor(len(prompts)) as pool:
            texts = list(pool.map(lambda p: api.completions.create(model="tiny", prompt=p, max_tokens=TOKENS,
                                                                   temperature=0).choices[0].text, prompts))
        assert texts == [reference(p, TOKENS) for p in prompts]
        assert 1 <= watcher.most <= 2  # the rest waited for KV
        assert target.pool.reserved == 0
    finally:
        server.stop()


def test_a_failed_round_fails_its_requests_and_the_engine_goes_on(batching, reference, monkeypatch,
                                                                   wait_until):
    """A fault inside an engine round is a 500 for the requests in that round; the engine thread lives on with a
    fresh engine and KV pool, and later requests get their solo output."""
    target = batching.service.model.target
    forward, calls = target.forward, []

    def faulty(chunks):
        calls.append(len(chunks))
        if len(calls) == 8:
            raise RuntimeError("a fault in the round")
        return forward(chunks)

    monkeypatch.setattr(target, "forward", faulty)

    def generate(prompt: str) -> requests.Response:
        body = {"text": prompt, "sampling_params": {"max_new_tokens": TOKENS, "temperature": 0}}
        return requests.post(batching.url + "/generate", json=body, timeout=300)

    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(generate, DISTINCT[:3]))
    assert 500 in [a.status_code for a in answers] and {a.status_code for a in answers} <= {200, 500}
    assert all(a.json()["text"] == reference(p, TOKENS) for a, p in zip(answers, DISTINCT) if a.status_code == 200)
    assert generate(DISTINCT[3]).json()["text"] == reference(DISTINCT[3], TOKENS)
    pool = target.pool
    assert wait_until(lambda: batching.service.scheduler.running == 0)
    assert pool.reserved == 0 and pool.free_slots == pool.capacity


def test_the_batch_loop_runs_on_the_thread_that_calls_run(served_dir, reference):
    """``engine_thread=False`` (what ``launch_server`` runs: the loop on the thread that loaded the model, HTTP on
    another): every round runs on the thread that called ``scheduler.run()``, no engine thread is started, requests
    get their solo output, and the server's shutdown ends the loop."""
    from whiflash_sgl.server.model import ServedModel

    model = ServedModel.load(str(served_dir / "model"), "WHIFLASH", "heuristic", str(served_dir / "whiflash.json"),
                             served_name="tiny")
    engine_threads = lambda: sum(t.name == "whiflash-engine" for t in threading.enumerate())  # noqa: E731
    other_servers = engine_threads()
    server = start(model, max_running=4, engine_thread=False)
    scheduler = server.service.scheduler
    count_rounds, rounds_ran_on = scheduler.on_step, set()

    def on_step(requests_in_batch):
        rounds_ran_on.add(threading.current_thread().name)
        count_rounds(requests_in_batch)

    scheduler.on_step = on_step
    owner = threading.Thread(target=scheduler.run, name="loop-owner")
    owner.start()
    try:
        api = client(server)
        with ThreadPoolExecutor(len(DISTINCT)) as pool:
            texts = list(pool.map(lambda p: api.completions.create(model="tiny", prompt=p, max_tokens=TOKENS,
                                                                   temperature=0).choices[0].text, DISTINCT))
        assert texts == [reference(p, TOKENS) for p in DISTINCT]
        assert rounds_ran_on == {"loop-owner"}
        assert engine_threads() == other_servers
    finally:
        server.stop()
        owner.join(30)
    assert not owner.is_alive()


def test_the_loading_thread_hands_its_openmp_workers_back_before_an_engine_thread_starts():
    """``start_background`` with an engine thread of its own first ends the calling thread's pool of OpenMP workers
    (``release_openmp_workers``): beside a second pool, libgomp has the engine's workers sleep between parallel
    regions. The workers that the caller's parallel region started end, and its next region starts new ones. (Threads
    are told apart by id, so other threads of the test process coming and going do not count.)"""
    import torch

    from whiflash_sgl.server.scheduler import release_openmp_workers

    maps = Path("/proc/self/maps")
    if not (maps.exists() and "/libgomp" in maps.read_text()):
        pytest.skip("torch's OpenMP runtime here is not libgomp on Linux, where the hand-back applies")

    def threads_now() -> set[str]:
        return set(os.listdir("/proc/self/task"))

    def pool_of_a_region(x: torch.Tensor) -> set[str]:
        """The threads that a parallel region on this thread starts, with no pool of its own before it."""
        release_openmp_workers()
        before = threads_now()
        x.add_(1)
        return threads_now() - before

    def gone(workers: set[str]) -> bool:
        deadline = time.monotonic() + 5  # a released worker leaves once it wakes
        while workers & threads_now() and time.monotonic() < deadline:
            time.sleep(0.01)
        return not workers & threads_now()

    threads, x = torch.get_num_threads(), torch.zeros(1 << 22)
    torch.set_num_threads(2)
    try:
        workers = pool_of_a_region(x)
        assert len(workers) == 1  # two threads in the region: this one and one worker
        release_openmp_workers()
        assert gone(workers)
        again = pool_of_a_region(x)
        assert len(again) == 1 and not again & workers
        assert torch.equal(x, torch.full_like(x, 2.0))
    finally:
        torch.set_num_threads(threads)
