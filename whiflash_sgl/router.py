"""Per-round routing between drafting paradigms: features, a measured cost model, the policy call, the record.

Every round the router computes features that are free after the last verify pass (target entropy and top-1
margin at the root, last and per-paradigm EMA of tau, the last paradigm, DFlash's block confidences, EAGLE's
first-step top-1 probability, catch-up backlogs, cheap syntax state of the generated text) and the predicted
latency of each paradigm from an online cost model. The policy turns these into an *action*: one paradigm, or a
hedge such as ``eagle3+ngram``, whose drafts are verified together as one tree (the round accepts the longest any of
them reaches, for the price of both drafts and a wider verify). The router guards the call: a policy that raises,
overruns its deadline or returns something invalid yields the fallback paradigm, and the event is counted and logged
once per kind. Policies only choose proposals, so routing never changes the output.

In a batch, a sequence's round is everyone's round: the rows it adds to the shared forward delay every other
sequence. So each action is priced at what it adds on top of the rest of the batch (its share of its drafter's
batched call, and the verify rows it adds at the batch's place on the target's cost curve), and the objective is the
batch's rate, ``(others' tokens + tau) / (others' seconds + the action's)``, which at batch 1 is ``tau / seconds``.
Whether a request drafts at all is the batch's decision (``drafting_plan``: a drafter call's fixed part is shared by
everyone it drafts for); a request that does not draft verifies its root alone (``NO_DRAFT``) and probes again after
a few rounds, less often while probes keep finding that drafting does not pay: a probe's tree widens everyone's
forward.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from whiflash_sgl.cost_curve import CostCurve
from whiflash_sgl.forward_price import ScaledCurve

log = logging.getLogger(__name__)

PARADIGMS = ("eagle3", "dflash", "ngram")
NO_DRAFT = "none"  # the router's own action: verify the root alone this round
PROBE_EVERY = 4  # after this many rounds without drafting, draft once to refresh the tau statistics ...
MAX_PROBE_GAP = 64  # ... and twice as many after each probe that changed nothing, up to this many
POLICY_IDLE_EXIT_S = 5.0  # the policy's thread ends after this long without a call (a later call starts another)


def members(action: str) -> tuple[str, ...]:
    """The paradigms an action drafts with: one, or several for a hedge (``"eagle3+ngram"``)."""
    return tuple(action.split("+"))


def hedge(paradigms) -> str:
    """An action's canonical name: its paradigms sorted and joined by ``+``."""
    return "+".join(sorted(paradigms))


@dataclass
class RoundFeatures:
    entropy: float  # of the target's distribution at the root (nats)
    margin: float  # top-1 minus top-2 probability at the root
    last_tau: float
    last_paradigm: str
    ema_tau: dict[str, float]
    pending: dict[str, int]  # catch-up backlog per paradigm
    predicted_seconds: dict[str, float]  # cost model: draft + verify + catch-up per action the router can serve
    dflash_expected: float  # expected accepted prefix from DFlash's last block confidences
    eagle_top1: float  # EAGLE's last first-step top-1 probability
    ngram_draft: int  # tokens the n-gram drafter would propose now (0: no earlier match of the suffix)
    in_code: bool
    in_json: bool
    bracket_depth: int
    batch_tokens: float = 0.0  # tokens the rest of the batch commits per round (last round's)
    batch_seconds: float = 0.0  # the rest of the batch's round time without this sequence (cost model)

    # What a learned policy sees: only what does not depend on which paradigm drafted before. It is trained on
    # oracle traces (every paradigm drafts every round), so the last paradigm, the tau EMAs, backlogs and the last
    # round's drafter statistics would mean something else there than under its own choices.
    VECTOR_FIELDS = ("entropy", "margin", "ngram_draft", "in_code", "in_json", "bracket_depth")

    def expected_tau(self) -> dict[str, float]:
        """Each paradigm's tau EMA, except that the model-free drafter with nothing to propose commits one token."""
        expected = dict(self.ema_tau)
        if "ngram" in expected and self.ngram_draft == 0:
            expected["ngram"] = 1.0
        return expected

    @property
    def others(self) -> tuple[float, float]:
        return self.batch_tokens, self.batch_seconds

    def vector(self) -> list[float]:
        """A flat numeric view for learned policies."""
        return [float(getattr(self, f)) for f in self.VECTOR_FIELDS]


