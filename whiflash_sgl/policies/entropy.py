"""Entropy gate: where the target is sure of its next token (low entropy at the root) the span is likely
structured and a block drafter's long guesses pay; where it hesitates, a branching tree hedges better.

The expected tau of the block paradigm is scaled up below ``threshold`` nats and down above it; the choice then
maximises ``E[tau]/T`` (``lam`` None) or ``E[tau] - lam * T_ms`` over the available paradigms.
"""

from __future__ import annotations

import math

from whiflash_sgl.router import Decision, RoundFeatures, best_paradigm


class EntropyPolicy:
    def __init__(self, threshold: float = 1.0, sharpness: float = 2.0, lam: float | None = None,
                 block: str = "dflash"):
        self.threshold, self.sharpness, self.lam, self.block = threshold, sharpness, lam, block

    def decide(self, f: RoundFeatures) -> Decision:
        expected = f.expected_tau()
        if self.block in expected:
            gate = 2 / (1 + math.exp(self.sharpness * (f.entropy - self.threshold)))  # 2 at H=0, 1 at threshold
            expected[self.block] *= gate
        return Decision(best_paradigm(expected, f.predicted_seconds, self.lam, f.others))
