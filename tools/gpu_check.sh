#!/usr/bin/env bash
# The GPU check: the first thing to run on a lent GPU machine (about 9 minutes).
#
#   bash tools/gpu_wheels.sh                      # here, once: the wheels that machine lacks, into .whl/
#   device run, carry [".whl"]: bash tools/gpu_check.sh
#
# It runs the GPU-marked tests, then the rows of BENCHMARKS.md's GPU table on full-size
# VideoCrafter2 at 320x512 with random weights (speed does not depend on weight values), and
# writes into $OUT (else runs/gpu-check/): gpu.txt, tests.txt, bench.jsonl (one JSON object per
# run, tagged with its row) and BENCHMARKS.md with the GPU table filled in. Rows run in order of
# importance and are skipped once the time budget (GPU_CHECK_SECONDS, default 510) is spent.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
out=${OUT:-runs/gpu-check}
budget=${GPU_CHECK_SECONDS:-510}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 FIFO_STREAM_CONFIG=videocrafter2
if [ -d .whl ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"

timeout 150 $PY -m pytest -q -p no:cacheprovider -m gpu tests/models/test_fastpath.py 2>&1 | tail -20 | tee "$out/tests.txt"

PEAK=${PEAK_TFLOPS:-989}  # dense bf16/fp16 TFLOP/s of an H100/H200 SXM
FAST=(runtime.dtype=bf16 runtime.compile=true runtime.cuda_graphs=true)

row() {  # row NAME LIMIT_SECONDS BENCH_ARGS...: one bench.py process, its JSON lines tagged with NAME
    local name=$1 limit=$2
    shift 2
    local left=$((budget - SECONDS))
    if [ "$left" -lt 60 ]; then
        echo "{\"row\": \"$name\", \"skipped\": \"time budget spent\"}" >> "$out/bench.jsonl"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (at most ${limit}s)"
    timeout "$limit" $PY tools/bench.py --config videocrafter2 --peak-tflops "$PEAK" "$@" model.weights=random 2>>"$out/bench.err" \
        | sed -u "s/^{/{\"row\": \"$name\", /" | tee -a "$out/bench.jsonl"
    [ "${PIPESTATUS[0]}" -eq 0 ] || echo "{\"row\": \"$name\", \"failed\": \"exit ${PIPESTATUS[0]}, see bench.err\"}" >> "$out/bench.jsonl"
}

# A = the reference's pattern (sequential, fp32, eager), B = batched bf16 eager: B's speedup over the reference.
row "reference vs batched bf16" 200 --frames 3 --warmup 1 --pairs 1 --baseline runtime.dtype=bf16
row "fast path (bf16, compile, CUDA graphs)" 200 --frames 12 --warmup 3 "${FAST[@]}"
row "batched fp16, eager" 90 --frames 6 --warmup 1 runtime.dtype=fp16
row "fast path, lookahead off" 200 --frames 12 --warmup 3 "${FAST[@]}" sampling.lookahead=false
row "fast path + channels_last" 200 --frames 12 --warmup 3 "${FAST[@]}" runtime.channels_last=true

$PY tools/gpu_table.py "$out/bench.jsonl" BENCHMARKS.md "$out/BENCHMARKS.md"
echo "gpu check done in ${SECONDS}s: $out"