@dataclass(frozen=True)
class BatchLoad:
    """The rest of the batch in a sequence's last round: rows it verified, tokens it committed, its drafting time,
    how many sequences it was."""

    rows: int = 0
    tokens: float = 0.0
    draft_seconds: float = 0.0
    sequences: int = 0


@dataclass(frozen=True)
class Decision:
    paradigm: str  # an action: a paradigm or a hedge
    tau: float | None = None  # the policy's expected tokens per round with it, where the policy predicts them


def batch_rate(tau: float, seconds: float, others: tuple[float, float] = (0.0, 0.0)) -> float:
    """Tokens per second of the batch's round when this sequence commits ``tau`` tokens for ``seconds`` added to
    the rest of the batch's ``others`` = (tokens, seconds); ``tau / seconds`` alone."""
    return (others[0] + tau) / max(others[1] + seconds, 1e-6)


def best_paradigm(expected_tau: dict[str, float], seconds: dict[str, float], lam: float | None,
                  others: tuple[float, float] = (0.0, 0.0)) -> str:
    """The objective: ``argmax`` of the batch's rate with action ``m`` (``lam`` None; ``E[tau_m] / T_m`` alone), or
    ``argmax E[tau_m] - lam * T_m`` with ``T`` the action's added milliseconds (``lam`` > 0 trades expected tokens
    against latency; 0 ignores latency)."""
    if lam is None:
        return max(expected_tau, key=lambda p: batch_rate(expected_tau[p], seconds.get(p, 0.0), others))
    return max(expected_tau, key=lambda p: expected_tau[p] - lam * 1000 * seconds.get(p, 0.0))


def root_statistics(logits: torch.Tensor | Sequence[torch.Tensor]) -> list[tuple[float, float]]:
    """Each row's entropy (nats) and top-1 minus top-2 probability, for ``[rows, vocab]`` logits or a sequence of
    ``[vocab]`` rows. On a CPU, row by row in NumPy into two reused row buffers: batched torch ops paged in fresh
    megabytes for every temporary and woke torch's threads between ops, 1.2-1.9 ms for 8 rows of a 49k vocabulary
    where this takes 0.4-0.5; on an accelerator, one batched pass."""
    rows = list(logits)
    if not rows:
        return []
    if rows[0].device.type != "cpu":
        logp = torch.log_softmax(torch.stack(rows).float(), dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)
        top2 = logp.topk(2, dim=-1).values.exp()
        return list(zip(entropy.tolist(), (top2[:, 0] - top2[:, 1]).tolist()))
    shifted, weights = np.empty(rows[0].shape[-1], np.float32), np.empty(rows[0].shape[-1], np.float32)
    stats = []
    for row in rows:
        row = row.detach().float().numpy()
        np.subtract(row, row.max(), out=shifted)  # the top token's 0, every other's below
        np.exp(shifted, out=weights)
        total = float(weights.sum())
        entropy = math.log(total) - float(weights.dot(shifted)) / total
        weights[shifted.argmax()] = 0.0  # the largest weight left is the runner-up's (the top's again on a tie)
        stats.append((entropy, (1.0 - float(weights.max())) / total))
    return stats


def syntax_state(text: str) -> tuple[bool, bool, int]:
    """Inside a fenced code block, inside a JSON-looking object, and the open-bracket depth of ``text``."""
    in_code = text.count("```") % 2 == 1
    depth = 0
    for ch in text[-2000:]:
        if ch in "{[(":
            depth += 1
        elif ch in "}])" and depth:
            depth -= 1
    tail = text[text.rfind("{") :] if "{" in text else ""
    in_json = depth > 0 and '"' in tail
    return in_code, in_json, depth


