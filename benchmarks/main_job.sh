#!/usr/bin/env bash
# Wall time of the main job (scripts/main_job.sh) from an empty run folder, stage by stage.
#   bash benchmarks/main_job.sh            # prints "[main-job] <seconds> s: <stage>" lines and the total
# Setup (scripts/setup.sh: pip + Mesa) is not included; it runs once per machine.
set -euo pipefail
RUN_ROOT=${RUN_ROOT:-$(mktemp -d /tmp/vla-razor-main-XXXX)}
export RUN_ROOT
start=$(date +%s)
bash "$(dirname "$0")/../scripts/main_job.sh" 2>&1 | grep --line-buffered -E "^\[main-job\]|^\||final:|base scores"
echo "main job total: $(( $(date +%s) - start )) s (${RUN_ROOT})"
