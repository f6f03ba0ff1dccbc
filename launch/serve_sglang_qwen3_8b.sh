#!/usr/bin/env bash
# Serve Qwen3-8B with WhiFlash on one CUDA GPU through SGLang 0.5.23: EAGLE-3 drafter AngelSlim/Qwen3-8B_eagle3,
# DFlash drafter z-lab/Qwen3-8B-DFlash-b16 (from launch/whiflash.yaml), routed per round by the heuristic policy.
#
# Setup, once, in a venv with a CUDA build of torch (sglang 0.5.23 pins torch 2.14.1):
#   pip install -e ".[sglang]"
# Then: launch/serve_sglang_qwen3_8b.sh [more SGLang flags, e.g. --tp-size 2 --port 30001]
# Environment: EAGLE3 (drafter), CONFIG (WhiFlash settings), POLICY (overrides the file's), MODEL (target).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-Qwen/Qwen3-8B}
EAGLE3=${EAGLE3:-AngelSlim/Qwen3-8B_eagle3}
CONFIG=${CONFIG:-launch/whiflash.yaml}
policy=()
[[ -n "${POLICY:-}" ]] && policy=(--whiflash-policy "$POLICY")
exec python -m whiflash_sgl.launch_server --backend sglang --whiflash-config "$CONFIG" "${policy[@]}" \
    --model-path "$MODEL" --speculative-draft-model-path "$EAGLE3" \
    --attention-backend flashinfer --mem-fraction-static 0.8 --host 127.0.0.1 --port 30000 "$@"