class LinearFit:
    """``y = a + b * x`` by least squares over every observation so far (``a`` alone while ``x`` never varied)."""

    def __init__(self) -> None:
        self._n = self._sx = self._sy = self._sxx = self._sxy = 0.0

    def observe(self, x: float, y: float) -> None:
        self._n += 1
        self._sx += x
        self._sy += y
        self._sxx += x * x
        self._sxy += x * y

    def __call__(self, x: float) -> float:
        if self._n == 0:
            return 0.0
        denominator = self._n * self._sxx - self._sx**2
        slope = (self._n * self._sxy - self._sx * self._sy) / denominator if denominator > 1e-12 else 0.0
        intercept = (self._sy - slope * self._sx) / self._n
        return max(intercept + slope * x, 0.0)


class CostModel:
    """Latency estimates, shared by every sequence a router serves: each paradigm's draft time as
    ``a + b * sequences`` (one call drafts all the sequences that chose it), the target's verify time against the
    rows of the whole batched forward (the measured ``curve`` when there is one, scaled to the forwards seen here,
    ``forward_price.ScaledCurve``, else a least-squares line over them), and each paradigm's catch-up time as
    ``a + b * backlog``. The drafters' times are always observed here: priced against a curve from another machine,
    drafting would look cheaper or dearer than it is.

    Catch-up needs the intercept: a KV-only prefill of a few positions costs mostly its fixed overhead, and a
    per-position rate measured there, times the long backlog an idle drafter builds up, would price that drafter
    out of ever being chosen again."""

    def __init__(self, curve: CostCurve | None = None) -> None:
        self.forwards = ScaledCurve(curve) if curve is not None else None
        self.draft: dict[str, LinearFit] = {}
        self.catchup: dict[str, LinearFit] = {}
        self.verify_seconds = LinearFit()
        self.group: dict[str, int] = {}  # sequences in each paradigm's last batched draft call
        self._last_verify: tuple[int, float, int] | None = None  # the forward the line last learned from

    def observe_draft(self, paradigm: str, seconds: float, sequences: int = 1) -> None:
        self.draft.setdefault(paradigm, LinearFit()).observe(sequences, seconds)
        self.group[paradigm] = sequences

    def observe_catchup(self, paradigm: str, positions: int, seconds: float) -> None:
        if positions > 0:
            self.catchup.setdefault(paradigm, LinearFit()).observe(positions, seconds)

    def observe_verify(self, rows: int, seconds: float, sequences: int = 1) -> None:
        """A forward of ``rows`` rows over ``sequences`` sequences took ``seconds``. Each of its sequences may report
        it; it counts once (``ScaledCurve.observe`` drops a repeat itself, as the engine tells it too), else the
        least-squares line would weigh each forward by its number of sequences."""
        if self.forwards is not None:
            self.forwards.observe(rows, seconds, sequences)
        elif rows > 0 and (rows, seconds, sequences) != self._last_verify:
            self._last_verify = (rows, seconds, sequences)
            self.verify_seconds.observe(rows, seconds)

    def knows_roots(self, sequences: int) -> bool:
        """Whether the forward of ``sequences`` sequences' roots alone is priced from this machine's forwards yet
        (``ScaledCurve.knows_roots``; always, without a curve to scale)."""
        return self.forwards is None or self.forwards.knows_roots(sequences)

    def verify(self, rows: float, sequences: int = 1) -> float:
        """Seconds of a forward of ``rows`` rows over ``sequences`` sequences (0 for none)."""
        if rows <= 0:
            return 0.0
        return self.verify_seconds(rows) if self.forwards is None else self.forwards(rows, sequences)

    def draft_call(self, paradigm: str, sequences: int) -> float:
        """Seconds of one call of ``paradigm``'s drafter for ``sequences`` sequences (0 before any was seen)."""
        return self.draft[paradigm](sequences) if paradigm in self.draft and sequences > 0 else 0.0

    def catchup_seconds(self, paradigm: str, backlog: int) -> float:
        return self.catchup[paradigm](backlog) if backlog > 0 and paradigm in self.catchup else 0.0

    def predict(self, action: str, draft_tokens: dict[str, int], pending: dict[str, int],
                others_rows: int = 0, others_sequences: int = 0) -> float:
        """What an action adds to a round in which the rest of the batch (``others_sequences`` sequences) verifies
        ``others_rows`` rows: each of its
        paradigms drafts (after catching up; a fair share of a batched call), then its rows (all its paradigms'
        tokens and the root; shared prefixes would merge, so this bounds a hedge) join the forward."""
        return self.predict_all((action,), draft_tokens, pending, others_rows, others_sequences)[action]

    def predict_all(self, actions: Sequence[str], draft_tokens: dict[str, int], pending: dict[str, int],
                    others_rows: int = 0, others_sequences: int = 0) -> dict[str, float]:
        """:meth:`predict` for every one of ``actions``, each paradigm's share priced once."""
        base = self.verify(others_rows, others_sequences)
        share = {}
        for p in {p for a in actions if a != NO_DRAFT for p in members(a)}:
            n = self.group.get(p, 1) if others_rows else 1
            share[p] = self.draft_call(p, n) / n + self.catchup_seconds(p, pending[p])
        seconds = {}
        for action in actions:
            chosen = () if action == NO_DRAFT else members(action)
            rows = sum(draft_tokens[p] for p in chosen) + 1
            added = self.verify(others_rows + rows, others_sequences + 1) - base
            seconds[action] = added + sum(share[p] for p in chosen)
        return seconds


