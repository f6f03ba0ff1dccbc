"""WhiFlash's serving settings: what SGLang has no flag for, read from the environment.

SGLang rejects unknown CLI flags, so the EAGLE-3 drafter rides on ``--speculative-draft-model-path`` and everything
else comes from ``WHIFLASH_CONFIG`` (a YAML/JSON file, or inline JSON) and ``WHIFLASH_POLICY`` (a policy name that
overrides the file's). SGLang resolves its server arguments once, in the launching process, and spawns the scheduler
processes afterwards; the resolved settings are written to ``WHIFLASH_RESOLVED_CONFIG`` there, so every child reads
the same values without resolving anything again. Nothing here imports SGLang.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from whiflash_sgl.config import read_mapping
from whiflash_sgl.errors import WhiFlashError

CONFIG_ENV = "WHIFLASH_CONFIG"
POLICY_ENV = "WHIFLASH_POLICY"
RESOLVED_ENV = "WHIFLASH_RESOLVED_CONFIG"

CATCH_UP_MODES = ("eager",)
# The reference engine's settings (whiflash_sgl.config) that SGLang takes from its own flags, or does not use.
REFERENCE_ONLY = {
    "eagle3_path": "use --speculative-draft-model-path",
    "eagle3_depth": "use --speculative-num-steps",
    "eagle3_topk": "use --speculative-eagle-topk",
    "eagle3_budget": "the verify width is the DFlash block size",
    "paradigms": "SGLang routes between eagle3 and dflash",
}
SERVED_PARADIGMS = ("eagle3", "dflash")


@dataclass(frozen=True)
class ServingSettings:
    dflash_path: str = ""  # the DFlash drafter: a local folder or a hub id
    dflash_block_size: int = 0  # 0: --speculative-dflash-block-size, else the checkpoint's
    policy: str = "heuristic"  # a name in the whiflash_sgl.policies entry-point group
    policy_params: dict = field(default_factory=dict)
    catch_up: str = "eager"  # both drafters' KV written every round (safe with the radix cache)
    fallback: str = "eagle3"  # the paradigm used when the policy fails or overruns its deadline
    policy_deadline_ms: float = 5.0

    def __post_init__(self) -> None:
        if self.catch_up == "lazy":
            raise WhiFlashError(f"{CONFIG_ENV}: catch_up: lazy is not implemented by the SGLang worker yet (the "
                                f"reference engine has it); use eager")
        if self.catch_up not in CATCH_UP_MODES:
            raise WhiFlashError(f"{CONFIG_ENV}: catch_up must be one of {', '.join(CATCH_UP_MODES)}, "
                                f"got {self.catch_up!r}")
        if self.fallback not in SERVED_PARADIGMS:
            raise WhiFlashError(f"{CONFIG_ENV}: fallback must be one of {', '.join(SERVED_PARADIGMS)}, "
                                f"got {self.fallback!r}")
        if self.dflash_block_size < 0:
            raise WhiFlashError(f"{CONFIG_ENV}: dflash_block_size must be >= 0 (0 = the checkpoint's), "
                                f"got {self.dflash_block_size}")
        if self.policy_deadline_ms <= 0:
            raise WhiFlashError(f"{CONFIG_ENV}: policy_deadline_ms must be positive, got {self.policy_deadline_ms}")

    @classmethod
    def from_mapping(cls, values: dict, source: str) -> "ServingSettings":
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        for key in unknown:
            if key in REFERENCE_ONLY or key.startswith(("ngram_", "dflash_tree_")):
                hint = REFERENCE_ONLY.get(key, "it has no effect")
                raise WhiFlashError(f"{source}: {key} is a reference-engine setting; with SGLang {hint} (drop it "
                                    f"from this file)")
        if unknown:
            raise WhiFlashError(f"{source}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(fields)}")
        for key, value in values.items():
            expected = dict if key == "policy_params" else type(fields[key].default)
            if expected is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            else:
                ok = type(value) is expected
            if not ok:
                raise WhiFlashError(f"{source}: {key} must be {expected.__name__}, got {value!r}")
        if "policy_deadline_ms" in values:
            values = {**values, "policy_deadline_ms": float(values["policy_deadline_ms"])}
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def _config_mapping(spec: str) -> tuple[dict, str]:
    """The mapping ``WHIFLASH_CONFIG`` holds: inline JSON when it starts with ``{``, else a file path."""
    if spec.lstrip().startswith("{"):
        try:
            values = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise WhiFlashError(f"{CONFIG_ENV} holds invalid inline JSON: {exc}") from exc
        if not isinstance(values, dict):
            raise WhiFlashError(f"{CONFIG_ENV} must hold a JSON object of settings")
        return values, f"{CONFIG_ENV} (inline JSON)"
    path = Path(spec).expanduser()
    try:
        return read_mapping(path), str(path)
    except WhiFlashError as exc:
        raise WhiFlashError(f"{CONFIG_ENV}={spec}: {exc}") from exc


def settings_from_env(environ=os.environ) -> ServingSettings:
    """Settings from ``WHIFLASH_CONFIG`` and ``WHIFLASH_POLICY`` (the resolving, launching process)."""
    spec = environ.get(CONFIG_ENV, "").strip()
    if not spec:
        raise WhiFlashError(
            f"WHIFLASH needs {CONFIG_ENV}: a YAML/JSON file (or inline JSON) naming at least dflash_path, the DFlash "
            f"drafter; e.g. {CONFIG_ENV}=launch/whiflash.yaml, or `python -m whiflash_sgl.launch_server "
            f"--whiflash-config FILE ...`"
        )
    values, source = _config_mapping(spec)
    policy = environ.get(POLICY_ENV, "").strip()
    if policy:
        values = {**values, "policy": policy}
    settings = ServingSettings.from_mapping(values, source)
    if not settings.dflash_path:
        raise WhiFlashError(f"{source}: dflash_path is required (the DFlash drafter's folder or hub id)")
    return settings


def publish(settings: ServingSettings, environ=os.environ) -> None:
    """Hand the resolved settings to the processes SGLang spawns later (they inherit the environment)."""
    environ[RESOLVED_ENV] = settings.to_json()


def resolved_settings(environ=os.environ) -> ServingSettings:
    """The settings the launching process resolved (any SGLang process after argument resolution)."""
    text = environ.get(RESOLVED_ENV)
    if text is None:
        raise WhiFlashError(
            f"{RESOLVED_ENV} is not set: WHIFLASH settings are resolved with SGLang's server arguments "
            f"(--speculative-algorithm WHIFLASH) in the launching process"
        )
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise WhiFlashError(f"{RESOLVED_ENV} is not valid JSON: {exc}") from exc
    return ServingSettings.from_mapping(values, RESOLVED_ENV)
