#!/usr/bin/env bash
# The main job on the embedded default: SmolLM2-135M-Instruct on the CPU, every method on the demo prompts,
# a comparison table on stdout and bench_demo.json. Extra arguments go to `whiflash bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
.venv/bin/whiflash prepare >/dev/null
exec .venv/bin/whiflash bench --prompts launch/demo_prompts.jsonl \
    --methods vanilla,hf-generate,hf-prompt-lookup,ngram --max-new-tokens 96 --threads 2 --out bench_demo.json "$@"
