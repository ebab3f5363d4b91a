"""mp4 videos of recorded episodes, from the images stored in a dataset (no re-rendering)."""

from __future__ import annotations

from pathlib import Path

from data_collection.dataset import DemoDataset


def write_episode_videos(dataset: DemoDataset, out_dir: Path, num_episodes: int, fps: int = 10) -> list[Path]:
    """Write the first `num_episodes` kept episodes (cell order) as `<out_dir>/cell_<c>_seed_<s>.mp4`.

    One frame per recorded step (the image the expert acted on). Needs imageio + imageio-ffmpeg.
    """
    from vla_razor.video import write_video

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for row, steps in dataset.episodes():
        if len(written) >= num_episodes:
            break
        path = out_dir / f"cell_{row['cell']:04d}_seed_{row['seed']}.mp4"
        frames = steps["observation", "image"].numpy()  # [T, H, W, 3] uint8
        write_video(path, frames, fps)
        written.append(path)
    return written
