#!/usr/bin/env bash
# The GPU check: one prepared run on an NVIDIA GPU host (driver present; no Rust, no network)
# of a CUDA build of `flamingo`, made elsewhere and packed by scripts/gpu-bundle.sh.
#
#   scripts/gpu-check.sh [BUNDLE] [OUT]     # BUNDLE default target/gpu, OUT default $OUT or gpu-check-out
#
# BUNDLE holds `flamingo` (or `flamingo.xz`) and `fixtures/` (reference-parity cases). Within
# about 8 minutes it:
#   1. checks reference parity on the GPU in f32 (TF32 off, candle's default): greedy, beam and
#      blank-image ids must equal the PyTorch reference's (paged K/V, and the per-sequence
#      layout); then in bf16, reporting ids and the largest logit drift;
#   2. benchmarks decode tokens/s at 1, 16 and 64 concurrent sequences, time to first token and
#      prefix / vision cache hits, in bf16, on the mid-size random model and on a random model
#      with OpenFlamingo-3B's shapes (built in GPU memory);
#   3. writes OUT/*.json, OUT/*.md and OUT/summary.md with the targets (batch-1 decode >= 40% of
#      the HBM roofline, 64 sequences >= 25x batch 1, prefix hit >= 5x lower time to first token).
# CUDA libraries: libcuda.so.1 from the driver; cuBLAS, cuRAND and the runtime (CUDA 13) from
# $FLAMINGO_CUDA_LIBS, else from the nvidia-* pip packages of /opt/torch/.venv or python3.
# HBM bandwidth for the roofline: $HBM_TBPS (default 4.8, an H200).
# A dry run elsewhere: DEVICE=cpu HALF=f16 SIZES=tiny scripts/gpu-check.sh BUNDLE OUT.
set -uo pipefail
DEVICE="${DEVICE:-cuda}"
HALF="${HALF:-bf16}"
SIZES="${SIZES:-mid of3b}"

BUNDLE="${1:-target/gpu}"
OUT="${2:-${OUT:-gpu-check-out}}"
HBM_TBPS="${HBM_TBPS:-4.8}"
mkdir -p "$OUT"
LOG="$OUT/gpu-check.log"
say() { echo "[$(date +%T)] $*" | tee -a "$LOG"; }

BIN="$BUNDLE/flamingo"
if [[ ! -x "$BIN" && -f "$BUNDLE/flamingo.xz" ]]; then
  BIN="${TMPDIR:-/tmp}/flamingo-gpu-check"
  xz -dc "$BUNDLE/flamingo.xz" >"$BIN" && chmod +x "$BIN" || { say "cannot unpack $BUNDLE/flamingo.xz"; exit 2; }
fi
[[ -x "$BIN" ]] || { say "no flamingo binary in $BUNDLE"; exit 2; }

if [[ -z "${FLAMINGO_CUDA_LIBS:-}" ]]; then
  for py in /opt/torch/.venv/bin/python python3; do
    command -v "$py" >/dev/null 2>&1 || continue
    FLAMINGO_CUDA_LIBS="$("$py" - <<'EOF' 2>/dev/null
import glob, os
try:
    import nvidia
except ImportError:
    raise SystemExit(0)
dirs = set()
for root in nvidia.__path__:
    for lib in glob.glob(os.path.join(root, "**", "lib*.so*"), recursive=True):
        dirs.add(os.path.dirname(lib))
print(":".join(sorted(dirs)))
EOF
)"
    [[ -n "$FLAMINGO_CUDA_LIBS" ]] && break
  done
fi
export LD_LIBRARY_PATH="${FLAMINGO_CUDA_LIBS:-}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

{
  echo "# GPU check"
  echo
  echo "- date: $(date -u +%FT%TZ)"
  echo "- binary: $("$BIN" --version 2>&1)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/- gpu: /'
} >"$OUT/summary.md"
missing="$(ldd "$BIN" 2>&1 | grep 'not found' || true)"
if [[ -n "$missing" ]]; then
  say "libraries not found (set FLAMINGO_CUDA_LIBS):"; echo "$missing" | tee -a "$LOG"
  exit 2
