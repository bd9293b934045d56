#!/usr/bin/env bash
# The GPU prefill targets in one run: LLaVA-1.5-7B-shaped random bf16 model, start layer 12, language-model prefill
# of ProxyV against the same weights with ProxyV off (transformers' SDPA path), in eager mode and under
# torch.compile(mode="reduce-overhead") (CUDA graphs) for both sides.
#   batch 1 and batch 8 with one 576-token image; LLaVA-NeXT batch 1 with one 5-crop image (2,928 image tokens).
# Usage: bash benchmarks/gpu_prefill.sh [OUTPUT_DIR]    (writes the JSON reports there; default: current folder)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
mkdir -p "$out"
shape=(--device cuda --dtype bfloat16 --hidden 4096 --intermediate 11008 --layers 32 --heads 32
       --vision-hidden 1024 --vision-layers 2 --start-layers 12 --no-whole-model --repeats 10 --warmup 3)
for mode in eager compile; do
    flag=()
    [[ "$mode" == compile ]] && flag=(--compile)
    python benchmarks/prefill_speed.py "${shape[@]}" --cases 1x1 8x1 "${flag[@]}" --json "$out/llava-$mode.json"
    python benchmarks/prefill_speed.py "${shape[@]}" --arch llava_next --cases 1x1 "${flag[@]}" \
        --json "$out/llava-next-$mode.json"
done
