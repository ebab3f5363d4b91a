"""Env steps/s with a trivial random policy vs inside the TorchRL collector with the token VLA in the loop.

    python benchmarks/collector_overhead.py                       # pick_can, 2 and 4 workers, tiny_vla defaults
    python benchmarks/collector_overhead.py --workers 2 --frames 400 --policy runs/main/base/policy.pt

The VLA runs in this process, batched over the env workers (ParallelEnv); overhead = 1 - (steps/s with the
VLA) / (steps/s with random actions), same workers, same frames. Target: <= 10 %.
"cpu busy" is the whole machine's (all cores, /proc/stat) during the measured steps: when the env workers alone
already keep it near 100 %, the policy's CPU time cannot hide behind them, however it is scheduled.
"""
from __future__ import annotations

import argparse
import os
import time

import torch


def random_policy(td):
    td["action"] = torch.rand(*td.batch_size, 7) * 2 - 1
    return td


def cpu_times() -> tuple[int, int]:
    """(all, idle) jiffies of the whole machine since boot (Linux)."""
    values = [int(v) for v in open("/proc/stat").readline().split()[1:]]
    return sum(values), values[3] + values[4]  # idle + iowait


def steps_per_s(env, policy, frames: int) -> tuple[float, float]:
    """(env steps/s, machine CPU busy %) over ``frames`` steps after a warm-up batch."""
    from torchrl.collectors import Collector

    workers = env.batch_size[0]
    collector = Collector(env, policy, frames_per_batch=workers * 20, total_frames=frames + workers * 20)
    iterator = iter(collector)
    next(iterator)  # warm-up batch: worker start, shader compile, first forward
    start, seen, (all0, idle0) = time.perf_counter(), 0, cpu_times()
    for batch in iterator:
        seen += batch.numel()
    elapsed = time.perf_counter() - start
    all1, idle1 = cpu_times()
    collector.shutdown(close_env=False)
    return seen / elapsed, 100 * (1 - (idle1 - idle0) / max(all1 - all0, 1))


def fresh_env(task, positions, workers):
    from vla_razor.rollouts import make_task_envs

    return make_task_envs(task, positions, workers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="pick_can")
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--frames", type=int, default=400, help="measured env steps per setting (after warm-up)")
    parser.add_argument("--policy", default="", help="policy.pt (default: a fresh tiny_vla)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from envs.placement import grid_positions
    from envs.registry import placement_box
    from policies.vla_factory import PolicyConfig, build_policy, load_policy
    from vla_razor.rollouts import policy_threads

    if args.policy:
        policy = load_policy(args.policy)[0]
    else:
        policy = build_policy(PolicyConfig(), ["pick coke can", "open top drawer", "close top drawer"])
    policy.eval()
    positions = grid_positions(4, 4, *placement_box(args.task))
    print(f"{'workers':>7} {'random steps/s':>15} {'cpu busy':>9} {'VLA steps/s':>12} {'cpu busy':>9} {'overhead':>9}"
          f"  ({args.task}, {args.frames} steps each, {os.cpu_count()} cores, torch threads {args.threads})")
    for workers in args.workers:
        # a fresh set of workers per measurement: the collector closes them on shutdown
        alone, busy_alone = steps_per_s(fresh_env(args.task, positions, workers), random_policy, args.frames)
        with torch.no_grad(), policy_threads():
            with_vla, busy_vla = steps_per_s(fresh_env(args.task, positions, workers), policy, args.frames)
        print(f"{workers:>7} {alone:>15.1f} {busy_alone:>8.0f}% {with_vla:>12.1f} {busy_vla:>8.0f}% "
              f"{100 * (1 - with_vla / alone):>8.1f}%", flush=True)


if __name__ == "__main__":
    main()
