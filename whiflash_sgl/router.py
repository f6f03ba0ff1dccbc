"""Per-round routing between drafting paradigms: features, a measured cost model, the policy call, the record.

Every round the router computes features that are free after the last verify pass (target entropy and top-1
margin at the root, last and per-paradigm EMA of tau, the last paradigm, DFlash's block confidences, EAGLE's
first-step top-1 probability, catch-up backlogs, cheap syntax state of the generated text) and the predicted
latency of each paradigm from an online cost model. The policy turns these into an *action*: one paradigm, or a
hedge such as ``eagle3+ngram``, whose drafts are verified together as one tree (the round accepts the longest any of
them reaches, for the price of both drafts and a wider verify). The router guards the call: a policy that raises,
overruns its deadline or returns something invalid yields the fallback paradigm, and the event is counted and logged
once per kind. Policies only choose proposals, so routing never changes the output.
"""

from __future__ import annotations

import copy
import itertools
import logging
import threading
from dataclasses import asdict, dataclass, field

import torch

log = logging.getLogger(__name__)

PARADIGMS = ("eagle3", "dflash", "ngram")


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

    def vector(self) -> list[float]:
        """A flat numeric view for learned policies."""
        return [float(getattr(self, f)) for f in self.VECTOR_FIELDS]


@dataclass(frozen=True)
class Decision:
    paradigm: str  # an action: a paradigm or a hedge


