#!/usr/bin/env bash
# The main job on the embedded default, end to end (README command 1 runs it after scripts/setup.sh):
#   demos on small grids -> base (pretrain on drawer + some pick demos) -> SFT and REINFORCE on pick-can ->
#   forgetting on the drawer tasks, KL to the base -> report folder with plots, a side-by-side table and a video.
# Every step is resumable: rerunning the script skips finished demo cells, resumes training from checkpoints and
# reuses the cached base evaluation. Everything lands in $RUN_ROOT (default runs/main).
set -euo pipefail
RUN_ROOT=${RUN_ROOT:-runs/main}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
common=(experiment=embedded demos_root="$RUN_ROOT/demos" base="$RUN_ROOT/base/policy.pt"
        results="$RUN_ROOT/results.csv" report_dir="$RUN_ROOT/report")
start=$(date +%s)
stamp() { echo "[main-job] $(( $(date +%s) - start )) s: $*"; }

stamp "collecting demonstrations"
collect-demos env=pick_can grid=5 per_cell=4 out_dir="$RUN_ROOT/demos/pick_can"
collect-demos env=open_drawer grid=5 per_cell=3 out_dir="$RUN_ROOT/demos/open_drawer"
collect-demos env=close_drawer grid=4 per_cell=3 out_dir="$RUN_ROOT/demos/close_drawer"

stamp "pretraining the base policy"
train-vla --algo pretrain "${common[@]}" eval.at_end=false

stamp "fine-tuning with SFT"
train-vla --algo sft "${common[@]}" out_dir="$RUN_ROOT/sft" algo.lr=3e-4 algo.epochs=2 eval.at_end=false

stamp "fine-tuning with REINFORCE"
train-vla --algo reinforce "${common[@]}" out_dir="$RUN_ROOT/reinforce" algo.lr=1e-4 algo.iterations=4 \
  algo.grid=4 algo.trajectories_per_cell=2 eval.at_end=false

# One evaluation pass for the base, SFT and REINFORCE: each task's env workers start once and score all three
# on the same seeded positions (starting workers costs more than scoring a policy on them).
stamp "evaluating base, SFT and REINFORCE (new task, drawers, KL)"
eval-forgetting policy_files="[$RUN_ROOT/sft/policy.pt,$RUN_ROOT/reinforce/policy.pt]" demos_root="$RUN_ROOT/demos" \
  base="$RUN_ROOT/base/policy.pt" results="$RUN_ROOT/results.csv" report_dir="$RUN_ROOT/report" threads=2 eval=embedded

stamp "exporting a rollout video"
export-video policy_file="$RUN_ROOT/reinforce/policy.pt" episodes=4 out="$RUN_ROOT/report/reinforce_pick_can.mp4"

stamp "done: $RUN_ROOT/report (runs.md, summary.md, frontier.png, forgetting_vs_kl.png, *.mp4)"
cat "$RUN_ROOT/report/runs.md"
