"""One configuration object for the engine's drafters, loadable from YAML/JSON and overridable from the CLI."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from whiflash_sgl.errors import WhiFlashError


@dataclass(frozen=True)
class WhiFlashConfig:
    # n-gram drafter (prompt lookup)
    ngram_max: int = 4
    ngram_min: int = 2
    ngram_tokens: int = 8
    ngram_width: int = 1

    @classmethod
    def from_mapping(cls, values: dict, source: str = "config") -> "WhiFlashConfig":
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise WhiFlashError(f"{source}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(fields)}")
        for key, value in values.items():
            expected = type(fields[key].default)
            if type(value) is not expected:
                raise WhiFlashError(f"{source}: {key} must be {expected.__name__}, got {value!r}")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> "WhiFlashConfig":
        path = Path(path)
        if not path.is_file():
            raise WhiFlashError(f"config file {path} does not exist")
        text = path.read_text()
        try:
            values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise WhiFlashError(f"cannot parse {path}: {exc}") from exc
        if not isinstance(values, dict):
            raise WhiFlashError(f"{path} must hold a mapping of settings")
        return cls.from_mapping(values, str(path))
