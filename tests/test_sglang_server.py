"""The real SGLang 0.5.23 server on this CPU (its CPU engine over the sgl_kernel stand-in), as users run it.

Servers start once per module, all at once (``python -m sglang.launch_server`` through ``whiflash_sgl.sglang.
cpu_serve``): a tiny Qwen3-architecture target with an EAGLE-3 drafter over a reduced draft vocabulary (d2t/t2d) and a
DFlash drafter in the published checkpoints' layout, served with every method and WhiFlash policy; and SmolLM2-135M
with the committed drafters. Greedy output of every speculative method must be token-identical to the same model's
non-speculative server, one prompt at a time and as one batch; a batched divergence passes only at a proven near-tie.
Every server runs with deterministic inference (seeded sampling), and WHIFLASH verifies sampled requests with the
keyed rule, so its seeded sampled text must be the non-speculative server's too, and one seed must give one text.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import requests
import torch

pytestmark = pytest.mark.sglang_server

pytest.importorskip("sglang.srt.plugins", reason="SGLang is not installed; run launch/install_sglang_cpu.sh (CI does)")
sgl_kernel = pytest.importorskip("sgl_kernel", reason="the sgl_kernel stand-in is not installed; run "
                                 "launch/install_sglang_cpu.sh (CI does)")

from whiflash_sgl.sglang.cpu_serve import sglang_command  # noqa: E402
from whiflash_sgl.target import Target  # noqa: E402

START_TIMEOUT_S = 600  # nine servers share 2 cores; a loaded machine needs more than 7 min
NEAR_TIE = 1e-3  # top-2 logit gap under which float rounding across kernel shapes may flip the argmax
TINY_TOKENS = 24
SMOL_TOKENS = 24
PROMPTS = [
    "def add(a, b):\n    return",
    '{"name": "get_weather", "arguments": {"city": "Paris"',
    "The quick brown fox jumps over the lazy dog.",
    "for i in range(10):\n    print(",
    "Speculative decoding drafts tokens and verifies them",
    "The dog sleeps. The quick brown",
    '{"name": "get_weather", "arguments": {"unit": "celsius"',
    "def square(x):\n    return x *",
]
SMOL_PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "What is the capital of France? Answer in one sentence.",
    "List three uses of a paper clip.",
    "Call the weather tool for Paris: respond with JSON only.",
    "Explain speculative decoding to a child.",
    "Translate 'good morning' into Spanish and German.",
    "What is 17 times 23? Show your working.",
    "Summarize: The cat sat on the mat all afternoon, then went to sleep.",
]


class Server:
    """One ``sglang.launch_server`` process group, its log in a file, its scheduler on one thread pinned to ``cpu``."""

    def __init__(self, name: str, method: str, model: Path, log_dir: Path, cpu: int, **options):
        self.name, self.port = name, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"{name.replace(':', '-').replace('/', '-')}.log"
        # SGLang draws its scheduler's port itself, from a range these overlap, and binds it a minute later
        argv, env = sglang_command(method, str(model), port=self.port, extra=("--nccl-port", str(_free_port())),
                                   **options)
        env["SGLANG_CPU_OMP_THREADS_BIND"] = str(cpu)
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"{self.name} server exited ({self.process.returncode}):\n{self.tail()}")
            try:
                if requests.get(f"{self.url}/health_generate", timeout=30).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(2)
        pytest.fail(f"{self.name} server not ready after {START_TIMEOUT_S} s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def signal(self, number: int) -> None:
        try:
            os.killpg(self.process.pid, number)  # the launcher and the scheduler/detokenizer processes it spawned
        except ProcessLookupError:
            pass

    def wait_stopped(self) -> None:
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        self.signal(signal.SIGKILL)

    def generate(self, text, max_new_tokens: int, sampling: dict | None = None, **extra) -> dict | list:
        body = {"text": text, "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens,
                                                  **(sampling or {})}, **extra}
        response = requests.post(f"{self.url}/generate", json=body, timeout=600)
        assert response.status_code == 200, response.text
        return response.json()


_HANDED_OUT: set[int] = set()  # ports given to servers of this session, bound or not yet


def _free_port() -> int:
    """A free port below the kernel's ephemeral range, never one handed out before in this session. A server takes a
    minute or more to start, and a port from that range (a bind to port 0) can meanwhile go to an outgoing
    connection, such as a health check of another server starting beside it; the server then cannot bind it (seen in
    CI: 25 tests erred at setup). For the same reason, two servers starting side by side must not be given one port
    between them: the first to bind it fails the other (seen in CI: the scheduler's port was another's)."""
    ranges = Path("/proc/sys/net/ipv4/ip_local_port_range")
    ephemeral = int(ranges.read_text().split()[0]) if ranges.exists() else 32768
    for port in random.sample(range(20000, max(ephemeral, 20001)), 100):
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free port found between 20000 and {ephemeral}")


def start_all(specs: dict[str, tuple], log_dir: Path) -> dict[str, Server]:
    """Start every server at once (their start-up is mostly imports), then wait for all. Each scheduler computes on
    one thread, the servers dealt round the machine's CPUs: nine schedulers each running an OpenMP team over both
    cores of a 2-core machine wait at every barrier for a thread the others have descheduled."""
    cpus = sorted(os.sched_getaffinity(0))
    servers = {name: Server(name, method, model, log_dir, cpus[i % len(cpus)], **options)
               for i, (name, (method, model, options)) in enumerate(specs.items())}
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        for server in servers.values():
            server.wait_ready(deadline)
    except BaseException:
        stop_all(servers.values())
        raise
    return servers


def stop_all(servers) -> None:
    """Signal every server first, then wait: their shutdowns overlap."""
    servers = list(servers)
    for server in servers:
        server.signal(signal.SIGTERM)
    for server in servers:
        server.wait_stopped()


# ---- tiny models in the layouts users bring from the hub ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer, random_drafters):
    """A 6-layer Qwen3 target; an EAGLE-3 drafter over 128 of its 320 tokens (d2t/t2d maps); a DFlash drafter whose
    config is laid out like the published z-lab checkpoints (block size at the top level, no mask token name)."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    root = tmp_path_factory.mktemp("sglang-tiny")
    config = Qwen3Config(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=512, eos_token_id=2, bos_token_id=1, pad_token_id=0,
                         tie_word_embeddings=True, initializer_range=0.02)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(root / "target")
    tiny_tokenizer.save_pretrained(root / "target")
    random_drafters(Target(model, tiny_tokenizer, name="tiny-qwen3"), root)
    dflash = json.loads((root / "dflash" / "config.json").read_text())
    dflash["block_size"] = dflash["dflash_config"].pop("block_size")
    dflash["dflash_config"].pop("mask_token")
    (root / "dflash" / "config.json").write_text(json.dumps(dflash, indent=1))
    return root


