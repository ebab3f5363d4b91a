"""Task names → env ids, and `make_task`, the one way callers build a task env.

Two families share one interface: the embedded ManiSkill3 tasks (`TASKS`) and SimplerEnv's
Google-robot tasks (`envs.simpler.SIMPLER_TASKS`, names starting with "simpler_"). Simulator (and
gymnasium) imports happen inside the functions, so `import envs` stays cheap and works without
mani_skill or SimplerEnv installed.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from envs import simpler

if TYPE_CHECKING:
    from envs.observation import TaskObservation


@dataclass(frozen=True)
class TaskSpec:
    name: str
    module: str  # imported to register the env id
    env_id: str
    env_class: str
    x_range_attr: str  # class attributes holding the default placement box
    y_range_attr: str


TASKS: dict[str, TaskSpec] = {
    "pick_can": TaskSpec("pick_can", "envs.pick_can", "VlaRazorPickCan-v1", "PickCanEnv",
                         "can_x_range", "can_y_range"),
    "open_drawer": TaskSpec("open_drawer", "envs.open_drawer", "VlaRazorOpenDrawer-v1", "OpenDrawerEnv",
                            "cabinet_x_range", "cabinet_y_range"),
    "close_drawer": TaskSpec("close_drawer", "envs.close_drawer", "VlaRazorCloseDrawer-v1",
                             "CloseDrawerEnv", "cabinet_x_range", "cabinet_y_range"),
}

# Layout of obs["state"]; every task has the same 19 entries in this order.
STATE_LAYOUT: tuple[tuple[str, int], ...] = (
    ("qpos", 9),  # 7 Panda arm joints (rad) + 2 finger joints (m)
    ("tcp_pos", 3),  # world metres
    ("tcp_quat", 4),  # wxyz
    ("obj_pos", 3),  # privileged: can centre or drawer-handle bar centre, world metres
)
STATE_DIM = sum(size for _, size in STATE_LAYOUT)


def known_tasks() -> list[str]:
    """Every task name `make_task` accepts: the embedded tasks, then SimplerEnv's."""
    return sorted(TASKS) + list(simpler.SIMPLER_TASKS)


def is_simpler_task(name: str) -> bool:
    return name in simpler.SIMPLER_TASKS


def task_spec(name: str) -> TaskSpec:
    """Spec of an embedded (ManiSkill3) task."""
    if name not in TASKS:
        hint = " (a SimplerEnv task: it has no ManiSkill3 spec)" if is_simpler_task(name) else ""
        raise ValueError(f"unknown task {name!r}{hint}; known tasks: {', '.join(known_tasks())}")
    return TASKS[name]


def task_class(name: str):
    """The ManiSkill env class of a task (imports mani_skill)."""
    spec = task_spec(name)
    return getattr(importlib.import_module(spec.module), spec.env_class)


def state_layout(name: str) -> tuple[tuple[str, int], ...]:
    """Layout of the task's obs["state"]."""
    if is_simpler_task(name):
        return simpler.SIMPLER_STATE_LAYOUT
    task_spec(name)
    return STATE_LAYOUT


def task_instruction(name: str) -> str | None:
    """The task's language instruction; None when it is drawn per episode (generic SimplerEnv drawers)."""
    if is_simpler_task(name):
        return simpler.simpler_task(name).instruction
    return task_class(name).instruction


def placement_box(name: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """Default (x_range, y_range) of the task's object (can or cabinet), world metres."""
    if is_simpler_task(name):
        return simpler.placement_box(name)
    spec = task_spec(name)
    cls = task_class(name)
    return tuple(getattr(cls, spec.x_range_attr)), tuple(getattr(cls, spec.y_range_attr))


def require_simulator(name: str) -> None:
    """Raise, in this process, the one-line error that making task `name` would raise in an env worker, where it
    would come back buried in a traceback: no usable Vulkan device for SAPIEN, or SimplerEnv not installed."""
    if is_simpler_task(name):
        simpler.require_simpler()
    else:
        from envs.vulkan import require_vulkan

        require_vulkan()


def default_render_backend() -> str:
    """SAPIEN's renderer: the CUDA one where torch sees a GPU, else the CPU (Vulkan lavapipe) one."""
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def make_task(
    name: str,
    image_size: int = 128,
    render_images: bool = True,
    max_episode_steps: int | None = None,
    **env_kwargs,
) -> TaskObservation:
    """One CPU env of task `name` (see `known_tasks()`).

    SimplerEnv tasks ("simpler_*") are built by `envs.simpler.make_simpler_task` (their extra kwargs:
    shader, urdf_version, station; actions in SimplerEnv's convention). For the embedded tasks:

    Action: 7-D pd_ee_delta_pose ([-1, 1]^7: xyz × 0.1 m, rotation × 0.1 rad, gripper +1 open /
    −1 closed). Reward: success as 0/1. Episodes terminate on success and truncate at the task's
    step limit (or `max_episode_steps`). Place the object with
    `reset(seed=s, options={"obj_init_xy": [x, y]})`. Raises VulkanUnavailableError when SAPIEN
    has no usable Vulkan device.
    """
    if is_simpler_task(name):
        return simpler.make_simpler_task(name, image_size=image_size, render_images=render_images,
                                         max_episode_steps=max_episode_steps, **env_kwargs)
    spec = task_spec(name)
    import gymnasium as gym

    from envs.observation import VlaObservation
    from envs.vulkan import require_vulkan

    require_vulkan()
    importlib.import_module(spec.module)
    from mani_skill.utils.wrappers.gymnasium import CPUGymWrapper

    if max_episode_steps is not None:
        env_kwargs["max_episode_steps"] = max_episode_steps
    # ManiSkill asks for a CUDA renderer by default and warns on every env made without one; say "cpu" up front
    env_kwargs.setdefault("render_backend", default_render_backend())
    env = gym.make(
        spec.env_id,
        obs_mode="rgb" if render_images else "state_dict",
        control_mode="pd_ee_delta_pose",
        reward_mode="sparse",
        sim_backend="physx_cpu",
        image_size=image_size,
        **env_kwargs,
    )
    return VlaObservation(CPUGymWrapper(env), render_images=render_images)
