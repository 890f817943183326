#!/usr/bin/env bash
# Everything to check on a CUDA machine that has only this repo (no internet, no package index):
#   1. install the package (editable, no deps, no index; the C++ CPU extension is skipped unless
#      GPU_CHECK_BUILD_EXT=1: it is not used on the GPU and its build may fail there harmlessly)
#   2. the CUDA parity tests (tests marked `cuda` or with "cuda" in their id)
#   3. the MoE block-size search (bench/moe_tune.py; writes lfm_kernels/triton/moe_configs.json)
#   4. lfm-kernels bench --device cuda --json $OUT/gpu.json
#   5. a short table: time, GB/s and share of the measured copy bandwidth (also $OUT/summary.md)
# within 8 minutes in all: every step runs under `timeout`, sized from what is left.
#
#   bash bench/gpu_check.sh              # results in $OUT (default ./gpu_check_out)
#   PYTHON=python3.12 OUT=/tmp/r bash bench/gpu_check.sh
#   GPU_CHECK_DRY=1 bash bench/gpu_check.sh   # rehearse the script's plumbing on a CPU-only machine
#                                             # (tiny shapes, CPU device, Triton interpreter)
set -u -o pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PY
DRY=${GPU_CHECK_DRY:-0}
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
TOTAL_S=${GPU_CHECK_TOTAL_S:-470}   # a little under 8 minutes, for the summary and the copy-out
START=$SECONDS

# The repo is importable whatever the install step does; no Triton interpreter on a GPU machine.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ $DRY != 1 ]]; then unset TRITON_INTERPRET; fi
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

declare -a STATUS=()

# step NAME WANT_SECONDS CMD...: run CMD under a timeout of min(WANT, time left), log to $OUT/NAME.log
step() {
  local name=$1 want=$2
  shift 2
  local left=$((TOTAL_S - (SECONDS - START) - 10))
  local t=$((want < left ? want : left))
  if ((t < 15)); then
    echo "=== $name: SKIPPED (only ${left}s left)"
    STATUS+=("$name: skipped, out of time")
    return 0
  fi
  echo "=== $name (timeout ${t}s) $(date -u +%H:%M:%S)"
  local t0=$SECONDS rc
  timeout -k 10 "$t" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  local took=$((SECONDS - t0))
  case $rc in
    0) STATUS+=("$name: ok (${took}s)") ;;
    124 | 137) STATUS+=("$name: TIMED OUT after ${took}s") ;;
    5) STATUS+=("$name: ok, but pytest selected no tests (${took}s)") ;;
    *) STATUS+=("$name: FAILED rc=$rc (${took}s)") ;;
  esac
  echo "=== $name: rc=$rc in ${took}s"
}

echo "=== machine"
{
  date -u
  nvidia-smi -L 2>/dev/null || echo "nvidia-smi not found"
  "$PY" -c 'import torch, sys
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
import triton; print("triton", triton.__version__)
sys.exit(0 if torch.cuda.is_available() else 3)'
} 2>&1 | tee "$OUT/machine.log"
if [[ $DRY == 1 ]]; then
  echo "(GPU_CHECK_DRY=1: rehearsal on the CPU with tiny shapes; the figures mean nothing)"
elif ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "no CUDA device visible to torch: nothing to check here" >&2
  exit 2
fi

install() {
  if [[ ${GPU_CHECK_BUILD_EXT:-0} == 1 ]]; then
    "$PY" setup.py build_ext --inplace || echo "(C++ extension build failed: CPU ops would use references; fine for the GPU)"
  else
    export LFM_KERNELS_NO_EXTENSION=1
  fi
  # Editable, without dependencies (torch and triton are already here) or an index; when pip or
  # setuptools cannot do it, PYTHONPATH above still makes the checkout importable.
  "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . \
    || echo "(pip install failed; using the checkout through PYTHONPATH)"
  "$PY" -m lfm_kernels.cli info
}
export -f install
if [[ $DRY == 1 ]]; then
  # Never install anything on the rehearsal machine: only show the package imports.
  step install 60 "$PY" -m lfm_kernels.cli info
else
  step install 120 bash -c install
fi

# -k matches test ids and marker names, so this selects tests marked `cuda` and CUDA-parametrized ones.
step cuda_tests 150 "$PY" -m pytest tests -q -k cuda -rfEs --tb=short -p no:cacheprovider \
  --junitxml="$OUT/cuda_tests.xml"

