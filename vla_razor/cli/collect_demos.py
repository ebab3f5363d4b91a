"""`collect-demos`: expert demonstrations over a placement grid, stored as memmap shards.

    collect-demos env=pick_can expert=scripted per_cell=10            # 10x10 grid, 1000 episodes
    collect-demos env=open_drawer grid=3 per_cell=2 out_dir=/tmp/d   # a small one
    collect-demos ... video=true video_episodes=4                    # + mp4s in <out_dir>/videos
    collect-demos env=simpler_pick_coke_can expert=rt1 rt1_checkpoint=ckpts/rt_1_tf_trained_for_000400120
    demos-info /tmp/d                                                # what a dataset holds

For every grid cell the expert is rolled until `per_cell` successes (failures are dropped and
counted). Resumable: finished cells are shards on disk; a rerun with the same settings collects
only the missing cells (a killed run loses at most the cells in progress, never duplicates).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore

from data_collection.collect import MAX_ATTEMPTS_PER_CELL, MAX_CELLS, Throughput, WorkerSpec, run_workers
from data_collection.dataset import (
    DatasetError,
    DemoDataset,
    read_metadata,
    remove_partial_shards,
    shard_cells,
    write_metadata,
)
from envs.registry import require_simulator
from vla_razor.cli.common import run_config

log = logging.getLogger("collect-demos")

EXPERTS = ("scripted", "rt1")  # scripted: embedded tasks; rt1: SimplerEnv tasks (the paper's demonstrator)
# Settings that define a dataset's content: a rerun must match them to resume into the same folder.
IDENTITY_FIELDS = ("task", "expert", "image_size", "grid", "per_cell", "max_failures_per_cell", "seed",
                   "max_episode_steps", "tokenizer", "shader", "rt1_checkpoint")
# What "action" holds and what the tokens encode, per task family (written into metadata.json).
ACTION_DOC = {
    "embedded": ("pd_ee_delta_pose: xyz x 0.1 m, rotation x 0.1 rad, gripper +1 open / -1 closed",
                 "the actions themselves (already in [-1, 1])"),
    "simpler": ("SimplerEnv Google robot (RT-1 convention): xyz delta m, axis-angle delta rad, relative gripper "
                "+1 close / -1 open",
                "OpenVLA labels (envs.simpler_actions.simpler_to_policy_actions): xyz and roll-pitch-yaw normalized "
                "with fractal20220817_data q01/q99, absolute gripper 1 open / 0 closed"),
}


@dataclass
class CollectDemosConfig:
    env: str = "pick_can"           # task name (envs.known_tasks())
    expert: str = "scripted"        # scripted (embedded tasks) | rt1 (simpler_pick_coke_can*)
    rt1_checkpoint: str | None = None  # expert=rt1: folder of an RT-1 SavedModel (SimplerEnv README)
    # SimplerEnv tasks: default (SimplerEnv's choice) | ibl (rasterized, fast) | rt (ray traced, needs an RTX GPU)
    shader: str = "default"
    out_dir: str = "runs/demos/${env}"
    grid: int = 10                  # cells per axis over the task's placement box
    grid_y: int | None = None       # cells along y if different from `grid`
    per_cell: int = 10              # successful episodes kept per cell
    max_failures_per_cell: int = 10  # stop trying a cell after this many failures (logged)
    image_size: int = 128           # square camera images, pixels
    max_episode_steps: int | None = None  # None: the task's own limit
    seed: int = 0                   # base of the per-(cell, attempt) reset seeds
    # Env processes. 1 by default: on a 2-core CPU machine one process already keeps both cores
    # busy with software Vulkan rendering (measured: 2 workers were no faster than 1).
    num_workers: int = 1
    progress: bool = True           # tqdm bar on stderr
    video: bool = False             # write mp4s of the first `video_episodes` episodes
    video_episodes: int = 4
    video_fps: int = 10


ConfigStore.instance().store(name="collect_demos_schema", node=CollectDemosConfig)


def validate(cfg: CollectDemosConfig) -> None:
    from envs import known_tasks
    from envs.registry import is_simpler_task
    from envs.simpler import SHADERS, simpler_task

    if cfg.env not in known_tasks():
        raise ValueError(f"env={cfg.env!r} is not a task; known: {known_tasks()}")
    if cfg.expert not in EXPERTS:
        raise ValueError(f"expert={cfg.expert!r} is not supported; known: {list(EXPERTS)}")
    simpler = is_simpler_task(cfg.env)
    if simpler and simpler_task(cfg.env).kind != "pick":
        raise ValueError(f"env={cfg.env} has a fixed cabinet and no placement grid to collect over; collect "
                         f"SimplerEnv demos on simpler_pick_coke_can (or its _horizontal/_vertical/_standing variants)")
    if simpler and cfg.expert != "rt1":
        raise ValueError(f"expert={cfg.expert} has no {cfg.env} expert; use expert=rt1 rt1_checkpoint=<folder>")
    if not simpler and cfg.expert == "rt1":
        raise ValueError(f"expert=rt1 drives SimplerEnv's Google robot only; env={cfg.env} uses expert=scripted")
    if cfg.expert != "rt1" and cfg.rt1_checkpoint is not None:
        raise ValueError(f"rt1_checkpoint={cfg.rt1_checkpoint!r} is set but expert={cfg.expert}; drop it or use "
                         f"expert=rt1")
    if cfg.expert == "rt1":
        from policies.rt1_expert import check_checkpoint

        check_checkpoint(cfg.rt1_checkpoint)
    if cfg.shader not in SHADERS:
        raise ValueError(f"shader={cfg.shader!r} is not one of {list(SHADERS)}")
    if not simpler and cfg.shader != "default":
        raise ValueError(f"shader={cfg.shader} applies to SimplerEnv tasks only; env={cfg.env} renders with "
                         f"ManiSkill3's default: drop shader=")
    n_y = cfg.grid if cfg.grid_y is None else cfg.grid_y
    if cfg.grid < 1 or n_y < 1 or cfg.grid * n_y > MAX_CELLS:
        raise ValueError(f"grid={cfg.grid} x grid_y={n_y} must give 1..{MAX_CELLS} cells")
    if cfg.per_cell < 1 or cfg.max_failures_per_cell < 0:
        raise ValueError(f"per_cell={cfg.per_cell} must be >= 1 and max_failures_per_cell="
                         f"{cfg.max_failures_per_cell} >= 0")
    if cfg.per_cell + cfg.max_failures_per_cell > MAX_ATTEMPTS_PER_CELL:
        raise ValueError(f"per_cell + max_failures_per_cell = {cfg.per_cell + cfg.max_failures_per_cell} "
                         f"exceeds {MAX_ATTEMPTS_PER_CELL} attempts per cell")
    if cfg.num_workers < 1:
        raise ValueError(f"num_workers={cfg.num_workers} must be >= 1 (one env process each)")
    if cfg.video and cfg.video_episodes < 1:
        raise ValueError(f"video=true needs video_episodes >= 1, got {cfg.video_episodes}")


def build_metadata(cfg: CollectDemosConfig) -> dict:
    """The dataset's description: identity fields (checked on resume) and descriptive fields."""
    from envs import placement_box, state_layout, task_instruction
    from envs.placement import grid_positions
    from envs.registry import is_simpler_task
    from vla_razor.action_tokens import make_action_tokenizer

    n_y = cfg.grid if cfg.grid_y is None else cfg.grid_y
    x_range, y_range = placement_box(cfg.env)
    positions = grid_positions(cfg.grid, n_y, x_range, y_range)  # [n_x * n_y, 2], x-major
    tok = make_action_tokenizer()
    simpler = is_simpler_task(cfg.env)
    return {
        "task": cfg.env,
        "expert": cfg.expert,
        # the checkpoint's folder name identifies the demonstrator; its location may change between runs
        "rt1_checkpoint": None if cfg.rt1_checkpoint is None else Path(cfg.rt1_checkpoint).expanduser().name,
        "shader": cfg.shader if simpler else None,
        "instruction": task_instruction(cfg.env),
        "image_size": cfg.image_size,
        "max_episode_steps": cfg.max_episode_steps,
        "grid": {"n_x": cfg.grid, "n_y": n_y, "x_range": list(x_range), "y_range": list(y_range),
                 "order": "x-major", "positions": positions.tolist()},
        "per_cell": cfg.per_cell,
        "max_failures_per_cell": cfg.max_failures_per_cell,
        "seed": cfg.seed,
        "seed_rule": f"reset seed = (seed * {MAX_CELLS} + cell) * {MAX_ATTEMPTS_PER_CELL} + attempt",
        "tokenizer": {"name": "openvla_vocab_tail", "num_bins": tok.num_bins, "ids": "window",
                      "full_vocab_size": tok.full_vocab_size, "action_low": -1.0, "action_high": 1.0},
        "state_layout": [list(item) for item in state_layout(cfg.env)],
        "action": ACTION_DOC["simpler" if simpler else "embedded"][0],
        "tokens": ACTION_DOC["simpler" if simpler else "embedded"][1],
    }



