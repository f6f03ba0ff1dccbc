"""The target's cost curve: seconds of one forward against the rows it verifies and the sequences they belong to,
measured on this machine.

A verify row costs very differently at batch 1 and at batch 16. On a CPU a forward of a few rows is bound by
reading the weights, so extra rows are nearly free; past some tens of rows the matrix products become compute-bound
and every row costs its share. Each sequence in a forward costs too (its own attention over its own cache), and in
a round the sequences are given: only the rows a request drafts are a choice. So the curve is kept per number of
sequences, and what a draft row adds is read at the round's own sequence count (measured at 8 sequences on a
2-core CPU: 8 rows 76 ms, 16 rows 78 ms; a curve over rows alone, whose 16 rows were 16 sequences, priced those
eight extra rows at 10 ms). Speculation pays only while the rows it adds cost less than the tokens they are expected
to bring, so the engine (which trims draft trees by value, ``engine.trim_to_value``) and the router (which prices
each action at its marginal cost on top of the rest of the batch) both read this curve.

``whiflash cost-curve`` measures it: forwards of 1 to 16 sequences with 1 to 32 rows each (at most 256 in all) and
a realistic cached prefix each, the median of several passes over every shape (interleaved, so that a slow spell of
a shared machine does not land on a few shapes). Per sequence count the curve is piecewise linear between the
measured rows and linear beyond the last two; between two measured counts it is interpolated, and beyond the last
it is that count's.
"""

from __future__ import annotations

import bisect
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from whiflash_sgl.errors import WhiFlashError
from whiflash_sgl.tree import DraftTree

SEQUENCES = (1, 2, 4, 8, 16)  # sequences per measured forward
ROWS_EACH = (1, 2, 4, 8, 16, 32)  # rows per sequence in a measured forward
MAX_ROWS = 256
# next to a target's committed drafters, in WEIGHTS_DIR: one per precision of the target's matmuls (``Target.matmul``)
COST_CURVE_FILES = {"float32": "cost_curve.json", "bfloat16": "cost_curve_bf16.json"}
Price = Callable[[float, int], float]  # seconds of a forward of (rows, sequences): a CostCurve, or a scaled price


