#!/usr/bin/env bash
# Installs vla-razor and everything its default paths need, from PyPI only.
# torch is pinned to the 2.13 CPU wheel: an unpinned torch pulls a multi-GB CUDA build on a CPU machine.
# GPU users: install the torch build for your CUDA first, then run this with VLA_RAZOR_KEEP_TORCH=1.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ -z "${VLA_RAZOR_KEEP_TORCH:-}" ]; then
  "$PYTHON" -m pip install -q "torch==2.13.*"
fi
"$PYTHON" -m pip install -q -e ".[vla,test]"
