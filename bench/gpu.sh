#!/usr/bin/env bash
# Every GPU benchmark of issue 7 in one go (target: under 10 minutes on one H100), for whoever is
# lent a GPU. Writes its log and JSON lines to ${OUT:-bench-gpu-out}/ and prints a summary.
#
#   bash bench/gpu.sh            # needs a CUDA build of torch and `pip install -e .`
#   SMOKE=1 bash bench/gpu.sh    # every step on the CPU at toy sizes (smoke preset, 2 trials):
#                                # checks the script itself before a GPU's minutes are spent on it
#
# 1. generation: 10,000 full-preset scenes on the device (target < 1 s)
# 2. training throughput, full preset (scenes/s) and validation
# 3. a trial's time by part (data, forward, loss, backward, optimizer, validation, storage)
# 4. localizing one scene (MDL + MUSIC + refinement) against the original's grid
# 5. one full trial: `hpo train --preset full` (10k/1k scenes, 12 epochs; target <= 10 s)
# 6. `hpo run --trials 40 --preset full` with several workers on the GPU, GPU busy % sampled by
#    nvidia-smi (target: >= 80 %; 200 trials <= 20 min, extrapolated from the 40 here)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-gpu-out}
WORKERS_PER_GPU=${WORKERS_PER_GPU:-4}
TRIALS=${TRIALS:-40}
if [ "${SMOKE:-0}" = 1 ]; then
    DEVICE=cpu PRESET=smoke TRIALS=2 GEN_SCENES=256 TT_STEPS=2 TT_REPEATS=1 LOC_SCENES=8 LOC_TIMED=2
    WORKERS=(--workers 2)
else
    DEVICE=cuda PRESET=full GEN_SCENES=10000 TT_STEPS=20 TT_REPEATS=5 LOC_SCENES=500 LOC_TIMED=50
    WORKERS=(--workers-per-gpu "$WORKERS_PER_GPU")
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # absolute: step 6 runs inside it
if [ "$DEVICE" = cuda ]; then
    python -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print(torch.cuda.get_device_name(0), torch.__version__)" | tee "$OUT/device.txt"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/device.txt"
else
    python -c "import torch; print('cpu (SMOKE: toy sizes, figures mean nothing)', torch.__version__)" | tee "$OUT/device.txt"
fi

step() { echo; echo "== $1 ($(date -u +%H:%M:%S))"; }

step "1. generation"
python bench/generation.py --device "$DEVICE" --preset "$PRESET" --scenes "$GEN_SCENES" | tee "$OUT/generation.jsonl"
step "2. training throughput"
python bench/train_throughput.py --device "$DEVICE" --presets "$PRESET" quick --steps "$TT_STEPS" --repeats "$TT_REPEATS" | tee "$OUT/train_throughput.jsonl"
step "3. trial profile ($PRESET)"
python bench/trial_profile.py --device "$DEVICE" --preset "$PRESET" --threads 4 | tee "$OUT/trial_profile.txt"
step "4. localize one scene"
python bench/localize.py --device "$DEVICE" --preset "$PRESET" --scenes "$LOC_SCENES" --timed "$LOC_TIMED" | tee "$OUT/localize.jsonl"
step "5. one $PRESET trial"
start=$(date +%s.%N)
hpo train --preset "$PRESET" --device "$DEVICE" --out "$OUT/full-trial" --json > "$OUT/full-trial.json"
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
step "6. hpo run on $DEVICE ($TRIALS trials, ${WORKERS[*]})"
rm -f "$OUT/gpu-util.csv" "$OUT/study.db"
SMI=
if [ "$DEVICE" = cuda ]; then
    # Its stderr must not hold a caller's pipe open: if step 6 fails, the trap still stops it.
    nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 500 \
        > "$OUT/gpu-util.csv" 2>/dev/null &
    SMI=$!
    trap '[ -n "$SMI" ] && kill "$SMI" 2>/dev/null' EXIT
else
    : > "$OUT/gpu-util.csv"
fi
start=$(date +%s.%N)
# inside $OUT: the study's worker logs and checkpoints (runs/) land there too
(cd "$OUT" && hpo run --trials "$TRIALS" --preset "$PRESET" "${WORKERS[@]}" --device "$DEVICE" \
    --storage "sqlite:///$OUT/study.db" --study gpu-bench --quiet) | tee "$OUT/run.txt"
end=$(date +%s.%N)
if [ -n "$SMI" ]; then kill "$SMI" 2>/dev/null || true; SMI=; fi
python - "$start" "$end" "$OUT/gpu-util.csv" "$TRIALS" <<'PY' | tee "$OUT/run-summary.json"
import json, statistics, sys
start, end, path, trials = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
util = [float(x) for x in open(path) if x.strip()]
wall = end - start
print(json.dumps({"trials": trials, "wall_s": round(wall, 1),
                  "gpu_busy_mean_pct": round(statistics.mean(util), 1) if util else None,
                  "gpu_busy_median_pct": statistics.median(util) if util else None,
                  "extrapolated_200_trials_min": round(wall / trials * 200 / 60, 1),
                  "targets": {"gpu_busy_pct": 80, "200_trials_min": 20}}))
PY
echo; echo "all results in $OUT/"
