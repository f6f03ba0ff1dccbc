#!/usr/bin/env bash
# Installs a minimal, CPU-only SGLang 0.5.23 into an existing Python environment, enough to serve with SGLang's own
# CPU engine (`SGLANG_USE_CPU_ENGINE=1 python -m sglang.launch_server --device cpu ...`, see
# launch/serve_sglang_cpu.sh). A full `pip install sglang==0.5.23` would replace the CPU torch with a CUDA build and
# pull about 1.6 GB of CUDA packages, so SGLang goes in with --no-deps and only what its import paths need follows:
#   A  sglang itself and what `import sglang.srt.speculative.spec_info` / `sglang.srt.plugins` / `server_args` need,
#      triton included (sglang imports it unconditionally; a 236 MB wheel, about 900 MB installed, no GPU needed);
#   B  what ServerArgs.resolve_once() needs with a real local model config (transformers, tvm-ffi, ...);
#   C  what the worker, scheduler and server modules need to import, and `sglang.launch_server` itself
#      (fastapi, uvicorn, openai, xgrammar, soundfile, ...);
#   D  the CPU ops SGLang's CPU engine calls: our pure-PyTorch `sgl_kernel` stand-in (sgl_kernel_cpu/; refused on a
#      CUDA machine or beside a real sgl-kernel), and a .pth file that runs whiflash_sgl.sglang.cpu_engine.activate()
#      at interpreter start: in processes with SGLANG_USE_CPU_ENGINE=1 it applies the CPU workarounds before SGLang
#      imports the modules they touch (every process SGLang spawns included).
# torch stays at the installed version (installed as torch==2.13.0, the local CPU wheel, when missing) and an
# installed transformers 5.x is kept: sglang 0.5.23 pins 5.19.0, but every path the plugin and its tests use works
# with later 5.x releases. torchvision is not installed (PyPI's builds need CUDA); tests/stubs stands in for it.
#
# Usage: launch/install_sglang_cpu.sh            # into .venv (created by launch/setup_cpu.sh)
#        PYTHON=/path/to/venv/bin/python launch/install_sglang_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || { echo "install_sglang_cpu: no Python at $PYTHON; run launch/setup_cpu.sh or set PYTHON" >&2; exit 2; }
pip() { "$PYTHON" -m pip "$@" 2> >(grep -v "^WARNING: Location" >&2); }

installed() { "$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null || true; }

torch_version=$(installed torch)
if [ -z "$torch_version" ]; then
    pip install -q torch==2.13.0
    torch_version=$(installed torch)
fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==${torch_version%%+*}" >"$constraints"
transformers_version=$(installed transformers)
case "$transformers_version" in
    5.*) echo "transformers==$transformers_version" >>"$constraints" ;;
    *) echo "transformers==5.19.0" >>"$constraints" ;;
esac

echo "install_sglang_cpu: sglang 0.5.23 (no deps), keeping $(tr '\n' ' ' <"$constraints")"
pip install -q --no-deps sglang==0.5.23
# Phase A
pip install -q -c "$constraints" numpy orjson packaging psutil pybase64 requests pillow starlette msgspec pydantic \
    pyzmq tqdm IPython aiohttp triton==3.8.0
# Phase B
pip install -q -c "$constraints" transformers dill apache-tvm-ffi==0.1.11 sentencepiece==0.2.1 \
    compressed-tensors==0.18.0 gguf
# Phase C
pip install -q -c "$constraints" einops openai==2.8.0 partial_json_parser setproctitle uvicorn fastapi uvloop \
    python-multipart jsonschema xgrammar==0.2.7 soundfile
# Phase D
PYTHON="$PYTHON" bash launch/install_sgl_kernel_cpu.sh
site_packages=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo 'import os; os.environ.get("SGLANG_USE_CPU_ENGINE") == "1" and __import__("whiflash_sgl.sglang.cpu_engine").sglang.cpu_engine.activate()' \
    >"$site_packages/whiflash_sgl_cpu_engine.pth"
"$PYTHON" - <<'EOF'
import importlib.metadata as m
import sglang.srt.plugins, sglang.srt.server_args, sglang.srt.speculative.spec_info  # noqa: F401
print("install_sglang_cpu: ok: sglang", m.version("sglang"), "torch", m.version("torch"),
      "transformers", m.version("transformers"), "triton", m.version("triton"))
EOF
