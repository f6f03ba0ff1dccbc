#!/usr/bin/env bash
# The main job on the embedded default: SmolLM2-135M-Instruct on the CPU with its committed drafters; every
# method on the demo prompts, a comparison table on stdout, bench_demo.json and two figures next to it.
# Extra arguments go to `whiflash bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
.venv/bin/whiflash prepare >/dev/null
exec .venv/bin/whiflash bench --prompts launch/demo_prompts.jsonl \
    --methods vanilla,hf-generate,ngram,eagle3,dflash,whiflash:heuristic,whiflash:mlp,oracle \
    --max-new-tokens 96 --threads 2 --out bench_demo.json --plot "$@"
