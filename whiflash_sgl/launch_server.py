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


def _without_backend(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--backend":
            skip = True
        elif not arg.startswith("--backend="):
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="python -m whiflash_sgl.launch_server",
        description="Serve WhiFlash speculative decoding over SGLang's HTTP API (native /generate and OpenAI "
                    "/v1/*). The flags below are the reference backend's; on the SGLang backend every flag goes "
                    "to SGLang's launcher.",
    )
    parser.add_argument("--backend", choices=("auto", "sglang", "reference"), default="auto",
                        help="auto: SGLang when a CUDA device and sglang are available, else the reference engine")
    add_arguments(parser)
    args, rest = parser.parse_known_args(argv)
    backend, why = choose_backend(args.backend)
    print(f"launch_server: backend: {backend} ({why})", file=sys.stderr)
    if backend == "reference":
        if rest:
            parser.error(f"the reference backend does not take: {' '.join(rest)}")
        return serve(args)
    try:
        from whiflash_sgl.sglang.launch import main as sglang_main
    except ImportError as exc:
        print(f"launch_server: error: the SGLang backend cannot start: {exc}", file=sys.stderr)
        return 2
    return sglang_main(_without_backend(argv))


if __name__ == "__main__":
    sys.exit(main())
