#!/usr/bin/env bash
# A soak on loopback: `flamingo serve` (release build, the default model flamingo-mini) with a
# small capacity and small budgets, and `flamingo bench --soak-seconds` against it: CLIENTS
# clients sending streamed requests with an image back to back, above the capacity, beside
# slow readers and connections trickling a body or headers. Prints the figures (accepted and
# completed, 429s with Retry-After, failures, latency percentiles, the slow clients' fate, the
# server's RSS at the start, its peaks in each half and at the end) and writes them as JSON to
# target/soak.json; the server's log goes to target/soak-server.log.
#
#   scripts/soak.sh [SECONDS [CLIENTS]]      (default: 600 s, 32 clients)
#
# The capacity and budgets are the FLAMINGO_* variables below (any may be set before). The test
# suite runs a 20 s version of it against a debug build (crates/flamingo-server/tests/soak.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-600}
clients=${2:-32}
port=${FLAMINGO_SOAK_PORT:-8399}
export FLAMINGO_ENGINE_MAX_RUNNING=${FLAMINGO_ENGINE_MAX_RUNNING:-8}
export FLAMINGO_ENGINE_MAX_WAITING=${FLAMINGO_ENGINE_MAX_WAITING:-8}
export FLAMINGO_ENGINE_KV_CACHE_BYTES=${FLAMINGO_ENGINE_KV_CACHE_BYTES:-67108864}
export FLAMINGO_ENGINE_VISION_CACHE_BYTES=${FLAMINGO_ENGINE_VISION_CACHE_BYTES:-16777216}
export FLAMINGO_ENGINE_PREFIX_CACHE_BYTES=${FLAMINGO_ENGINE_PREFIX_CACHE_BYTES:-16777216}
export FLAMINGO_ENGINE_PINNED_BYTES=${FLAMINGO_ENGINE_PINNED_BYTES:-16777216}
export FLAMINGO_SERVER_CLIENT_TIMEOUT_SECONDS=${FLAMINGO_SERVER_CLIENT_TIMEOUT_SECONDS:-5}
export FLAMINGO_STORAGE_DIR=${FLAMINGO_STORAGE_DIR:-$(mktemp -d)}

cargo build --release --locked -p flamingo-server
bin=target/release/flamingo
"$bin" serve --port "$port" --log-format json 2> target/soak-server.log &
pid=$!
trap 'kill "$pid" 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
  sleep 1
done
"$bin" bench --url "http://127.0.0.1:$port" --soak-seconds "$secs" --concurrency "$clients" --max-tokens 32 \
  --slow-clients 4 --stall-seconds 10 --server-pid "$pid" --json target/soak.json
kill -TERM "$pid"
wait "$pid"
trap - EXIT
echo "the server drained and exited cleanly"
