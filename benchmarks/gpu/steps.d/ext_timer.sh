#!/usr/bin/env bash
# The compiled extension's CUDA-graph timer vs a Python loop. Building the CUDA extension takes
# longer than this step's limit, so build it beforehand when wanted:
#   HAWADA_BUILD_EXT=1 HAWADA_BUILD_CUDA=1 HAWADA_CUDA_ARCH_LIST=9.0 python setup.py -q build_ext --inplace
# Without a built extension this step records why it did not time anything and passes.
set -uo pipefail
if "$PY" -c "import sys; from hawada import _ext; sys.exit(0 if _ext.has_cuda() else 1)" 2>/dev/null; then
  "$PY" benchmarks/gpu/ext_timer.py
else
  echo '{"benchmark": "ext_timer_gpu", "skipped": "hawada._C with CUDA is not built on this machine"}' > "$RES/ext_timer_gpu.json"
  echo "ext_timer: extension with CUDA not built; recorded as skipped"
fi
