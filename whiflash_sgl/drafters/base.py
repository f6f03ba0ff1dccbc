"""The drafter interface: given the committed sequence, propose a draft tree below its last token."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from whiflash_sgl.tree import DraftTree


@dataclass
class SequenceState:
    """What a drafter may look at. ``tokens[-1]`` is the root of the next draft; its target KV is not cached yet.

    ``features`` holds the target's captured hidden states for ``tokens[:-1]`` (``[n-1, layers, H]``), or is None when
    the engine captures nothing (model-free drafters).
    """

    tokens: list[int]
    prompt_len: int
    features: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


class Drafter(Protocol):
    name: str

    def start(self, state: SequenceState) -> None:
        """A new sequence begins (its prompt is prefilled); drop any per-sequence state."""

    def propose(self, state: SequenceState, max_depth: int) -> DraftTree:
        """A draft below ``state.tokens[-1]`` no deeper than ``max_depth`` (may be empty)."""
