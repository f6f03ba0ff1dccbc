"""The level log of a concurrency bench: each finished (method, level) run, one JSON line, next to ``--out``.

A bench over a whole prompt set at several levels runs for hours on a CPU; a crash, a reboot or a session's end
would otherwise throw all of it away. ``--resume`` reads the log back and runs only what it lacks. The log's first
line holds the run settings and the prompt ids: a log written by a bench with other settings or prompts is refused
rather than mixed in. The records carry their token ids, so a resumed bench judges new runs against the logged
vanilla reference. A last line cut short by a kill is dropped (that run is redone)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from whiflash_sgl.bench import LoadLevel, LoadRun
from whiflash_sgl.errors import WhiFlashError


def log_path(out: str | Path) -> Path:
    """Where the level log of the report ``out`` goes: ``bench.json`` → ``bench.levels.jsonl``."""
    return Path(out).with_suffix(".levels.jsonl")


class LevelLog:
    """The log at ``path``; ``resume``: keep what it holds (else it starts over)."""

    def __init__(self, path: Path, resume: bool):
        self.path, self.resume = path, resume

    def start(self, head: dict, prompt_ids: list[str]) -> dict[tuple[str, int], LoadLevel]:
        """The runs already logged for these settings and prompts (none unless resuming); later :meth:`add` calls
        append to the log."""
        header = {"settings": head, "prompt_ids": prompt_ids}
        if not self.resume or not self.path.exists():
            if self.resume:
                print(f"--resume: {self.path} does not exist, starting from the beginning", file=sys.stderr)
            self.path.write_text(json.dumps(header) + "\n", encoding="utf-8")
            return {}
        lines = self.path.read_text(encoding="utf-8").split("\n")
        logged = _parse(lines[0], self.path)
        if logged != json.loads(json.dumps(header)):
            differ = sorted(k for k in {**head, **logged.get("settings", {})}
                            if logged.get("settings", {}).get(k) != head.get(k))
            what = ", ".join(differ) if differ else "the prompts"
            raise WhiFlashError(f"{self.path} was written by a bench with other settings ({what}): rerun with the "
                                f"same ones, or drop --resume to start over")
        done = {}
        for n, line in enumerate(lines[1:], 2):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                if n < len(lines):  # only the last line can have been cut short
                    raise WhiFlashError(f"{self.path}, line {n} is not JSON: delete the file, or that line") from None
                break
            done[entry["method"], entry["concurrency"]] = LoadLevel(
                [LoadRun(**r) for r in entry["runs"]], entry["wall_seconds"], entry["peak_running"])
        with open(self.path, "w", encoding="utf-8") as f:  # without a cut line, so that appends stay parseable
            f.write("".join(line + "\n" for line in lines[:1] + [
                json.dumps(self._entry(m, c, r)) for (m, c), r in done.items()]))
        if done:
            print(f"--resume: {len(done)} runs from {self.path}: "
                  f"{', '.join(f'{m} at {c}' for m, c in done)}", file=sys.stderr)
        return done

    def add(self, method: str, level: int, result: LoadLevel) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(self._entry(method, level, result)) + "\n")

    @staticmethod
    def _entry(method: str, level: int, result: LoadLevel) -> dict:
        return {"method": method, "concurrency": level, "wall_seconds": result.wall_seconds,
                "peak_running": result.peak_running, "runs": [asdict(r) for r in result.runs]}


def _parse(line: str, path: Path) -> dict:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        raise WhiFlashError(f"{path} does not start with a bench's settings: delete it, or drop --resume") from None