if [[ $DRY == 1 ]]; then
  step moe_tune 140 "$PY" bench/moe_tune.py --device cpu --shape 4,32,64 --tokens 2,8 --max-configs 2 \
    --out "$OUT/moe_configs.json" --summary-json "$OUT/moe_tune.json"
  step bench 170 "$PY" -m lfm_kernels.cli bench --device cpu --quick --ops short_conv --json "$OUT/gpu.json"
else
  step moe_tune 140 "$PY" bench/moe_tune.py --tokens 1,4,16,64,256,1024,4096 --budget-s 110 \
    --summary-json "$OUT/moe_tune.json"
  if [[ -f lfm_kernels/triton/moe_configs.json ]]; then cp lfm_kernels/triton/moe_configs.json "$OUT/"; fi
  step bench 170 "$PY" -m lfm_kernels.cli bench --device cuda --json "$OUT/gpu.json"
fi

echo "=== summary"
DEV=cuda
[[ $DRY == 1 ]] && DEV=cpu
"$PY" - "$OUT" "$DEV" <<'PYEOF' 2>&1 | tee "$OUT/summary.md"
import json, os, sys, datetime

out, device = sys.argv[1], sys.argv[2]
try:
    data = json.load(open(os.path.join(out, "gpu.json")))
except (OSError, ValueError) as exc:
    print(f"no bench results ({exc})")
    sys.exit(0)
gpu = data["machine"].get("cuda_device") if device == "cuda" else data["machine"].get("cpu")
dev = data["devices"].get(device, {})
bw = dev.get("bandwidth")
print(f"GPU check, {datetime.date.today().isoformat()}, {gpu}, torch {data['machine']['torch']}, "
      f"triton {data['machine']['triton']}; measured copy bandwidth {bw / 1e9:.0f} GB/s" if bw else "")
if not data.get("complete", True):
    print("(partial: the bench was cut short; these are the cases it finished)")
print()
print("| op | shape | dtype | backend | kernel | GB/s | share of copy bw | vs eager | vs best | check |")
print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")


def t(s):
    return "-" if not isinstance(s, (int, float)) else (f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms")


def n(x, spec, suffix=""):
    return "-" if not isinstance(x, (int, float)) else f"{x:{spec}}{suffix}"


for r in data["rows"]:
    if r.get("device") != device:
        continue
    if "failed" in r:
        print(f"| {r['op']} | {r['case']} | | | FAILED: {r['failed'][:60]} | | | | | |")
        continue
    kt = r["times_s"].get("kernel")
    share = r["bytes_moved"] / kt / bw if kt and bw and r.get("bytes_moved") else None
    check = "ok" if r["check"]["ok"] else f"MISMATCH {r['check']['rel_err']}"
    print(f"| {r['op']} | {r['case']} | {r['dtype']} | {r['backend']} | {t(kt)} | {n(r.get('GBps'), '.1f' if (r.get('GBps') or 0) < 100 else '.0f')} | "
          f"{n(100 * share if share else None, '.0f', '%')} | {n(r.get('speedup_vs_eager'), '.2f', 'x')} | "
          f"{n(r.get('speedup_vs_best'), '.2f', 'x')} ({r.get('best_baseline')}) | {check} |")
try:
    tune = json.load(open(os.path.join(out, "moe_tune.json")))
except (OSError, ValueError):
    tune = None
if tune and tune.get("rows"):
    print()
    print(f"MoE block sizes ({tune['key']}):")
    print()
    print("| M tokens | best time | default | GB/s | share of copy bw | config |")
    print("| ---: | ---: | ---: | ---: | ---: | --- |")
    for r in tune["rows"]:
        c = r["config"]
        cfg = f"M{c.get('BLOCK_M')} N{c.get('BLOCK_N')} K{c.get('BLOCK_K')} w{c.get('num_warps')} s{c.get('num_stages')}"
        print(f"| {r['M']} | {t(r['time_s'])} | {t(r.get('default_time_s'))} | {n(r['GBps'], '.0f')} | "
              f"{n(100 * r['share_of_copy_bw'] if r.get('share_of_copy_bw') else None, '.0f', '%')} | {cfg} |")
PYEOF

echo
echo "=== steps ($((SECONDS - START))s in all)"
failed=0
for s in "${STATUS[@]}"; do
  echo "  $s"
  [[ $s == *": ok"* ]] || failed=1
done
echo "results in $OUT"
exit $failed
