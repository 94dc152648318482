#!/usr/bin/env bash
# One-GPU smoke test of the transformers engine: caprl from this checkout (PYTHONPATH=., no install)
# captions a few images with the tiny random Qwen2.5-VL on GPU 0, and the evidence is printed.
#
# For a machine with one NVIDIA GPU, torch with CUDA and transformers, but no vLLM and no network.
# Small pure-Python dependencies the machine may lack (webdataset, braceexpand, click) are carried as
# wheels in a folder named by $WHEELS; only those whose module is missing are unpacked, into the
# output folder (nothing is installed into the machine's Python).
#
#   WHEELS=.gpu-wheels bash bench/gpu_smoke.sh [OUT]       # from the repository root
#   GPU_SMOKE_ALLOW_CPU=1 bash bench/gpu_smoke.sh          # the same steps on the CPU (a dry run)
#
# OUT defaults to build/gpu-smoke (emptied first). PYTHON picks the interpreter (default python3).
# Exit code: that of the caption run (0 when all is well); 2 when no GPU is visible and
# GPU_SMOKE_ALLOW_CPU is not 1; 1 when a dependency is missing.
set -u -o pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${1:-build/gpu-smoke}
rm -rf "$OUT"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

section() { printf '\n== %s ==\n' "$*"; }

