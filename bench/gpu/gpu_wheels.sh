#!/usr/bin/env bash
# Fetch, here, the wheels that bench/gpu/gpu_device.sh installs on a lent GPU machine, which
# reaches no package registry. Its image already holds torch, numpy, scipy, matplotlib, tqdm,
# PyYAML, packaging, typing-extensions, MarkupSafe, click, rich and shellingham (device tool,
# KINDS.md); it lacks Optuna and its store (SQLAlchemy, Alembic, Mako, colorlog), and pydantic,
# which this typer imports. Versions: the ones installed here, so the device runs what the tests ran.
# Python 3.12 is the device image's.
#
#   bash bench/gpu/gpu_wheels.sh [DIR]   # DIR relative to the repository root; default .whl/ (git-
#                                    # ignored), the folder to name in the device run's `carry`
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=${1:-.whl}
PY=${DEVICE_PYTHON:-3.12}
mkdir -p "$DIR" && rm -f "$DIR"/*.whl  # only the wheels: DIR may be a folder of the caller's
pins=$(python - <<'PY'
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}"
               for name in ("optuna", "sqlalchemy", "alembic", "mako", "colorlog", "typer",
                            "pydantic", "pydantic-core", "annotated-types",
                            "typing-inspection")))
PY
)
echo "fetching for CPython $PY: $pins"
# shellcheck disable=SC2086  # one argument per pin
python -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$DIR" $pins
ls -l "$DIR"
