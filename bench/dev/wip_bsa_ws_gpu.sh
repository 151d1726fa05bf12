#!/bin/bash
# One device call for branch wip/bsa-ws-union (csrc/NOTES.md v8): JIT build, the new GPU tests,
# compute-sanitizer memcheck + racecheck on small shapes, then the timing script. ~10 min on an H200.
#   device: bash bench/dev/wip_bsa_ws_gpu.sh   (with .gpu_carry/upstream for upstream's BSA)
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/wip_out}
mkdir -p "$OUT"
t0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
timeout 120 python3 -c "from longcat_kernels._ext import extension; extension(); print('extension built')" 2>&1 | tail -3 | tee "$OUT/build.txt"
echo "build $(( $(date +%s)-t0 )) s"
timeout 240 python3 -m pytest tests/block_sparse_attn/test_bsa_cuda_kernels.py tests/dispatch -q -p no:cacheprovider \
    -k "union or two_segments or straddling or backward or auto or sm90ws" 2>&1 | tail -25 | tee "$OUT/tests.txt"
echo "tests $(( $(date +%s)-t0 )) s"
for tool in memcheck racecheck; do
    timeout 150 compute-sanitizer --tool $tool python3 bench/dev/wip_bsa_ws_small.py 2>&1 | tail -15 | tee "$OUT/$tool.txt"
done
echo "sanitizers $(( $(date +%s)-t0 )) s"
up=""
[ -d .gpu_carry/upstream ] && up="--upstream .gpu_carry/upstream"
timeout 330 python3 bench/dev/bsa_ws_union_gpu_dev.py --out "$OUT" $up 2>&1 | grep -v "^DEBUG" | tee "$OUT/bench.log"
echo "total $(( $(date +%s)-t0 )) s"