@dataclass(frozen=True)
class CostCurve:
    """Measured forwards: ``rows[i]`` rows over ``sequences[i]`` sequences took ``seconds[i]`` (no ``sequences``:
    one curve over rows, whatever the sequences)."""

    rows: tuple[int, ...]
    seconds: tuple[float, ...]
    sequences: tuple[int, ...] = ()
    # per measured sequence count, ascending: (count, rows ascending, seconds made non-decreasing)
    lines: tuple[tuple[int, tuple[int, ...], tuple[float, ...]], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        counts = self.sequences or (1,) * len(self.rows)
        if len(self.rows) != len(self.seconds) or len(counts) != len(self.rows):
            raise WhiFlashError("a cost curve needs one time (and one sequence count, where given) per row count")
        lines = []
        for count in sorted(set(counts)):
            points = [(r, t) for c, r, t in zip(counts, self.rows, self.seconds) if c == count]
            rows = [r for r, _ in points]
            if len(rows) < 2 or rows != sorted(set(rows)):
                raise WhiFlashError("a cost curve needs two or more distinct ascending row counts per sequence "
                                    "count, one time each")
            lines.append((count, tuple(rows), _non_decreasing([t for _, t in points])))
        object.__setattr__(self, "lines", tuple(lines))
        pooled = {(count, r): t for count, rows, seconds in lines for r, t in zip(rows, seconds)}
        object.__setattr__(self, "seconds", tuple(pooled[c, r] for c, r in zip(counts, self.rows)))

    def __call__(self, rows: float, sequences: int = 1) -> float:
        """Seconds of a forward of ``rows`` rows over ``sequences`` sequences; 0 for no forward at all."""
        if rows <= 0:
            return 0.0
        return between_counts([count for count, _, _ in self.lines], sequences, lambda i: _along(self.lines[i], rows))

    @classmethod
    def load(cls, path: Path) -> "CostCurve":
        try:
            data = json.loads(Path(path).read_text())
            return cls(tuple(int(r) for r in data["rows"]), tuple(float(s) for s in data["seconds"]),
                       tuple(int(c) for c in data.get("sequences", ())))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise WhiFlashError(f"cannot read a cost curve from {path}: {exc}; remake it with `whiflash cost-curve`")

    def save(self, path: Path, **about) -> None:
        shape = {"sequences": list(self.sequences)} if self.sequences else {}
        Path(path).write_text(json.dumps({**about, **shape, "rows": list(self.rows), "seconds": list(self.seconds)},
                                         indent=1) + "\n")


def between_counts(counts: Sequence[int], sequences: float, value: Callable[[int], float],
                   beyond: float | None = None) -> float:
    """A quantity known at the ascending sequence ``counts`` (``value(i)`` at ``counts[i]``), at ``sequences``: its
    value at that count, else linear between the two nearest counts, else (beyond them) ``beyond`` where given, the
    nearest one's otherwise."""
    i = bisect.bisect_left(counts, sequences)
    if i == len(counts) or (i == 0 and counts[0] != sequences):
        return value(min(i, len(counts) - 1)) if beyond is None else beyond
    if counts[i] == sequences:
        return value(i)
    w = (sequences - counts[i - 1]) / (counts[i] - counts[i - 1])
    return (1 - w) * value(i - 1) + w * value(i)


def _along(line: tuple[int, tuple[int, ...], tuple[float, ...]], rows: float) -> float:
    """One sequence count's curve at ``rows``: piecewise linear, and linear beyond its first and last segments."""
    _, xs, ys = line
    i = min(max(bisect.bisect_left(xs, rows), 1), len(xs) - 1)  # the segment, or the first or last one beyond
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return max(y0 + (y1 - y0) * (rows - x0) / (x1 - x0), 0.0)


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


def measure(target, prefix: int = 256, repeats: int = 5, progress: bool = True) -> CostCurve:
    """Time target forwards of every shape: ``SEQUENCES`` sequences with ``ROWS_EACH`` rows each, at most
    ``MAX_ROWS`` in all (the median of ``repeats`` passes over all the shapes); each sequence has ``prefix``
    positions cached."""
    from tqdm import tqdm

    from whiflash_sgl.target import Chunk

    pool, vocab = target.pool, target.model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    shapes = [(n, k) for n in SEQUENCES for k in ROWS_EACH if n * k <= MAX_ROWS]
    need = max(SEQUENCES) * prefix + MAX_ROWS
    region = pool.reserve(need)
    if region is None:
        raise WhiFlashError(f"measuring the cost curve needs {need} KV slots; raise the KV budget")
    try:
        cached = [region.alloc(prefix) for _ in range(max(SEQUENCES))]  # each sequence's rows together, as served
        for rows_of in cached:  # fill the prefixes with real KV
            ids = torch.randint(vocab, (prefix,), generator=generator).tolist()
            target.forward([Chunk(ids, torch.arange(prefix), rows_of[:0], rows_of)])

        def timed(sequences: int, each: int) -> float:
            chunks = [Chunk(torch.randint(vocab, (each,), generator=generator).tolist(),
                            torch.arange(prefix, prefix + each), cached[i], region.alloc(each), logits=each)
                      for i in range(sequences)]
            tic = time.perf_counter()
            target.forward(chunks)
            seconds = time.perf_counter() - tic
            for chunk in chunks:
                region.free(chunk.rows)
            return seconds

        for shape in shapes:  # the first run of a shape warms it up
            timed(*shape)
        times: dict[tuple[int, int], list[float]] = {shape: [] for shape in shapes}
        with tqdm(total=repeats * len(shapes), desc="cost curve", disable=not progress) as bar:
            for _ in range(repeats):  # every shape once per pass: a machine's slow spell hits them all alike
                for shape in shapes:
                    times[shape].append(timed(*shape))
                    bar.update()
        return CostCurve(tuple(n * k for n, k in shapes), tuple(statistics.median(times[s]) for s in shapes),
                         tuple(n for n, _ in shapes))
    finally:
        pool.release(region)


def plot(curve: CostCurve, path: Path, title: str) -> Path:
    """Milliseconds per forward against rows per forward, one line per number of sequences in it."""
    from whiflash_sgl.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for count, rows, seconds in curve.lines:
        ax.plot(rows, [1000 * t for t in seconds], "-o", ms=4, label=f"{count} sequence{'s' * (count > 1)}")
    ax.set_xlabel("rows verified in one target forward (all requests together)")
    ax.set_ylabel("ms per forward")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=8)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def trim_to_value(trees: Sequence[DraftTree], price: Price) -> list[DraftTree]:
    """Spend one round's verify rows where they pay, across the whole batch.

    Every request's root row is verified and commits a token. Draft nodes then join the forward likeliest first (by
    ``DraftTree.probs``; trees without them are kept whole), as long as a node's expected token is worth its rows'
    added cost at the batch's current rate: ``p / (T(R + 1) - T(R)) >= tokens / T(R)`` (``T = price`` at the
    batch's sequence count: the curve, or a cost model's price of it scaled to this machine). At batch 1 that keeps
    all but the long shots; as the batch grows each row costs more and the trees shrink, down to no draft at all."""
    sequences = len(trees)
    rows = sequences + sum(len(t) for t in trees if not t.probs)
    tokens = float(sequences)
    nodes = sorted(((-p, t.depths[n], i, n) for i, t in enumerate(trees) if t.probs for n, p in enumerate(t.probs)))
    kept: dict[int, list[int]] = {i: [] for i, t in enumerate(trees) if t.probs}
    for neg_p, _, i, n in nodes:
        if -neg_p < _bar(price, rows, tokens, sequences):
            break
        if trees[i].parents[n] >= 0 and trees[i].parents[n] not in kept[i]:
            continue  # a node likelier than its parent (the estimate broke its contract) waits for the parent
        rows += 1
        tokens += -neg_p
        kept[i].append(n)
    return [t.subtree(sorted(kept[i])) if i in kept else t for i, t in enumerate(trees)]


def value_bar(trees: Sequence[DraftTree], price: Price) -> tuple[float, float]:
    """For one round's trimmed ``trees``: the least probability at which one more draft node would pay for its row
    on top of them (what :func:`trim_to_value` would ask of the next node), and the tokens per second the round is
    expected to commit. The engine hands both to the next round's drafters: they need not draft what could not pass,
    nor spend on a draft step more time than the tokens it brings are worth."""
    if not trees:
        return 0.0, 0.0
    rows = len(trees) + sum(len(t) for t in trees)
    tokens = len(trees) + sum(sum(t.probs) for t in trees)
    return _bar(price, rows, tokens, len(trees)), tokens / price(rows, len(trees))


def _bar(price: Price, rows: int, tokens: float, sequences: int) -> float:
    """The probability a node needs to pay for one more row in a forward of ``rows`` rows over ``sequences``
    sequences that commits ``tokens`` (expected): its share of the forward's rate, ``tokens * dT / T``."""
    return tokens * (price(rows + 1, sequences) - price(rows, sequences)) / price(rows, sequences)
