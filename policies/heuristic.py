"""Rules with hysteresis: structured spans go to the block drafter, otherwise the paradigm with the best measured
tokens per second, and a switch needs a clear margin so the router does not flap."""

from __future__ import annotations

from whiflash_sgl.router import Decision, RoundFeatures, best_paradigm


class HeuristicPolicy:
    def __init__(self, hysteresis: float = 0.15, structured_bonus: float = 1.0, lam: float | None = None):
        self.hysteresis, self.structured_bonus, self.lam = hysteresis, structured_bonus, lam

    def decide(self, f: RoundFeatures) -> Decision:
        expected = f.expected_tau()
        if "dflash" in expected and (f.in_code or f.in_json):
            expected["dflash"] += self.structured_bonus
        choice = best_paradigm(expected, f.predicted_seconds, self.lam)
        current = f.last_paradigm
        if current in expected and choice != current:
            rate = {p: expected[p] / max(f.predicted_seconds.get(p, 0.0), 1e-6) for p in expected}
            if rate[choice] < (1 + self.hysteresis) * rate[current]:
                choice = current
        return Decision(choice)
