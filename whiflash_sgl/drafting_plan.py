"""Which of a round's requests draft: the batch's speculation budget, decided for the whole round at once.

Each request's policy names the action it would draft with; whether drafting pays is a property of the batch. A
drafter call costs a fixed part plus a part per sequence (EAGLE-3's fixed part is most of its cost for one
sequence), and every drafted row joins one shared forward whose price per row the target's cost curve gives. Asked
one by one, every request finds that it alone would pay the drafter's fixed part and drafts nothing, while eight of
them together would have shared it; so the plan orders the requests by their own value (expected extra tokens per
second they add) and takes the prefix of that order that maximises the round's tokens per second.

A request's expected tau is its policy's prediction where the policy makes one (the MLP's, from this round's
features), scaled by :class:`Calibration` to what verified drafts have accepted; otherwise the tau its paradigm
reached when it last drafted, and then a request idle for a while is due for a probe, which drafts in any case
(those statistics go stale while it idles).

Over the plan stands :class:`RealizedRates`: what the batch actually committed per second in its rounds with drafts
and without. The plan predicts from a cost model, which cannot see everything (the work around a round per request,
trees that cost more per row than the curve's uniform chunks, optimistic tau); where the measured rates say that
drafting loses, the batch does not draft.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass

from whiflash_sgl.router import CostModel, members

RATE_WINDOW = 16  # a batch size's latest rounds of each kind (with drafts, without) whose committed rate is compared
IDLE_EVERY = 16  # a batch that drafted this many rounds in a row verifies its roots alone once: the rate without
EXPLORE_EVERY = 16  # a batch kept from drafting may draft again after this many rounds: the rate with drafts


@dataclass(frozen=True)
class Wish:
    """What drafting would bring and cost one request this round."""

    action: str  # the policy's action: a paradigm or a hedge
    tau: float  # tokens it expects to commit when it drafts (1 without a draft)
    rows: int  # draft rows it would add to the verify forward
    backlog: dict[str, int]  # positions each of its paradigms must catch up before drafting
    forced: bool = False  # a probe: it drafts whatever the plan finds


class Calibration:
    """Draft tokens accepted per draft token a policy predicted, over the rounds that drafted (with a prior of
    ``prior`` tokens at a ratio of 1). A learned policy predicts the acceptance of a whole tree drafted on its own;
    in a batch the engine trims trees to what pays, so fewer are accepted, and the plan must not count on more."""

    def __init__(self, prior: float = 8.0) -> None:
        self.predicted = self.accepted = prior

    def observe(self, predicted_tau: float, tau: float) -> None:
        self.predicted += predicted_tau - 1
        self.accepted += tau - 1

    def __call__(self, predicted_tau: float) -> float:
        """A prediction of tau, scaled to what drafts have been accepting."""
        return 1 + (predicted_tau - 1) * self.accepted / self.predicted


def round_seconds(wishes: Sequence[Wish], drafting: Sequence[bool], costs: CostModel, base_rows: int) -> float:
    """The round's predicted time: one forward over every request's root (``base_rows``) and the drafted rows, and
    each drafter's call for the requests that chose it, after one catch-up over their backlogs."""
    chosen = [w for w, go in zip(wishes, drafting) if go]
    groups = Counter(p for w in chosen for p in members(w.action))
    backlog = Counter()
    for w in chosen:
        backlog.update(w.backlog)
    return (costs.verify(base_rows + sum(w.rows for w in chosen), len(wishes))
            + sum(costs.draft_call(p, n) + costs.catchup_seconds(p, backlog[p]) for p, n in groups.items()))


