#!/bin/bash
# The device tool's check run: install the project (builds the extension), diffusers from wheels carried in,
# the environment report, then every device-marked test in three parts, logs under $OUT.
#
# Prepare here (the device has no registry access: bash bench/dev/prepare_carry.sh does the two lines below),
# then run with carry [".gpu_carry"]:
#   mkdir -p .gpu_carry/wheels && pip download diffusers -d .gpu_carry/wheels   # minus numpy: the device has it
#   (plus the cp310/312/313 wheels of regex, pillow, pyyaml, charset_normalizer: the device's Python may differ)
#   HEAD=<commit> bash bench/dev/device_checks.sh
# Parts, each on unless set to 0: PYT_I (ITESTS, default tests/integrations), PYT_A (ATESTS, default the kernel
# folders + tests/test_*.py, -n 4), PYT_B (tests/vc, -n 3); all with -m "cuda or triton_gpu or ext" except PYT_I.
# `pip` on the device belongs to another Python than torch's: `python -m pip` is the right call.
set -u
: "${OUT:?set OUT (the device tool sets it)}"
HEAD=${HEAD:-unknown}
LOG=$OUT/checks.log
{
echo "== $(date -u) head=$HEAD"; python -V; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
t0=$(date +%s)
python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -n 3
echo "ext build+install $(( $(date +%s) - t0 )) s"
if [ -d .gpu_carry/wheels ]; then
  python -m pip install -q --no-index --find-links .gpu_carry/wheels diffusers 2>&1 | tail -n 3
fi
python -c "import diffusers; print('diffusers', diffusers.__version__)" 2>&1 | tail -n 1
python -m longcat_kernels.env 2>&1 | head -30
} > "$LOG" 2>&1
if [ "${PYT_I:-1}" = 1 ]; then
  t0=$(date +%s)
  python -m pytest -q -p no:cacheprovider ${ITESTS:-tests/integrations} -x -rs --timeout 600 > "$OUT/integrations.log" 2>&1
  echo "integrations rc=$? $(( $(date +%s) - t0 )) s" >> "$LOG"
fi
if [ "${PYT_A:-1}" = 1 ]; then
  t0=$(date +%s)
  python -m pytest -q -p no:cacheprovider ${ATESTS:-tests/block_sparse_attn tests/kv_cache_attn tests/dispatch tests/rope tests/fp8_quant tests/test_*.py} \
    -m "cuda or triton_gpu or ext" -n 4 > "$OUT/partA.log" 2>&1
  echo "partA rc=$? $(( $(date +%s) - t0 )) s" >> "$LOG"
fi
if [ "${PYT_B:-1}" = 1 ]; then
  t0=$(date +%s)
  python -m pytest -q -p no:cacheprovider tests/vc -m "cuda or triton_gpu or ext" -n 3 > "$OUT/partB.log" 2>&1
  echo "partB rc=$? $(( $(date +%s) - t0 )) s" >> "$LOG"
fi
tail -n 3 "$OUT"/*.log >> "$LOG"
cat "$LOG"
