"""Expert success and simulator throughput per task, on CPU with rendering on.

    python -m benchmarks.experts                 # 10x10 grid, all tasks, 1 and 2 workers
    python -m benchmarks.experts --grid 5 --tasks pick_can

For each task: expert success over the task's default placement grid, mean episode length, env
steps/s with the camera rendering (expert in the loop, one process), and episodes/min with 1 and
with N worker processes (one env per process, spawn start; env build time excluded and reported
separately). Episode i of the grid always uses seed i, so every worker count sees the same episodes.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

import numpy as np

TASK_NAMES = ("pick_can", "open_drawer", "close_drawer")


def _run_shard(task: str, image_size: int, shard: list[tuple[int, float, float]]) -> dict:
    """Worker body: build one env, run the expert on each (seed, x, y); returns per-episode results."""
    from envs import make_task
    from policies.experts import make_expert, run_expert_episode

    start = time.perf_counter()
    env = make_task(task, image_size=image_size)
    expert = make_expert(task)
    built = time.perf_counter()
    results = [run_expert_episode(env, expert, (x, y), seed=seed) for seed, x, y in shard]
    done = time.perf_counter()
    env.close()
    return {"results": results, "make_s": built - start, "episodes_s": done - built}


def benchmark_task(task: str, grid: int, image_size: int, workers: int) -> dict:
    """Run the grid split over `workers` spawned processes; returns the measured figures."""
    from envs import placement_box
    from envs.placement import grid_positions

    x_range, y_range = placement_box(task)
    points = grid_positions(grid, grid, x_range, y_range)
    episodes = [(i, float(x), float(y)) for i, (x, y) in enumerate(points)]
    shards = [episodes[w::workers] for w in range(workers)]
    with mp.get_context("spawn").Pool(workers) as pool:
        outs = pool.starmap(_run_shard, [(task, image_size, shard) for shard in shards])
    successes = [ok for out in outs for ok, _ in out["results"]]
    lengths = [n for out in outs for _, n in out["results"]]
    parallel_s = max(out["episodes_s"] for out in outs)
    return {
        "task": task,
        "workers": workers,
        "episodes": len(successes),
        "success_rate": float(np.mean(successes)),
        "mean_length": float(np.mean(lengths)),
        "steps_per_s": sum(lengths) / parallel_s,
        "episodes_per_min": 60.0 * len(successes) / parallel_s,
        "make_s": max(out["make_s"] for out in outs),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=int, default=10, help="grid points per axis (default 10: 100 episodes)")
    parser.add_argument("--tasks", nargs="+", default=list(TASK_NAMES), choices=TASK_NAMES)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    args = parser.parse_args(argv)

    header = f"{'task':<13} {'workers':>7} {'episodes':>8} {'success':>8} {'mean len':>8} {'steps/s':>8} {'eps/min':>8} {'make s':>7}"
    print(f"image {args.image_size}x{args.image_size}, grid {args.grid}x{args.grid}, rendering on")
    print(header)
    for task in args.tasks:
        for workers in args.workers:
            r = benchmark_task(task, args.grid, args.image_size, workers)
            print(
                f"{r['task']:<13} {r['workers']:>7} {r['episodes']:>8} {r['success_rate']:>8.1%} "
                f"{r['mean_length']:>8.1f} {r['steps_per_s']:>8.1f} {r['episodes_per_min']:>8.1f} {r['make_s']:>7.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