def plan(wishes: Sequence[Wish], costs: CostModel, base_rows: int) -> list[bool]:
    """Whether each request drafts this round: the best prefix, by the round's tokens per second, of the requests
    ordered by what each adds alone (forced ones always draft)."""
    idle = round_seconds(wishes, [False] * len(wishes), costs, base_rows)

    def value(i: int) -> float:
        """The tokens request ``i`` adds per second it adds, drafting alone."""
        alone = [j == i for j in range(len(wishes))]
        return (wishes[i].tau - 1) / max(round_seconds(wishes, alone, costs, base_rows) - idle, 1e-9)

    drafting = [w.forced for w in wishes]
    order = sorted((i for i, w in enumerate(wishes) if not w.forced and w.tau > 1), key=value, reverse=True)
    tokens = len(wishes) + sum(w.tau - 1 for w in wishes if w.forced)
    best, best_rate = 0, tokens / max(round_seconds(wishes, drafting, costs, base_rows), 1e-9)
    trial = list(drafting)
    for k, i in enumerate(order, 1):
        trial[i] = True
        tokens += wishes[i].tau - 1
        rate = tokens / max(round_seconds(wishes, trial, costs, base_rows), 1e-9)  # no costs seen yet: draft
        if rate > best_rate:
            best, best_rate = k, rate
    for i in order[:best]:
        drafting[i] = True
    return drafting


class RealizedRates:
    """Tokens per second a batch of ``n`` sequences committed in its latest rounds with drafts and without, each
    round timed from its start to the next round's start (routing, drafting, catch-up, the forward and the commit
    all inside); a round whose forward also ran a prefill, or whose sequences changed before the next began, is not
    counted. A batch size's first counted round with drafts is followed by one without; from then on drafting is
    allowed while it has been no slower than not drafting at this batch size; when it has been slower, the batch
    drafts one round in ``EXPLORE_EVERY`` to keep that rate current, and a batch that keeps drafting verifies its
    roots alone once every ``IDLE_EVERY`` rounds for the other. Exploring costs: a round
    without drafts in 16 gives up a sixteenth of what drafting gains, a round with drafts in 16 a sixteenth of what
    it loses."""

    def __init__(self) -> None:
        self.rounds: dict[tuple[int, bool], deque[tuple[int, float]]] = {}  # (n, drafted) -> (tokens, seconds)
        self._round: tuple[float, list, int, bool] | None = None  # the round under way: start, states, tokens, drafted
        self.streak = (False, 0)  # (drafted, rounds in a row that did) up to the last round

    def start(self, states: Sequence, decode_only: bool, now: float) -> None:
        """A round of ``states`` starts at ``now``; ``decode_only``: the last round's forward ran those sequences'
        trees and nothing else, so it counts if they are the same sequences."""
        committed = sum(len(s.tokens) for s in states)
        if self._round is not None:
            began, before, tokens, drafted = self._round
            if decode_only and len(before) == len(states) and all(a is b for a, b in zip(before, states)):
                window = self.rounds.setdefault((len(states), drafted), deque(maxlen=RATE_WINDOW))
                window.append((committed - tokens, now - began))
        self._round = (now, list(states), committed, False)

    def ran(self, drafted: bool) -> None:
        """Whether the round under way drafts."""
        if self._round is not None:
            self._round = (*self._round[:3], drafted)
        same, count = self.streak
        self.streak = (drafted, count + 1 if same == drafted else 1)

    def rate(self, n: int, drafted: bool) -> float | None:
        """Tokens per second over the window, None before any round of that kind."""
        window = self.rounds.get((n, drafted))
        return sum(t for t, _ in window) / max(sum(s for _, s in window), 1e-9) if window else None

    def allows_drafting(self, n: int) -> bool:
        """Whether a batch of ``n`` may draft this round (the plan then says who does)."""
        with_drafts, without = self.rate(n, True), self.rate(n, False)
        if without is None:  # after the first round with drafts at this size, one without
            return with_drafts is None
        if with_drafts is None:
            return True
        drafted, count = self.streak
        if drafted:  # one round with drafts in a row too many (slower, or due to measure the rate without)
            return with_drafts >= without and count < IDLE_EVERY
        return with_drafts >= without or count >= EXPLORE_EVERY - 1
