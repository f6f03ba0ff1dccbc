"""The SGLang half of ``python -m whiflash_sgl.launch_server``: WhiFlash settings into the environment, then SGLang.

``--whiflash-config FILE`` and ``--whiflash-policy NAME`` become ``WHIFLASH_CONFIG`` / ``WHIFLASH_POLICY`` (SGLang
rejects flags it does not know), ``--speculative-algorithm WHIFLASH`` is added when missing, and every other
argument goes to ``python -m sglang.launch_server`` unchanged, which this process becomes (``exec``), so SGLang's
own processes inherit the settings. The settings file is checked before SGLang starts; everything else (the
policy, the drafters, the tree shape) is checked by SGLang's argument resolution through the plugin.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from whiflash_sgl.errors import WhiFlashError
from whiflash_sgl.sglang.settings import CONFIG_ENV, POLICY_ENV, settings_from_env


def split_arguments(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """WhiFlash's two flags, and the arguments for SGLang's launcher."""
    parser = argparse.ArgumentParser(prog="python -m whiflash_sgl.launch_server", add_help=False)
    parser.add_argument("--whiflash-config")
    parser.add_argument("--whiflash-policy")
    return parser.parse_known_args(argv)


def sglang_command(argv: list[str], environ=os.environ) -> list[str]:
    """The SGLang launcher's command line; sets WhiFlash's variables in ``environ`` and checks the settings."""
    ours, rest = split_arguments(argv)
    if ours.whiflash_config:
        spec = ours.whiflash_config
        environ[CONFIG_ENV] = spec if spec.lstrip().startswith("{") else str(Path(spec).expanduser().resolve())
    if ours.whiflash_policy:
        environ[POLICY_ENV] = ours.whiflash_policy
    algorithms = [rest[i + 1] for i, a in enumerate(rest[:-1]) if a == "--speculative-algorithm"]
    algorithms += [a.split("=", 1)[1] for a in rest if a.startswith("--speculative-algorithm=")]
    if not algorithms:
        rest = [*rest, "--speculative-algorithm", "WHIFLASH"]
    elif any(a.upper() != "WHIFLASH" for a in algorithms):
        raise WhiFlashError(f"--speculative-algorithm {algorithms[-1]} is not WHIFLASH; drop it (WHIFLASH is added) or "
                            f"run `python -m sglang.launch_server` directly")
    settings_from_env(environ)
    return [sys.executable, "-m", "sglang.launch_server", *rest]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print("python -m whiflash_sgl.launch_server --backend sglang [--whiflash-config FILE] [--whiflash-policy NAME] "
              "<arguments of python -m sglang.launch_server>\n\n"
              f"--whiflash-config  YAML/JSON file (or inline JSON) of WhiFlash's settings; sets {CONFIG_ENV}\n"
              f"--whiflash-policy  routing policy name (entry-point group whiflash_sgl.policies); sets {POLICY_ENV}\n"
              "The EAGLE-3 drafter is --speculative-draft-model-path. SGLang's own flags follow:\n", flush=True)
        os.execv(sys.executable, [sys.executable, "-m", "sglang.launch_server", "--help"])
    try:
        command = sglang_command(argv)
    except WhiFlashError as exc:
        print(f"launch_server: error: {exc}", file=sys.stderr)
        return 2
    print(f"launch_server: {' '.join(command[1:])} with {CONFIG_ENV}={os.environ[CONFIG_ENV]}"
          + (f" {POLICY_ENV}={os.environ[POLICY_ENV]}" if os.environ.get(POLICY_ENV) else ""), file=sys.stderr,
          flush=True)
    os.execv(command[0], command)  # does not return