fi

status=0
step() { # step NAME SECONDS ARGS...: runs flamingo, output to OUT/NAME.md
  local name="$1" limit="$2"; shift 2
  say "$name: flamingo $*"
  local t0=$SECONDS
  timeout "$limit" "$BIN" "$@" >"$OUT/$name.md" 2>>"$LOG"
  local rc=$?
  say "$name: exit $rc after $((SECONDS - t0)) s"
  [[ $rc -eq 0 ]] || status=1
  { echo; echo "## $name (exit $rc, $((SECONDS - t0)) s)"; echo; cat "$OUT/$name.md"; } >>"$OUT/summary.md"
}

F="$BUNDLE/fixtures"
step parity-f32-paged 60 parity --fixtures "$F" --device "$DEVICE" --dtype f32 --kv paged --exact --json "$OUT/parity-f32-paged.json"
step parity-f32-own 60 parity --fixtures "$F" --device "$DEVICE" --dtype f32 --kv own --exact --json "$OUT/parity-f32-own.json"
step parity-half 60 parity --fixtures "$F" --device "$DEVICE" --dtype "$HALF" --kv paged --json "$OUT/parity-half.json"
for size in $SIZES; do
  limit=90
  [[ "$size" == of3b ]] && limit=180
  step "bench-$size" "$limit" bench --device "$DEVICE" --dtype "$HALF" --size "$size" --concurrency 1,16,64 --decode-steps 32 \
    --repeats 3 --json "$OUT/bench-$size.json"
done

# Targets, from the JSON (python3 where there is one).
for py in /opt/torch/.venv/bin/python python3; do
  command -v "$py" >/dev/null 2>&1 || continue
  SIZES="$SIZES" HBM_TBPS="$HBM_TBPS" OUT="$OUT" "$py" - >>"$OUT/summary.md" <<'EOF'
import json, os
out, tbps = os.environ["OUT"], float(os.environ["HBM_TBPS"])
def load(name):
    try:
        return json.load(open(os.path.join(out, name)))
    except (OSError, ValueError):
        return None
print("\n## Targets\n")
print("| target | measured | met |\n|---|---|---|")
for name in ("parity-f32-paged", "parity-f32-own"):
    p = load(name + ".json")
    ok = bool(p and p["all_ids_equal"])
    print(f"| {name}: every id equals the reference | {'yes' if ok else 'no'} (drift {p['max_logit_drift']:.1e}) | {ok} |" if p else f"| {name} | no result | False |")
p = load("parity-half.json")
if p:
    print(f"| {p['dtype']}: ids and drift reported | all ids equal: {p['all_ids_equal']}, max drift {p['max_logit_drift']:.2e} | n/a |")
b = load("bench-of3b.json") or load("bench-" + os.environ.get("SIZES", "of3b").split()[-1] + ".json")
if b and b.get("decode"):
    rows = {r["sequences"]: r for r in b["decode"]}
    if 1 in rows:
        frac = rows[1]["tokens_per_s"] * b["decode_weight_bytes"] / (tbps * 1e12)
        print(f"| {b['size']} shapes, {b['dtype']}, batch-1 decode >= 40% of roofline ({tbps} TB/s) | {rows[1]['tokens_per_s']:.1f} tok/s = {100 * frac:.1f}% | {frac >= 0.4} |")
    if 1 in rows and 64 in rows:
        x = rows[64]["tokens_per_s"] / rows[1]["tokens_per_s"]
        print(f"| 64 sequences >= 25x batch 1 | {x:.1f}x ({rows[64]['tokens_per_s']:.0f} tok/s) | {x >= 25} |")
    if b.get("prefix"):
        h = b["prefix"]["hit_speedup"]
        print(f"| prefix hit time to first token >= 5x lower | {h:.1f}x ({b['prefix']['miss_ms']:.0f} -> {b['prefix']['hit_ms']:.0f} ms) | {h >= 5} |")
else:
    print("| OpenFlamingo-3B shapes benchmark | no result | False |")
EOF
  break
done
say "done (status $status); results in $OUT"
exit $status
