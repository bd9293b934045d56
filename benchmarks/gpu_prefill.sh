#!/usr/bin/env bash
# The CUDA tests and the GPU prefill targets in one run (8-9 minutes on an H100, most of it compiling the language
# model for the compile mode; a stage that runs past its limit keeps what it printed):
#   0. tests:      python -m pytest -q tests/test_cuda.py (about a minute).
#   1. llava:      LLaVA-1.5-7B shape (hidden 4096, 32 layers, 11008 FFN), random bf16 weights, ProxyV from layer 12,
#                  one 576-token image, batch 1 and 8; eager, CUDA-graph and torch.compile(mode="reduce-overhead")
#                  modes; whole-model prefill and decode per token (eager).
#   2. llava-next: the same language model, LLaVA-NeXT with one 5-crop image (2,928 image tokens), batch 1, the same
#                  modes.
# Every side is timed against the same weights with ProxyV off (transformers' SDPA model) in the same mode.
# Usage: bash benchmarks/gpu_prefill.sh [OUTPUT_DIR]   (logs and JSON reports go there; default: ./gpu-prefill)
# Each stage has its own time limit and a failing stage does not stop the next; the exit status says if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-prefill}"
mkdir -p "$out"
python="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
failed=()

stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s)"
    local began=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - began)) s"
    [[ $rc -eq 0 ]] || failed+=("$name")
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee "$out/device.log"
"$python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    2>&1 | tee -a "$out/device.log"

stage tests 120 "$python" -m pytest -q tests/test_cuda.py

shape=(--device cuda --dtype bfloat16 --hidden 4096 --intermediate 11008 --layers 32 --heads 32
       --vision-hidden 1024 --vision-layers 2 --start-layers 12 --repeats 20 --warmup 5 --decode-tokens 32)
stage llava 270 "$python" benchmarks/prefill_speed.py "${shape[@]}" --cases 1x1 8x1 --modes eager cuda-graph compile \
    --json "$out/llava.json"
stage llava-next 160 "$python" benchmarks/prefill_speed.py "${shape[@]}" --arch llava_next --cases 1x1 \
    --modes eager cuda-graph compile --json "$out/llava-next.json"

echo "== summary (ProxyV / off; speedup = 1 / time ratio)"
grep -h "^  L" "$out"/llava.log "$out"/llava-next.log 2>/dev/null
if ((${#failed[@]})); then
    echo "failed stages: ${failed[*]}"
    exit 1
fi