def best_paradigm(expected_tau: dict[str, float], seconds: dict[str, float], lam: float | None) -> str:
    """The objective: ``argmax E[tau_m] / T_m`` (``lam`` None), or ``argmax E[tau_m] - lam * T_m`` with ``T`` in
    milliseconds (``lam`` > 0 trades expected tokens against latency; 0 ignores latency)."""
    if lam is None:
        return max(expected_tau, key=lambda p: expected_tau[p] / max(seconds.get(p, 0.0), 1e-6))
    return max(expected_tau, key=lambda p: expected_tau[p] - lam * 1000 * seconds.get(p, 0.0))


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
    """Online latency estimates, shared by every sequence a router serves: each paradigm's draft time as
    ``a + b * sequences`` (one call drafts all the sequences that chose it), verify time as ``a + b * rows`` over the
    rows of the whole batched forward, and each paradigm's catch-up time as ``a + b * backlog``, all fitted by least
    squares over everything seen.

    Catch-up needs the intercept: a KV-only prefill of a few positions costs mostly its fixed overhead, and a
    per-position rate measured there, times the long backlog an idle drafter builds up, would price that drafter
    out of ever being chosen again."""

    def __init__(self) -> None:
        self.draft: dict[str, LinearFit] = {}
        self.catchup: dict[str, LinearFit] = {}
        self.verify_seconds = LinearFit()

    def observe_draft(self, paradigm: str, seconds: float, sequences: int = 1) -> None:
        self.draft.setdefault(paradigm, LinearFit()).observe(sequences, seconds)

    def observe_catchup(self, paradigm: str, positions: int, seconds: float) -> None:
        if positions > 0:
            self.catchup.setdefault(paradigm, LinearFit()).observe(positions, seconds)

    def observe_verify(self, rows: int, seconds: float) -> None:
        self.verify_seconds.observe(rows, seconds)

    def predict(self, action: str, draft_tokens: dict[str, int], pending: dict[str, int]) -> float:
        """An action's round for one sequence alone: each of its paradigms drafts (after catching up), then one
        verify of all their tokens (shared prefixes would merge, so this is an upper bound for a hedge)."""
        seconds = self.verify_seconds(sum(draft_tokens[p] for p in members(action)) + 1)
        for p in members(action):
            seconds += self.draft[p](1) if p in self.draft else 0.0
            if pending[p] > 0 and p in self.catchup:
                seconds += self.catchup[p](pending[p])
        return seconds


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
                 ema: float = 0.9, record: bool = True, hedging: bool = False):
        if fallback not in paradigms:
            raise ValueError(f"fallback paradigm {fallback!r} is not one of {paradigms}")
        self.policy, self.paradigms, self.fallback = policy, paradigms, fallback
        sets = range(2, len(paradigms) + 1) if hedging else ()
        self.actions = paradigms + tuple(hedge(c) for n in sets for c in itertools.combinations(paradigms, n))
        self.deadline_s, self.ema, self.record = deadline_s, ema, record
        self.costs = CostModel()
        self.stats = RouterStats()
        self.decisions: list[dict] = []
        self._logged: set[str] = set()
        self._stuck: threading.Thread | None = None
        self.reset()

    def fork(self) -> "Router":
        """A router for another sequence: the same policy, cost model, statistics and decision log."""
        twin = copy.copy(self)
        twin._stuck = None
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

    def features(self, root_logits: torch.Tensor | None, text: str, pending: dict[str, int],
                 draft_tokens: dict[str, int], dflash_confidences: list[float], eagle_top1: float,
                 ngram_draft: int = 0) -> RoundFeatures:
        entropy = margin = 0.0
        if root_logits is not None:
            probs = torch.softmax(root_logits.float(), dim=-1)
            entropy = float(-(probs * probs.clamp_min(1e-12).log()).sum())
            top2 = probs.topk(2).values
            margin = float(top2[0] - top2[1])
        expected, run = 0.0, 1.0
        for q in dflash_confidences:
            run *= q
            expected += run
        in_code, in_json, depth = syntax_state(text)
        return RoundFeatures(
            entropy=entropy, margin=margin, last_tau=self.last_tau, last_paradigm=self.last_paradigm,
            ema_tau=dict(self.ema_tau), pending=dict(pending),
            predicted_seconds={a: self.costs.predict(a, draft_tokens, pending) for a in self.actions},
            dflash_expected=expected, eagle_top1=eagle_top1, ngram_draft=ngram_draft, in_code=in_code,
            in_json=in_json, bracket_depth=depth,
        )

    def _fault(self, kind: str, detail: str) -> str:
        self.stats.faults[kind] = self.stats.faults.get(kind, 0) + 1
        if kind not in self._logged:
            self._logged.add(kind)
            log.warning("routing policy %s (%s); using %s (logged once)", kind, detail, self.fallback)
        return self.fallback

    def _call_policy(self, features: RoundFeatures) -> str:
        if self._stuck is not None and self._stuck.is_alive():
            return self._fault("timeout", "still running from an earlier round")
        result: list = []

        def call() -> None:
            try:
                result.append(self.policy.decide(features))
            except Exception as exc:  # noqa: BLE001 - any policy failure must fall back, never stop generation
                result.append(exc)

        worker = threading.Thread(target=call, daemon=True)
        worker.start()
        worker.join(self.deadline_s)
        if worker.is_alive():
            self._stuck = worker
            return self._fault("timeout", f"no decision within {self.deadline_s * 1000:.0f} ms")
        decision = result[0]
        if isinstance(decision, Exception):
            return self._fault("raised", f"{type(decision).__name__}: {decision}")
        action = decision.paradigm if isinstance(decision, Decision) else decision
        if isinstance(action, str) and "+" in action:
            action = hedge(members(action))
        if action not in self.actions:
            return self._fault("invalid", f"returned {decision!r}, not one of {self.actions}")
        return action

    def decide(self, features: RoundFeatures) -> str:
        """The action for this round (a paradigm or a hedge)."""
        action = self._call_policy(features)
        if self.last_paradigm and action != self.last_paradigm:
            self.stats.switches += 1
        self.stats.rounds[action] = self.stats.rounds.get(action, 0) + 1
        if self.record:
            self.decisions.append({"paradigm": action, **asdict(features)})
        self.last_paradigm = action
        return action

    def update(self, action: str, tau: float, each: dict[str, float] | None = None) -> None:
        """After verifying ``action``'s draft: the round's tau and, for a hedge, each paradigm's own tau (what its
        tree alone would have accepted), which feed the per-paradigm EMAs."""
        self.last_tau = tau
        for paradigm, value in (each or {action: tau}).items():
            self.ema_tau[paradigm] = self.ema * self.ema_tau[paradigm] + (1 - self.ema) * value
