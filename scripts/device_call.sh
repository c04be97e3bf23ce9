#!/usr/bin/env bash
# One device call for both GPU issues, because a session's device time (15 minutes, each machine start
# counted) holds one start and one command of at most 10 minutes, not two: the engine's GPU check
# (bench/gpu_run.sh: GPU tests, our benchmark, the stock-transformers peer) and then a chunk of demo-model
# training (python -m photon_core.train.gpu) in the time left, packed into what comes back from the device
# machine (at most 8 files of 16 MiB, named in letters, digits, '.', '_' and '-').
#
#   bash scripts/device_call.sh prepare        # here, first: .gpu/parity (from ../shared), .gpu/bodies.safetensors.xz,
#                                              # RESUME=DIR also .gpu/resume (a model folder an earlier call wrote);
#                                              # checks what travels is under 64 MiB; prints the run to make
#   bash scripts/device_call.sh run [PARTS]    # there (kind nvidia-h200), carry [".gpu"]; OUT set; PARTS engine,train
#   bash scripts/device_call.sh unpack DIR     # here: DIR the folder the files came back to; unpacks into
#                                              # runs/device/DATE_GPU/ and files the results under bench/results/
#                                              # and research/gpu_runs/; prints the evaluation to run on the CPU
#
# run's limits (seconds): CALL_LIMIT_S (default 570) for the whole command; ENGINE_LIMIT_S (280) of it for the
# engine check; the training gets the rest, less PACK_S (15) for packing, and starts only if that is at least
# TRAIN_MIN_S (45; its set-up and checks take ≈ 20 s of it on the H200). TRAIN_ARGS (default
# "--stages vision:0.7,llm:0.3", the model card's plan after call 1) go to the trainer; a .gpu/resume folder is
# continued (--resume-from). What comes back: call.log (progress, the trainer's output), engine.tar.gz (the
# engine check's 7 files), demo.tar.gz (the model folder but its weights, and metrics.json), and each weight
# file of the model over SEPARATE_BYTES (1 MiB) on its own (demo_<name>.safetensors). Whatever part fails or
# runs out of time, the rest still runs and is packed; the script exits 0. SMOKE=1: the same on the CPU at
# tiny sizes (tests/test_bench.py runs prepare, run and unpack so).
set -u
cmd=${1:-}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-$(command -v python || command -v python3)}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
GPU_DIR=${GPU_DIR:-.gpu}
BODIES=${BODIES:-$GPU_DIR/bodies.safetensors.xz}
RESULTS=${RESULTS:-bench/results}         # unpack: where the engine's results are filed,
GPU_RUNS=${GPU_RUNS:-research/gpu_runs}   # the trainer's metrics,
DEVICE_RUNS=${DEVICE_RUNS:-runs/device}   # and everything unpacked (git-ignored)

