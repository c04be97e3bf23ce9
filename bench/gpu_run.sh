#!/usr/bin/env bash
# The engine's whole GPU check in one command, from the repository root on the GPU machine:
#
#     bash bench/gpu_run.sh                 # OUT (the folder whose files come back) must be set
#
# (PYTHON=... picks the interpreter; default: python on the PATH.)
# Runs, each in its own process under its own limit, within GPU_RUN_LIMIT_S (default 280 s; ≤ 300 s in all):
#   1. tests/test_gpu.py (bf16 vs fp32, graph vs eager decode and prefill spans, varlen, fused, device reads), 75 s
#                                                                                       -> tests.log, tests.xml
#   2. bench/gpu_bench.py --section ours (rows A-D, decode modes, fused vs separate, service, profiles), 150 s
#                                                                                       -> bench_ours.json,
#                                                                                          profile.txt
#   3. bench/gpu_bench.py --section peer (stock transformers eager, static + compile, step profile), 55 s
#                                                                                       -> bench_peer.json
#   4. merge                                                                             -> gpu_bench.json
# Every section writes its results as they come; one that fails or runs out of time leaves what it had and
# the next one still runs; the script itself exits 0. Progress and errors: run.log. Seven files in $OUT.
# SMOKE=1 runs the same sections on the CPU with tiny shapes (tests/test_bench.py does), limits × 5.
# The GPU tests need the reference-parity fixtures: PHOTON_PARITY=<folder>, else shared/parity in the working
# tree, else ../shared/parity; without them they skip (run.log says which folder was used).
set -u
: "${OUT:?set OUT to the folder for the results}"
mkdir -p "$OUT"
PY=${PYTHON:-$(command -v python || command -v python3)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LIMIT=${GPU_RUN_LIMIT_S:-280}
SCALE=1
SMOKE_ARG=""
if [ "${SMOKE:-0}" = "1" ]; then SCALE=5; SMOKE_ARG="--smoke"; LIMIT=$((LIMIT * SCALE)); fi
START=$(date +%s)
LOG="$OUT/run.log"
if [ -z "${PHOTON_PARITY:-}" ] && [ -f "$PWD/shared/parity/fixture.safetensors" ]; then
    export PHOTON_PARITY="$PWD/shared/parity"
fi

left() { echo $((LIMIT - ($(date +%s) - START))); }

section() {   # section NAME LIMIT_S COMMAND...: run under min(LIMIT_S, time left), log, never fail
    local name=$1 want=$(($2 * SCALE)) l t rc
    shift 2
    l=$(left)
    t=$((l < want ? l : want))
    if [ "$t" -lt 15 ]; then echo "== $name: skipped, ${l}s left" >>"$LOG"; return 0; fi
    echo "== $name: start (limit ${t}s) $(date -u +%H:%M:%S)" >>"$LOG"
    SECTION_BUDGET_S=$((t - 12)) timeout -k 5 "$t" "$@" >>"$LOG" 2>&1
    rc=$?
    echo "== $name: exit $rc after $(( $(date +%s) - START ))s in all" >>"$LOG"
    return 0
}

{
    echo "photon engine GPU run, $(date -u), limit ${LIMIT}s, python $PY"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
    parity=${PHOTON_PARITY:-$PWD/../shared/parity}
    if [ -f "$parity/fixture.safetensors" ]; then echo "parity fixtures: $parity"
    else echo "parity fixtures: NOT FOUND at $parity (the parity-based GPU tests will skip)"; fi
    "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'gpu', torch.cuda.is_available())" 2>&1 || true
} >>"$LOG"

section "gpu tests" 75 bash -c "\"$PY\" -m pytest tests/test_gpu.py -q -rA -s -p no:cacheprovider \
    --junitxml=\"$OUT/tests.xml\" >\"$OUT/tests.log\" 2>&1"
section "ours" 150 bash -c "\"$PY\" bench/gpu_bench.py $SMOKE_ARG --section ours --budget-s \$SECTION_BUDGET_S \
    --json \"$OUT/bench_ours.json\" --profile \"$OUT/profile.txt\""
section "peer" 55 bash -c "\"$PY\" bench/gpu_bench.py $SMOKE_ARG --section peer --budget-s \$SECTION_BUDGET_S \
    --json \"$OUT/bench_peer.json\""
timeout 60 "$PY" bench/gpu_bench.py --merge "$OUT/bench_ours.json" "$OUT/bench_peer.json" \
    --json "$OUT/gpu_bench.json" >>"$LOG" 2>&1 || echo "== merge failed" >>"$LOG"
rm -f "$OUT"/*.tmp
echo "== done after $(( $(date +%s) - START ))s" >>"$LOG"
exit 0
