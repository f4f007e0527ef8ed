#!/usr/bin/env bash
# Build .gpu/site: what a bare GPU machine (Python 3.12, its own torch/transformers/accelerate/peft,
# no diffusers, no network) needs to run benchmarks/gpu_session.sh: sdcore and its plugins as
# installed wheels (entry points included), diffusers, tomli-w and bitsandbytes (CUDA 13 library
# only, to stay inside the device tool's 64 MiB transfer), unpacked so PYTHONPATH finds them.
# Run here, then carry .gpu:  bash benchmarks/gpu_prepare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/site
py=.venv/bin/python
for pkg in packages/sdcore packages/sdplugin-*; do
  "$py" -m pip wheel -q --no-deps --no-build-isolation -w .gpu/wheels "$pkg"
done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/wheels diffusers==0.42.1 tomli-w==1.2.0 bitsandbytes==0.50.2
for wheel in .gpu/wheels/*.whl; do
  "$py" -m zipfile -e "$wheel" .gpu/site
done
find .gpu/site/bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*cuda130.so' ! -name '*cpu.so' -delete
# the toy world's weights (9 MB, no GPU check reads them) travel in the tree already: the tree and .gpu must
# stay under the device tool's 64 MiB together
rm -rf .gpu/site/sdcore/models/toyworld_base
rm -rf .gpu/wheels
du -sh .gpu
