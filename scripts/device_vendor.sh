#!/usr/bin/env bash
# Build .device_vendor/: the pure-Python-importable packages a lent GPU machine lacks (it has torch, transformers and
# peft, but no tensordict or torchrl), unpacked from wheels for ITS Python (default 3.12), to pass as `carry` and put on
# PYTHONPATH (benchmarks/gpu_session.sh does). Downloads from PyPI: run it on purpose, here, not on the device.
# Usage: bash scripts/device_vendor.sh [python_version]
set -euo pipefail
PY=${1:-3.12}
cd "$(dirname "$0")/.."
WHEELS=$(mktemp -d)
trap 'rm -rf "$WHEELS"' EXIT
pip download --no-deps --only-binary=:all: --python-version "$PY" \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$WHEELS" torchrl==0.14.1 tensordict==0.14.3 pyvers==0.2.3 cloudpickle orjson importlib_metadata zipp
rm -rf .device_vendor && mkdir .device_vendor
for wheel in "$WHEELS"/*.whl; do
  python -m zipfile -e "$wheel" .device_vendor
done
# torchrl's wheel also ships its repository's benchmark folders at top level: they would shadow ours
rm -rf .device_vendor/benchmarks .device_vendor/sota-check .device_vendor/sota-implementations
du -sh .device_vendor
