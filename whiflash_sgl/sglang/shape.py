"""The verify width and the EAGLE-3 tree shape WHIFLASH serves with. Pure Python, no SGLang.

Both drafters are verified over one width ``N`` per batch: the DFlash block size ``B`` (a block is a chain of ``B``
rows, the root included). SGLang's EAGLE drafting keeps ``topk`` candidates at the first step and ``topk * topk``
at each later step, then picks the best ``N - 1`` of all ``topk + (steps - 1) * topk**2`` candidates; with
``topk == 1`` its chain path requires ``N == steps + 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

from whiflash_sgl.errors import WhiFlashError

DEFAULT_TOPK = 4
DEFAULT_STEPS = 6  # the reference engine's default EAGLE-3 depth


@dataclass(frozen=True)
class TreeShape:
    width: int  # N: rows per request in verify, the root included
    steps: int
    topk: int


def eagle_candidates(steps: int, topk: int) -> int:
    return topk + (steps - 1) * topk * topk


def resolve_tree_shape(block_size: int, num_draft_tokens: int | None, steps: int | None,
                       topk: int | None) -> TreeShape:
    """The shape from the DFlash block size and whatever of the three SGLang flags the user set.

    Unset flags get the reference engine's defaults (depth 6, top-k 4, capped by the width); set ones are checked,
    and a conflict names the flag and the value that would work."""
    if block_size < 2:
        raise WhiFlashError(f"the DFlash block size must be at least 2, got {block_size}")
    if num_draft_tokens is not None and num_draft_tokens != block_size:
        raise WhiFlashError(
            f"--speculative-num-draft-tokens {num_draft_tokens} differs from the DFlash block size {block_size}: "
            f"WHIFLASH verifies both drafters over one width; drop the flag or set it to {block_size}"
        )
    width = block_size
    if topk is None:
        topk = 1 if steps == width - 1 else DEFAULT_TOPK
    if topk < 1:
        raise WhiFlashError(f"--speculative-eagle-topk must be at least 1, got {topk}")
    if steps is None:
        steps = width - 1 if topk == 1 else min(DEFAULT_STEPS, width - 1)
    if steps < 1:
        raise WhiFlashError(f"--speculative-num-steps must be at least 1, got {steps}")
    if topk == 1 and steps != width - 1:
        raise WhiFlashError(
            f"--speculative-eagle-topk 1 drafts a chain, which must fill the width {width}: "
            f"set --speculative-num-steps {width - 1}"
        )
    if eagle_candidates(steps, topk) < width - 1:
        raise WhiFlashError(
            f"--speculative-num-steps {steps} with --speculative-eagle-topk {topk} drafts "
            f"{eagle_candidates(steps, topk)} candidates, fewer than the {width - 1} the width {width} needs: "
            f"raise either flag"
        )
    return TreeShape(width, steps, topk)
