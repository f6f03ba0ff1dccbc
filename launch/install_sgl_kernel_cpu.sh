#!/usr/bin/env bash
# Installs whiflash-sgl-kernel-cpu (sgl_kernel_cpu/): WhiFlash's pure-PyTorch stand-in for the sgl_kernel CPU ops that
# SGLang 0.5.23's CPU engine calls. CPU-only machines only: it refuses when a real sgl-kernel/sglang-kernel is
# installed or CUDA is available, since the stand-in must never shadow the real kernels.
#
# Usage: launch/install_sgl_kernel_cpu.sh            # into .venv
#        PYTHON=/path/to/venv/bin/python launch/install_sgl_kernel_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || { echo "install_sgl_kernel_cpu: no Python at $PYTHON; run launch/setup_cpu.sh or set PYTHON" >&2; exit 2; }

real=$("$PYTHON" - <<'EOF2'
import importlib.metadata as m
found = []
for name in ("sgl-kernel", "sglang-kernel", "sglang-kernel-cpu"):
    try:
        found.append(f"{name}=={m.version(name)}")
    except m.PackageNotFoundError:
        pass
print(" ".join(found))
EOF2
)
if [ -n "$real" ]; then
    echo "install_sgl_kernel_cpu: refusing: a real sgl_kernel is installed ($real); the stand-in must not replace it" >&2
    exit 2
fi
if "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "install_sgl_kernel_cpu: refusing: CUDA is available; install the real sglang-kernel on GPU machines" >&2
    exit 2
fi

"$PYTHON" -m pip install -q -e ./sgl_kernel_cpu 2> >(grep -v "^WARNING: Location" >&2)
"$PYTHON" - <<'EOF2'
import importlib.metadata as m
import torch
import sgl_kernel
assert sgl_kernel.WHIFLASH_CPU_STANDIN and hasattr(torch.ops.sgl_kernel, "convert_weight_packed")
print("install_sgl_kernel_cpu: ok: whiflash-sgl-kernel-cpu", m.version("whiflash-sgl-kernel-cpu"),
      "torch", m.version("torch"))
EOF2
