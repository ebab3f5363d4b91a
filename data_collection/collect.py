"""Roll an expert (scripted, or RT-1 in SimplerEnv tasks) over a placement grid and record successful episodes, one shard per cell.

`collect_cells` is the worker loop (one env per process); `run_workers` runs it in-process for one
worker, or in `num_workers` spawned processes that each take a disjoint set of cells and write their
own shards, reporting progress events to the parent through a queue.

Episode seeds depend only on (base seed, cell, attempt) (`episode_seed`), and a cell's shard is
written only when the cell is finished, so a rerun after a crash recollects exactly the missing
cells and reproduces the episodes the crashed run would have written.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data_collection.dataset import Episode, write_shard

log = logging.getLogger(__name__)

# episode_seed packs (cell, attempt) into one integer; these bound each field.
MAX_ATTEMPTS_PER_CELL = 10_000
MAX_CELLS = 1_000


@dataclass
class WorkerSpec:
    """Everything a worker process needs (picklable)."""

    root: str
    task: str
    image_size: int
    positions: list[tuple[float, float]]  # grid cell -> (x, y), world metres
    per_cell: int  # successes to keep per cell
    max_failures_per_cell: int  # give up on a cell after this many failed attempts
    seed: int
    max_episode_steps: int | None = None
    expert: str = "scripted"  # "scripted" (embedded tasks) | "rt1" (SimplerEnv tasks)
    rt1_checkpoint: str | None = None
    env_kwargs: dict = field(default_factory=dict)  # extra make_task kwargs (e.g. shader for SimplerEnv)


def episode_seed(seed: int, cell: int, attempt: int) -> int:
    """Reset seed of attempt `attempt` in cell `cell`; unique per (seed, cell, attempt)."""
    if not 0 <= cell < MAX_CELLS or not 0 <= attempt < MAX_ATTEMPTS_PER_CELL:
        raise ValueError(f"cell {cell} / attempt {attempt} outside [0, {MAX_CELLS}) / [0, {MAX_ATTEMPTS_PER_CELL})")
    return (seed * MAX_CELLS + cell) * MAX_ATTEMPTS_PER_CELL + attempt


def record_episode(env, expert, tokenizer, cell: int, xy, seed: int, attempt: int) -> Episode:
    """Run `expert` in `env` from placement `xy` with reset seed `seed`, recording every step.

    Step t stores the observation the expert acted on and its env action (so T observations, T actions;
    the observation after the last action is not kept). Tokens encode the *policy* actions
    (`env.to_policy_actions`: the same for embedded tasks, OpenVLA's fractal labels for SimplerEnv).
    """
    obs, info = env.reset(seed=seed, options={"obj_init_xy": [float(v) for v in xy]})
    expert.reset(env)
    images, states, actions = [], [], []
    while True:
        action = np.asarray(expert.act(env, obs), dtype=np.float32)
        images.append(obs["image"])
        states.append(obs["state"])
        actions.append(action)
        obs, _, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            break
    actions_t = torch.from_numpy(np.stack(actions))  # [T, 7]
    return Episode(
        cell=cell, x=float(xy[0]), y=float(xy[1]), seed=seed, attempt=attempt, success=bool(info["success"]),
        images=torch.from_numpy(np.stack(images)),  # [T, H, W, 3]
        states=torch.from_numpy(np.stack(states)),  # [T, D] (the task's state layout)
        actions=actions_t,
        tokens=tokenizer.encode(torch.from_numpy(env.to_policy_actions(actions_t.numpy()))).to(torch.int64),  # [T, 7]
    )


def build_expert(spec: WorkerSpec):
    """The expert a worker rolls: the task's scripted one, or RT-1 from `spec.rt1_checkpoint`."""
    if spec.expert == "rt1":
        from policies.rt1_expert import RT1Expert

        return RT1Expert(spec.rt1_checkpoint)
    from policies.experts import make_expert

    return make_expert(spec.task)


def collect_cells(spec: WorkerSpec, cells: list[int], report: Callable[[tuple], None]) -> None:
    """Collect `cells` one after another, writing each cell's shard as soon as it is done.

    `report` receives ("episode", success, steps) after every attempt and ("cell", cell, kept,
    attempts) after every shard.
    """
    from envs import make_task
    from vla_razor.action_tokens import make_action_tokenizer

    expert = build_expert(spec)
    tokenizer = make_action_tokenizer()  # window ids in [0, 256)
    for cell in cells:
        # A fresh env per cell: the CPU sim carries sub-millimetre state across resets (measured:
        # the same seed after other episodes drifts ~0.5 mm and can change the length by a step), so
        # only a fresh env makes a cell's shard independent of which cells ran before it (worker
        # split, resume). Costs one 0.3-0.5 s make per cell after the process's first.
        env = make_task(spec.task, image_size=spec.image_size, max_episode_steps=spec.max_episode_steps,
                        **spec.env_kwargs)
        try:
            kept: list[Episode] = []
            attempt = failures = 0
            while len(kept) < spec.per_cell and failures < spec.max_failures_per_cell:
                ep = record_episode(env, expert, tokenizer, cell, spec.positions[cell],
                                    episode_seed(spec.seed, cell, attempt), attempt)
                attempt += 1
                if ep.success:
                    kept.append(ep)
                else:
                    failures += 1
                report(("episode", ep.success, ep.length))
            if len(kept) < spec.per_cell:
                log.warning("cell %d: only %d/%d successes after %d failures", cell, len(kept), spec.per_cell,
                            failures)
            write_shard(Path(spec.root), cell, kept, attempt)
            report(("cell", cell, len(kept), attempt))
        finally:
            env.close()


def _worker_main(spec: WorkerSpec, cells: list[int], events) -> None:
    try:
        collect_cells(spec, cells, events.put)
        events.put(("done",))
    except BaseException:  # noqa: BLE001 - forwarded to the parent, which raises
        events.put(("error", traceback.format_exc()))


def run_workers(spec: WorkerSpec, cells: list[int], num_workers: int,
                on_event: Callable[[tuple], None]) -> None:
    """Collect `cells` with `num_workers` env processes (1: in this process); `on_event` gets progress."""
    if num_workers <= 1:
        collect_cells(spec, cells, on_event)
        return
    # spawn, not fork: SAPIEN / Vulkan state must not be inherited by children.
    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    chunks = [cells[i::num_workers] for i in range(num_workers)]
    procs = [ctx.Process(target=_worker_main, args=(spec, chunk, events), daemon=True) for chunk in chunks if chunk]
    for proc in procs:
        proc.start()
    running = len(procs)
    try:
        while running:
            try:
                event = events.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"collection worker pid {dead[0].pid} died with exit code {dead[0].exitcode}")
                continue
            if event[0] == "done":
                running -= 1
            elif event[0] == "error":
                raise RuntimeError(f"a collection worker failed:\n{event[1]}")
            else:
                on_event(event)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join(timeout=10)


class Throughput:
    """Counts attempts, successes and steps for the progress bar."""

    def __init__(self):
        self.attempts = self.successes = self.steps = 0
        self.started = time.time()

    def add(self, success: bool, steps: int) -> None:
        self.attempts += 1
        self.successes += int(success)
        self.steps += steps

    @property
    def steps_per_s(self) -> float:
        return self.steps / max(time.time() - self.started, 1e-9)
