#!/usr/bin/env bash
# On a lent GPU machine (the device tool's `run`, in this repository's root): install the wheels
# fetched by bench/gpu/gpu_wheels.sh and this package into /tmp/site, run bench/gpu/gpu.sh, and
# leave its results under $OUT as the device tool can return them (few files, shallow):
# gpu-tests.log (tests/pipeline_tests/test_cuda.py), gpu.log and gpu-out.tgz (every JSON and table
# of bench/gpu/gpu.sh, checkpoints left out).
#
#   here:   bash bench/gpu/gpu_wheels.sh
#   device: run(command="bash bench/gpu/gpu_device.sh", carry=[".whl"], timeout_s=600)
#
# SMOKE=1 is passed on to bench/gpu/gpu.sh (toy sizes on the CPU): with a venv that has only what
# the device image has, it checks this script and the wheel list before a GPU's minutes go to them.
# DEADLINE_S (default 570, under the run call's 600) bounds the whole script: the CUDA tests get
# at most 240 s, bench/gpu/gpu.sh what is left less 45 s (its BUDGET_S, at least 60, enforced with
# `timeout -s INT`), and the tarball of results is written whatever happened before. STEPS is
# passed on (a rerun of some steps; the CUDA tests are then left out).
set -euo pipefail
cd "$(dirname "$0")/../.."
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/site}
DEADLINE_S=${DEADLINE_S:-570}
RESULTS=${OUT:-gpu-device-out}  # the device tool's $OUT, else a local folder
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
PY=$(command -v python3)
if ! compgen -G "$WHEELS/*.whl" > /dev/null; then
    echo "error: no wheels in $WHEELS/: run 'bash bench/gpu/gpu_wheels.sh' here first, and name" \
         "$WHEELS in the device run's carry" >&2
    exit 2
fi
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEELS"/*.whl
BUILD=$(mktemp -d)  # build from a copy: setuptools leaves build/ and *.egg-info behind
tar cf - --exclude=./.git --exclude=./.whl --exclude=./runs . | tar xf - -C "$BUILD"
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade \
    --target "$SITE" "$BUILD"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
# bench/gpu/gpu.sh calls `python` and `hpo`; the image may have only python3. A script, not a link:
# a link to a venv's python outside its bin/ runs the base interpreter, without the venv's
# packages.
SHIM=$(mktemp -d)
printf '#!/bin/sh\nexec "%s" "$@"\n' "$PY" > "$SHIM/python"
chmod +x "$SHIM/python"
export PATH="$SHIM:$SITE/bin:$PATH"
"$PY" -c "import torch, optuna, sqlalchemy, hpo; print('torch', torch.__version__, 'optuna', optuna.__version__, 'sqlalchemy', sqlalchemy.__version__)"
WORK=$(mktemp -d)
status=0
# The CUDA tests first (skipped on a machine without CUDA): the device path computes what the CPU's
# does. Their result is logged; the benchmarks run either way.
if [ -z "${STEPS:-}" ]; then
    timeout -k 10 240 "$PY" -m pytest -q -p no:cacheprovider tests/pipeline_tests/test_cuda.py \
        2>&1 | tee "$RESULTS/gpu-tests.log" || status=$?
fi
BUDGET_S=$(( DEADLINE_S - SECONDS - 45 ))  # 45 s: a stop at the limit, then the tarball
if [ "$BUDGET_S" -lt 60 ]; then BUDGET_S=60; fi
echo "bench/gpu/gpu.sh gets $BUDGET_S s"
# At the limit SIGINT, as Ctrl-C: the running step stops (hpo run records its trials, within
# its 20 s stop grace), gpu.sh skips the rest; SIGKILL 30 s later if anything is still there.
OUT="$WORK" BUDGET_S="$BUDGET_S" PYTHONUNBUFFERED=1 timeout -s INT -k 30 "$BUDGET_S" \
    bash bench/gpu/gpu.sh 2>&1 | tee -i "$RESULTS/gpu.log" || status=$?
tar czf "$RESULTS/gpu-out.tgz" -C "$WORK" --exclude='*.pt' --exclude='*.db' --exclude='*.lock' . \
    || status=$?
echo "results in $RESULTS: $(cd "$RESULTS" && ls | tr "\n" " ")(exit $status)"
exit "$status"
