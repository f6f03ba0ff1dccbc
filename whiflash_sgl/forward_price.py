"""What a target forward costs on this machine: the measured cost curve, scaled to the forwards observed here.

A committed curve was measured on one machine, and another runs its forwards faster or slower (two 2-core hosts of
this project differed 2x at one row), and not uniformly: a draft row's share of a forward moves with the hardware
(8 more rows of 8 sequences cost 2.4 ms on a CPU with AMX, where the bf16 curve was measured, and 8.6 ms on a Zen 4
without it, where trimming by that curve verified every node likelier than 0.08 at 8 requests). So the curve is
scaled in two parts, each per number of sequences in the forward (interpolated between the nearest counts seen),
since how far the curve is off moves with the batch too: roots alone ran 1.36x the curve at 8 sequences and 1.09x at
16 on a 2-core host, and one median over all counts had priced a 16-request round without drafts at 58 ms where it
ran 45 (so the plan drafted rounds of 75-110 ms), and one of 8 too cheaply; draft rows ran 3-4x the curve at 1
request (trees of dozens of rows over long contexts) and under 2x at 8.

The forward of the batch's roots alone is scaled by the median observed/curve ratio of the last ``CURVE_WINDOW`` such
forwards, and the draft rows on top of it by their own ratio: measured rows are uniform causal chunks over 256
positions, served draft trees are uneven and their contexts longer, and one scale fitted where the batch drafts
would misprice the roots alone, which is what not drafting costs. The draft rows' ratio is each forward's time beyond
its roots over the curve's, and the window's median of it weighted by the curve's time of each forward's draft rows:
a forward with a draft row or two is priced a millisecond over its roots, and its jitter divided by that had run a
plain median to 2.8-3.7x by the end of a 4-request run; pooled sums instead let one slow forward among the first four
of a size price its rows at 2.4x, and a batch that does not draft does not measure them again (a 4-request batch then
drafted in 6 of its 300 rounds). Beyond the counts that drafted ``TIMED`` times, draft rows are priced at the count's
roots' ratio, not the nearest count's: the draft rows of one request ran anywhere from 0.1 to 4 times the curve, and
borrowed by 4 requests at 0.1, they had the plan draft rounds it priced at 33 ms that ran 50. Before any roots alone
were seen, one median ratio over every forward scales both parts.
"""

from __future__ import annotations

import collections
import statistics
from collections.abc import Sequence

from whiflash_sgl.cost_curve import CostCurve, between_counts

CURVE_WINDOW = 64  # forwards whose observed time scales the cost curve to this machine
TIMED = 3  # forwards (or rounds) of a kind timed at a batch size before their ratio stands for that size


