#!/usr/bin/env bash
# Install mergekit into its own virtualenv, for bench/run.py to compare against.
#
# mergekit is never a dependency of tureen: it lives in a separate venv (default
# ../mergekit-venv, or the first argument). torch is installed first, pinned to 2.13.0
# as in tureen's own setup, and held there by a constraints file while mergekit's
# requirements resolve, so that pip does not pull in another torch build with its CUDA
# packages. If a future mergekit pins a torch that 2.13.0 does not satisfy, install it with
# --no-deps (MERGEKIT_NO_DEPS=1) and its other requirements by hand.
#
# Usage: bash bench/setup_mergekit.sh [VENV_DIR]
# Then:  python bench/run.py --mergekit VENV_DIR/bin/mergekit-yaml ...
set -euo pipefail

VENV="${1:-../mergekit-venv}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
MERGEKIT_SPEC="${MERGEKIT_SPEC:-mergekit}"

if [[ ! -x "$VENV/bin/python" ]]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet "torch==${TORCH_VERSION}"

if [[ "${MERGEKIT_NO_DEPS:-0}" == "1" ]]; then
    "$VENV/bin/pip" install --quiet --no-deps "$MERGEKIT_SPEC"
    echo "installed $MERGEKIT_SPEC without dependencies; install its requirements by hand" >&2
else
    constraints="$(mktemp)"
    trap 'rm -f "$constraints"' EXIT
    echo "torch==${TORCH_VERSION}" >"$constraints"
    "$VENV/bin/pip" install --quiet --constraint "$constraints" "$MERGEKIT_SPEC"
fi

"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md

import torch

print("torch", torch.__version__, "mergekit", md.version("mergekit"))
EOF
echo "mergekit-yaml: $VENV/bin/mergekit-yaml"
