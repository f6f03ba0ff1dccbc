"""``python -m whiflash_sgl.launch_server``: serve WhiFlash with SGLang on a GPU, or with the reference engine.

``--backend auto`` (the default) picks SGLang when it can run (a CUDA device and an importable ``sglang``) and the
reference engine's embedded server otherwise, and says which at start-up. Both speak SGLang's HTTP API.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

from whiflash_sgl.server.launch import add_arguments, serve


def choose_backend(requested: str) -> tuple[str, str]:
    """``(backend, why)`` for ``--backend``."""
    if requested != "auto":
        return requested, "--backend " + requested
    import torch

    if not torch.cuda.is_available():
        return "reference", "no CUDA device"
    if importlib.util.find_spec("sglang") is None:
        return "reference", "sglang is not installed"
    return "sglang", "a CUDA device and sglang are available"


def _parser(backend_only: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m whiflash_sgl.launch_server", add_help=not backend_only,
        description="Serve WhiFlash speculative decoding over SGLang's HTTP API (native /generate and OpenAI "
                    "/v1/*). The flags below are the reference backend's; with --backend sglang, "
                    "--whiflash-config/--whiflash-policy and SGLang's own flags go to SGLang's launcher "
                    "(--backend sglang --help lists them).",
    )
    parser.add_argument("--backend", choices=("auto", "sglang", "reference"), default="auto",
                        help="auto: SGLang when a CUDA device and sglang are available, else the reference engine")
    if not backend_only:
        add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen, rest = _parser(backend_only=True).parse_known_args(argv)
    backend, why = choose_backend(chosen.backend)
    print(f"launch_server: backend: {backend} ({why})", file=sys.stderr, flush=True)
    if backend == "sglang":
        from whiflash_sgl.sglang.launch import main as sglang_main

        return sglang_main(rest)
    return serve(_parser(backend_only=False).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