def check_same_dataset(root: Path, existing: dict, wanted: dict) -> None:
    # .get on both sides: a field a dataset predates reads as None, like a field that does not apply to it
    diff = {k: (existing.get(k), wanted.get(k)) for k in IDENTITY_FIELDS if existing.get(k) != wanted.get(k)}
    if diff:
        parts = ", ".join(f"{k}: folder has {_short(a)}, this run asks {_short(b)}" for k, (a, b) in diff.items())
        raise DatasetError(f"{root} holds a different collection ({parts}); rerun with the folder's settings to "
                           f"resume it, or choose another out_dir")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) < 80 else text[:77] + "..."


def run(cfg: CollectDemosConfig) -> dict:
    validate(cfg)
    require_simulator(cfg.env)
    root = Path(cfg.out_dir)
    started = time.time()
    wanted = build_metadata(cfg)
    if (root / "metadata.json").exists():
        existing = read_metadata(root)
        check_same_dataset(root, existing, wanted)
    elif root.exists() and any(not p.name.startswith(".") for p in root.iterdir()):  # Hydra logs are hidden
        raise DatasetError(f"{root} is not empty and holds no metadata.json: not a vla-razor demos dataset; "
                           f"choose an empty or new out_dir")
    write_metadata(root, {**wanted, "complete": False})
    stale = remove_partial_shards(root)
    if stale:
        log.info("removed %d partial shard(s) left by an interrupted run", stale)

    n_cells = len(wanted["grid"]["positions"])
    done = set(shard_cells(root))
    todo = [c for c in range(n_cells) if c not in done]
    log.info("%s: %d/%d cells already collected, %d to go (%d per cell, %d worker(s))", root, len(done), n_cells,
             len(todo), cfg.per_cell, cfg.num_workers)
    spec = WorkerSpec(root=str(root), task=cfg.env, image_size=cfg.image_size,
                      positions=[tuple(p) for p in wanted["grid"]["positions"]], per_cell=cfg.per_cell,
                      max_failures_per_cell=cfg.max_failures_per_cell, seed=cfg.seed,
                      max_episode_steps=cfg.max_episode_steps, expert=cfg.expert, rt1_checkpoint=cfg.rt1_checkpoint,
                      env_kwargs={"shader": cfg.shader} if wanted["shader"] is not None else {})
    collect_with_progress(spec, todo, n_cells, len(done), cfg)

    dataset = DemoDataset(root)
    summary = dataset.summary()
    per_cell_counts = {str(c): int(dataset.shard(c)["episodes"].batch_size[0]) for c in dataset.cells}
    write_metadata(root, {**wanted, "complete": summary["complete"], "per_cell_counts": per_cell_counts,
                          "episodes": summary["episodes"], "attempts": summary["attempts"],
                          "steps": summary["steps"]})
    if cfg.video:
        from data_collection.video import write_episode_videos

        paths = write_episode_videos(dataset, root / "videos", cfg.video_episodes, fps=cfg.video_fps)
        log.info("wrote %d video(s) to %s", len(paths), root / "videos")
    log.info("done in %.1f s: %d episodes (%d attempts), %d steps, %.1f MB in %s", time.time() - started,
             summary["episodes"], summary["attempts"], summary["steps"], summary["disk_bytes"] / 1e6, root)
    return summary


def collect_with_progress(spec: WorkerSpec, todo: list[int], n_cells: int, n_done: int,
                          cfg: CollectDemosConfig) -> None:
    from tqdm import tqdm

    counts = Throughput()
    bar = tqdm(total=len(todo) * cfg.per_cell, unit="demo", disable=not cfg.progress or not todo,
               desc=f"{cfg.env} cells {n_done}/{n_cells}", dynamic_ncols=True)
    cells_done = n_done

    def on_event(event: tuple) -> None:
        nonlocal cells_done
        if event[0] == "episode":
            _, success, steps = event
            counts.add(success, steps)
            bar.update(int(success))
            bar.set_postfix_str(f"success {counts.successes}/{counts.attempts} attempts, "
                                f"{counts.steps_per_s:.1f} steps/s")
        elif event[0] == "cell":
            cells_done += 1
            bar.set_description(f"{cfg.env} cells {cells_done}/{n_cells}")

    try:
        run_workers(spec, todo, cfg.num_workers, on_event)
    finally:
        bar.close()


@hydra.main(config_path="../../configs", config_name="collect_demos", version_base="1.3")
def main(cfg) -> None:
    run_config("collect-demos", run, cfg)


if __name__ == "__main__":
    main()