class _Call:
    def __init__(self, features: Sequence[RoundFeatures]):
        self.features, self.result, self.done = features, None, threading.Event()


class PolicyWorker:
    """Runs a policy's ``decide`` on one long-lived thread, so that a call can have a deadline.

    A thread started and joined per call cost 1.7 ms of the 4 ms a request's routing took per round on a 2-core CPU;
    handing the call to a waiting thread costs a fraction of that, and one call decides for every sequence of a
    batch (a hand-off per sequence was half a millisecond each, at 8 sequences). The thread is a daemon, so a policy
    that never returns cannot keep the process alive, and it ends after ``POLICY_IDLE_EXIT_S`` without calls, so
    engines that come and go leave no threads behind.

    The thread runs torch single-threaded. A torch op parallelised on a second thread gives that thread an OpenMP
    team of its own; with more OpenMP threads than cores, libgomp stops spinning between parallel regions and every
    later one pays a wake-up: on a 2-core CPU each target forward ran 23% slower for the rest of the process (8
    requests' decode step 72 -> 88 ms, after one small MLP call on another thread), slowing every method that
    routes by an MLP. torch's thread count is per thread once set, but the setting is also the default of threads
    started later: the starting thread sets its own count back, once the policy thread has taken its one."""

    def __init__(self, decide, decide_batch=None):
        self._decide, self._decide_batch = decide, decide_batch  # decide_batch: the policy's, where it has one
        self._calls: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self._lock = threading.Lock()  # orders a call's arrival against the thread's decision to end
        self._thread: threading.Thread | None = None
        self._late: _Call | None = None  # a call that overran its deadline

    @property
    def overrunning(self) -> bool:
        """Whether a call that missed its deadline still runs (every later call would wait behind it)."""
        return self._late is not None and not self._late.done.is_set()

    def _run(self, features: Sequence[RoundFeatures]) -> list:
        """Each decision, or the exception that stood in its way (any policy failure must fall back, never stop
        generation)."""
        if self._decide_batch is not None and len(features) > 1:
            try:
                return list(self._decide_batch(list(features)))
            except Exception as exc:  # noqa: BLE001
                return [exc] * len(features)
        results = []
        for one in features:
            try:
                results.append(self._decide(one))
            except Exception as exc:  # noqa: BLE001
                results.append(exc)
        return results

    def call(self, features: Sequence[RoundFeatures], timeout: float) -> list | None:
        """The decision for each of ``features`` (or the exception decide raised for it), or None when they did not
        all come in time."""
        call = _Call(features)
        with self._lock:
            self._calls.put(call)
            if self._thread is None:
                threads, single = torch.get_num_threads(), threading.Event()
                self._thread = threading.Thread(target=self._serve, args=(single,), name="whiflash-policy",
                                                daemon=True)
                self._thread.start()
                single.wait()
                torch.set_num_threads(threads)
        if call.done.wait(timeout):
            return call.result
        self._late = call
        return None

    def _serve(self, single: threading.Event) -> None:
        torch.set_num_threads(1)
        single.set()
        while True:
            try:
                call = self._calls.get(timeout=POLICY_IDLE_EXIT_S)
            except queue.Empty:
                with self._lock:
                    if self._calls.empty():
                        self._thread = None
                        return
                continue
            call.result = self._run(call.features)
            call.done.set()


