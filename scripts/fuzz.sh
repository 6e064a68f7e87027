#!/usr/bin/env bash
# Fuzzes every target in fuzz/ (cargo-fuzz, libFuzzer) for a bounded time each, starting from
# the committed corpus (fuzz/corpus/<target>/, left unchanged: new inputs go to a scratch
# directory). A panic, an abort, an allocation over the targets' 256 MiB cap, more than
# 2 GiB of memory or 10 s on one input fails the run; libFuzzer writes the input to
# fuzz/artifacts/<target>/ and prints how to reproduce it. Prints each target's executions.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET [TARGET...]]     (default: 30 s, every target)
#
# CI runs it for 30 s per target; for a longer search, e.g. an hour each:
#   scripts/fuzz.sh 3600
# To keep what a long run found, merge it into the corpus (minimised):
#   cargo fuzz run --features libfuzzer -s none TARGET -- -merge=1 fuzz/corpus/TARGET NEW_DIR
# Builds without a sanitizer (-s none: the targets are safe Rust over parsers; the C decoders
# are not instrumented either way), which needs no nightly toolchain; with one, AddressSanitizer:
#   cargo +nightly fuzz run --features libfuzzer -s address TARGET -- -rss_limit_mb=4096
# cargo-fuzz is installed under target/tools when it is not on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-30}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(request media prompt weights model_dir)

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  if [ ! -x target/tools/bin/cargo-fuzz ]; then
    cargo install cargo-fuzz --version 0.13.2 --locked --root target/tools --quiet
  fi
  export PATH="$PWD/target/tools/bin:$PATH"
fi

opts=(--features libfuzzer -s none --codegen-units 16)
cargo fuzz build "${opts[@]}"

summary=()
for t in "${targets[@]}"; do
  work=$(mktemp -d)
  mkdir -p "$work/new"
  log="$work/log"
  echo "== fuzzing $t for ${secs}s"
  # -timeout: one input taking 10 s is a finding; -rss_limit_mb: so is 2 GiB of memory.
  if ! cargo fuzz run "${opts[@]}" "$t" "$work/new" "fuzz/corpus/$t" -- \
      -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 2>"$log"; then
    tail -n 60 "$log"
    echo "fuzz target $t failed; the input is under fuzz/artifacts/$t/"
    exit 1
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1)
  summary+=("$t: ${runs:-?} inputs, ${cov:-cov: ?} edges, 0 crashes")
  rm -rf "$work"
done
printf '%s\n' "${summary[@]}"
