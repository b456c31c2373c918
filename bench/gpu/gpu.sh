#!/usr/bin/env bash
# Every GPU benchmark of issue 7 in one go (target: under 10 minutes on one H100), for whoever is
# lent a GPU. Writes its log and JSON lines to ${OUT:-bench-gpu-out}/ and prints a summary.
#
#   bash bench/gpu/gpu.sh            # needs a CUDA build of torch and `pip install -e .`
#   SMOKE=1 bash bench/gpu/gpu.sh    # every step on the CPU at toy sizes (smoke preset, 2
#                                    # trials): checks the script before a GPU's minutes go to it
#   STEPS="4 6" bash bench/gpu/gpu.sh   # only those steps (a rerun of the ones that failed)
#
# Steps 1-4 and 7 are benchmarks of the suite (`python -m bench NAME`, run from the repository
# root); their JSON lines, a header line first, go to $OUT/*.jsonl.
#
# 1. generation: 10,000 full-preset scenes on the device (target < 1 s)
# 2. training throughput, full preset (scenes/s) and validation
# 3. a trial's time by part (data, forward, loss, backward, optimizer, validation, storage)
# 4. localizing one scene (MDL + MUSIC + refinement) against the original's grid
# 5. one full trial: `hpo train --preset full` (10k/1k scenes, 12 epochs; target <= 10 s)
# 6. `hpo run --trials 200 --preset full` with several workers on the GPU, GPU busy % sampled by
#    nvidia-smi (target: >= 80 %; 200 trials <= 20 min). It gets what is left of BUDGET_S
#    (default 540 s for the whole script) as `hpo run --timeout`, less a minute for the trials
#    running then to finish (and 90 s for step 7); the summary extrapolates 200 trials from the
#    ones finished.
# 7. torch.compile of the trunk against eager, full preset (training scenes/s, compile time)
#
# A step that fails is reported and the next one runs all the same: one lease's minutes are not
# lost to one broken step. The exit status is 1 when any step failed; the last line names them.
# SIGINT or SIGTERM (`timeout -s INT`, as bench/gpu/gpu_device.sh sends it) stops after the
# running step, which gets the signal too: `hpo run` then records its trials before it exits.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-bench-gpu-out}
WORKERS_PER_GPU=${WORKERS_PER_GPU:-4}
TRIALS=${TRIALS:-200}
BUDGET_S=${BUDGET_S:-540}
STEPS=${STEPS:-1 2 3 4 5 6 7}
for n in $STEPS; do
    case $n in
        [1-7]) ;;
        *) echo "error: STEPS must hold step numbers 1-7 separated by spaces, but got '$STEPS'" >&2
           exit 2 ;;
    esac
done
if [ "${SMOKE:-0}" = 1 ]; then
    DEVICE=cpu PRESET=smoke TRIALS=2 GEN_SCENES=256 TT_STEPS=2 TT_REPEATS=1 LOC_SCENES=8 LOC_TIMED=2
    WORKERS=(--workers 2)
else
    DEVICE=cuda PRESET=full GEN_SCENES=10000 TT_STEPS=20 TT_REPEATS=5 LOC_SCENES=500 LOC_TIMED=50
    WORKERS=(--workers-per-gpu "$WORKERS_PER_GPU")
fi
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)  # absolute: step 6 runs inside it
if [ "$DEVICE" = cuda ]; then
    python -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print(torch.cuda.get_device_name(0), torch.__version__)" | tee "$OUT/device.txt" || exit 1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/device.txt"
else
    python -c "import torch; print('cpu (SMOKE: toy sizes, figures mean nothing)', torch.__version__)" | tee "$OUT/device.txt"
fi

FAILED=()
SMI=  # step 6's nvidia-smi sampler
STOPPING=
trap 'STOPPING=1' INT TERM
wanted() { [[ " $STEPS " == *" $1 "* ]]; }
step() { echo; echo "== $1 ($(date -u +%H:%M:%S))"; }
# run N COMMAND...: step N's command; its failure is recorded and the script goes on. Once a
# signal has come, whenever it came, the step it came in counts as stopped and no step starts.
run() {
    local n=$1; shift
    if [ -n "$STOPPING" ]; then
        echo "!! stopped by a signal before step $n"
        FAILED+=("$n")
        return
    fi
    "$@"
    local code=$?
    # bash runs the trap only when it sees a child die of the signal; `hpo run` takes SIGINT,
    # records its trials and exits 130 (143 for SIGTERM), which bash takes for a handled signal.
    case $code in 130|143) STOPPING=1 ;; esac
    if [ -n "$STOPPING" ]; then
        echo "!! step $n stopped by a signal (exit $code)"
        FAILED+=("$n")
    elif [ "$code" != 0 ]; then
        echo "!! step $n failed (exit $code)"
        FAILED+=("$n")
    fi
}

