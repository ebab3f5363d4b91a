#!/usr/bin/env bash
# Wall time of the main job (scripts/main_job.sh) from an empty run folder, stage by stage.
#   bash benchmarks/main_job.sh            # prints "[main-job] <seconds> s: <stage>" lines and the total
# Setup (scripts/setup.sh: pip + Mesa) is not included; it runs once per machine. The full log is kept in
# $RUN_ROOT/main_job.log and its tail is printed if a stage fails.
set -uo pipefail
RUN_ROOT=${RUN_ROOT:-$(mktemp -d /tmp/vla-razor-main-XXXX)}
export RUN_ROOT
mkdir -p "$RUN_ROOT"
start=$(date +%s)
bash "$(dirname "$0")/../scripts/main_job.sh" > >(tee "$RUN_ROOT/main_job.log" \
  | grep --line-buffered -E "^\[main-job\]|^\||final:|base scores") 2>&1
status=$?
if [ $status -ne 0 ]; then
  echo "main job FAILED (exit $status); last lines of $RUN_ROOT/main_job.log:"
  tail -n 20 "$RUN_ROOT/main_job.log"
  exit $status
fi
echo "main job total: $(( $(date +%s) - start )) s (${RUN_ROOT})"
