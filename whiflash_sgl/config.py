"""One configuration object for the engine's drafters, loadable from YAML/JSON and overridable from the CLI."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from whiflash_sgl.errors import WhiFlashError

# where the target's attention runs: a backend of ``whiflash_sgl.kernels`` (planned once per forward, run per layer),
# or "direct", the single-request reference called on HF's own layout
ATTENTION_PATHS = ("auto", "reference", "flashinfer", "cpu", "direct")
# the products in a float32 target's linear layers on a CPU (``Target.matmul``); "auto": bfloat16 where it runs
MATMUL_PRECISIONS = ("float32", "bfloat16", "auto")


@dataclass(frozen=True)
class WhiFlashConfig:
    # n-gram drafter (prompt lookup)
    ngram_max: int = 4
    ngram_min: int = 2
    ngram_tokens: int = 8
    ngram_width: int = 1
    # EAGLE-3 drafter: folder ("" = the committed one for the default target), dynamic tree shape. Wider trees buy
    # acceptance with verify rows the 2-core target pays for: on specbench_dev (--limit 8, EAGLE-3 v6, each run against
    # its own vanilla) these defaults give tau 1.83 at 1.25x vanilla, budget 32 with min_prob 0.01 tau 1.98 at 1.09x
    eagle3_path: str = ""
    eagle3_depth: int = 6
    eagle3_topk: int = 4
    eagle3_budget: int = 16
    eagle3_min_prob: float = 0.05  # stop drafting below this cumulative draft probability (0 = full tree)
    # DFlash drafter: folder, block size drafted per round (0 = the checkpoint's training block), tree from
    # per-position top-k (1 = chain) grown best-first to a node budget. CPU defaults for the SmolLM2 drafter (chosen
    # with v3, trained with block 8), measured on 10 dev prompts, each run against its own vanilla: positions past 4
    # almost never accept and each verified row costs the 2-core target 1-2 ms (chain block 4 1.13x vanilla at tau
    # 1.62, blocks 5 / 8 1.07x / 1.00x); the second-best token per position, 8 nodes in all, lifts tau 1.62 -> 1.83
    # at +4% tokens/s (budget 6 / 12: tau 1.80 / 1.83, slower; top-3 or block 5 at budget 8: same speed)
    # On specbench_dev (--limit 8, DFlash v7): tau 1.70 at 1.12x vanilla; block 8, top-3, 24 nodes: tau 1.87 at 0.96x
    dflash_path: str = ""
    dflash_block_size: int = 4
    dflash_tree_topk: int = 2
    dflash_tree_budget: int = 8
    # drafter weights and arithmetic: drafts only propose (the target verifies in its own dtype), so a cheaper
    # dtype for them never changes the output
    drafter_dtype: str = "bfloat16"
    # WhiFlash routing: paradigms to route between, catch-up mode, fallback on policy faults, policy deadline
    paradigms: str = "eagle3,dflash,ngram"
    catch_up: str = "lazy"
    fallback: str = "eagle3"
    policy_deadline_ms: float = 50.0
    # the target's measured forward cost against rows per forward (``whiflash cost-curve``): "" = the committed
    # curve when the target is the embedded default on a CPU, "none" = no curve (no trimming of trees by value; the
    # router learns verify cost online), else a JSON file
    cost_curve: str = ""

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
        return cls.from_mapping(read_mapping(path), str(path))


def read_mapping(path: str | Path) -> dict:
    """A YAML or JSON file holding one mapping of settings."""
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
    return values
