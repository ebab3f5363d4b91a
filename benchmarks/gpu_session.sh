#!/usr/bin/env bash
# One call on a lent GPU (<= 9.9 min: 450 s + 140 s; issue 6): the OpenVLA-7B-shaped benchmark against naive transformers (the
# targets, the numerics and CUDA-graph checks, op-level copy / GEMM sources, the optional speed-up rows and the
# largest batches with the faster ones), then the product path (native OpenVLA build through openvla_policy,
# speed-ups off vs on). Figures go to $OUT (or ./bench_out).
# Usage (device tool): first `bash scripts/device_vendor.sh` here, then command "bash benchmarks/gpu_session.sh",
# kind "nvidia-h200" (the targets are an H200's; full FT b48 / LoRA b80 need > 80 GiB), carry [".device_vendor"],
# timeout_s 600.
set -u
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
# The lent machine has torch, transformers and peft but no tensordict / torchrl: scripts/device_vendor.sh builds
# .device_vendor (carry it) and it goes first on the path.
[ -d .device_vendor ] && export PYTHONPATH="$PWD/.device_vendor${PYTHONPATH:+:$PYTHONPATH}"
python -V
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
timeout 450 python benchmarks/gpu_openvla.py --budget-s 420 --out "$OUT" 2>&1 | tail -80 | tee "$OUT/gpu_openvla.txt"
timeout 140 python benchmarks/gpu_openvla_product.py --budget-s 115 --out "$OUT/product" 2>&1 | tail -30 | tee "$OUT/gpu_openvla_product.txt"
