#!/usr/bin/env bash
# Reruns every measurement docs/benchmarks.md quotes for issue 7, in order, on a quiet machine: where a prefill and
# a decode step go, Nimbus vs vLLM (burst, online, shared prefix, with the ceiling), and the daemon's own cost
# (null-model steps/s, CPU share and worker memory in a real burst, daemon RSS drift).
#
# Both servers run the dtype this CPU is fast in: bfloat16 where it has AVX512-BF16 (about 40 minutes with the
# float32 comparison after it), else float32 (about 30 minutes; bfloat16 matrix multiplies run at about 1 GFLOP/s
# on AVX2 alone, so neither server is worth running in it there).
# Needs vLLM's CPU build in /work/vllm-venv (shared/NOTES.md); results under ${OUT:-/tmp/nimbus-bench}.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/nimbus-bench}
PY=.venv/bin/python
mkdir -p "$OUT"
if grep -qw avx512_bf16 /proc/cpuinfo; then
  $PY bench/step_profile.py --dtype bfloat16 | tee "$OUT/step_profile.txt"
  $PY bench/dtype.py | tee "$OUT/dtype.txt"
  $PY bench/compare.py --out "$OUT/bf16" --vllm-dtype bfloat16 --nimbus-config 'dtype = "bfloat16"' | tee "$OUT/bf16.txt"
  $PY bench/compare.py --out "$OUT/fp32" --parts burst,shared-prefix | tee "$OUT/fp32.txt"
  $PY bench/daemon_cost.py --out "$OUT/daemon" --dtype bfloat16 | tee "$OUT/daemon.txt"
else
  $PY bench/step_profile.py --dtype float32 | tee "$OUT/step_profile.txt"
  $PY bench/compare.py --out "$OUT/fp32" | tee "$OUT/fp32.txt"
  $PY bench/daemon_cost.py --out "$OUT/daemon" --dtype float32 | tee "$OUT/daemon.txt"
fi
