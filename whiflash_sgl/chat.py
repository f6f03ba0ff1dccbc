"""Chat prompts: the JSONL prompt-set format of the bench contract, and the target's chat template."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from whiflash_sgl.errors import WhiFlashError


@dataclass(frozen=True)
class ChatPrompt:
    id: str
    category: str
    messages: tuple[dict, ...]


def load_prompts(path: str | Path, categories: list[str] | None = None, limit: int | None = None) -> list[ChatPrompt]:
    """Prompts from a JSONL file (``{"id", "category", "messages"}`` per line), ``limit`` per category."""
    path = Path(path)
    if not path.is_file():
        raise WhiFlashError(f"prompt file {path} does not exist")
    prompts: list[ChatPrompt] = []
    with open(path, encoding="utf-8") as f:
        lines = list(f)  # split at newlines only: see whiflash_sgl.jsonl
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt = ChatPrompt(str(row["id"]), str(row["category"]), tuple(row["messages"]))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise WhiFlashError(f"{path}:{lineno}: not a prompt line ({exc}); expected id, category, messages") from exc
        prompts.append(prompt)
    if categories:
        present = {p.category for p in prompts}
        missing = [c for c in categories if c not in present]
        if missing:
            raise WhiFlashError(f"{path} has no prompts in categories {missing}; it has {sorted(present)}")
        prompts = [p for p in prompts if p.category in categories]
    if limit is not None:
        seen: dict[str, int] = {}
        kept = []
        for p in prompts:
            seen[p.category] = seen.get(p.category, 0) + 1
            if seen[p.category] <= limit:
                kept.append(p)
        prompts = kept
    return prompts


def encode_chat(tokenizer, messages) -> list[int]:
    """Token ids of ``messages`` with the chat template applied and the assistant turn opened."""
    if not getattr(tokenizer, "chat_template", None):
        raise WhiFlashError("the model's tokenizer has no chat template; pass raw text instead of chat messages")
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)
