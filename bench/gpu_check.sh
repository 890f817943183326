#!/usr/bin/env bash
# Everything to check on a lent CUDA machine (an H200: torch 2.11, triton 3.6.0, pytest and
# pytest-xdist installed, no network) in one command, in under 6 minutes from a fresh machine:
#   1. cuda_tests: the CUDA parity tests (`pytest -m cuda`: real shapes, graph replay == eager)
#   2. bench:      lfm-kernels bench --device cuda (each kernel's share of the floor, from the copy
#                  bandwidth measured in the same run, and its speed against the torch baselines)
#   3. e2e:        the full-size default model, prefill and decode, eager and as a CUDA graph
#   4. moe_tune:   only if at least a minute is left, a short MoE block-size search (writes to $OUT only)
# Nothing is installed: the checkout runs from PYTHONPATH, the C++ CPU extension is not needed, and
# none of the steps uses transformers (so the machine's 5.17 is fine; no wheels to carry).
#
# Returns at most 8 files in $OUT (the lease's return folder; default ./gpu_check_out):
#   summary.md (written first and rewritten after every step, so a run cut short still returns it),
#   logs.tgz (every step's log and the tests' junit xml), bench.json, e2e.json, moe_tune.json,
#   moe_configs.json
#
#   bash bench/gpu_check.sh              # on the GPU machine
#   bash bench/gpu_check.sh --dry-run    # rehearsal here (CPU, tiny shapes, under a minute): same steps
#                                        # and file set, figures meaningless
set -u -o pipefail

cd "$(dirname "$0")/.."
DRY=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    -h | --help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (expected --dry-run)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
TOTAL_S=${GPU_CHECK_TOTAL_S:-330}  # 5.5 minutes of steps; the rest of 6 is for start-up and copy-out
# the rehearsal needs about 20 s of CPU; the budget leaves room for a machine shared with others
[[ $DRY == 1 ]] && TOTAL_S=${GPU_CHECK_TOTAL_S:-150}
START=$SECONDS
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
mkdir -p "$WORK/logs"
STATUS=$WORK/status
: >"$STATUS"
DEV=cuda
[[ $DRY == 1 ]] && DEV=cpu

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PIP_NO_INDEX=1
if [[ $DRY != 1 ]]; then unset TRITON_INTERPRET; fi

summarize() {
  "$PY" tools/gpu_summary.py "$OUT" "$STATUS" "$DEV" >/dev/null 2>&1 || echo "(summary failed)" >&2
  tar -czf "$OUT/logs.tgz" -C "$WORK" logs 2>/dev/null || true
}

# step NAME WANT_SECONDS CMD...: CMD under a timeout of min(WANT, time left), logged; then the summary.
step() {
  local name=$1 want=$2
  shift 2
  local left=$((TOTAL_S - (SECONDS - START)))
  local t=$((want < left ? want : left))
  if ((t < 10)); then
    echo "=== $name: skipped (${left}s left)"
    echo "$name: skipped, out of time" >>"$STATUS"
    summarize
    return 0
  fi
  echo "=== $name (timeout ${t}s) $(date -u +%H:%M:%S)"
  local t0=$SECONDS rc
  timeout -k 5 "$t" "$@" >"$WORK/logs/$name.log" 2>&1
  rc=$?
  tail -n 25 "$WORK/logs/$name.log"
  local took=$((SECONDS - t0))
  case $rc in
    0) echo "$name: ok (${took}s)" >>"$STATUS" ;;
    124 | 137) echo "$name: TIMED OUT after ${took}s (partial results kept)" >>"$STATUS" ;;
    *) echo "$name: FAILED rc=$rc (${took}s; see logs.tgz)" >>"$STATUS" ;;
  esac
  echo "=== $name: rc=$rc in ${took}s"
  summarize
}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 || echo "no nvidia-smi"
  "$PY" -c 'import sys, torch, importlib.metadata as md
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "triton", md.version("triton"))
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
} >"$WORK/logs/machine.log" 2>&1
cat "$WORK/logs/machine.log"
echo "machine: $(tail -n 1 "$WORK/logs/machine.log")" >>"$STATUS"
summarize  # the summary exists from here on
if [[ $DRY != 1 ]] && ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "no CUDA device visible to torch (use --dry-run to rehearse on a CPU)" | tee -a "$STATUS" >&2
  summarize
  exit 2
fi

if [[ $DRY == 1 ]]; then
  step cuda_tests 60 "$PY" -m pytest tests/test_cuda.py -m cuda -q -rs -p no:cacheprovider \
    --junitxml="$WORK/logs/cuda_tests.xml"
  step bench 60 "$PY" -m lfm_kernels.cli bench --device cpu --quick --ops short_conv --min-time 0.005 --threads 1 \
    --json "$OUT/bench.json"
  step e2e 40 "$PY" tools/gpu_e2e.py --dry-run --batches 1,2 --json "$OUT/e2e.json"
  step moe_tune 40 "$PY" bench/moe_tune.py --device cpu --shape 4,16,32 --tokens 2 --max-configs 1 \
    --out "$OUT/moe_configs.json" --summary-json "$OUT/moe_tune.json"
else
  # the tests compile every kernel once; xdist spreads the compiles over the host's cores
  XDIST=()
  if "$PY" -c 'import xdist' 2>/dev/null; then XDIST=(-n 8); fi
  # the files that hold `cuda` tests, not all of tests/: the machine's transformers (5.17) is older
  # than the integration tests need, and a module that fails to import would stop the whole session
  step cuda_tests 120 "$PY" -m pytest tests/test_cuda.py tests/test_short_conv.py tests/test_linear.py \
    tests/test_rms_norm_triton.py -m cuda \
    -q -rfEs --tb=short -p no:cacheprovider --continue-on-collection-errors ${XDIST[@]+"${XDIST[@]}"} \
    --junitxml="$WORK/logs/cuda_tests.xml"
  step bench 110 "$PY" -m lfm_kernels.cli bench --device cuda --json "$OUT/bench.json"
  step e2e 80 "$PY" tools/gpu_e2e.py --batches 1,64 --prompt-len 512 --steps 32 --json "$OUT/e2e.json"
  if ((TOTAL_S - (SECONDS - START) >= 60)); then
    step moe_tune $((TOTAL_S - (SECONDS - START) - 5)) "$PY" bench/moe_tune.py --tokens 1,16,64,512 \
      --budget-s $((TOTAL_S - (SECONDS - START) - 25)) --out "$OUT/moe_configs.json" \
      --summary-json "$OUT/moe_tune.json"
  else
    echo "moe_tune: skipped (under a minute left)" >>"$STATUS"
    summarize
  fi
fi

echo
cat "$OUT/summary.md"
echo "=== $((SECONDS - START))s in all; results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
rc=0
grep -qE ": (FAILED|TIMED OUT)" "$STATUS" && rc=1
rm -rf "$WORK"
exit $rc
