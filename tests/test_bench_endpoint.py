"""``whiflash bench --endpoint``: the bench against running embedded servers (a vanilla one and a WhiFlash one, in
threads of this process), its JSON contract, and one-line errors for unreachable or failing servers and bad flags."""

from __future__ import annotations

import json
import socket

import pytest

from whiflash_sgl.bench_endpoint import Endpoint, parse_endpoints
from whiflash_sgl.errors import WhiFlashError

ROW_KEYS = ("method", "category", "prompts", "new_tokens", "seconds", "tokens_per_s", "tau", "rounds",
            "speedup_vs_vanilla", "identical_to_vanilla", "paradigm_rounds", "switches", "switch_overhead_frac")


@pytest.fixture(scope="module")
def vanilla_server(served_dir):
    """The embedded server without speculation, on the same tiny target as the ``server`` fixture."""
    from whiflash_sgl.server.launch import start_background
    from whiflash_sgl.server.model import ServedModel
    from whiflash_sgl.server.service import Service

    running = start_background(Service(ServedModel.load(str(served_dir / "model"), None, served_name="tiny")))
    yield running
    running.stop()




def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_endpoint_bench_writes_the_reference_contract(run_cli, server, vanilla_server, served_dir, prompts,
                                                      tmp_path):
    out_json = tmp_path / "out.json"
    code, out, err = run_cli("bench", "--prompts", prompts, "--max-new-tokens", 24, "--out", out_json,
                          "--endpoint", f"whiflash:heuristic={server.url}",
                          "--endpoint", f"vanilla={vanilla_server.url}")
    assert code == 0, err
    assert "speedup" in out and "whiflash:heuristic" in out
    report = json.loads(out_json.read_text())
    assert report["model"] == str(served_dir / "model") and report["max_new_tokens"] == 24
    assert report["temperature"] == 0.0
    assert report["device"].startswith("endpoint") and server.url in report["device"]
    assert vanilla_server.url in report["device"]
    rows = {(r["method"], r["category"]): r for r in report["results"]}
    methods = ("whiflash:heuristic", "vanilla")  # the labels' order
    assert [r["method"] for r in report["results"]][::3] == list(methods)
    assert set(rows) == {(m, c) for m in methods for c in ("chat", "code", "all")}
    for row in rows.values():
        assert set(ROW_KEYS) <= set(row)
        assert row["identical_to_vanilla"] is True
    vanilla, routed = rows[("vanilla", "all")], rows[("whiflash:heuristic", "all")]
    assert vanilla["prompts"] == routed["prompts"] == 3 and vanilla["new_tokens"] == routed["new_tokens"]
    assert vanilla["tau"] == 1.0 and vanilla["rounds"] == vanilla["new_tokens"] and vanilla["switches"] == 0
    assert vanilla["speedup_vs_vanilla"] == 1.0 and vanilla["paradigm_rounds"] == {"vanilla": vanilla["rounds"]}
    assert routed["tau"] > 1 and routed["rounds"] < routed["new_tokens"]
    assert set(routed["paradigm_rounds"]) <= {"eagle3", "eagle3:first", "dflash", "ngram"}
    assert isinstance(routed["switches"], int) and routed["switch_overhead_frac"] is not None
    assert routed["draft_ms_per_round"] is None  # not visible over HTTP
    assert routed["speedup_vs_vanilla"] > 0
    assert len(report["per_prompt"]) == 6
    assert all(r["server_seconds"] is not None and r["seconds"] > 0 for r in report["per_prompt"])


def test_plain_urls_take_methods_in_order(run_cli, vanilla_server, prompts, tmp_path):
    out_json = tmp_path / "out.json"
    code, _, err = run_cli("bench", "--prompts", prompts, "--limit", 1, "--categories", "chat",
                        "--max-new-tokens", 4, "--methods", "vanilla", "--endpoint", vanilla_server.url,
                        "--out", out_json)
    assert code == 0, err
    rows = json.loads(out_json.read_text())["results"]
    assert [(r["method"], r["category"], r["prompts"]) for r in rows] == [("vanilla", "chat", 1), ("vanilla", "all", 1)]


