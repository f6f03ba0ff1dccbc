"""Per-request routing inside an SGLang batch: one core ``Router`` state per running request, one policy and one cost
model for all.

A request's router holds what its own rounds taught (last tau, the tau EMA of each paradigm, its last paradigm) and
the target's entropy and top-1 margin at its last bonus position; SGLang's request id keys it, and it is dropped when
the scheduler reports the request finished (``drop``), or, for a request that left the batch without such a report
(an abort before decoding, a retraction that never came back), after ``STALE_ROUNDS`` rounds unseen. A fresh router
starts neutral, so a request's routing does not depend on what was served before it. The policy is stateless (it
sees features, returns a decision) and is shared; so is the cost model, because latency is the machine's, not the
request's. Nothing here imports SGLang.
"""

from __future__ import annotations

from whiflash_sgl.router import Router
from whiflash_sgl.sglang.settings import SERVED_PARADIGMS

STALE_ROUNDS = 256


class RequestRoutes:
    def __init__(self, policy, fallback: str, deadline_s: float, width: int):
        self.width = width
        self._prototype = Router(policy, SERVED_PARADIGMS, fallback, deadline_s=deadline_s)  # forks share its policy
        self.costs = self._prototype.costs
        self._routers: dict[str, Router] = {}
        self._roots: dict[str, tuple[float, float]] = {}
        self._seen: dict[str, int] = {}
        self._round = 0

    def __len__(self) -> int:
        return len(self._routers)

    def _router(self, rid: str) -> Router:
        router = self._routers.get(rid)
        if router is None:
            router = self._routers[rid] = self._prototype.fork()
        return router

    def route(self, rids: list[str], eagle_top1: list[float]) -> list[str]:
        """Each request's paradigm for this round, from its own features: the target's entropy and margin at its
        bonus position, its tau statistics, EAGLE's first-step top-1 probability for it, and the shared costs.
        Text-syntax features are not available in the scheduler process and stay off."""
        self._round += 1
        pending = {p: 0 for p in SERVED_PARADIGMS}  # eager catch-up: no backlog
        draft_tokens = {p: self.width - 1 for p in SERVED_PARADIGMS}
        routers = [self._router(rid) for rid in rids]
        features = [router.features(self._roots.get(rid, (0.0, 0.0)), "", pending, draft_tokens, [], top1)
                    for router, rid, top1 in zip(routers, rids, eagle_top1)]
        choices = [router.settle(decision.paradigm)
                   for router, decision in zip(routers, Router.choose_all(routers, features))] if rids else []
        for rid in rids:
            self._seen[rid] = self._round
        self._forget_stale()
        return choices

    def observe(self, rids: list[str], paradigms: list[str], taus: list[float],
                roots: list[tuple[float, float]] | None) -> None:
        """After the verify: each request's tau under the paradigm it chose, and the root statistics (entropy,
        margin) of its new bonus position, which its next round's features use."""
        for i, (rid, paradigm, tau) in enumerate(zip(rids, paradigms, taus)):
            self._router(rid).update(paradigm, tau)
            if roots is not None:
                self._roots[rid] = roots[i]

    def drop(self, rid: str) -> None:
        for table in (self._routers, self._roots, self._seen):
            table.pop(rid, None)

    def _forget_stale(self) -> None:
        for rid in [r for r, seen in self._seen.items() if self._round - seen > STALE_ROUNDS]:
            self.drop(rid)
