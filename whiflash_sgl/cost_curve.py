"""The target's cost curve: seconds of one forward against the rows it verifies, measured on this machine.

A verify row costs very differently at batch 1 and at batch 16. On a CPU a forward of a few rows is bound by
reading the weights, so extra rows are nearly free; past some tens of rows the matrix products become compute-bound
and every row costs its share. Speculation pays only while the rows it adds cost less than the tokens they are
expected to bring, so the engine (which trims draft trees by value, ``engine.trim_to_value``) and the router (which
prices each action at its marginal cost on top of the rest of the batch) both read this curve.

``whiflash cost-curve`` measures it: forwards of ``n`` rows spread over ``min(n, 16)`` sequences with a realistic
cached prefix each, the median of several passes over every ``n`` (interleaved, so that a slow spell of a shared
machine does not land on a few row counts). The curve is piecewise linear between the measured points and linear
beyond the last two.
"""

from __future__ import annotations

import bisect
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from whiflash_sgl.errors import WhiFlashError
from whiflash_sgl.tree import DraftTree

DEFAULT_ROWS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
COST_CURVE_FILE = "cost_curve.json"  # next to a target's committed drafters, in WEIGHTS_DIR


@dataclass(frozen=True)
class CostCurve:
    rows: tuple[int, ...]  # ascending
    seconds: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.rows) < 2 or len(self.rows) != len(self.seconds) or list(self.rows) != sorted(set(self.rows)):
            raise WhiFlashError("a cost curve needs two or more distinct ascending row counts, one time each")
        object.__setattr__(self, "seconds", _non_decreasing(self.seconds))

    def __call__(self, rows: float) -> float:
        """Seconds of a forward of ``rows`` rows; 0 for no forward at all."""
        if rows <= 0:
            return 0.0
        xs, ys = self.rows, self.seconds
        i = min(max(bisect.bisect_left(xs, rows), 1), len(xs) - 1)  # the segment, or the first or last one beyond
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return max(y0 + (y1 - y0) * (rows - x0) / (x1 - x0), 0.0)

    def added(self, base_rows: float, extra_rows: float) -> float:
        """What ``extra_rows`` add to a forward that already has ``base_rows`` (the whole forward when none)."""
        return self(base_rows + extra_rows) - self(base_rows)

    @classmethod
    def load(cls, path: Path) -> "CostCurve":
        try:
            data = json.loads(Path(path).read_text())
            return cls(tuple(int(r) for r in data["rows"]), tuple(float(s) for s in data["seconds"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise WhiFlashError(f"cannot read a cost curve from {path}: {exc}; remake it with `whiflash cost-curve`")

    def save(self, path: Path, **about) -> None:
        Path(path).write_text(json.dumps({**about, "rows": list(self.rows), "seconds": list(self.seconds)},
                                         indent=1) + "\n")


def _non_decreasing(values: Sequence[float]) -> tuple[float, ...]:
    """The nearest non-decreasing sequence in least squares (pool adjacent violators). A forward of more rows never
    costs less: a measured dip is noise, and left in, it would tell the router that the rows past it are free."""
    blocks: list[list[float]] = []  # [sum, count] of runs pooled to their mean
    for value in values:
        blocks.append([float(value), 1])
        while len(blocks) > 1 and blocks[-2][0] * blocks[-1][1] > blocks[-1][0] * blocks[-2][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return tuple(total / count for total, count in blocks for _ in range(int(count)))


def measure(target, rows: Sequence[int] = DEFAULT_ROWS, prefix: int = 256, repeats: int = 5,
            progress: bool = True) -> CostCurve:
    """Time target forwards of each row count in ``rows`` (the median of ``repeats`` passes over all the counts), the
    rows spread evenly over ``min(n, 16)`` sequences that each have ``prefix`` positions cached."""
    from tqdm import tqdm

    from whiflash_sgl.target import Chunk

    pool, vocab = target.pool, target.model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    sequences = 16
    need = sequences * prefix + max(rows)
    if not pool.reserve(need):
        raise WhiFlashError(f"measuring the cost curve needs {need} KV slots; raise the KV budget")
    cached = [pool.alloc(prefix) for _ in range(sequences)]
    try:
        for rows_of in cached:  # fill the prefixes with real KV
            ids = torch.randint(vocab, (prefix,), generator=generator).tolist()
            target.forward([Chunk(ids, torch.arange(prefix), rows_of[:0], rows_of)])

        def timed(n: int) -> float:
            batch = min(n, sequences)
            sizes = [n // batch + (i < n % batch) for i in range(batch)]
            chunks = [Chunk(torch.randint(vocab, (k,), generator=generator).tolist(), torch.arange(prefix, prefix + k),
                            cached[i], pool.alloc(k), logits=k) for i, k in enumerate(sizes)]
            tic = time.perf_counter()
            target.forward(chunks)
            seconds = time.perf_counter() - tic
            for chunk in chunks:
                pool.free(chunk.rows)
            return seconds

        for n in rows:  # the first run of a shape warms it up
            timed(n)
        times: dict[int, list[float]] = {n: [] for n in rows}
        with tqdm(total=repeats * len(rows), desc="cost curve", disable=not progress) as bar:
            for _ in range(repeats):  # every row count once per pass: a machine's slow spell hits them all alike
                for n in rows:
                    times[n].append(timed(n))
                    bar.update()
        seconds = [statistics.median(times[n]) for n in rows]
        return CostCurve(tuple(rows), tuple(seconds))
    finally:
        for rows_of in cached:
            pool.free(rows_of)
        pool.release(need)


def plot(curve: CostCurve, path: Path, title: str) -> Path:
    """Seconds per forward and seconds per row against rows per forward."""
    from whiflash_sgl.plots import _pyplot

    plt = _pyplot()
    fig, left = plt.subplots(figsize=(7, 4))
    left.plot(curve.rows, [1000 * s for s in curve.seconds], "-o", color="tab:blue", ms=4)
    left.set_xlabel("rows verified in one target forward (all requests together)")
    left.set_ylabel("ms per forward", color="tab:blue")
    left.set_xscale("log", base=2)
    right = left.twinx()
    right.plot(curve.rows, [1000 * s / r for s, r in zip(curve.seconds, curve.rows)], "-s", color="tab:orange",
               ms=4)
    right.set_ylabel("ms per row", color="tab:orange")
    right.set_yscale("log")
    left.set_title(title)
    left.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def trim_to_value(trees: Sequence[DraftTree], curve: CostCurve) -> list[DraftTree]:
    """Spend one round's verify rows where they pay, across the whole batch.

    Every request's root row is verified and commits a token. Draft nodes then join the forward likeliest first (by
    ``DraftTree.probs``; trees without them are kept whole), as long as a node's expected token is worth its rows'
    added cost at the batch's current rate: ``p / (T(R + 1) - T(R)) >= tokens / T(R)``. At batch 1 that keeps all
    but the long shots; as the batch grows each row costs more and the trees shrink, down to no draft at all."""
    rows = len(trees) + sum(len(t) for t in trees if not t.probs)
    tokens = float(len(trees))
    nodes = sorted(((-p, t.depths[n], i, n) for i, t in enumerate(trees) if t.probs for n, p in enumerate(t.probs)))
    kept: dict[int, list[int]] = {i: [] for i, t in enumerate(trees) if t.probs}
    for neg_p, _, i, n in nodes:
        if -neg_p * curve(rows) < tokens * curve.added(rows, 1):
            break
        if trees[i].parents[n] >= 0 and trees[i].parents[n] not in kept[i]:
            continue  # a node likelier than its parent (the estimate broke its contract) waits for the parent
        rows += 1
        tokens += -neg_p
        kept[i].append(n)
    return [t.subtree(sorted(kept[i])) if i in kept else t for i, t in enumerate(trees)]