TINY_METHODS = {
    "vanilla": ("vanilla", {}),
    "eagle3": ("eagle3", {}),
    "dflash": ("dflash", {}),
    "whiflash:heuristic": ("whiflash", {"policy": "heuristic"}),
    "whiflash:entropy": ("whiflash", {"policy": "entropy"}),
    "whiflash:mlp": ("whiflash", {"policy": "mlp"}),
    "whiflash:alternate": ("whiflash", {"policy": "alternate"}),  # the test policy below
}
SMOL_METHODS = ("vanilla", "whiflash:mlp")  # EAGLE3 and DFLASH on SmolLM2: the server bench checks their identity


ALTERNATE_POLICY = '''
import itertools


class AlternatePolicy:
    """Each request switches paradigm every round; its first round takes EAGLE-3 and DFlash in turn with the other
    requests starting then (the worker asks for each request of a batch in order). Requests that start together
    thus stay apart: every round of their batch drafts some with EAGLE-3 and the others with DFlash."""

    def __init__(self):
        self._first_rounds = itertools.count()

    def decide(self, features):
        if features.last_paradigm:  # this request's own last round
            return "dflash" if features.last_paradigm == "eagle3" else "eagle3"
        return ("eagle3", "dflash")[next(self._first_rounds) % 2]
'''