step1() {
    step "1. generation"
    python -m bench generation --device "$DEVICE" --preset "$PRESET" --scenes "$GEN_SCENES" \
        | tee "$OUT/generation.jsonl"
}
step2() {
    step "2. training throughput"
    python -m bench train_throughput --device "$DEVICE" --presets "$PRESET" quick \
        --steps "$TT_STEPS" --repeats "$TT_REPEATS" | tee "$OUT/train_throughput.jsonl"
}
step3() {
    step "3. trial profile ($PRESET)"
    # its JSON lines on stdout, its table on stderr: both in the file
    python -m bench trial_profile --device "$DEVICE" --preset "$PRESET" --threads 4 2>&1 \
        | tee "$OUT/trial_profile.txt"
}
step4() {
    step "4. localize one scene"
    python -m bench localize --device "$DEVICE" --preset "$PRESET" --scenes "$LOC_SCENES" \
        --timed "$LOC_TIMED" | tee "$OUT/localize.jsonl"
}
step5() {
    local start end
    step "5. one $PRESET trial"
    start=$(date +%s.%N)
    hpo train --preset "$PRESET" --device "$DEVICE" --out "$OUT/full-trial" --json \
        > "$OUT/full-trial.json" || return
    end=$(date +%s.%N)
    python - "$start" "$end" "$OUT/full-trial.json" <<'PY' | tee "$OUT/full-trial-summary.json"
import json, sys
start, end, path = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
summary = json.loads(open(path).read())
epochs = summary["history"]  # per epoch: training + validation with MUSIC, in seconds
print(json.dumps({"command_wall_s_incl_startup_and_references": round(end - start, 2),
                  "epochs": len(epochs),
                  "trial_s": round(sum(e["seconds"] for e in epochs), 2),
                  "target_s": 10}))
PY
}
step6() {
    local limit start end code
    step "6. hpo run on $DEVICE (up to $TRIALS trials, ${WORKERS[*]})"
    # What is left of the budget, less a minute for the trials running at the limit to end and
    # 90 s for step 7.
    limit=$(( BUDGET_S - SECONDS - 60 ))
    if wanted 7; then limit=$(( limit - 90 )); fi
    if [ "$limit" -lt 30 ]; then limit=30; fi
    echo "hpo run gets --timeout $limit (BUDGET_S=$BUDGET_S, $SECONDS s used)"
    rm -f "$OUT/gpu-util.csv" "$OUT/study.db"
    if [ "$DEVICE" = cuda ]; then
        # Its stderr must not hold a caller's pipe open: if the step fails, the trap stops it.
        nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 500 \
            > "$OUT/gpu-util.csv" 2>/dev/null &
        SMI=$!
        trap '[ -n "$SMI" ] && kill "$SMI" 2>/dev/null' EXIT
    else
        : > "$OUT/gpu-util.csv"
    fi
    [ -z "$STOPPING" ] || return 130  # a signal came while the step was setting up
    start=$(date +%s.%N)
    # inside $OUT: the study's worker logs and checkpoints (runs/) land there too; `tee -i`
    # outlives a SIGINT to the group, so hpo run can still say what it recorded
    (cd "$OUT" && hpo run --trials "$TRIALS" --preset "$PRESET" "${WORKERS[@]}" \
        --device "$DEVICE" --timeout "$limit" --storage "sqlite:///$OUT/study.db" \
        --study gpu-bench --quiet) 2>&1 | tee -i "$OUT/run.txt"
    code=$?
    end=$(date +%s.%N)
    if [ -n "$SMI" ]; then kill "$SMI" 2>/dev/null; SMI=; fi
    [ "$code" = 0 ] || return "$code"
    python - "$start" "$end" "$OUT/gpu-util.csv" "$TRIALS" "$OUT/study.db" <<'PY' \
        | tee "$OUT/run-summary.json"
import json, statistics, sys

import optuna

from hpo import count_trials

start, end, path, budget, db = (float(sys.argv[1]), float(sys.argv[2]), sys.argv[3],
                                int(sys.argv[4]), sys.argv[5])
optuna.logging.set_verbosity(optuna.logging.WARNING)
trials = optuna.load_study(study_name="gpu-bench", storage=f"sqlite:///{db}").get_trials()
counts = count_trials(trials)  # as hpo counts: re-queued and voided attempts left out
util = [float(x) for x in open(path) if x.strip()]
wall = end - start
print(json.dumps({
    "budget": budget, "finished": counts.finished, "complete": counts.complete,
    "pruned": counts.pruned, "failed": counts.failed,
    "epochs_trained": sum(len(t.intermediate_values) for t in trials),
    "wall_s": round(wall, 1),
    "gpu_busy_mean_pct": round(statistics.mean(util), 1) if util else None,
    "gpu_busy_median_pct": statistics.median(util) if util else None,
    "200_trials_min": round(wall / max(counts.finished, 1) * 200 / 60, 1),
    "200_trials_extrapolated": counts.finished != 200,
    "targets": {"gpu_busy_pct": 80, "200_trials_min": 20}}))
PY
}

step7() {
    step "7. torch.compile of the trunk ($PRESET)"
    python -m bench train_throughput --device "$DEVICE" --presets "$PRESET" \
        --compile none default --steps "$TT_STEPS" --repeats 3 | tee "$OUT/compile.jsonl"
}

for n in 1 2 3 4 5 6 7; do
    if wanted "$n"; then run "$n" "step$n"; fi
done
echo; echo "all results in $OUT/ ($SECONDS s)"
if [ "${#FAILED[@]}" != 0 ]; then
    echo "failed steps: ${FAILED[*]} (rerun them alone with STEPS=\"${FAILED[*]}\")"
    exit 1
fi