def test_servers_of_different_models_need_model(run_cli, server, vanilla_server, served_dir, prompts, tmp_path,
                                                monkeypatch):
    monkeypatch.setattr(vanilla_server.service.model, "model_path", "elsewhere/tiny")  # same weights, another name
    argv = ["bench", "--prompts", prompts, "--limit", 1, "--categories", "chat", "--max-new-tokens", 4,
            "--endpoint", f"vanilla={vanilla_server.url}", "--endpoint", f"whiflash:heuristic={server.url}"]
    code, _, err = run_cli(*argv)
    assert code == 2 and "serve different models" in err and "--model" in err
    out_json = tmp_path / "out.json"
    code, _, err = run_cli(*argv, "--model", served_dir / "model", "--out", out_json)
    assert code == 0, err
    assert json.loads(out_json.read_text())["model"] == str(served_dir / "model")


def test_unreachable_endpoint_names_the_url_and_says_to_start_the_server(run_cli, prompts):
    url = f"http://127.0.0.1:{_free_port()}"
    code, out, err = run_cli("bench", "--prompts", prompts, "--endpoint", f"vanilla={url}")
    assert code == 2 and out == "" and "Traceback" not in err
    assert f"cannot reach vanilla's server at {url}" in err and "start it first" in err
    assert len(err.strip().splitlines()) == 1


def test_a_failing_request_reports_the_status_and_the_servers_message(run_cli, vanilla_server, prompts):
    code, _, err = run_cli("bench", "--prompts", prompts, "--max-new-tokens", 600,
                        "--endpoint", f"vanilla={vanilla_server.url}")
    assert code == 2 and "Traceback" not in err
    assert "answered HTTP 400 to POST /generate" in err and "context window" in err


@pytest.mark.parametrize("flags, message", [
    (["--dtype", "bfloat16"], "which --dtype (reference-engine settings) cannot reach"),
    (["--threads", "2", "--config", "c.yaml"], "which --config, --threads (reference-engine settings)"),
    (["--methods", "vanilla,vanilla"], "--methods names vanilla more than once"),
])
def test_engine_only_flags_and_repeated_methods_are_refused(run_cli, prompts, flags, message):
    code, _, err = run_cli("bench", "--prompts", prompts, "--endpoint", "http://127.0.0.1:1", *flags)
    assert code == 2 and message in err


@pytest.mark.parametrize("values, methods, message", [
    (["vanilla=http://a:1", "vanilla=http://b:2"], None, "vanilla is given to more than one --endpoint"),
    (["http://a:1", "ngram=http://b:2"], None, "every --endpoint as METHOD=URL"),
    (["http://a:1", "http://b:2"], ["vanilla"], "need --methods with as many names"),
    (["vanilla=http://a:1"], ["ngram"], "must name the --endpoint labels vanilla"),
    (["vanilla=a:1"], None, "expected http://HOST:PORT"),
    (["=http://a:1"], None, "empty method label"),
])
def test_bad_endpoint_lists_are_clear_errors(values, methods, message):
    with pytest.raises(WhiFlashError, match=message):
        parse_endpoints(values, methods)


def test_endpoint_labels_and_order():
    assert parse_endpoints(["vanilla=http://a:1/", "whiflash:mlp=http://b:2"], ["whiflash:mlp", "vanilla"]) == [
        Endpoint("whiflash:mlp", "http://b:2"), Endpoint("vanilla", "http://a:1")]
    assert parse_endpoints(["http://a:1?x=1"], ["eagle3"]) == [Endpoint("eagle3", "http://a:1?x=1")]


def test_sglang_whiflash_routing_in_meta_info_becomes_paradigm_rounds_and_switches():
    """SGLang's WHIFLASH worker reports the paradigm of every verify round (meta_info.spec_paradigms)."""
    from whiflash_sgl.bench_endpoint import endpoint_run
    from whiflash_sgl.chat import ChatPrompt

    meta = {"completion_tokens": 9, "spec_verify_ct": 4, "spec_paradigms": ["eagle3", "dflash", "dflash", "eagle3"]}
    tokens, run = endpoint_run("whiflash:mlp", ChatPrompt("p", "code", ()), {"output_ids": list(range(9)),
                                                                              "meta_info": meta}, 1.5)
    assert tokens == list(range(9))
    assert run.paradigm_rounds == {"eagle3": 2, "dflash": 2} and run.switches == 2
    assert run.rounds == 4 and run.tau == 9 / 4
