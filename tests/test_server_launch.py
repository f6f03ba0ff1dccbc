"""``python -m whiflash_sgl.launch_server``: backend choice, clear start-up errors, and a real launch."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest
import requests

from whiflash_sgl import launch_server


def test_auto_backend_is_sglang_only_with_cuda_and_sglang(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert launch_server.choose_backend("auto") == ("reference", "no CUDA device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(launch_server.importlib.util, "find_spec", lambda name: None)
    assert launch_server.choose_backend("auto") == ("reference", "sglang is not installed")
    monkeypatch.setattr(launch_server.importlib.util, "find_spec", lambda name: object())
    assert launch_server.choose_backend("auto")[0] == "sglang"
    assert launch_server.choose_backend("reference")[0] == "reference"


@pytest.mark.parametrize("flags, message", [
    (["--speculative-algorithm", "WHIFLASH", "--whiflash-policy", "nope"], "unknown routing policy 'nope'"),
    (["--speculative-algorithm", "MEDUSA"], "unknown --speculative-algorithm 'MEDUSA'"),
    (["--max-queued-requests", "0"], "--max-queued-requests must be >= 1"),
    (["--max-running-requests", "0"], "--max-running-requests must be >= 1, got 0"),
    (["--kv-budget-mb", "0"], "--kv-budget-mb must be >= 1, got 0"),
    (["--max-prompt-chars", "0"], "--max-prompt-chars must be positive, got 0"),
    (["--max-request-bytes", "0"], "--max-request-bytes must be positive, got 0"),
    (["--timeout-read", "-1"], "--timeout-read must be positive, got -1.0"),
    (["--sampling-rule", "coin"], "--sampling-rule must be one of keyed, rejection, got 'coin'"),
])
def test_bad_settings_fail_before_serving(capsys, served_dir, flags, message):
    code = launch_server.main(["--backend", "reference", "--model-path", str(served_dir / "model"),
                               "--whiflash-config", str(served_dir / "whiflash.json"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert "backend: reference" in err


def test_reference_backend_refuses_flags_it_does_not_know(capsys):
    """SGLang-only flags are an error on the reference backend, not silently ignored."""
    with pytest.raises(SystemExit) as exit_info:
        launch_server.main(["--backend", "reference", "--tp-size", "2"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --tp-size 2" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_module_serves_until_terminated(served_dir):
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "whiflash_sgl.launch_server", "--backend", "reference",
         "--model-path", str(served_dir / "model"), "--speculative-algorithm", "WHIFLASH", "--whiflash-policy",
         "heuristic", "--whiflash-config", str(served_dir / "whiflash.json"), "--port", str(port), "--threads", "1",
         "--log-level", "warning"],
        stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        out = requests.post(f"http://127.0.0.1:{port}/generate", timeout=60, json={
            "text": "def add(a, b):", "sampling_params": {"max_new_tokens": 8, "temperature": 0}}).json()
        assert out["meta_info"]["completion_tokens"] == 8 and "spec_accept_length" in out["meta_info"]
        # SIGTERM with a request under way: it still gets all of its tokens, then the server exits cleanly
        stream = requests.post(f"http://127.0.0.1:{port}/generate", timeout=60, stream=True, json={
            "text": "def add(a, b):", "stream": True, "sampling_params": {"max_new_tokens": 48, "temperature": 0}})
        chunks = stream.iter_lines()
        assert next(chunk for chunk in chunks if chunk).startswith(b"data: {")
        proc.terminate()
        events = [json.loads(chunk[len(b"data: "):]) for chunk in chunks if chunk and chunk != b"data: [DONE]"]
        assert events[-1]["meta_info"]["completion_tokens"] == 48
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "launch_server: backend: reference" in err
    assert re.search(r"reference engine \(whiflash:heuristic, batches of up to 16 requests, (bfloat16|float32) "
                     r"matmul\) on http://127\.0\.0\.1:\d+", err)


def test_a_port_in_use_is_a_clear_error(capsys, served_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = launch_server.main(["--backend", "reference", "--model-path", str(served_dir / "model"),
                                   "--port", str(port)])
    err = capsys.readouterr().err
    assert code == 2 and f"launch_server: error: cannot listen on 127.0.0.1:{port}: Address already in use" in err
    assert "Traceback" not in err


def test_sglang_backend_hands_every_other_flag_to_sglangs_launcher(monkeypatch, capsys):
    import whiflash_sgl.sglang.launch as sglang_launch

    seen = []
    monkeypatch.setattr(sglang_launch, "main", lambda argv: seen.append(argv) or 0)
    argv = ["--model-path", "Qwen/Qwen3-8B", "--backend", "sglang", "--whiflash-policy", "entropy", "--tp-size", "2"]
    assert launch_server.main(argv) == 0
    assert seen == [["--model-path", "Qwen/Qwen3-8B", "--whiflash-policy", "entropy", "--tp-size", "2"]]
    assert "backend: sglang (--backend sglang)" in capsys.readouterr().err