@pytest.fixture(scope="module")
def alternate_policy(tmp_path_factory) -> dict:
    """The environment of a server that has the ``alternate`` test policy: a module and a distribution declaring it
    in the ``whiflash_sgl.policies`` entry-point group, on the server's PYTHONPATH."""
    root = tmp_path_factory.mktemp("test-policy")
    (root / "whiflash_test_policy.py").write_text(ALTERNATE_POLICY)
    dist = root / "whiflash_test_policy-0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: whiflash-test-policy\nVersion: 0\n")
    (dist / "entry_points.txt").write_text("[whiflash_sgl.policies]\n"
                                           "alternate = whiflash_test_policy:AlternatePolicy\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)}


@pytest.fixture(scope="module")
def servers(tiny_dir, tmp_path_factory, alternate_policy):
    from whiflash_sgl.model_store import prepare_default_model

    smol = prepare_default_model()
    drafters = {"eagle3_path": str(tiny_dir / "eagle3"), "dflash_path": str(tiny_dir / "dflash")}
    specs = {f"tiny/{name}": (method, tiny_dir / "target", {**drafters, **options, "max_total_tokens": 4096})
             for name, (method, options) in TINY_METHODS.items()}
    specs["tiny/whiflash:alternate"][2]["environ"] = alternate_policy
    specs.update({f"smol/{name}": (TINY_METHODS[name][0], smol, TINY_METHODS[name][1]) for name in SMOL_METHODS})
    running = start_all(specs, tmp_path_factory.mktemp("sglang-logs"))
    yield running
    stop_all(running.values())


# ---- what the tests compare ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompts():
    """Per model family, the texts sent: raw for the tiny target, SmolLM2's chat template for SmolLM2."""
    from transformers import AutoTokenizer

    from whiflash_sgl.model_store import prepare_default_model

    smol = AutoTokenizer.from_pretrained(prepare_default_model())
    chat = [smol.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in SMOL_PROMPTS]
    return {"tiny": (PROMPTS, TINY_TOKENS), "smol": (chat, SMOL_TOKENS)}


@pytest.fixture(scope="module")
def solo(servers, prompts):
    """Every server's greedy output for each prompt, sent one by one (the servers answer side by side)."""
    from concurrent.futures import ThreadPoolExecutor

    def one_by_one(name):
        texts, max_new_tokens = prompts[name.split("/")[0]]
        return [servers[name].generate(text, max_new_tokens) for text in texts]

    with ThreadPoolExecutor(len(servers)) as pool:
        return dict(zip(servers, pool.map(one_by_one, servers)))


SPECULATIVE = [f"tiny/{m}" for m in TINY_METHODS if m != "vanilla"] + [f"smol/{m}" for m in SMOL_METHODS
                                                                        if m != "vanilla"]


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def assert_same_or_near_tie(vanilla: "Server", text: str, expected: list[int], got: list[int], max_new_tokens: int,
                            what: str) -> None:
    """Identical, or diverging first where the non-speculative server's top-2 logits are within NEAR_TIE."""
    at = first_difference(expected, got)
    if at is None:
        return
    scored = vanilla.generate(text, max_new_tokens, return_logprob=True, top_logprobs_num=2)
    top2 = scored["meta_info"]["output_top_logprobs"][at]
    gap = top2[0][0] - top2[1][0]
    assert gap < NEAR_TIE, (f"{what}: output differs from the non-speculative server's at token {at} "
                            f"({expected[at:at + 4]} vs {got[at:at + 4]}), where its top-2 logit gap is {gap:.4g}")


@pytest.mark.parametrize("name", SPECULATIVE)
def test_greedy_output_is_the_non_speculative_servers_one_by_one(solo, name):
    vanilla = solo[f"{name.split('/')[0]}/vanilla"]
    for i, (ours, theirs) in enumerate(zip(solo[name], vanilla)):
        assert ours["output_ids"] == theirs["output_ids"], f"{name}, prompt {i}"
    assert all(r["meta_info"]["spec_verify_ct"] > 0 for r in solo[name])


@pytest.mark.parametrize("name", SPECULATIVE)
def test_greedy_output_in_one_batch_is_the_non_speculative_servers(servers, solo, prompts, name):
    family = name.split("/")[0]
    texts, max_new_tokens = prompts[family]
    batch = servers[name].generate(texts, max_new_tokens)
    vanilla = servers[f"{family}/vanilla"]
    for i, (text, result) in enumerate(zip(texts, batch)):
        assert_same_or_near_tie(vanilla, text, solo[f"{family}/vanilla"][i]["output_ids"], result["output_ids"],
                                max_new_tokens, f"{name}, batch member {i}")


def test_whiflash_reports_acceptance_and_routing_in_meta_info_and_metrics(servers, solo):
    for name in [n for n in SPECULATIVE if "whiflash" in n]:
        for result in solo[name]:
            meta = result["meta_info"]
            assert meta["spec_accept_length"] == pytest.approx(meta["completion_tokens"] / meta["spec_verify_ct"])
            assert len(meta["spec_paradigms"]) == meta["spec_verify_ct"]
            assert set(meta["spec_paradigms"]) <= {"eagle3", "dflash"}
    metrics = requests.get(f"{servers['smol/whiflash:mlp'].url}/metrics", timeout=30).text
    rounds = {line.split('"')[1]: float(line.split()[-1]) for line in metrics.splitlines()
              if line.startswith("whiflash_paradigm_rounds_total{")}
    served = Counter(p for r in solo["smol/whiflash:mlp"] for p in r["meta_info"]["spec_paradigms"])
    assert sum(rounds.values()) >= sum(served.values()) > 0
    assert "sglang:spec_accept_length" in metrics


def mixed_rounds(server: "Server") -> float:
    metrics = requests.get(f"{server.url}/metrics", timeout=30).text
    return sum(float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith("whiflash_mixed_rounds_total"))


def test_requests_of_one_batch_route_apart_and_keep_their_text(servers, solo, prompts):
    """Each request of a batch has its own route: under the alternating policy the rounds draft some requests with
    EAGLE-3 and the others with DFlash and verify them all in one target forward (the mixed-round counter grows),
    every request drafts with both in turn (so both drafters must be caught up for every request), and each
    request's greedy and seeded sampled text is the non-speculative server's."""
    server, vanilla = servers["tiny/whiflash:alternate"], servers["tiny/vanilla"]
    texts, max_new_tokens = prompts["tiny"]
    before = mixed_rounds(server)
    greedy = server.generate(texts, max_new_tokens)
    assert mixed_rounds(server) > before
    for i, (text, result) in enumerate(zip(texts, greedy)):
        assert set(result["meta_info"]["spec_paradigms"]) == {"eagle3", "dflash"}, f"request {i}"
        assert_same_or_near_tie(vanilla, text, solo["tiny/vanilla"][i]["output_ids"], result["output_ids"],
                                max_new_tokens, f"alternating batch member {i}")
    seeded = server.generate(texts, max_new_tokens, sampling(0.8, 11))
    expected = vanilla.generate(texts, max_new_tokens, sampling(0.8, 11))
    assert [r["output_ids"] for r in seeded] == [r["output_ids"] for r in expected]


def test_the_policy_set_by_config_routes(solo):
    """Three servers differing only in WHIFLASH_CONFIG's policy route differently."""
    routes = {policy: [tuple(r["meta_info"]["spec_paradigms"]) for r in solo[f"tiny/whiflash:{policy}"]]
              for policy in ("heuristic", "entropy", "mlp")}
    assert len({tuple(v) for v in routes.values()}) > 1, routes


def test_unknown_policy_fails_the_launch_naming_the_installed_ones(tiny_dir, tmp_path):
    settings = tmp_path / "whiflash.json"
    settings.write_text(json.dumps({"dflash_path": str(tiny_dir / "dflash"), "policy": "no-such-policy"}))
    argv, env = sglang_command("whiflash", str(tiny_dir / "target"), port=_free_port(),
                               eagle3_path=str(tiny_dir / "eagle3"), dflash_path=str(tiny_dir / "dflash"))
    env["WHIFLASH_CONFIG"] = str(settings)
    run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "unknown routing policy 'no-such-policy'; installed policies: entropy, heuristic, mlp" in run.stderr


def test_a_frontend_program_runs_against_the_real_server(servers):
    """SGLang's frontend language (gen, select) against WHIFLASH answers as against the target alone."""
    import sglang as sgl

    @sgl.function
    def program(s, text):
        s += text + sgl.gen("continuation", max_tokens=12, temperature=0)
        s += " Is it code?" + sgl.select("verdict", choices=["yes", "no"])

    answers = {}
    for name in ("tiny/vanilla", "tiny/whiflash:entropy"):
        state = program.run(text=PROMPTS[0], backend=sgl.RuntimeEndpoint(servers[name].url))
        answers[name] = (state["continuation"], state["verdict"])
    assert answers["tiny/whiflash:entropy"] == answers["tiny/vanilla"]
    assert answers["tiny/vanilla"][1] in ("yes", "no")


# ---- seeded sampling: WHIFLASH's keyed verification ---------------------------------------------------------------

SAMPLED_WHIFLASH = [f"tiny/whiflash:{policy}" for policy in ("heuristic", "entropy", "mlp", "alternate")] + [
    "smol/whiflash:mlp"]
# (family, prompt index, temperature, seed): both temperatures, seeds beyond 32 bits and a negative one (SGLang takes
# any int64 and hashes it as uint64); SmolLM2's requests are the slow ones, so fewer of them
SAMPLED = {"tiny": [(p, t, seed) for p in (0, 2, 4) for t, seed in ((0.7, 3), (1.0, 2**40 + 7), (1.0, -5))],
           "smol": [(0, 0.7, 2**40 + 7), (4, 1.0, 2**63 - 1)]}


def sampling(temperature: float, seed: int) -> dict:
    return {"temperature": temperature, "top_p": 0.9, "sampling_seed": seed}


@pytest.fixture(scope="module")
def sampled(servers, prompts):
    """Each family's seeded sampled requests, sent one by one to its vanilla and WHIFLASH servers (side by side)."""
    from concurrent.futures import ThreadPoolExecutor

    def one_by_one(name):
        family = name.split("/")[0]
        texts, max_new_tokens = prompts[family]
        return [servers[name].generate(texts[p], max_new_tokens, sampling(t, seed)) for p, t, seed in SAMPLED[family]]

    names = ["tiny/vanilla", "smol/vanilla", *SAMPLED_WHIFLASH]
    with ThreadPoolExecutor(len(names)) as pool:
        return dict(zip(names, pool.map(one_by_one, names)))


@pytest.mark.parametrize("name", SAMPLED_WHIFLASH)
def test_seeded_sampled_text_is_the_non_speculative_servers(sampled, name):
    """SGLang alone verifies sampled requests greedily on CPU; WHIFLASH accepts a draft iff it is the target's keyed
    sample, which is the non-speculative server's seeded draw, so the texts are the same token for token."""
    family = name.split("/")[0]
    for request, ours, theirs in zip(SAMPLED[family], sampled[name], sampled[f"{family}/vanilla"]):
        assert ours["output_ids"] == theirs["output_ids"], f"{name}, (prompt, T, seed) = {request}"
        assert ours["meta_info"]["spec_verify_ct"] > 0


def test_sampled_requests_are_sampled_and_speculated_on_smollm2(sampled, solo):
    """The seeded requests really sample (not SGLang's greedy text), and with the trained drafters WHIFLASH commits
    more than one token per verify round for them."""
    greedy = [solo["smol/vanilla"][p]["output_ids"] for p, _, _ in SAMPLED["smol"]]
    assert [r["output_ids"] for r in sampled["smol/vanilla"]] != greedy
    meta = [r["meta_info"] for r in sampled["smol/whiflash:mlp"]]
    assert sum(m["completion_tokens"] for m in meta) / sum(m["spec_verify_ct"] for m in meta) > 1


def test_one_seeded_request_ten_times_at_once_gives_one_text(servers, prompts, solo):
    """Ten copies of one seeded request, concurrent (so batched with each other as the scheduler likes), give one
    text, the non-speculative server's for that seed, and not the greedy one."""
    from concurrent.futures import ThreadPoolExecutor

    texts, max_new_tokens = prompts["smol"]
    request = (texts[2], max_new_tokens, {"temperature": 0.8, "top_p": 0.9, "sampling_seed": 2**32 + 1})
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: servers["smol/whiflash:mlp"].generate(*request), range(10)))
    texts_out = {tuple(a["output_ids"]) for a in answers}
    assert len(texts_out) == 1, [a["text"] for a in answers]
    assert list(texts_out.pop()) == servers["smol/vanilla"].generate(*request)["output_ids"]
    assert answers[0]["output_ids"] != solo["smol/vanilla"][2]["output_ids"]
