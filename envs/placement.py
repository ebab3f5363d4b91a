"""Object placements over a table box: a regular training grid and uniformly sampled eval points.

Pure NumPy (no simulator import), so data collection and evaluation can plan placements anywhere.
Feed a row to a task as `env.reset(seed=s, options={"obj_init_xy": xy})`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _check_range(name: str, value: Sequence[float]) -> tuple[float, float]:
    if len(value) != 2 or not value[0] <= value[1]:
        raise ValueError(f"{name} must be (low, high) with low <= high, got {tuple(value)}")
    return float(value[0]), float(value[1])


def grid_positions(
    n_x: int = 10,
    n_y: int = 10,
    x_range: Sequence[float] = (-0.1, 0.1),
    y_range: Sequence[float] = (-0.1, 0.1),
) -> np.ndarray:
    """[n_x * n_y, 2] evenly spaced (x, y) including the box corners, x-major order.

    A 1-point axis sits at the middle of its range.
    """
    if n_x < 1 or n_y < 1:
        raise ValueError(f"grid needs at least one point per axis, got n_x={n_x}, n_y={n_y}")
    x_lo, x_hi = _check_range("x_range", x_range)
    y_lo, y_hi = _check_range("y_range", y_range)
    xs = np.linspace(x_lo, x_hi, n_x) if n_x > 1 else np.array([(x_lo + x_hi) / 2])
    ys = np.linspace(y_lo, y_hi, n_y) if n_y > 1 else np.array([(y_lo + y_hi) / 2])
    gx, gy = np.meshgrid(xs, ys, indexing="ij")  # [n_x, n_y] each
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def eval_positions(
    n: int = 100,
    x_range: Sequence[float] = (-0.1, 0.1),
    y_range: Sequence[float] = (-0.1, 0.1),
    seed: int = 0,
) -> np.ndarray:
    """[n, 2] (x, y) uniform in the box, from a private generator: same seed, same points."""
    if n < 1:
        raise ValueError(f"n must be a positive number of placements, got {n}")
    x_lo, x_hi = _check_range("x_range", x_range)
    y_lo, y_hi = _check_range("y_range", y_range)
    rng = np.random.default_rng(seed)
    unit = rng.random((n, 2))
    return np.column_stack([x_lo + unit[:, 0] * (x_hi - x_lo), y_lo + unit[:, 1] * (y_hi - y_lo)])