place() {   # place SRC DEST: copy, never over an earlier file (DEST-2, DEST-3, ... instead); prints where
    local dest=$2 base ext n=2
    base=${2%.*}; ext=${2##*.}
    while [ -e "$dest" ]; do dest="$base-$n.$ext"; n=$((n + 1)); done
    cp "$1" "$dest" && echo "$dest"
}

prepare() {
    PY=${PYTHON:-$ROOT/.venv/bin/python}
    mkdir -p "$GPU_DIR"
    local shared=${SHARED_PARITY:-$ROOT/../shared/parity}
    if [ -f "$shared/fixture.safetensors" ]; then
        rm -rf "$GPU_DIR/parity" && cp -r "$shared" "$GPU_DIR/parity" && chmod -R u+w "$GPU_DIR/parity"
    else
        echo "no parity fixtures at $shared: the parity-based GPU tests will skip there" >&2
    fi
    if [ ! -f "$BODIES" ]; then
        local coarse=()          # SMOKE=1: the smoke runs' coarse grid (a twelfth of the bytes, a third of the time)
        [ "${SMOKE:-0}" = "1" ] && coarse=(--downsample 2.5)
        "$PY" -m photon_core.train.synthetic.bodies --out "$BODIES" "${coarse[@]}" \
            || { echo "bodies: failed" >&2; exit 1; }
    fi
    rm -rf "$GPU_DIR/resume"
    if [ -n "${RESUME:-}" ]; then
        [ -f "$RESUME/train_state.json" ] || { echo "RESUME=$RESUME holds no train_state.json" >&2; exit 1; }
        cp -r "$RESUME" "$GPU_DIR/resume"
    fi
    local tracked untracked carried total
    tracked=$(git ls-files -z | xargs -0 cat 2>/dev/null | wc -c)
    untracked=$(git ls-files -z --others --exclude-standard | xargs -0 -r cat 2>/dev/null | wc -c)
    carried=$(find "$GPU_DIR" -type f -print0 | xargs -0 cat | wc -c)
    total=$((tracked + untracked + carried))
    echo "travels: tracked $((tracked / 1048576)) MiB, untracked $((untracked / 1048576)) MiB," \
         "$GPU_DIR $((carried / 1048576)) MiB: $((total / 1048576)) MiB of 64"
    if [ "$total" -gt $((64 * 1048576)) ]; then echo "over the 64 MiB a call carries" >&2; exit 1; fi
    echo "run: command \"bash scripts/device_call.sh run\", carry [\"$GPU_DIR\"]," \
         "timeout_s $(( ${CALL_LIMIT_S:-570} + 30 )), kind \"nvidia-h200\" (the issues' targets are the H200's)"
}

run() {
    : "${OUT:?set OUT to the folder whose files come back}"
    local parts=${1:-engine,train} limit=${CALL_LIMIT_S:-570} engine_limit=${ENGINE_LIMIT_S:-280}
    local pack_s=${PACK_S:-15} smoke="" start work log left minutes
    [ "${SMOKE:-0}" = "1" ] && smoke="--smoke"
    start=$(date +%s)
    mkdir -p "$OUT"
    work=$(mktemp -d)
    log="$OUT/call.log"
    {
        echo "device call, $(date -u), parts $parts, limit ${limit}s, python $PY"
        echo "gpu: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
    } >>"$log"
    pack() {    # what the parts left, into at most 8 files (runs again on a signal: packs what is there)
        if [ -d "$work/engine" ] && [ ! -f "$OUT/engine.tar.gz" ]; then
            tar -czf "$OUT/engine.tar.gz" -C "$work" engine 2>>"$log"
        fi
        if [ -d "$work/demo" ] && [ ! -f "$OUT/demo.tar.gz" ]; then
            local f
            for f in "$work"/demo/model/*.safetensors; do
                [ -f "$f" ] || continue
                [ "$(wc -c <"$f")" -gt "${SEPARATE_BYTES:-1048576}" ] && mv "$f" "$OUT/demo_$(basename "$f")"
            done
            find "$work/demo" -name '*.partial' -delete
            tar -czf "$OUT/demo.tar.gz" -C "$work" demo 2>>"$log"
        fi
        echo "== packed after $(( $(date +%s) - start ))s: $(cd "$OUT" && ls | tr '\n' ' ')" >>"$log"
    }
    trap 'pack; exit 0' TERM INT
    if [[ ",$parts," == *",engine,"* ]]; then
        echo "== engine: start (limit ${engine_limit}s) $(date -u +%H:%M:%S)" >>"$log"
        local parity=${PHOTON_PARITY:-$GPU_DIR/parity}
        [ -f "$parity/fixture.safetensors" ] || parity=""
        OUT="$work/engine" GPU_RUN_LIMIT_S=$engine_limit PYTHON="$PY" PHOTON_PARITY="$parity" \
            SMOKE=${SMOKE:-0} bash bench/gpu_run.sh >>"$log" 2>&1
        echo "== engine: done after $(( $(date +%s) - start ))s in all" >>"$log"
    fi
    if [[ ",$parts," == *",train,"* ]]; then
        left=$((limit - ($(date +%s) - start) - pack_s))
        if [ "$left" -lt "${TRAIN_MIN_S:-45}" ]; then
            echo "== train: skipped, ${left}s left" >>"$log"
        else
            local resume=()
            [ -f "$GPU_DIR/resume/train_state.json" ] && resume=(--resume-from "$GPU_DIR/resume")
            minutes=$(awk "BEGIN { printf \"%.2f\", ($left - 20) / 60 }")   # (its checks end inside)
            # shellcheck disable=SC2086
            set -- ${TRAIN_ARGS:---stages vision:0.7,llm:0.3}
            echo "== train: start ($minutes min; $*) $(date -u +%H:%M:%S)" >>"$log"
            PYTHONUNBUFFERED=1 timeout -k 5 "$left" "$PY" -m photon_core.train.gpu $smoke --out "$work/demo" \
                --minutes "$minutes" --bodies "$BODIES" "${resume[@]}" "$@" >>"$log" 2>&1
            echo "== train: exit $? after $(( $(date +%s) - start ))s in all" >>"$log"
        fi
    fi
    pack
    rm -rf "$work"
    exit 0
}

summary() {   # summary engine|demo FILE: the figures to read first
    "$PY" - "$@" <<'PY'
import json, sys
kind, path = sys.argv[1:3]
d = json.load(open(path))
if kind == "engine":
    print("engine targets:", json.dumps(d.get("targets", {}), ensure_ascii=False))
    bad = {k: v.get("status") for k, v in d.get("parts", {}).items() if not str(v.get("status")).startswith("ok")}
    print("engine parts not ok:", json.dumps(bad, ensure_ascii=False)[:2000])
else:
    keep = ("generator", "vision_probe", "val", "null_answers", "error")
    print("training:", json.dumps({k: d[k] for k in keep if k in d}, default=str)[:3000])
PY
}

unpack() {
    local src=${1:?unpack DIR: the folder the files of the device call came back to}
    PY=${PYTHON:-$ROOT/.venv/bin/python}
    [ -f "$src/call.log" ] || { echo "$src holds no call.log: not a device call's files" >&2; exit 1; }
    local gpu stamp dest
    gpu=$(sed -n 's/^gpu: //p' "$src/call.log" | head -1 | sed 's/NVIDIA //; s/[^A-Za-z0-9]\+/-/g; s/^-//; s/-$//' \
          | tr A-Z a-z)
    gpu=${gpu:-nogpu}
    stamp=$(date -u +%F)_$gpu
    dest=$DEVICE_RUNS/$stamp
    [ -e "$dest" ] && dest=$dest-$(date -u +%H%M%S)
    mkdir -p "$dest"
    cp "$src/call.log" "$dest/"
    if [ -f "$src/engine.tar.gz" ]; then
        tar -xzf "$src/engine.tar.gz" -C "$dest"
        local f
        [ -f "$dest/engine/gpu_bench.json" ] && summary engine "$dest/engine/gpu_bench.json"
        echo "engine: $dest/engine; filed:"
        for f in gpu_bench.json:.json tests.log:_tests.log profile.txt:_profile.txt; do
            [ -f "$dest/engine/${f%%:*}" ] && place "$dest/engine/${f%%:*}" \
                "$RESULTS/gpu_${stamp#*_}_${stamp%%_*}${f#*:}"
        done
    fi
    if [ -f "$src/demo.tar.gz" ]; then
        tar -xzf "$src/demo.tar.gz" -C "$dest"
        for w in "$src"/demo_*.safetensors; do
            [ -f "$w" ] && cp "$w" "$dest/demo/model/$(basename "$w" | sed 's/^demo_//')"
        done
        if [ -f "$dest/demo/metrics.json" ]; then
            summary demo "$dest/demo/metrics.json"
            local call
            call=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1])).get('call', 0))" \
                   "$dest/demo/metrics.json")
            echo "training: $dest/demo/model; metrics filed:"
            place "$dest/demo/metrics.json" "$GPU_RUNS/${stamp%%_*}_call${call}_metrics.json"
            echo "evaluate: .venv/bin/photon-eval --model $dest/demo/model --demo-split test --scans 20" \
                 "--no-baselines --out $dest/eval"
        fi
    fi
}

case "$cmd" in
    prepare) prepare ;;
    run) shift; run "$@" ;;
    unpack) shift; unpack "$@" ;;
    *) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 2 ;;
esac
