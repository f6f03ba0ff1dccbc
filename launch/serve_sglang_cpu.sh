#!/usr/bin/env bash
# The real SGLang server on this CPU, one method at a time, on SmolLM2-135M-Instruct with the committed drafters:
#   bash launch/serve_sglang_cpu.sh --method {vanilla,eagle3,dflash,whiflash} [--policy NAME] [--port N] \
#       [--dtype float32|bfloat16] [-- extra sglang.launch_server args]
# Uses the .venv of launch/setup_cpu.sh (made when missing), installs the minimal CPU SGLang and the sgl_kernel
# stand-in when missing, converts the target once, then becomes `python -m sglang.launch_server --device cpu ...`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash launch/setup_cpu.sh
.venv/bin/python -c "import sglang.srt.plugins, sgl_kernel" 2>/dev/null || bash launch/install_sglang_cpu.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m whiflash_sgl.sglang.cpu_serve "$@"
