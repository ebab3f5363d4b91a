"""Rollout videos: per-episode clips and a tiled grid, with the instruction and the outcome drawn on the frames.

Frames are uint8 ``[T, H, W, 3]``. ``.mp4`` goes through imageio-ffmpeg (bundled binary, works offline), ``.gif``
through Pillow. Episodes of different lengths are tiled by holding each one's last frame.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

SUCCESS_COLOUR = (40, 200, 60)
FAILURE_COLOUR = (220, 50, 40)


def upscale(frames: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement: 128-pixel sim frames are too small to read text on."""
    return frames if factor <= 1 else frames.repeat(factor, axis=1).repeat(factor, axis=2)


def annotate(frames: np.ndarray, caption: str, success: bool | None) -> np.ndarray:
    """Draw ``caption`` on a dark band at the top and, when known, a green/red border for success/failure."""
    from PIL import Image, ImageDraw

    out = []
    for frame in frames:
        image = Image.fromarray(frame)
        draw = ImageDraw.Draw(image)
        draw.rectangle([0, 0, image.width, 13], fill=(0, 0, 0))
        draw.text((3, 1), caption, fill=(255, 255, 255))
        if success is not None:
            colour = SUCCESS_COLOUR if success else FAILURE_COLOUR
            draw.rectangle([0, 0, image.width - 1, image.height - 1], outline=colour, width=3)
        out.append(np.asarray(image))
    return np.stack(out)


def tile(clips: Sequence[np.ndarray], columns: int | None = None) -> np.ndarray:
    """Clips ``[T_i, H, W, 3]`` -> one clip ``[max T, rows * H, columns * W, 3]`` (short clips hold their end)."""
    if not clips:
        raise ValueError("no clips to tile")
    columns = columns or int(np.ceil(np.sqrt(len(clips))))
    rows = int(np.ceil(len(clips) / columns))
    length = max(len(c) for c in clips)
    height, width = clips[0].shape[1:3]
    grid = np.zeros((length, rows * height, columns * width, 3), dtype=np.uint8)
    for i, clip in enumerate(clips):
        r, c = divmod(i, columns)
        padded = np.concatenate([clip, np.repeat(clip[-1:], length - len(clip), axis=0)])
        grid[:, r * height:(r + 1) * height, c * width:(c + 1) * width] = padded
    return grid


def write_video(path: str | Path, frames: np.ndarray, fps: int = 10) -> Path:
    """Write ``frames`` to ``path``; the extension picks the format (.mp4 or .gif)."""
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gif":
        imageio.mimwrite(path, list(frames), duration=1000 / fps, loop=0)
    elif path.suffix == ".mp4":
        # macro_block_size=1 keeps any frame size instead of resizing to a multiple of 16
        imageio.mimwrite(path, list(frames), fps=fps, codec="libx264", macro_block_size=1)
    else:
        raise ValueError(f"video path {path} must end in .mp4 or .gif")
    return path
