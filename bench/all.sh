#!/usr/bin/env bash
# Reruns every measurement docs/benchmarks.md quotes for issue 7, in order, on a quiet machine (about 25 minutes):
# where a prefill and a decode step go, float32 vs bfloat16 runtime probe, Nimbus vs vLLM in bfloat16 (burst,
# online, shared prefix, with the ceiling), the same in float32, and the daemon's own cost (null-model steps/s,
# CPU share and worker memory in a real bfloat16 burst, daemon RSS drift).
# Needs vLLM's CPU build in /work/vllm-venv (shared/NOTES.md); results under ${OUT:-/tmp/nimbus-bench}.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/nimbus-bench}
PY=.venv/bin/python
mkdir -p "$OUT"
$PY bench/step_profile.py | tee "$OUT/step_profile.txt"
$PY bench/dtype.py | tee "$OUT/dtype.txt"
$PY bench/compare.py --out "$OUT/bf16" --vllm-dtype bfloat16 --nimbus-config 'dtype = "bfloat16"' | tee "$OUT/bf16.txt"
$PY bench/compare.py --out "$OUT/fp32" --parts burst,shared-prefix | tee "$OUT/fp32.txt"
$PY bench/daemon_cost.py --out "$OUT/daemon" --dtype bfloat16 | tee "$OUT/daemon.txt"
