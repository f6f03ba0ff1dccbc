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

The plan's round times come from the cost model, which prices the forward, the drafter calls and catch-up but not
the rest of a round (routing, the commit, the Python around each request), and that rest is larger in a round that
drafts. :class:`RoundTimes` measures it, for rounds with drafts and without, and the plan adds it to each kind; and
since every price is a prediction, it also measures what routed rounds commit per second against rounds without
routing, which is the last word on whether a batch of that size routes at all (``RoundTimes.routing_pays``).
"""

from __future__ import annotations

import statistics
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, replace

from whiflash_sgl.cost_curve import between_counts
from whiflash_sgl.forward_price import TIMED
from whiflash_sgl.router import CostModel, members

CALIBRATION_WINDOW = 128  # latest request-rounds whose accepted / predicted draft tokens scale predictions
TIME_WINDOW = 32  # latest rounds of each kind (with drafts, without) and size whose cost beyond the cost model is kept
LONG_BACKLOG = 32  # catch-up beyond this many positions is a cost paid once: see ``round_seconds``
IDLE_EVERY = 16  # a batch that drafted this many routed rounds in a row verifies its roots alone once, to measure it
PAIRED = 8  # latest rounds without routing that a routed round's rate is compared with (``routing_pays``)
FIRST_STEP = "eagle3:first"  # EAGLE-3's first step alone (``FirstSteps``): its calls' price, its rounds' paradigm
FIRST_STEP_PROBE = 16  # a batch whose first steps did not pay drafts them anyway after this many rounds, to measure


@dataclass(frozen=True)
class Wish:
    """What drafting would bring and cost one request this round."""

    action: str  # the policy's action: a paradigm or a hedge
    tau: float  # tokens it expects to commit when it drafts (1 without a draft)
    rows: int  # draft rows it would add to the verify forward
    backlog: dict[str, int]  # positions each of its paradigms must catch up before drafting
    forced: bool = False  # a probe: it drafts whatever the plan finds
    predicted: float | None = None  # the policy's tau for the trees as cut, before calibration
    rounds_left: float = 1.0  # the rounds it has left when it drafts (tokens left over tau): see ``round_seconds``
    # what it commits, and adds rows, when the plan leaves it out: its n-gram lookup, or EAGLE-3's first step where
    # those pay (:class:`FirstSteps`), else its root alone
    fallback_tau: float = 1.0
    fallback_rows: float = 0.0


class Calibration:
    """Draft tokens accepted per draft token a policy predicted, over the latest ``window`` request-rounds that
    drafted, with a prior of ``prior`` predicted tokens at ``prior_ratio``. A learned policy predicts the acceptance
    of trees drafted on their own; how much of that a batch's trees keep moves with the batch size (at 16 requests
    the cut predictions ran 1.5x over what was accepted, after rounds at 8 had been close), so only recent rounds
    count; and before any draft is verified a batch counts on half of what is predicted (a 16-request batch that
    took the predictions at their word drafted 43 rows a round at once and lost a quarter of its rate)."""

    def __init__(self, prior: float = 8.0, window: int = CALIBRATION_WINDOW, prior_ratio: float = 0.5) -> None:
        self.prior, self.prior_ratio = prior, prior_ratio
        self.rounds: deque[tuple[float, float]] = deque(maxlen=window)  # (predicted, accepted) draft tokens
        self.predicted = self.accepted = 0.0  # their sums

    def observe(self, predicted_tau: float, tau: float) -> None:
        if len(self.rounds) == self.rounds.maxlen:
            old_predicted, old_accepted = self.rounds[0]
            self.predicted -= old_predicted
            self.accepted -= old_accepted
        self.rounds.append((predicted_tau - 1, tau - 1))
        self.predicted += predicted_tau - 1
        self.accepted += tau - 1

    def __call__(self, predicted_tau: float) -> float:
        """A prediction of tau, scaled to what drafts have been accepting."""
        return 1 + (predicted_tau - 1) * (self.prior * self.prior_ratio + self.accepted) / (self.prior + self.predicted)


def round_seconds(wishes: Sequence[Wish], drafting: Sequence[bool], costs: CostModel, base_rows: int) -> float:
    """The round's predicted time: one forward over every request's root (``base_rows``), the drafted rows and the
    fallbacks' of the others (``Wish.fallback_rows``), and each drafter's call for the requests that chose it, after
    one catch-up over their backlogs (a fallback's call is not priced: a lookup has none, and first steps are drafted
    for most requests left out whatever the plan is). A backlog's first
    ``LONG_BACKLOG`` positions count whole; the rest (a prompt's, the first time a request drafts with a paradigm, or
    what a long idle left) is paid once and serves every round the request has left, so it counts spread over them
    (``Wish.rounds_left``). Charged whole to one round, the prompts of a batch of 8 that had not drafted yet (40-800
    positions, 9-17 ms of catch-up) priced its first drafting round out, and while it did not draft its backlogs
    only grew, so the price rose round after round, in the tail of the run too."""
    chosen = [w for w, go in zip(wishes, drafting) if go]
    groups = Counter(p for w in chosen for p in members(w.action))
    backlog = Counter()
    for w in chosen:
        backlog.update({p: n if n <= LONG_BACKLOG else LONG_BACKLOG + (n - LONG_BACKLOG) / max(w.rounds_left, 1.0)
                        for p, n in w.backlog.items()})
    rows = sum(w.rows if go else w.fallback_rows for w, go in zip(wishes, drafting))
    return (costs.verify(base_rows + rows, len(wishes))
            + sum(costs.draft_call(p, n) + costs.catchup_seconds(p, backlog[p]) for p, n in groups.items()))


def plan(wishes: Sequence[Wish], costs: CostModel, base_rows: int,
         extra: tuple[float, float] = (0.0, 0.0)) -> list[bool]:
    """Whether each request drafts this round: the best prefix, by the round's tokens per second, of the requests
    ordered by what each adds alone (forced ones always draft). ``extra``: the seconds a round costs beyond the cost
    model's price, without drafts and with (:class:`RoundTimes`).

    A request left out still drafts its fallback (``Wish.fallback_tau``), so what drafting adds is measured from
    there. Counted from its root alone, an EAGLE-3 tree beside a lookup the request drafts anyway looked worth its
    call and rows, and at 8 requests on a 2-core CPU such hedges and trees added 1.9 verify rows and 0.7-2 ms of
    drafting a round for no more tokens a round than the fallbacks alone committed (13.9)."""
    idle = round_seconds(wishes, [False] * len(wishes), costs, base_rows)

    def seconds(drafting: Sequence[bool]) -> float:
        return round_seconds(wishes, drafting, costs, base_rows) + extra[any(drafting)]

    def value(i: int) -> float:
        """The tokens request ``i`` adds per second it adds, drafting alone."""
        alone = [j == i for j in range(len(wishes))]
        return (wishes[i].tau - wishes[i].fallback_tau) / max(round_seconds(wishes, alone, costs, base_rows) - idle,
                                                               1e-9)

    drafting = [w.forced for w in wishes]
    order = sorted((i for i, w in enumerate(wishes) if not w.forced and w.tau > w.fallback_tau), key=value,
                   reverse=True)
    tokens = sum(w.tau if w.forced else w.fallback_tau for w in wishes)
    best, best_rate = 0, tokens / max(seconds(drafting), 1e-9)
    trial = list(drafting)
    for k, i in enumerate(order, 1):
        trial[i] = True
        tokens += wishes[i].tau - wishes[i].fallback_tau
        rate = tokens / max(seconds(trial), 1e-9)  # no costs seen yet: draft
        if rate > best_rate:
            best, best_rate = k, rate
    for i in order[:best]:
        drafting[i] = True
    return drafting


def explore(wishes: Sequence[Wish], costs: CostModel, base_rows: int,
            extra: tuple[float, float] = (0.0, 0.0)) -> list[bool]:
    """The plan with the request that expects most from drafting in any case (nothing where none expects more than
    its fallback). A batch whose plan has drafted nothing for a long while rests on prices of drafting it no longer
    measures; this measures them again, so that one slow round cannot keep a batch from drafting for good."""
    best = max(range(len(wishes)), key=lambda i: wishes[i].tau - wishes[i].fallback_tau)
    if wishes[best].tau <= wishes[best].fallback_tau:
        return [False] * len(wishes)
    return plan([replace(w, forced=True) if i == best else w for i, w in enumerate(wishes)], costs, base_rows, extra)


class FirstSteps:
    """Whether EAGLE-3's first step pays for the requests of a batch round that draft nothing else: those the plan
    leaves out, or every request when the batch goes without routing, that find no n-gram lookup.

    The first step is the forward over each request's root that seeds EAGLE-3's tree: one call for all of them, a
    few node candidates each, whose best the engine's trim keeps where they pay. On a 2-core CPU, drafted for the
    requests without a lookup in every round where every slot was decoding, it took the rate from the lookups'
    alone to 1.13x at 4 requests (197 against 175 tok/s; vanilla 148), 1.07x at 8 (312 against 293; vanilla 242)
    and 1.01x at 16 (407 against 404; vanilla 359), where the plan's deeper EAGLE-3 trees paid at 4 requests only:
    a depth step costs the batch about what the first one does, and brings less. What it brings is measured: the
    draft tokens each first step got accepted and the rows it kept, over the latest ``CALIBRATION_WINDOW``; what it
    costs is its call's time (the cost model's ``FIRST_STEP``) and those rows' share of the forward; it pays while
    the tokens come at least at the rate the batch's latest rounds without routing committed
    (``RoundTimes.quiet_rate``; before those are measured, the engine's expected ``SequenceState.commit_rate``). At 8
    requests that margin is thin (median 2.5 tokens against 2.1 tokens' worth of time: 6 requests at 0.42 accepted,
    a 3.9 ms call and 4.8 ms of rows, at 256 tok/s), and drafting them in every round ran as fast. Until ``TIMED``
    first steps were verified it drafts, and when it does not pay, it drafts once every ``FIRST_STEP_PROBE`` rounds
    all the same, so that what it brings stays measured."""

    def __init__(self) -> None:
        self.drafts: deque[tuple[int, int]] = deque(maxlen=CALIBRATION_WINDOW)  # (accepted, verified rows) each
        self.declined = 0  # rounds in a row it did not pay

    def observe(self, accepted: int, rows: int) -> None:
        """A first step's draft had ``rows`` of its nodes verified and ``accepted`` of them accepted."""
        self.drafts.append((accepted, rows))

    def pays(self, requests: int, costs: CostModel, base_rows: int, sequences: int, rate: float) -> bool:
        """Whether ``requests`` requests draft their first step in a forward of ``base_rows`` rows over ``sequences``
        sequences without them, whose round commits ``rate`` tokens a second (0: not known)."""
        call = costs.draft_call(FIRST_STEP, requests)
        if len(self.drafts) >= TIMED and rate > 0 and call > 0 and self.declined < FIRST_STEP_PROBE:
            accepted, rows = self._means()
            seconds = call + costs.verify(base_rows + requests * rows, sequences) - costs.verify(base_rows, sequences)
            if requests * accepted < seconds * rate:
                self.declined += 1
                return False
        self.declined = 0
        return True

    def fallback(self) -> tuple[float, float]:
        """The tau and verify rows a first step is expected to bring a request the plan leaves out: as measured while
        the latest decision drafted them, else a root alone's (1, 0)."""
        if self.declined or len(self.drafts) < TIMED:
            return 1.0, 0.0
        accepted, rows = self._means()
        return 1 + accepted, rows

    def _means(self) -> tuple[float, float]:
        """Draft tokens accepted and rows verified per first step, over the latest ones."""
        return (sum(a for a, _ in self.drafts) / len(self.drafts), sum(r for _, r in self.drafts) / len(self.drafts))


@dataclass
class _Round:
    start: float
    states: list
    drafted: bool = False
    routed: bool | None = None  # its requests' policies were asked and the plan made (None: a measurement)
    priced: float = 0.0  # measured seconds of the parts the cost model prices: drafter calls, catch-up ...
    forward: float | None = None  # ... and the forward
    tokens: int = 0  # what its requests committed


class RoundTimes:
    """What a batch round costs beyond the parts the cost model prices (the forward, the drafter calls, catch-up):
    routing, the commit, the Python around each request. It is measured as the round's time from its start to the
    next round's start less those parts' measured seconds, over the latest ``TIME_WINDOW`` rounds with drafts and
    without, per batch size; a size's figures stand for it once ``TIMED`` rounds of the kind were measured there,
    and before, the sizes measured stand in: interpolated between two, the nearest's beyond them. Per round, not per
    sequence: much of it is paid once a round (the policy's call, the plan), and scaled per sequence from 4 requests
    (3.7 ms) it priced a drafting round of 8 at 7.4 ms beyond the cost model where it ran 3.8, so the batch of 8
    drafted nothing (made to draft, it ran 171 tok/s against 164). Priced too low instead, a size drafts, and its
    own figure stands after ``TIMED`` rounds. Not measured: a round whose forward also ran a prefill, or whose
    sequences changed before the next began, or one without routing that drafted lookups (no plan prices it). A batch
    that drafted ``IDLE_EVERY`` routed rounds in a row verifies its roots alone once, so that the rounds without
    drafts stay measured.

    Measured, not a ratio to the plan's prediction: the prediction moves as the cost model learns, and a ratio
    measured against one version of it, applied to the next, counted the model's correction twice (the first
    drafting rounds of 4 requests, priced with draft rows at the curve, ran 1.28x their prediction; with the rows at
    1.17x the curve once measured, the 1.28 still applied, rounds of 42 ms were priced at 67, and the batch stopped
    drafting)."""

    def __init__(self) -> None:
        self.rest: dict[tuple[bool, int], deque[float]] = {}  # (drafted, sequences): seconds a round
        # per batch size: the latest rounds without routing as (tokens, seconds), and each routed round as (tokens,
        # seconds, the rate of those rounds when it was measured)
        self.quiet: dict[int, deque[tuple[int, float]]] = {}
        self.paired: dict[int, deque[tuple[int, float, float]]] = {}
        self._round: _Round | None = None  # the round under way
        self.drafting_streak = 0  # rounds in a row that drafted, up to the last one

    def start(self, states: Sequence, decode_only: bool, now: float) -> None:
        """A round of ``states`` starts at ``now``; ``decode_only``: the last round's forward ran those sequences'
        trees and nothing else, so it is measured if they are the same sequences."""
        last = self._round
        if (last is not None and last.forward is not None and decode_only
                and len(last.states) == len(states) and all(a is b for a, b in zip(last.states, states))):
            if last.routed is not False or not last.drafted:  # no plan prices a round of lookups
                window = self.rest.setdefault((last.drafted, len(states)), deque(maxlen=TIME_WINDOW))
                window.append(now - last.start - last.priced - last.forward)
            quiet, seconds = self.quiet.setdefault(len(states), deque(maxlen=PAIRED)), now - last.start
            if last.routed is False:
                quiet.append((last.tokens, seconds))
            elif last.routed and len(quiet) >= TIMED:
                self.paired.setdefault(len(states), deque(maxlen=TIME_WINDOW)).append(
                    (last.tokens, seconds, _rate(quiet)))
        self._round = _Round(now, list(states))

    def ran(self, drafted: bool, routed: bool | None) -> None:
        """The round under way drafts or not, and was routed or went without (``QuietRounds``); None: it verifies
        the roots alone to measure them, and its rate stands for neither kind."""
        if self._round is not None:
            self._round.drafted, self._round.routed = drafted, routed
        if not drafted:
            self.drafting_streak = 0
        elif routed is not False:  # a round of lookups neither adds to the streak nor ends it
            self.drafting_streak += 1

    def committed(self, tokens: int) -> None:
        """A sequence of the round under way committed ``tokens``."""
        if self._round is not None:
            self._round.tokens += tokens

    def routing_pays(self, sequences: int) -> bool:
        """Whether routed rounds of ``sequences`` sequences committed at least the tokens that rounds without routing
        (each request drafting its n-gram lookup, if any) would have in their time, over the latest ``TIME_WINDOW``
        routed rounds measured, each against the latest ``PAIRED`` rounds without routing measured before it. Until
        ``TIMED`` of those were measured, it does not pay (the batch goes without routing, to measure that); then it
        does until ``TIMED`` routed rounds were compared.

        Each routed round is compared with rounds just before it because both kinds slow down as contexts grow (at 8
        requests from 300 to 230 tok/s over a run), and whole windows of each kind span different stretches of it: the
        routed rounds' window, filled slowly while routing did not pay, still held rounds of shorter contexts and looked
        faster than the latest rounds without routing, so a batch kept routing while its routed rounds ran 20% slower.
        The comparison leans towards routing: rounds without it follow plans that found nothing worth drafting, the
        harder stretches of text (at 4 requests routed rounds ran 191 tok/s against 142 for those before them, where
        whiflash:mlp as a whole ran within 1% of the lookups alone). The plan's every price is a prediction, and at 16
        requests a drafting round's gain is a few percent of it where its errors are tens: rounds it priced 5-15% faster
        per token than not drafting ran 10-30% slower, and a batch of 16 that drafted on that ran 10-14% behind vanilla
        while full. What routing brings is measured here, outcome against outcome, so that a batch of that size goes
        without it (``QuietRounds``). Windows of rounds, and only to quiet the batch: what one round commits moves more
        with its requests' text than with drafting (an earlier veto of each drafting round on measured tokens per second
        stopped 142 of 223 rounds at 4 requests, where drafting ran 21% faster); this one leaves the plan's round as it
        is and only lengthens the quiet gap after it."""
        if len(self.quiet.get(sequences, ())) < TIMED:
            return False
        paired = self.paired.get(sequences, ())
        if len(paired) < TIMED:
            return True
        return sum(tokens for tokens, _, _ in paired) >= sum(seconds * rate for _, seconds, rate in paired)

    def quiet_rate(self, sequences: int) -> float:
        """Tokens per second the latest rounds of ``sequences`` sequences without routing committed (0 before
        ``TIMED`` were measured)."""
        quiet = self.quiet.get(sequences, ())
        return _rate(quiet) if len(quiet) >= TIMED else 0.0

    def spent(self, seconds: float) -> None:
        """The round under way spent ``seconds`` in a drafter call or a catch-up."""
        if self._round is not None:
            self._round.priced += seconds

    def forwarded(self, seconds: float, prefilled: bool) -> None:
        """The round under way's forward took ``seconds`` (every sequence reports it; it counts once); one that
        ``prefilled`` a prompt chunk leaves the round unmeasured (the engine does not ask for drafts then)."""
        if prefilled:
            self._round = None
        elif self._round is not None:
            self._round.forward = seconds

    @property
    def idle_due(self) -> bool:
        """Whether this round should verify the roots alone: the batch drafted ``IDLE_EVERY`` rounds in a row."""
        return self.drafting_streak >= IDLE_EVERY

    def extra(self, sequences: int) -> tuple[float, float]:
        """Seconds a round of ``sequences`` sequences costs beyond the cost model's price, without drafts and with
        (the median, ``between_counts`` of the sizes measured); a kind not measured yet is taken to cost as much as
        the other (nothing before any)."""
        idle, drafted = (self._median(d, sequences) for d in (False, True))
        idle, drafted = (idle if idle is not None else drafted), (drafted if drafted is not None else idle)
        return idle or 0.0, drafted or 0.0

    def _median(self, drafted: bool, sequences: int) -> float | None:
        counts = sorted(n for (d, n), window in self.rest.items() if d == drafted and len(window) >= TIMED)
        if not counts:
            return None
        return between_counts(counts, sequences, lambda i: statistics.median(self.rest[drafted, counts[i]]))


def _rate(rounds: Sequence[tuple[int, float]]) -> float:
    """Tokens per second over (tokens, seconds) rounds."""
    return sum(tokens for tokens, _ in rounds) / max(sum(seconds for _, seconds in rounds), 1e-9)
