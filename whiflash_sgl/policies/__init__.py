"""Routing policies, found by name through the ``whiflash_sgl.policies`` entry-point group.

A policy is a small class: constructed from keyword parameters, it has ``decide(features) -> Decision | str``
(see ``whiflash_sgl.router.RoundFeatures``). Any installed distribution can add one by declaring an entry point in
that group; ``load_policy`` finds it by name with no change here.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from whiflash_sgl.errors import WhiFlashError

GROUP = "whiflash_sgl.policies"


def installed_policies() -> dict:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def load_policy(name: str, params: dict | None = None):
    """Instantiate the policy registered as ``name`` with ``params``."""
    found = installed_policies()
    if name not in found:
        raise WhiFlashError(f"unknown routing policy {name!r}; installed policies: {', '.join(sorted(found)) or 'none'}")
    cls = found[name].load()
    try:
        return cls(**(params or {}))
    except TypeError as exc:
        raise WhiFlashError(f"bad parameters for policy {name!r}: {exc}") from exc
