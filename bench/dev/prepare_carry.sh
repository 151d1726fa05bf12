#!/bin/bash
# Fill .gpu_carry/wheels (git-ignored) with what bench/dev/device_checks.sh installs on the device, which has
# no registry access: diffusers and its pure-Python dependencies, plus the compiled ones (regex, pillow,
# pyyaml, charset_normalizer) for the CPython versions a lent device may run (3.10-3.13). numpy is left out
# (the device's torch brings it). About 48 MB, under the device tool's 64 MiB carry limit.
#   bash bench/dev/prepare_carry.sh [diffusers version, default 0.42.1]
set -euo pipefail
VER=${1:-0.42.1}
DIR=.gpu_carry/wheels
mkdir -p "$DIR"
python -m pip download -q "diffusers==$VER" -d "$DIR"
rm -f "$DIR"/numpy-*.whl
for py in 310 311 312 313; do
  python -m pip download -q --no-deps --only-binary=:all: --python-version "$py" \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$DIR" regex pillow pyyaml charset_normalizer
done
du -sh .gpu_carry
