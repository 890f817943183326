#!/usr/bin/env bash
# Builds the CPU extension with AddressSanitizer + UndefinedBehaviorSanitizer in a scratch worktree and
# runs the CPU tests against it (Triton and integration tests are skipped: they exercise no C++).
# Usage: tools/sanitize.sh [pytest args...]   (default: the C++ op test files)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
scratch="$(mktemp -d /tmp/lfmk-sanitize.XXXXXX)"
trap 'git -C "$repo" worktree remove --force "$scratch" >/dev/null 2>&1 || rm -rf "$scratch"' EXIT
git -C "$repo" worktree add -q --detach "$scratch" HEAD
# carry uncommitted changes of the C++ and Python sources along
(cd "$repo" && git diff HEAD) | (cd "$scratch" && git apply --allow-empty 2>/dev/null || true)
cd "$scratch"
LFM_KERNELS_SANITIZE=address,undefined LFM_KERNELS_REQUIRE_EXTENSION=1 python3 setup.py build_ext --inplace >build.log 2>&1 \
  || { tail -30 build.log; exit 1; }
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
if [ $# -eq 0 ]; then
  set -- $(ls tests/test_short_conv.py tests/test_moe.py tests/test_decode_attention.py tests/test_linear.py \
    tests/test_policy.py 2>/dev/null) -k "not triton"
fi
python3 -m pytest -q -p no:cacheprovider "$@"
