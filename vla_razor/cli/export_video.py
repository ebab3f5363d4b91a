"""`export-video`: rollouts of any policy file as per-episode clips and one tiled grid video.

    export-video policy_file=runs/main/reinforce/policy.pt             # pick-can, 4 episodes
    export-video policy_file=... task=open_drawer episodes=9 out=runs/videos/open.gif

Each clip carries the instruction and the episode's outcome (green border: success, red: failure).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
from hydra.core.config_store import ConfigStore

from vla_razor.forgetting import EvalConfig, TaskSet, success_on
from vla_razor.cli.common import run_config

log = logging.getLogger("export-video")


@dataclass
class ExportVideoConfig:
    policy_file: str = "???"        # not `policy`, which Hydra reads as the policy/ config group
    task: str = ""                  # default: env.new_task
    episodes: int = 4
    out: str = "runs/videos/rollouts.mp4"   # the grid; per-episode clips go beside it (<stem>_ep<i><suffix>)
    fps: int = 10
    scale: int = 2                  # nearest-neighbour upscale of the sim frames
    per_episode: bool = True
    env: TaskSet = field(default_factory=TaskSet)
    eval: EvalConfig = field(default_factory=EvalConfig)
    threads: int = 0
    progress: bool = True


ConfigStore.instance().store(name="export_video_schema", node=ExportVideoConfig)


def export(cfg: ExportVideoConfig) -> list[Path]:
    from policies.vla_factory import load_policy
    from vla_razor.video import annotate, tile, upscale, write_video

    if not Path(cfg.policy_file).exists():
        raise FileNotFoundError(f"policy_file={cfg.policy_file} does not exist; pass the policy.pt of a train-vla run")
    if cfg.episodes < 1:
        raise ValueError(f"episodes={cfg.episodes} must be >= 1")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    task = cfg.task or cfg.env.new_task
    policy, _, _ = load_policy(cfg.policy_file)
    result = success_on({"policy": policy}, task, cfg.episodes, cfg.env, cfg.eval, keep_frames=True,
                        progress=cfg.progress)["policy"]
    instruction = task.replace("_", " ")
    clips = [annotate(upscale(frames, cfg.scale), f"{instruction} | ep {i} | {'success' if ok else 'failure'}", ok)
             for i, (frames, ok) in enumerate(zip(result.frames, result.success))]
    out = Path(cfg.out)
    written = [write_video(out, tile(clips), cfg.fps)]
    if cfg.per_episode:
        written += [write_video(out.with_name(f"{out.stem}_ep{i}{out.suffix}"), clip, cfg.fps)
                    for i, clip in enumerate(clips)]
    log.info("success %d/%d; wrote %s", int(result.success.sum()), len(result.success), ", ".join(map(str, written)))
    return written


@hydra.main(config_path="../../configs/vla", config_name="export_video", version_base="1.3")
def _hydra_main(cfg) -> None:
    run_config("export-video", export, cfg)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
