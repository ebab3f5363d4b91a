"""Env steps/s with a trivial random policy vs inside the TorchRL collector with the token VLA in the loop.

    python benchmarks/collector_overhead.py                       # pick_can, 2 and 4 workers, tiny_vla defaults
    python benchmarks/collector_overhead.py --workers 2 --frames 400 --policy runs/main/base/policy.pt

The VLA runs in this process, batched over the env workers (ParallelEnv); overhead = 1 - (steps/s with the
VLA) / (steps/s with random actions), same workers, same frames, measured in back-to-back pairs (``--rounds``) whose
median is the figure: this VM's speed drifts by 2x within an hour, so totals taken minutes apart mean little.
"policy ms/call" is one batched sampling call (7 tokens for every worker). Target: <= 10 %.
"cpu busy" is the whole machine's (all cores, /proc/stat) during the measured steps: when the env workers alone
already keep it near 100 %, the policy's CPU time cannot hide behind them, however it is scheduled.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def random_policy(td):
    td["action"] = torch.rand(*td.batch_size, 7) * 2 - 1
    return td


def cpu_times() -> tuple[int, int]:
    """(all, idle) jiffies of the whole machine since boot (Linux)."""
    values = [int(v) for v in open("/proc/stat").readline().split()[1:]]
    return sum(values), values[3] + values[4]  # idle + iowait


def steps_per_s(env, policy: TimedPolicy, frames: int) -> dict[str, float]:
    """Env steps/s, machine CPU busy %, episodes ended per 100 steps and the policy's share of the wall time, over
    ``frames`` steps after a warm-up batch."""
    from torchrl.collectors import Collector

    workers = env.batch_size[0]
    collector = Collector(env, policy, frames_per_batch=workers * 20, total_frames=frames + workers * 20,
                          auto_register_policy_transforms=False)  # as train-vla's
    iterator = iter(collector)
    next(iterator)  # warm-up batch: worker start, shader compile, first forward
    calls = policy.seconds
    calls.clear()
    start, seen, episodes, (all0, idle0) = time.perf_counter(), 0, 0, cpu_times()
    for batch in iterator:
        seen += batch.numel()
        episodes += int(batch["next", "done"].sum())
    elapsed = time.perf_counter() - start
    all1, idle1 = cpu_times()
    collector.shutdown(close_env=False)  # the next round reuses the workers
    return {"steps_per_s": seen / elapsed, "busy": 100 * (1 - (idle1 - idle0) / max(all1 - all0, 1)),
            "episodes_per_100": 100 * episodes / seen, "policy_share": 100 * sum(calls) / elapsed,
            "call_ms": 1e3 * sum(calls) / max(len(calls), 1)}


def fresh_env(task, positions, workers):
    from vla_razor.rollouts import make_task_envs

    return make_task_envs(task, positions, workers)


class TimedPolicy:
    """The policy, with the wall time of each call recorded (the collector calls it once per batch step)."""

    def __init__(self, policy):
        self.policy, self.seconds = policy, []

    def __call__(self, td):
        start = time.perf_counter()
        out = self.policy(td)
        self.seconds.append(time.perf_counter() - start)
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="pick_can")
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--frames", type=int, default=200, help="measured env steps per round and policy")
    parser.add_argument("--rounds", type=int, default=3,
                        help="random / VLA pairs on the same workers (the VM's speed drifts: pairs, not totals)")
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
    timed, timed_random = TimedPolicy(policy), TimedPolicy(random_policy)
    positions = grid_positions(4, 4, *placement_box(args.task))
    print(f"{'workers':>7} {'round':>5} {'random steps/s':>15} {'cpu':>4} {'eps/100':>7} {'VLA steps/s':>12} "
          f"{'cpu':>4} {'eps/100':>7} {'policy ms/call':>15} {'policy share':>13} {'overhead':>9}  ({args.task}, "
          f"{args.frames} steps each, {os.cpu_count()} cores, torch threads {args.threads})")
    for workers in args.workers:
        env = fresh_env(args.task, positions, workers)
        overheads, shares = [], []
        for round_index in range(args.rounds):
            alone = steps_per_s(env, timed_random, args.frames)
            with policy_threads():
                vla = steps_per_s(env, timed, args.frames)
            overheads.append(100 * (1 - vla["steps_per_s"] / alone["steps_per_s"]))
            shares.append(vla["policy_share"])
            print(f"{workers:>7} {round_index:>5} {alone['steps_per_s']:>15.1f} {alone['busy']:>3.0f}% "
                  f"{alone['episodes_per_100']:>7.1f} {vla['steps_per_s']:>12.1f} {vla['busy']:>3.0f}% "
                  f"{vla['episodes_per_100']:>7.1f} {vla['call_ms']:>15.1f} {vla['policy_share']:>12.1f}% "
                  f"{overheads[-1]:>8.1f}%", flush=True)
        if not env.is_closed:
            env.close()
        print(f"{workers:>7} {'median':>5} {'':>15} {'':>4} {'':>7} {'':>12} {'':>4} {'':>7} {'':>15} "
              f"{statistics.median(shares):>12.1f}% {statistics.median(overheads):>8.1f}%", flush=True)


if __name__ == "__main__":
    main()
