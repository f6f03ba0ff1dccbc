"""The real SGLang server on this CPU: SmolLM2-135M (or a local Llama/Qwen target) with its drafters, one method.

``python -m whiflash_sgl.sglang.cpu_serve --method whiflash --policy mlp --port 30000`` (what
``launch/serve_sglang_cpu.sh`` runs) becomes ``python -m sglang.launch_server --device cpu ...`` with SGLang's CPU
engine (``SGLANG_USE_CPU_ENGINE=1``, attention backend ``intel_amx`` over the ``sgl_kernel`` stand-in). The target
is the embedded default, converted once into a cached HF folder (``whiflash prepare``), unless ``--model-path``
names another; drafters default to the committed ones for SmolLM2. float32 by default: greedy output is then the
same for every method (``--dtype bfloat16`` is faster, and may flip near-ties between kernel shapes). The KV pool is
bounded (``--max-total-tokens``) so that two servers fit on a 24 GiB machine. ``sglang_command`` is also what the
tests use to start servers with tiny models.

Every method runs with ``--enable-deterministic-inference``: only then does SGLang sample with the request's
``sampling_seed`` (default 42), as a Gumbel-max draw keyed by (seed, position); without it a sampled token is an
unseeded ``torch.multinomial`` draw, so the same request gives a different text each time and no speculative
server could give the non-speculative one's. With it, one seed means one text on the vanilla server, and WHIFLASH,
which verifies sampled requests with that same keyed draw (``worker``), gives the same text. (SGLang then also turns
off the radix cache for ``intel_amx``, as for every attention backend it does not list as deterministic with it.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from whiflash_sgl.errors import WhiFlashError
from whiflash_sgl.model_store import WEIGHTS_DIR

METHODS = ("vanilla", "eagle3", "dflash", "whiflash")
WEIGHTS = WEIGHTS_DIR / "smollm2-135m"
MAX_TOTAL_TOKENS = 16384  # KV slots: SmolLM2 in float32 takes 30 layers x (K + V) x 3 heads x 64 x 4 B = 46 KB a token
MAX_RUNNING_REQUESTS = 16
# SGLang sizes memory on CPU from the whole machine's available RAM before and after loading the weights, so servers
# loading side by side see each other's weights as their own and refuse to start under the default 0.716; the KV pool
# is bounded by MAX_TOTAL_TOKENS anyway.
MEM_FRACTION_STATIC = 0.95
# SGLang imports every module of sglang.srt.models at start (255 in 0.5.23), several seconds of CPU in each server
# process; the stand-in serves dense Llama/Qwen targets and the EAGLE-3/DFlash drafters, so the rest are skipped.
SERVED_MODEL_MODULES = ("llama", "llama_eagle3", "qwen2", "qwen3", "dflash")
EAGLE3_TREE = ("--speculative-num-steps", "6", "--speculative-eagle-topk", "4", "--speculative-num-draft-tokens", "16")


def sglang_command(method: str, model_path: str, *, port: int, policy: str = "mlp", eagle3_path: str | None = None,
                   dflash_path: str | None = None, dtype: str = "float32", host: str = "127.0.0.1",
                   max_total_tokens: int = MAX_TOTAL_TOKENS, extra: tuple[str, ...] = (),
                   environ=None) -> tuple[list[str], dict]:
    """The command line and environment that serve ``model_path`` with ``method`` on SGLang's CPU engine."""
    if method not in METHODS:
        raise WhiFlashError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    eagle3_path = str(eagle3_path or WEIGHTS / "eagle3")
    dflash_path = str(dflash_path or WEIGHTS / "dflash")
    env = dict(os.environ if environ is None else environ)
    env.update(SGLANG_USE_CPU_ENGINE="1", HF_HUB_OFFLINE="1", SGLANG_DISABLED_MODEL_ARCHS=_unserved_model_modules())
    argv = [sys.executable, "-m", "sglang.launch_server", "--model-path", model_path, "--device", "cpu",
            "--attention-backend", "intel_amx", "--dtype", dtype, "--host", host, "--port", str(port),
            "--max-total-tokens", str(max_total_tokens), "--max-running-requests", str(MAX_RUNNING_REQUESTS),
            "--sleep-on-idle", "--enable-metrics", "--mem-fraction-static", str(MEM_FRACTION_STATIC),
            "--enable-deterministic-inference"]
    if method == "eagle3":
        argv += ["--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", eagle3_path, *EAGLE3_TREE]
    elif method == "dflash":
        argv += ["--speculative-algorithm", "DFLASH", "--speculative-draft-model-path", dflash_path]
    elif method == "whiflash":
        # the verify width is the DFlash block; the EAGLE-3 tree (depth 6, top-4) is fitted to it by the plugin
        argv += ["--speculative-algorithm", "WHIFLASH", "--speculative-draft-model-path", eagle3_path]
        env["WHIFLASH_CONFIG"] = json.dumps({"dflash_path": dflash_path, "policy": policy})
    return argv + list(extra), env


def _unserved_model_modules() -> str:
    """SGLang's SGLANG_DISABLED_MODEL_ARCHS: every model module but the served ones (found without importing)."""
    import importlib.util
    import pkgutil

    models = Path(importlib.util.find_spec("sglang").submodule_search_locations[0]) / "srt" / "models"
    return ",".join(m.name for m in pkgutil.iter_modules([str(models)])
                    if not m.ispkg and m.name not in SERVED_MODEL_MODULES)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1:]
    parser = argparse.ArgumentParser(prog="launch/serve_sglang_cpu.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=METHODS, default="whiflash")
    parser.add_argument("--policy", default="mlp", help="WhiFlash routing policy (with --method whiflash)")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--model-path", help="an HF folder (default: SmolLM2-135M-Instruct, converted once)")
    parser.add_argument("--eagle3-path", help="EAGLE-3 drafter folder (default: the committed one for SmolLM2)")
    parser.add_argument("--dflash-path", help="DFlash drafter folder (default: the committed one for SmolLM2)")
    args = parser.parse_args(argv)
    try:
        if args.model_path is None:
            from whiflash_sgl.model_store import prepare_default_model

            model_path = str(prepare_default_model())
        else:
            model_path = args.model_path
        command, env = sglang_command(args.method, model_path, port=args.port, policy=args.policy, host=args.host,
                                      eagle3_path=args.eagle3_path, dflash_path=args.dflash_path, dtype=args.dtype,
                                      extra=tuple(extra))
    except WhiFlashError as exc:
        print(f"serve_sglang_cpu: error: {exc}", file=sys.stderr)
        return 2
    print(f"serve_sglang_cpu: {args.method} on http://{args.host}:{args.port} "
          f"(SGLang's CPU engine; ready when /health answers)\n  {' '.join(command[1:])}", file=sys.stderr, flush=True)
    os.execve(command[0], command, env)  # does not return


if __name__ == "__main__":
    sys.exit(main())