section "carried wheels"
if [ -n "${WHEELS:-}" ]; then
    for wheel in "$WHEELS"/*.whl; do
        [ -e "$wheel" ] || { echo "no wheels in $WHEELS"; break; }
        module=$(basename "$wheel" | cut -d- -f1 | tr 'A-Z-' 'a-z_')
        if "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$module') is None)"; then
            echo "$module: already installed, $(basename "$wheel") not used"
        elif "$PY" -m pip install --quiet --no-index --no-deps --target "$OUT/wheels" "$wheel"; then
            echo "$module: unpacked from $(basename "$wheel")"
        else
            # A pure-Python wheel is a zip archive Python can import from directly.
            echo "$module: pip failed; importing $(basename "$wheel") from the archive"
            export PYTHONPATH="$PYTHONPATH:$(cd "$(dirname "$wheel")" && pwd)/$(basename "$wheel")"
        fi
    done
    [ -d "$OUT/wheels" ] && export PYTHONPATH="$PYTHONPATH:$OUT/wheels"
else
    echo "WHEELS not set: using what this Python has"
fi

section "python and libraries"
"$PY" - <<'EOF' || exit 1
import importlib, importlib.metadata, platform, sys, warnings
warnings.simplefilter("ignore")
print("python", platform.python_version(), sys.executable)
missing = []
for name in ("torch", "transformers", "PIL", "pyarrow", "click", "fsspec", "tqdm", "huggingface_hub",
             "webdataset", "braceexpand", "caprl_cli"):
    try:
        module = importlib.import_module(name)
        try:
            version = importlib.metadata.version({"PIL": "pillow", "caprl_cli": "caprl-cli"}.get(name, name))
        except importlib.metadata.PackageNotFoundError:  # caprl_cli from this checkout: not installed
            version = getattr(module, "__version__", "")
        print(f"{name} {version} ({getattr(module, '__file__', '')})")
    except Exception as exc:
        missing.append(name)
        print(f"{name}: MISSING ({type(exc).__name__}: {exc})")
try:
    import vllm  # noqa: F401
    print("vllm: present (not needed here)")
except Exception:
    print("vllm: absent (as expected)")
if missing:
    sys.exit(f"cannot run: missing {', '.join(missing)}")
import torch
print("torch.cuda.is_available():", torch.cuda.is_available(), "| device count:", torch.cuda.device_count(),
      "| CUDA", torch.version.cuda)
EOF

section "nvidia-smi -L"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi -L
    GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
else
    echo "nvidia-smi: not found"
    GPUS=0
fi
CUDA_OK=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
if [ "$GPUS" -ge 1 ] && [ "$CUDA_OK" = 1 ]; then
    DEVICE_ARGS=(--gpus 0)
    echo "GPU run: --gpus 0"
elif [ "${GPU_SMOKE_ALLOW_CPU:-0}" = 1 ]; then
    DEVICE_ARGS=()
    echo "NO GPU (nvidia-smi sees $GPUS, torch.cuda.is_available()=$CUDA_OK): GPU_SMOKE_ALLOW_CPU=1, so the"
    echo "same steps run on the CPU, without --gpus 0 (a dry run of this script, not a GPU test)"
else
    echo "NO GPU (nvidia-smi sees $GPUS, torch.cuda.is_available()=$CUDA_OK): nothing to test here."
    echo "Set GPU_SMOKE_ALLOW_CPU=1 to run the same steps on the CPU."
    exit 2
fi

section "tiny model and images"
"$PY" examples/make_tiny_model.py "$OUT/tiny-model" 2>&1 | tail -1 || exit 1
"$PY" - "$OUT/images" <<'EOF' || exit 1
import sys
from pathlib import Path
from PIL import Image
folder = Path(sys.argv[1])
folder.mkdir(parents=True)
for number, size in enumerate([(64, 48), (320, 240), (240, 320), (100, 100), (640, 360), (57, 91)]):
    Image.new("RGB", size, (number * 40 % 256, 120, 200 - number * 20)).save(folder / f"img{number}.jpg")
print(f"{number + 1} images in {folder}")
EOF

# Prints the exit code, the rows (count, statuses) and the summary's engine and run blocks of one run.
report() {
    local name=$1 code=$2
    echo "exit code ($name): $code"
    "$PY" - "$OUT/$name/out.parquet" <<'EOF'
import collections, json, sys
from pathlib import Path
output = Path(sys.argv[1])
if not output.exists():
    sys.exit(f"no output at {output}")
import pyarrow.parquet as pq
rows = pq.read_table(output).to_pylist()
print("rows:", len(rows), "| statuses:", dict(collections.Counter(row["status"] for row in rows)))
for row in rows:
    if row["status"] != "ok":
        print("  ", row["key"], row["error"])
summary = json.loads(Path(f"{output}.summary.json").read_text())
print("summary engine:", json.dumps({key: summary.get(key) for key in ("engine", "engine_version")}))
print("summary run:", json.dumps(summary.get("run"), indent=2))
EOF
}

section "caption with the transformers engine ${DEVICE_ARGS[*]:-(CPU)}"
mkdir -p "$OUT/one"
"$PY" -m caprl_cli caption "$OUT/images" -o "$OUT/one/out.parquet" --engine transformers ${DEVICE_ARGS[@]+"${DEVICE_ARGS[@]}"} \
    --model "$OUT/tiny-model" --dtype float32 --max-tokens 16 -v 2>&1 | tee "$OUT/one/caption.log"
CODE=${PIPESTATUS[0]}
report one "$CODE"
echo "where the model ran (from -v):"
grep -E "transformers engine on|no GPU found|captioning .* images" "$OUT/one/caption.log" \
    || echo "  NO device line in the log: the engine did not say where it ran"

section "one engine in a worker process (the multi-engine path) on GPU 0"
mkdir -p "$OUT/worker"
"$PY" bench/gpu_worker_path.py caption "$OUT/images" -o "$OUT/worker/out.parquet" --engine transformers \
    ${DEVICE_ARGS[@]+"${DEVICE_ARGS[@]}"} --model "$OUT/tiny-model" --dtype float32 --max-tokens 16 -v \
    > "$OUT/worker/caption.log" 2>&1 &
RUN=$!
while kill -0 "$RUN" 2>/dev/null; do  # show the worker holding GPU memory while it runs
    if command -v nvidia-smi >/dev/null && nvidia-smi --query-compute-apps=pid --format=csv,noheader | grep -q .; then
        ps -eo pid,ppid,comm | awk '$3 == "caprl" || /caprl engine/'
        nvidia-smi --query-compute-apps=pid,used_memory --format=csv
        break
    fi
    sleep 1
done
wait "$RUN"
WORKER_CODE=$?
cat "$OUT/worker/caption.log"
report worker "$WORKER_CODE"

section "several engines"
# Placement (caprl_cli/execute/devices.py) gives each engine its own GPU or GPUs: two engines on one
# GPU are refused (--gpus names each GPU once; --num-engines 2 needs two GPUs).
if [ "$GPUS" -ge 2 ] && [ "$CUDA_OK" = 1 ]; then
    mkdir -p "$OUT/two"
    "$PY" -m caprl_cli caption "$OUT/images" -o "$OUT/two/out.parquet" --engine transformers --gpus 0,1 \
        --model "$OUT/tiny-model" --dtype float32 --max-tokens 16 -v 2>&1 | tee "$OUT/two/caption.log"
    report two "${PIPESTATUS[0]}"
else
    echo "skipped: $GPUS GPU(s); placement allows no more than one engine per GPU"
fi

section "done"
echo "output and logs in $OUT"
[ "$CODE" = 0 ] && exit "$WORKER_CODE"
exit "$CODE"
