#!/usr/bin/env bash
# The CUDA tests and the GPU prefill targets in one run (about 4 minutes on an H100; each stage has a time limit and
# a stage that runs past it keeps what it printed):
#   tests:       python -m pytest -q tests/test_cuda.py in one process (about a minute and a half).
#   llava:       LLaVA-1.5-7B shape (hidden 4096, 32 layers, 11008 FFN), random bf16 weights, ProxyV from layer 12,
#                one 576-token image, batch 1 and 8; eager and CUDA-graph modes; whole-model prefill and decode per
#                token (eager).
#   llava-next:  the same language model, LLaVA-NeXT with one 5-crop image (2,928 image tokens), batch 1.
# Every side is timed against the same weights with ProxyV off (transformers' SDPA model) in the same mode.
# Options (before the output folder):
#   --compile    also torch.compile(mode="reduce-overhead") for the three cases (compiling the 32-layer model takes
#                1.5-3 minutes per case and side; about 6 more minutes).
#   --diagnose   also benchmarks/prefill_trace.py (where each timed run's time goes: host work before the device
#                starts, device busy, device idle; Chrome traces in OUTPUT_DIR/traces), benchmarks/layer_profile.py
#                --whole (each layer alone and inside whole prefills) for the three cases, and
#                benchmarks/forward_variants.py (other forms of the ProxyV forward and the prefill without its plan's
#                host work, CUDA graphs, batch 1 and 8) (about 4 more minutes).
# SMOKE=1 runs every stage on the CPU with a tiny model (a check of the script itself, a few seconds a stage).
# Usage: bash benchmarks/gpu_prefill.sh [--compile] [--diagnose] [OUTPUT_DIR]   (default folder: ./gpu-prefill)
# A failing stage does not stop the next; the exit status says if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
compile=0 diagnose=0
while [[ $# -gt 0 && $1 == --* ]]; do
    case $1 in
        --compile) compile=1 ;;
        --diagnose) diagnose=1 ;;
        *) echo "unknown option $1 (options: --compile, --diagnose)" >&2; exit 2 ;;
    esac
    shift
done
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

if [[ ${SMOKE:-0} == 1 ]]; then
    model=(--device cpu --dtype float32 --hidden 64 --intermediate 128 --layers 4 --heads 4 --vision-hidden 32
           --vision-layers 1)
    start=2 modes=(eager) timing=(--repeats 2 --warmup 1 --decode-tokens 2) profiling=(--runs 1 --repeats 2)
    variants=(--repeats 2 --warmup 1)
else
    model=(--device cuda --dtype bfloat16 --hidden 4096 --intermediate 11008 --layers 32 --heads 32
           --vision-hidden 1024 --vision-layers 2)
    start=12 modes=(eager cuda-graph) timing=(--repeats 20 --warmup 5 --decode-tokens 32) profiling=(--runs 3)
    variants=(--repeats 15 --warmup 3)
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 \
        | tee "$out/device.log"
fi
"$python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    2>&1 | tee -a "$out/device.log"

stage tests 150 "$python" -m pytest -q -o addopts=-ra tests/test_cuda.py  # one process, with or without xdist

speed=("$python" benchmarks/prefill_speed.py "${model[@]}" --start-layers "$start" "${timing[@]}")
stage llava 150 "${speed[@]}" --cases 1x1 8x1 --modes "${modes[@]}" --json "$out/llava.json"
stage llava-next 100 "${speed[@]}" --arch llava_next --cases 1x1 --modes "${modes[@]}" --json "$out/llava-next.json"
summaries=("$out/llava.log" "$out/llava-next.log")

if ((diagnose)); then  # the LLaVA-1.5 stages first: its 576-token cases are the ones to explain
    stage variants-llava 90 "$python" benchmarks/forward_variants.py "${model[@]}" --start-layer "$start" \
        --cases 1x1 8x1 "${variants[@]}"
    trace=("$python" benchmarks/prefill_trace.py "${model[@]}" --start-layer "$start" --runs 3)
    layers=("$python" benchmarks/layer_profile.py "${model[@]}" --start-layer "$start" --whole --rows 45
            "${profiling[@]}")
    stage trace-llava 100 "${trace[@]}" --cases 1x1 8x1 --traces "$out/traces"
    stage layers-llava 120 "${layers[@]}" --cases 1x1 8x1
    stage trace-llava-next 60 "${trace[@]}" --arch llava_next --cases 1x1 --traces "$out/traces"
    stage layers-llava-next 60 "${layers[@]}" --arch llava_next --cases 1x1
fi

if ((compile)); then
    stage llava-compile 330 "${speed[@]}" --cases 1x1 8x1 --modes compile --no-whole-model \
        --json "$out/llava-compile.json"
    stage llava-next-compile 200 "${speed[@]}" --arch llava_next --cases 1x1 --modes compile --no-whole-model \
        --json "$out/llava-next-compile.json"
    summaries+=("$out/llava-compile.log" "$out/llava-next-compile.log")
fi

echo "== summary (ProxyV / off; speedup = 1 / time ratio)"
grep -h "^  L" "${summaries[@]}" 2>/dev/null
if ((${#failed[@]})); then
    echo "failed stages: ${failed[*]}"
    exit 1
fi
