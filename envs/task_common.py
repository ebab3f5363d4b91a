"""Pieces every vla-razor ManiSkill3 task shares: camera, reset-option parsing, state layout.

Kept here (not in a base class) so each task file still reads top to bottom as one ManiSkill3 task.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import sapien
import torch

from mani_skill.sensors.camera import CameraConfig
from mani_skill.utils import sapien_utils

# Reset option that places the task's object (can, or cabinet) at a given table (x, y) in metres.
OBJ_INIT_XY = "obj_init_xy"

# Panda base sits here in every task (ManiSkill's table-scene convention); world axes = base axes.
ROBOT_BASE_XYZ = (-0.615, 0.0, 0.0)


def task_camera(
    eye: Sequence[float], target: Sequence[float], fov: float, image_size: int
) -> CameraConfig:
    """One square RGB camera named "base_camera" looking from `eye` at `target` (world, metres)."""
    if image_size <= 0:
        raise ValueError(f"image_size must be a positive pixel count, got {image_size}")
    pose = sapien_utils.look_at(eye=list(eye), target=list(target))
    return CameraConfig("base_camera", pose, image_size, image_size, fov, 0.01, 100)


def object_xy_for_reset(
    options: dict | None,
    batch: int,
    x_range: tuple[float, float],
    y_range: tuple[float, float],
) -> torch.Tensor:
    """[batch, 2] object xy: from options["obj_init_xy"] when given, else uniform in the box.

    The uniform draw uses torch's global RNG, which ManiSkill seeds from `reset(seed=...)`, so an
    unplaced reset is still deterministic for a given seed.
    """
    requested = (options or {}).get(OBJ_INIT_XY)
    if requested is None:
        lo = torch.tensor([x_range[0], y_range[0]])
        hi = torch.tensor([x_range[1], y_range[1]])
        return lo + torch.rand((batch, 2)) * (hi - lo)
    xy = torch.as_tensor(np.asarray(requested, dtype=np.float32)).reshape(-1, 2)
    if xy.shape[0] not in (1, batch):
        raise ValueError(
            f"options['{OBJ_INIT_XY}'] must hold 1 or {batch} (x, y) pairs, got shape {tuple(xy.shape)}"
        )
    return xy.expand(batch, 2).clone()


class TaskCameraMixin:
    """Plumbing every vla-razor ManiSkill3 task shares; mix in before ``BaseEnv``.

    Gives the ``image_size`` constructor argument, one square task camera built from the class attributes
    ``camera_eye`` / ``camera_target`` / ``camera_fov`` (plus a 512^2 one for human rendering), and the Panda
    base at ``ROBOT_BASE_XYZ``.
    """

    def __init__(self, *args, robot_uids="panda", image_size: int = 128, **kwargs):
        self.image_size = image_size
        super().__init__(*args, robot_uids=robot_uids, **kwargs)

    @property
    def _default_sensor_configs(self):
        return [task_camera(self.camera_eye, self.camera_target, self.camera_fov, self.image_size)]

    @property
    def _default_human_render_camera_configs(self):
        return task_camera(self.camera_eye, self.camera_target, self.camera_fov, 512)

    def _load_agent(self, options: dict):
        super()._load_agent(options, sapien.Pose(p=list(ROBOT_BASE_XYZ)))