class ScaledCurve:
    """``curve`` scaled to the forwards :meth:`observe` was told of; called like the curve, ``(rows, sequences) ->
    seconds``, so it prices what :func:`whiflash_sgl.cost_curve.trim_to_value` keeps."""

    def __init__(self, curve: CostCurve) -> None:
        self.curve = curve
        self._ratios: collections.deque[float] = collections.deque(maxlen=CURVE_WINDOW)  # observed / curve, all
        # per number of sequences: observed / curve of roots-only forwards, and forwards with draft rows as (curve of
        # their roots alone, curve of the rest, observed seconds)
        self._roots: dict[int, collections.deque[float]] = {}
        self._drafted: dict[int, collections.deque[tuple[float, float, float]]] = {}
        # what was computed since the last forward: ("roots" | "rows", count) scales, ("price", rows, count) prices (a
        # round prices every action of every request, mostly at the same few row counts)
        self._memo: dict[tuple, float] = {}
        self._last_forward: tuple[int, float, int] | None = None

    def observe(self, rows: int, seconds: float, sequences: int = 1) -> None:
        """A forward of ``rows`` rows over ``sequences`` sequences took ``seconds``. Told again of the same forward
        (by each of its sequences, or by the engine and a drafter's cost model), it counts once: 16 copies of each
        forward would leave the 64-forward windows 4 forwards deep."""
        if (rows, seconds, sequences) == self._last_forward or rows <= 0:
            return
        self._last_forward = (rows, seconds, sequences)
        self._memo = {}
        roots, whole = self.curve(sequences, sequences), self.curve(rows, sequences)
        self._ratios.append(seconds / max(whole, 1e-9))
        if rows <= sequences:
            self._roots.setdefault(sequences, collections.deque(maxlen=CURVE_WINDOW)).append(seconds / max(roots, 1e-9))
        elif whole > roots:
            self._drafted.setdefault(sequences, collections.deque(maxlen=CURVE_WINDOW)).append(
                (roots, whole - roots, seconds))

    def __call__(self, rows: float, sequences: int = 1) -> float:
        """Seconds of a forward of ``rows`` rows over ``sequences`` sequences (0 for none)."""
        if rows <= 0:
            return 0.0
        key = ("price", rows, sequences)
        if key not in self._memo:
            roots, whole = self.curve(sequences, sequences), self.curve(rows, sequences)
            self._memo[key] = roots * self.roots_scale(sequences) + max(whole - roots, 0.0) * self.rows_scale(
                sequences)
        return self._memo[key]

    def roots_scale(self, sequences: int) -> float:
        """This machine's time over the curve's for the roots alone of ``sequences`` sequences: the median ratio at
        that count (``between_counts`` of the counts seen), else the median over every forward (1 before any)."""
        if not self._roots:
            return statistics.median(self._ratios) if self._ratios else 1.0
        counts = sorted(self._roots)
        return between_counts(counts, sequences, lambda i: self._roots_at(counts[i]))

    def rows_scale(self, sequences: int) -> float:
        """This machine's time over the curve's for the draft rows on top of the roots of ``sequences`` sequences:
        over the forwards with draft rows at that count, each less its roots' price (``between_counts`` of the counts
        seen; beyond them, the roots' scale at ``sequences``)."""
        counts = sorted(n for n, window in self._drafted.items() if len(window) >= TIMED)
        if not self._roots or not counts:
            return self.roots_scale(sequences)
        return between_counts(counts, sequences, lambda i: self._rows_at(counts[i]), self.roots_scale(sequences))

    def knows_roots(self, sequences: int) -> bool:
        """Whether forwards of ``sequences`` sequences' roots alone were timed ``TIMED`` times, or those of a count
        below it and one above it were: the first such forward after a batch's prefill ran half again as long as the
        next ones, and alone it priced not drafting at 16 requests at 87.5 ms where it ran 68. Between two counts
        timed, the scale is interpolated (``roots_scale``), which is where a run's tail passes through every count
        below its level, a few rounds each, when drafting pays most."""
        if len(self._roots.get(sequences, ())) >= TIMED:
            return True
        timed = [n for n, ratios in self._roots.items() if len(ratios) >= TIMED]
        return any(n < sequences for n in timed) and any(n > sequences for n in timed)

    def _roots_at(self, count: int) -> float:
        if ("roots", count) not in self._memo:
            self._memo["roots", count] = statistics.median(self._roots[count])
        return self._memo["roots", count]

    def _rows_at(self, count: int) -> float:
        if ("rows", count) not in self._memo:
            roots = self.roots_scale(count)
            ratios = [((seconds - base * roots) / extra, extra) for base, extra, seconds in self._drafted[count]]
            self._memo["rows", count] = max(weighted_median(ratios), 0.0)
        return self._memo["rows", count]


def weighted_median(pairs: Sequence[tuple[float, float]]) -> float:
    """The median of the ``(value, weight)`` pairs' values, each counting by its weight."""
    ordered = sorted(pairs)
    half, weight = sum(w for _, w in ordered) / 2, 0.0
    for value, w in ordered:
        weight += w
        if weight >= half:
            return value
    return ordered[-1][0]
