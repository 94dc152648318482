#!/usr/bin/env bash
# CapRL-3B's model card, as written: serve the checkpoint under the name "caprl", then caption a folder
# through that server. `--model caprl` names what the server serves; caprl takes the processor files
# (grid, chat template) from the root the server reports when it is a folder on this machine, else from
# the hub id its last component names (/PATH/CapRL-3B is internlm/CapRL-3B), or from --processor.
#
#   MODEL_PATH=/data/CapRL-3B IMAGES=./images OUT=out.parquet bash examples/card_recipe.sh
#   SERVE=0 PORT=8000 IMAGES=./images bash examples/card_recipe.sh   # a server already running here
#
# One addition to the card's line: --trust-request-chat-template, so that caprl can send CapRL's exact
# prompt (the stock Qwen2.5-VL template adds a system turn CapRL was not trained with).
# Any further arguments go to `caprl caption` (e.g. --max-pixels, --concurrency).
set -euo pipefail

MODEL_PATH=${MODEL_PATH:-/PATH/CapRL-3B}
PORT=${PORT:-8000}
IMAGES=${IMAGES:-./images}
OUT=${OUT:-out.parquet}

if [[ "${SERVE:-1}" == 1 ]]; then
    vllm serve "$MODEL_PATH" \
        --trust-remote-code \
        --tensor-parallel-size=1 \
        --pipeline-parallel-size=1 \
        --gpu_memory_utilization=0.95 \
        --served-model-name=caprl \
        --port "$PORT" \
        --host 0.0.0.0 \
        --trust-request-chat-template &
    server=$!
    trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT
    until curl -sf "http://127.0.0.1:${PORT}/health" >/dev/null; do
        kill -0 "$server" 2>/dev/null || { echo "vllm serve exited" >&2; exit 1; }
        sleep 5
    done
fi

caprl caption "$IMAGES" -o "$OUT" --engine openai --base-url "http://127.0.0.1:${PORT}/v1" --model caprl "$@"
