#!/usr/bin/env bash
# One call on a lent GPU: the LLM-path GRPO check (issue 7), then the OpenVLA-7B-shaped benchmark (issue 6).
# Figures go to $OUT (or ./bench_out). Usage: bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
# The lent machine has torch + transformers but no tensordict: carry it (.device_vendor, pip --target) when present.
[ -d .device_vendor ] && export PYTHONPATH="$PWD/.device_vendor${PYTHONPATH:+:$PYTHONPATH}"
python -V
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
timeout 150 python benchmarks/gpu_llm_grpo.py --steps 2 2>&1 | tail -25 | tee "$OUT/gpu_llm_grpo.txt"
timeout 330 python benchmarks/gpu_openvla.py --budget-s 280 --out "$OUT" 2>&1 | tail -60 | tee "$OUT/gpu_openvla.txt"
