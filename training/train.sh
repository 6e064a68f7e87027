#!/usr/bin/env bash
# Reproduces flamingo-mini from nothing: builds `flamingo` (for `flamingo shapes`, the world's
# generator), then runs every training stage and writes the model directory and the reference
# answers the Rust exactness test checks.
#
#   training/train.sh [WORK_DIR]        (from the repository root; default WORK_DIR=/tmp/flamingo-mini-work)
#
# Needs the pinned Python environment (training/README.md); PYTHON picks its interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-/tmp/flamingo-mini-work}"
PYTHON="${PYTHON:-python3}"
cargo build --release --locked --bin flamingo
exec "$PYTHON" training/train.py --work "$WORK" --out models/flamingo-mini --fixtures tests/fixtures/flamingo-mini \
    --flamingo target/release/flamingo "${@:2}"
