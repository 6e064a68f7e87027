#!/usr/bin/env bash
# Packs what scripts/gpu-check.sh needs on a GPU host into target/gpu/ (ignored by git): the
# CUDA build of `flamingo`, xz-compressed, and a few reference-parity fixture cases.
#
#   scripts/gpu-bundle.sh            # builds with --features cuda first (scripts/cuda-toolchain.sh)
#   FLAMINGO_BIN=path scripts/gpu-bundle.sh   # packs an existing CUDA binary
#   CASES="mosaicgpt_x1 llama_x2" scripts/gpu-bundle.sh
#
# The default cases cover the family of OpenFlamingo-3B (MosaicGPT, a gated block before every
# layer) and LLaMA (rotary, grouped-query attention, every second layer): ~20 MB; the sizes are
# printed at the end and the whole must stay under a transfer limit of 64 MiB. Run on the
# host: scripts/gpu-check.sh target/gpu OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
CASES="${CASES:-mosaicgpt_x1 llama_x2}"
DEST=target/gpu
BIN="${FLAMINGO_BIN:-}"
if [[ -z "$BIN" ]]; then
  eval "$(scripts/cuda-toolchain.sh)"
  cargo build --release --locked -p flamingo-server --features cuda
  BIN=target/release/flamingo
fi
rm -rf "$DEST"
mkdir -p "$DEST/fixtures"
strip -o "$DEST/flamingo" "$BIN"
xz -T0 -6 -f "$DEST/flamingo"
for c in $CASES; do
  cp -r "tests/fixtures/models/$c" "$DEST/fixtures/$c"
done
cp scripts/gpu-check.sh "$DEST/"
du -sh "$DEST" "$DEST"/* >&2
total=$(du -sb "$DEST" | cut -f1)
if (( total > 64 * 1024 * 1024 )); then
  echo "gpu-bundle: $DEST is $total bytes, over the 64 MiB a GPU call carries (fewer CASES?)" >&2
  exit 1
fi
