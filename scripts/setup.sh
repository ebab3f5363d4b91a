#!/usr/bin/env bash
# Installs vla-razor and everything its default paths need, from PyPI (and, for CPU rendering, Debian).
# torch is pinned to the 2.13 CPU wheel: an unpinned torch pulls a multi-GB CUDA build on a CPU machine.
# GPU users: install the torch build for your CUDA first, then run this with VLA_RAZOR_KEEP_TORCH=1.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHON
if [ -z "${VLA_RAZOR_KEEP_TORCH:-}" ]; then
  "$PYTHON" -m pip install -q "torch==2.13.*"
fi
"$PYTHON" -m pip install -q -e ".[vla,sim,lora,test]"
# ManiSkill3/SAPIEN needs a Vulkan device even on CPU; this installs Mesa from Debian backports if none works.
if [ "$(id -u)" -eq 0 ]; then
  bash scripts/setup_vulkan.sh
else
  echo "setup: not root, skipping the Vulkan setup; if the robot tasks report no Vulkan device, run" \
       "'sudo bash scripts/setup_vulkan.sh'" >&2
fi
