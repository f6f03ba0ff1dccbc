"""SGLang plugin entry point (group ``sglang.srt.plugins``): registers ``--speculative-algorithm WHIFLASH``.

SGLang calls ``register()`` through ``load_plugins()`` in every process it starts (the launcher, the scheduler, the
detokenizer, the data-parallel controller), each a fresh interpreter. ``register()`` is cheap, idempotent and never
raises: a problem is logged and leaves SGLang exactly as it was. It first checks that the installed SGLang has every
symbol WHIFLASH uses (``whiflash_sgl.sglang.compat``); on a mismatch it registers nothing. Everything heavy (the
worker) is imported only when SGLang asks the factory for the worker class.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

_hooks_registered = False


def _worker_factory(server_args):
    from whiflash_sgl.sglang.worker import WhiFlashWorker

    return WhiFlashWorker


def _register() -> None:
    global _hooks_registered
    from importlib.metadata import version

    from whiflash_sgl.sglang import compat

    missing = compat.problems()
    if missing:
        log.error("whiflash-sgl: WHIFLASH not registered: it needs sglang==%s and the installed sglang %s differs:\n"
                  "  %s", compat.SGLANG_VERSION, version("sglang"), "\n  ".join(missing))
        return

    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    from whiflash_sgl.sglang.hooks import register_hooks
    from whiflash_sgl.sglang.spec import NAME, WhiflashSpecAlgo, validate_server_args

    try:
        SpeculativeAlgorithm.from_string(NAME)
    except ValueError:
        SpeculativeAlgorithm.register(NAME, supports_overlap=False, validate_server_args=validate_server_args,
                                      spec_class=WhiflashSpecAlgo)(_worker_factory)
    if not _hooks_registered:
        register_hooks()
        _hooks_registered = True


def register() -> None:
    """Register WHIFLASH with SGLang (entry point ``sglang.srt.plugins: whiflash``)."""
    try:
        _register()
    except Exception:  # noqa: BLE001 - a plugin must never take SGLang down; the log says what went wrong
        log.exception("whiflash-sgl: WHIFLASH not registered")
