#!/usr/bin/env bash
# GPU check of the verification kernels (whiflash_sgl/kernels/) on a CUDA machine.
#
# It fails early, with the reason, unless torch sees a CUDA device and the FlashInfer backend can be built; then it
# runs `python -m whiflash_sgl.kernels.check --device cuda` (every backend -- the PyTorch reference and FlashInfer --
# against per-request float32 SDPA on random ragged tree batches: chains, wide trees, GQA, prefixes up to 4k; max
# abs error and time per call for each dtype), the kernel tests, and the engine benchmark at the end (vanilla vs
# the drafters and WhiFlash, JSON in $OUT or ./gpu-check). It exits non-zero on any mismatch.
#
# Installing FlashInfer there (in the project's venv, which must hold a CUDA build of torch):
#   pip install -e ".[dev]"                    # the project and its test tools
#   pip install "flashinfer-python==0.7.2"     # the version sglang==0.5.23 pins; `pip install -e ".[sglang]"` also
#                                              # brings it, with SGLang itself
#   python -c "import flashinfer, torch; print(flashinfer.__version__, torch.version.cuda, torch.cuda.is_available())"
# FlashInfer compiles the kernels it needs on first use (JIT, with the CUDA toolkit's nvcc) and caches them, so the
# first run can take minutes; later runs reuse the cache.
#
# Usage: launch/gpu_check.sh [extra arguments for the check, e.g. --seed 1]
# PYTHON selects the interpreter (default: .venv/bin/python when present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

"$PYTHON" -c 'import sys, torch; sys.exit(None if torch.cuda.is_available() else "torch sees no CUDA device")'
"$PYTHON" -c '
import sys
from whiflash_sgl.kernels import BackendUnavailableError, get_backend
try:
    get_backend("flashinfer")
except BackendUnavailableError as error:
    sys.exit(str(error))
'
"$PYTHON" -m whiflash_sgl.kernels.check --device cuda "$@"
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_kernels.py

# ==== Engine benchmark on GPU ========================================================================================
# The reference engine on the GPU, verification through FlashInfer (a bf16 target: FlashInfer computes in 16 bits):
# vanilla against each drafter and WhiFlash on the demo prompts. The engine drives one sequence from Python, so this
# measures the algorithm on a GPU, not SGLang's serving speed (launch/gpu_smoke_sglang.sh is that). In bf16 a verify
# pass of many rows may round differently from a one-row step, so identical_to_vanilla can read "NO" on a few prompts.
mkdir -p "${OUT:-gpu-check}"
"$PYTHON" -m whiflash_sgl.cli prepare >/dev/null
"$PYTHON" -m whiflash_sgl.cli bench --device cuda --dtype bfloat16 --attention flashinfer \
    --prompts launch/demo_prompts.jsonl --methods vanilla,ngram,eagle3,dflash,whiflash:heuristic \
    --max-new-tokens 128 --out "${OUT:-gpu-check}/bench_gpu.json"
