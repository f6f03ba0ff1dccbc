#!/usr/bin/env bash
# GPU smoke test of the SGLang integration: no downloads, a few minutes on one CUDA GPU with SGLang 0.5.23.
#
# It writes a tiny random Qwen3 target (4 layers) and the configs of an EAGLE-3 and a DFlash drafter for it, then
# serves them twice with random weights (--load-format dummy, same seed): once without speculation and once with
# --speculative-algorithm WHIFLASH through `python -m whiflash_sgl.launch_server --backend sglang`. Each server
# gets the same greedy /generate requests (token ids; no tokenizer). It fails if WHIFLASH does not start or does
# not answer; it reports whether the outputs are token-identical to the baseline's and the accept lengths SGLang
# returns. Random models have near-flat distributions, so a rare bf16 tie can flip a token: a mismatch is printed
# for a person to judge, not counted as a failure.
#
# Setup: pip install -e ".[sglang]" in a venv with CUDA torch. Usage: launch/gpu_smoke_sglang.sh [policy]
set -euo pipefail
cd "$(dirname "$0")/.."
POLICY=${1:-heuristic}
PYTHON=${PYTHON:-python}
WORK=$(mktemp -d)
PORT=${PORT:-30123}
trap 'kill ${SERVER_PID:-} 2>/dev/null || true; rm -rf "$WORK"' EXIT
"$PYTHON" -c 'import sys, torch; sys.exit(None if torch.cuda.is_available() else "torch sees no CUDA device")'

"$PYTHON" - "$WORK" <<'EOF'
import json, sys
from pathlib import Path
from transformers import LlamaConfig, Qwen3Config
root = Path(sys.argv[1])
shape = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             vocab_size=1024, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False)
Qwen3Config(num_hidden_layers=4, architectures=["Qwen3ForCausalLM"], torch_dtype="bfloat16",
            **shape).save_pretrained(root / "target")
LlamaConfig(num_hidden_layers=1, architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=1024,
            target_hidden_size=256, torch_dtype="bfloat16",
            eagle_config={"eagle_aux_hidden_state_layer_ids": [0, 1, 2]}, **shape).save_pretrained(root / "eagle3")
Qwen3Config(num_hidden_layers=1, architectures=["DFlashDraftModel"], num_target_layers=4, target_hidden_size=256,
            torch_dtype="bfloat16", dflash_config={"block_size": 8, "target_layer_ids": [1, 2], "mask_token_id": 1023},
            **shape).save_pretrained(root / "dflash")
(root / "whiflash.json").write_text(json.dumps({"dflash_path": str(root / "dflash")}))
EOF

common=(--model-path "$WORK/target" --load-format dummy --skip-tokenizer-init --random-seed 7
        --mem-fraction-static 0.3 --max-running-requests 8 --host 127.0.0.1 --port "$PORT")
serve() {  # serve <log> <launcher args...>: start, wait for /health, leave SERVER_PID
    local log=$1; shift
    "$@" >"$log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 600); do
        if curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; then return 0; fi
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then tail -50 "$log"; echo "smoke: server died ($log)"; exit 1; fi
        sleep 1
    done
    tail -50 "$log"; echo "smoke: server did not become healthy in 600 s"; exit 1
}
generate() {  # generate <out.json>
    "$PYTHON" - "$PORT" "$1" <<'EOF'
import json, sys, requests
port, out = sys.argv[1], sys.argv[2]
prompts = [[5 + i, 17, 300 + i, 42, 8, 99] for i in range(8)]
r = requests.post(f"http://127.0.0.1:{port}/generate", timeout=300, json={
    "input_ids": prompts, "sampling_params": {"max_new_tokens": 48, "temperature": 0, "ignore_eos": True}})
r.raise_for_status()
json.dump(r.json(), open(out, "w"))
EOF
}
stop() { kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=; }

serve "$WORK/baseline.log" "$PYTHON" -m sglang.launch_server "${common[@]}"
generate "$WORK/baseline.json"; stop
serve "$WORK/whiflash.log" "$PYTHON" -m whiflash_sgl.launch_server --backend sglang \
    --whiflash-config "$WORK/whiflash.json" --whiflash-policy "$POLICY" "${common[@]}" \
    --speculative-draft-model-path "$WORK/eagle3" --speculative-draft-load-format dummy
generate "$WORK/whiflash.json"; stop

"$PYTHON" - "$WORK" <<'EOF'
import json, sys
from pathlib import Path
root = Path(sys.argv[1])
base, spec = (json.loads((root / f"{n}.json").read_text()) for n in ("baseline", "whiflash"))
same = sum(a["output_ids"] == b["output_ids"] for a, b in zip(base, spec))
accept = [r["meta_info"].get("spec_accept_length") for r in spec]
print(f"smoke: WHIFLASH served {len(spec)} requests; {same}/{len(spec)} token-identical to the baseline; "
      f"accept lengths {accept}")
log = (root / "whiflash.log").read_text()
print("smoke: capture layout:", next((l.strip() for l in log.splitlines() if "WHIFLASH target captures" in l), "?"))
print("smoke: KV budget:", next((l.strip() for l in log.splitlines() if "WHIFLASH KV budget" in l), "?"))
EOF
