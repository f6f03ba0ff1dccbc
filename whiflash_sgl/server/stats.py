"""Speculation statistics of one generation, in SGLang's ``meta_info`` vocabulary plus WhiFlash's per-paradigm view.

SGLang's definitions are kept exactly: ``spec_verify_ct`` counts target verify passes, ``spec_accept_length`` is
``completion_tokens / spec_verify_ct`` (so it includes the bonus token, and the token the prefill produced), and
``spec_accept_rate`` is accepted draft tokens over proposed ones. The per-paradigm figures count, for every round
that was drafted, the tokens it committed (accepted drafts + the bonus), by the paradigm that drafted it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from whiflash_sgl.engine import GenerationResult


@dataclass
class SpecStats:
    verify_ct: int
    accept_length: float
    accept_rate: float
    correct_drafts: int
    proposed_drafts: int
    histogram: list[int]  # rounds by number of accepted draft tokens
    rounds: list[tuple[str, int]] = field(default_factory=list)  # (paradigm, committed tokens) per drafted round
    switches: int = 0
    switch_seconds: float = 0.0

    @classmethod
    def of(cls, result: GenerationResult, single_paradigm: str | None) -> "SpecStats":
        """``single_paradigm``: the drafter's name for a one-drafter method, which is credited with every round
        (a final one-token round has nothing to draft, and counts as a round that accepted nothing); ``None`` for
        routed methods, whose result names the paradigm of each drafted round."""
        accepted = result.accept_lengths
        paradigms = [single_paradigm] * len(accepted) if single_paradigm else result.paradigms
        rounds = [(p, a + 1) for p, a in zip(paradigms, accepted)]
        histogram = [0] * (max(accepted, default=-1) + 1)
        for a in accepted:
            histogram[a] += 1
        completion = len(result.tokens)
        return cls(
            verify_ct=result.rounds,
            accept_length=completion / result.rounds if result.rounds else 0.0,
            accept_rate=sum(accepted) / result.drafted if result.drafted else 0.0,
            correct_drafts=sum(accepted),
            proposed_drafts=result.drafted,
            histogram=histogram,
            rounds=rounds,
            switches=sum(a != b for a, b in zip(result.paradigms, result.paradigms[1:])),
            switch_seconds=result.switch_seconds,
        )

    def paradigm_rounds(self) -> dict[str, int]:
        return dict(Counter(p for p, _ in self.rounds))

    def paradigm_accept_length(self) -> dict[str, float]:
        totals: Counter = Counter()
        for paradigm, committed in self.rounds:
            totals[paradigm] += committed
        counts = self.paradigm_rounds()
        return {p: round(totals[p] / n, 4) for p, n in counts.items()}

    def meta_info(self) -> dict:
        return {
            "spec_verify_ct": self.verify_ct,
            "spec_accept_length": self.accept_length,
            "spec_accept_rate": self.accept_rate,
            "spec_num_correct_drafts": self.correct_drafts,
            "spec_num_proposed_drafts": self.proposed_drafts,
            "spec_correct_drafts_histogram": self.histogram,
            "spec_paradigm_rounds": self.paradigm_rounds(),
            "spec_paradigm_accept_length": self.paradigm_accept_length(),
            "spec_switches": self.switches,
            "spec_switch_seconds": round(self.switch_seconds, 6),
        }
