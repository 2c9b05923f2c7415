#!/usr/bin/env bash
# One command for a fresh GPU machine (torch + triton preinstalled, nothing installed from here):
# the GPU-marked tests of the fused ops, then every kernel benchmark, then any extra steps in
# benchmarks/gpu/steps.d/*.sh. Budget: <= 8 minutes in total (each step has its own timeout).
#
#   bash benchmarks/gpu/run.sh             # from the repository root
#   bash benchmarks/gpu/run.sh --dry-run   # on a CPU: Triton interpreter, tiny shapes (checks the wiring)
#
# Results: JSON under $OUT/results when OUT is set, else benchmarks/results/; logs beside them.
# Exit status: 0 when every step passed, else 1 (later steps still run).
set -uo pipefail

cd "$(dirname "$0")/../.."
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1

PY="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's package, not an installed one
export HF_HUB_OFFLINE=1
if [[ -n "${OUT:-}" ]]; then RES="$OUT/results"; else RES="benchmarks/results"; fi
LOGS="$RES/logs"
mkdir -p "$RES" "$LOGS"
if (( DRY )); then
  export TRITON_INTERPRET=1
  BENCH_ARGS=(--dry-run)
else
  export TRITON_INTERPRET=0  # tests/conftest.py only sets it when unset: real kernels here
  BENCH_ARGS=()
fi

FAILED=()
START=$SECONDS
step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 limit=$2
  shift 2
  echo "=== [$((SECONDS - START))s] $name (limit ${limit}s)"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
  local rc=${PIPESTATUS[0]}
  if (( rc != 0 )); then
    echo "=== $name FAILED (exit $rc)"
    FAILED+=("$name")
  fi
}

"$PY" - <<'PYEOF' 2>&1 | tee "$LOGS/environment.log"
import json, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    info["gpu"] = torch.cuda.get_device_name()
try:
    import triton
    info["triton"] = triton.__version__
except Exception as e:
    info["triton"] = f"unavailable: {e}"
print(json.dumps(info))
PYEOF

# --- 1. GPU-marked correctness tests of the fused ops -------------------------------------------
if "$PY" -c "import pytest" 2>/dev/null; then
  step gpu_tests 240 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_ops_gated_linear.py \
    tests/test_ops_gates.py tests/test_ops_backend.py --junitxml="$RES/gpu_tests.xml"
else
  echo "=== gpu_tests SKIPPED: pytest is not installed on this machine"
  FAILED+=("gpu_tests(no pytest)")
fi

# --- 2. kernel benchmarks (one script per op) ----------------------------------------------------
step bench_gated_linear 240 "$PY" benchmarks/kernels/bench_gated_linear.py "${BENCH_ARGS[@]}"
step bench_gate_sample 40 "$PY" benchmarks/kernels/bench_gate_sample.py "${BENCH_ARGS[@]}"
step bench_gate_penalties 40 "$PY" benchmarks/kernels/bench_gate_penalties.py "${BENCH_ARGS[@]}"
step bench_project_gates 40 "$PY" benchmarks/kernels/bench_project_gates.py "${BENCH_ARGS[@]}"

# --- 3. extra GPU steps (e.g. the compiled extension's timing) -----------------------------------
# Each benchmarks/gpu/steps.d/NAME.sh runs with this environment (PY, RES, LOGS, DRY, PYTHONPATH,
# OUT) and a 60 s limit; keep the whole script within 8 minutes.
export PY RES LOGS DRY
for s in benchmarks/gpu/steps.d/*.sh; do
  [[ -e "$s" ]] || continue
  step "extra_$(basename "$s" .sh)" 60 bash "$s"
done

echo "=== done in $((SECONDS - START))s; results in $RES"
if (( ${#FAILED[@]} )); then
  echo "=== failed steps: ${FAILED[*]}"
  exit 1
fi
