"""Does REINFORCE raise pick-can success over the base? A paired measurement with an error bar.

    python benchmarks/reinforce_gain.py --run-root runs/main            # after the main job: its demos and base
    python benchmarks/reinforce_gain.py --run-root runs/main --iterations 10 --grid 5 --per-cell 4 --lr 1e-4 \
        --seeds 0 1 2 --positions 100

Trains REINFORCE from the main job's base with `train-vla` (rerunning the command resumes it), then scores the base
and the fine-tuned policy on the same seeded pick-can positions -- one set of env workers per seed, the same action
random numbers for both (common random numbers) -- and prints per-seed success, the pooled paired difference
(fine-tuned minus base, per episode) with its standard error, and the KL to the base. The main job's own
20-position evaluation cannot resolve this: a binomial score on 20 episodes has a ~11-point standard deviation.
Each iteration collects grid^2 x per-cell trajectories (~3 env-minutes for 100 on 2 cores).
"""
from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def paired_gain(base: np.ndarray, tuned: np.ndarray) -> tuple[float, float]:
    """Mean per-episode difference (percentage points) and its standard error."""
    diff = tuned.astype(float) - base.astype(float)
    se = diff.std(ddof=1) / math.sqrt(len(diff)) if len(diff) > 1 else float("nan")
    return 100 * diff.mean(), 100 * se


def train(args, out: Path) -> None:
    exe = shutil.which("train-vla") or sys.exit("train-vla is not installed: run `bash scripts/setup.sh`")
    root = Path(args.run_root)
    subprocess.run([exe, "--algo", "reinforce", "experiment=embedded", f"demos_root={root / 'demos'}",
                    f"base={root / 'base' / 'policy.pt'}", f"results={root / 'results_gain.csv'}",
                    f"report_dir={root / 'report'}", f"out_dir={out}", f"algo.lr={args.lr}",
                    f"algo.iterations={args.iterations}", f"algo.grid={args.grid}",
                    f"algo.trajectories_per_cell={args.per_cell}", "eval.at_end=false", *args.overrides],
                   check=True)


def final_kl(out: Path) -> float:
    from vla_razor.results import read_rows

    return float(read_rows(out / "metrics.csv")[-1]["kl_base_to_policy"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-root", default="runs/main", help="a main-job folder (demos/, base/policy.pt)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--grid", type=int, default=5, help="start cells per axis")
    parser.add_argument("--per-cell", type=int, default=4, help="trajectories per start cell per iteration")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--positions", type=int, default=100, help="pick-can positions per seed")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--sampled", action="store_true", help="score the sampling policy, not the argmax tokens")
    parser.add_argument("overrides", nargs="*", help="extra train-vla overrides")
    args = parser.parse_args()

    root = Path(args.run_root)
    base_file = root / "base" / "policy.pt"
    if not base_file.exists() or not (root / "demos" / "pick_can" / "metadata.json").exists():
        sys.exit(f"{root} has no base/policy.pt or demos/pick_can: run the main job first "
                 f"(RUN_ROOT={root} bash scripts/main_job.sh)")
    out = root / f"reinforce_gain_lr{args.lr:g}_g{args.grid}k{args.per_cell}_it{args.iterations}"
    started = time.time()
    train(args, out)
    train_s = time.time() - started

    import torch

    from policies.vla_factory import load_policy
    from vla_razor.forgetting import EvalConfig, TaskSet, success_on

    torch.set_num_threads(2)
    tasks = TaskSet(num_workers=args.workers)
    policies = {"base": load_policy(str(base_file))[0], "reinforce": load_policy(str(out / "policy.pt"))[0]}
    lines = [f"REINFORCE from {base_file}: lr {args.lr:g}, {args.iterations} iterations x {args.grid}^2 cells x "
             f"{args.per_cell} trajectories; KL(pi0||pi) {final_kl(out):.4f} nats/dim; train {train_s:.0f} s; "
             f"{'sampled' if args.sampled else 'argmax'} action tokens", "",
             "| seed | positions | base % | REINFORCE % | gain (points) |", "|---:|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    outcomes = {name: [] for name in policies}
    for seed in args.seeds:
        scored = success_on(policies, "pick_can", args.positions, tasks,
                            EvalConfig(new_task_positions=args.positions, seed=seed,
                                                              greedy=not args.sampled), progress=False)
        for name in policies:
            outcomes[name].append(scored[name].success)
        gain, _ = paired_gain(scored["base"].success, scored["reinforce"].success)
        lines.append(f"| {seed} | {args.positions} | {100 * scored['base'].success_rate:.1f} | "
                     f"{100 * scored['reinforce'].success_rate:.1f} | {gain:+.1f} |")
        print(lines[-1], flush=True)
    base, tuned = (np.concatenate(outcomes[name]) for name in ("base", "reinforce"))
    gain, se = paired_gain(base, tuned)
    lines.append(f"| all | {len(base)} | {100 * base.mean():.1f} | {100 * tuned.mean():.1f} | "
                 f"**{gain:+.1f} ± {se:.1f}** (paired SE) |")
    print(lines[-1])
    print(f"total {time.time() - started:.0f} s")
    report = root / "report" / f"{out.name}.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(lines) + "\n")
    print(f"written {report}")


if __name__ == "__main__":
    main()