@dataclass
class RouterStats:
    rounds: dict[str, int] = field(default_factory=dict)
    switches: int = 0
    faults: dict[str, int] = field(default_factory=dict)  # "raised" / "timeout" / "invalid" -> count


class Router:
    """Calls ``policy.decide(features)`` each round with a deadline, keeps tau statistics and the cost model.

    ``hedging`` says whether the engine can verify several paradigms' drafts as one tree; the actions it serves are
    then every paradigm and every set of two or more of them."""

    def __init__(self, policy, paradigms: tuple[str, ...], fallback: str, deadline_s: float = 0.05,
                 ema: float = 0.9, hedging: bool = False, curve: CostCurve | None = None):
        if fallback not in paradigms:
            raise ValueError(f"fallback paradigm {fallback!r} is not one of {paradigms}")
        self.policy, self.paradigms, self.fallback = policy, paradigms, fallback
        sets = range(2, len(paradigms) + 1) if hedging else ()
        self.actions = paradigms + tuple(hedge(c) for n in sets for c in itertools.combinations(paradigms, n))
        self.deadline_s, self.ema = deadline_s, ema
        self.costs = CostModel(curve)
        self.stats = RouterStats()
        self._worker = None if policy is None else PolicyWorker(policy.decide, getattr(policy, "decide_batch", None))
        self._logged: set[str] = set()
        self.reset()

    def fork(self) -> "Router":
        """A router for another sequence: the same policy (and its thread), cost model and statistics."""
        twin = copy.copy(self)
        twin.reset()
        return twin

    def reset(self) -> None:
        """A new sequence: tau statistics start from neutral values (cost estimates carry over).

        Starting from what earlier sequences measured routes better (49.4 against 47.0 simulated tokens/s for the
        heuristic on held-out traces), but then a sampled (T > 0) request's output would depend on the requests
        served before it, since the acceptance rule draws per draft candidate: a seeded request must give the same
        sample whatever came first."""
        self.ema_tau = {p: 2.0 for p in self.paradigms}
        self.last_tau = 1.0
        self.last_paradigm = ""  # none yet
        self.idle = 0  # rounds in a row without a draft
        self.probe_gap = PROBE_EVERY  # idle rounds before the next probe

    def features(self, root: tuple[float, float], text: str, pending: dict[str, int],
                 draft_tokens: dict[str, int], dflash_confidences: list[float], eagle_top1: float,
                 ngram_draft: int = 0, batch: BatchLoad = BatchLoad()) -> RoundFeatures:
        """``root``: the target's entropy and margin at the root (``root_statistics``), zeros before the first."""
        entropy, margin = root
        expected, run = 0.0, 1.0
        for q in dflash_confidences:
            run *= q
            expected += run
        in_code, in_json, depth = syntax_state(text)
        return RoundFeatures(
            entropy=entropy, margin=margin, last_tau=self.last_tau, last_paradigm=self.last_paradigm,
            ema_tau=dict(self.ema_tau), pending=dict(pending),
            predicted_seconds=self.costs.predict_all((*self.actions, NO_DRAFT), draft_tokens, pending, batch.rows,
                                                     batch.sequences),
            dflash_expected=expected, eagle_top1=eagle_top1, ngram_draft=ngram_draft, in_code=in_code,
            in_json=in_json, bracket_depth=depth, batch_tokens=batch.tokens,
            batch_seconds=self._batch_seconds(batch),
        )

    def _batch_seconds(self, batch: BatchLoad) -> float:
        """The rest of the batch's share of a round: its verify rows (over its sequences) and its drafting."""
        return self.costs.verify(batch.rows, batch.sequences) + batch.draft_seconds if batch.rows else 0.0

    def _fault(self, kind: str, detail: str) -> Decision:
        self.stats.faults[kind] = self.stats.faults.get(kind, 0) + 1
        if kind not in self._logged:
            self._logged.add(kind)
            log.warning("routing policy %s (%s); using %s (logged once)", kind, detail, self.fallback)
        return Decision(self.fallback)

    def choose(self, features: RoundFeatures) -> Decision:
        """The policy's decision for this round (the fallback where it fails), its action in canonical form."""
        return Router.choose_all([self], [features])[0]

    @staticmethod
    def choose_all(routers: Sequence["Router"], features: Sequence[RoundFeatures]) -> list[Decision]:
        """:meth:`choose` for several sequences whose routers are forks of one (sharing its policy thread), in one
        call on that thread with a deadline of ``deadline_s`` per sequence."""
        worker, deadline = routers[0]._worker, routers[0].deadline_s * len(routers)
        if worker.overrunning:
            return [r._fault("timeout", "still running from an earlier round") for r in routers]
        decisions = worker.call(features, deadline)
        if decisions is None:
            return [r._fault("timeout", f"no decision within {deadline * 1000:.0f} ms") for r in routers]
        return [r._checked(decision) for r, decision in zip(routers, decisions)]

    def _checked(self, decision) -> Decision:
        if isinstance(decision, Exception):
            return self._fault("raised", f"{type(decision).__name__}: {decision}")
        action = decision.paradigm if isinstance(decision, Decision) else decision
        if isinstance(action, str) and "+" in action:
            action = hedge(members(action))
        if action not in self.actions:
            return self._fault("invalid", f"returned {decision!r}, not one of {self.actions}")
        tau = decision.tau if isinstance(decision, Decision) else None
        if tau is not None and not (isinstance(tau, (int, float)) and math.isfinite(tau)):
            return self._fault("invalid", f"returned tau {tau!r}, not a finite number")
        return Decision(action, None if tau is None else max(float(tau), 1.0))

    def decide(self, features: RoundFeatures) -> str:
        """The policy's action for this round, drafted (a sequence routed on its own)."""
        return self.settle(self.choose(features).paradigm)

    @property
    def probe_due(self) -> bool:
        """Whether this sequence has gone ``probe_gap`` rounds without drafting: its next round should draft."""
        return self.idle >= self.probe_gap

    def settle(self, action: str, probe: bool = False) -> str:
        """Record the action this round takes: the policy's, or ``NO_DRAFT`` where the batch's plan found that its
        draft does not pay; ``probe``: it drafts only because a probe was due, so the next probe waits twice as long
        (a round that drafts on its merits brings the gap back to ``PROBE_EVERY``)."""
        if action == NO_DRAFT:
            self.idle += 1
        else:
            self.idle, self.probe_gap = 0, (min(2 * self.probe_gap, MAX_PROBE_GAP) if probe else PROBE_EVERY)
        if self.last_paradigm and action != self.last_paradigm:
            self.stats.switches += 1
        self.stats.rounds[action] = self.stats.rounds.get(action, 0) + 1
        self.last_paradigm = action
        return action

    def update(self, action: str, tau: float, each: dict[str, float] | None = None) -> None:
        """After verifying ``action``'s draft: the round's tau and, for a hedge, each paradigm's own tau (what its
        tree alone would have accepted), which feed the per-paradigm EMAs."""
        self.last_tau = tau
        for paradigm, value in (each if each is not None else {action: tau}).items():
            if paradigm in self.ema_tau:  # not NO_DRAFT
                self.ema_tau[paradigm] = self.ema * self.ema_tau[paradigm] + (1 - self.ema) * value
