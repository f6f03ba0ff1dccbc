"""JSON-lines files."""

from __future__ import annotations

import json
from pathlib import Path


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSON-lines file.

    Lines are split at newlines only. ``str.splitlines()`` also splits at U+2028, U+0085 and other separators that
    ``json.dumps(..., ensure_ascii=False)`` leaves raw inside strings (real chat prompts contain them), which would
    cut a row in two."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
