"""Fake `simpler_env`: the task table and `make` with the real one's behaviour (see ../README.md)."""

import warnings

import gymnasium as gym

import mani_skill2_real2sim.envs  # noqa: F401  (registers the env ids, as the real package does)

ENVIRONMENT_MAP = {
    "google_robot_pick_coke_can": ("GraspSingleOpenedCokeCanInScene-v0", {}),
    "google_robot_pick_horizontal_coke_can": ("GraspSingleOpenedCokeCanInScene-v0", {"lr_switch": True}),
    "google_robot_pick_vertical_coke_can": ("GraspSingleOpenedCokeCanInScene-v0", {"laid_vertically": True}),
    "google_robot_pick_standing_coke_can": ("GraspSingleOpenedCokeCanInScene-v0", {"upright": True}),
    "google_robot_open_drawer": ("OpenDrawerCustomInScene-v0", {}),
    "google_robot_open_top_drawer": ("OpenTopDrawerCustomInScene-v0", {}),
    "google_robot_open_middle_drawer": ("OpenMiddleDrawerCustomInScene-v0", {}),
    "google_robot_open_bottom_drawer": ("OpenBottomDrawerCustomInScene-v0", {}),
    "google_robot_close_drawer": ("CloseDrawerCustomInScene-v0", {}),
    "google_robot_close_top_drawer": ("CloseTopDrawerCustomInScene-v0", {}),
    "google_robot_close_middle_drawer": ("CloseMiddleDrawerCustomInScene-v0", {}),
    "google_robot_close_bottom_drawer": ("CloseBottomDrawerCustomInScene-v0", {}),
}
ENVIRONMENTS = list(ENVIRONMENT_MAP)


def make(task_name, **kwargs):
    """Like the real one: writes into the shared ENVIRONMENT_MAP dict, so kwargs leak into later calls."""
    assert task_name in ENVIRONMENTS, f"Task {task_name} is not supported. Environments: \n {ENVIRONMENTS}"
    env_name, env_kwargs = ENVIRONMENT_MAP[task_name]
    env_kwargs["obs_mode"] = "rgbd"
    env_kwargs["prepackaged_config"] = True
    for key, value in kwargs.items():
        if key in env_kwargs:
            warnings.warn(f"default value [{env_kwargs[key]}] for Key {key} changes to value [{value}]")
        env_kwargs[key] = value
    return gym.make(env_name, **env_kwargs)
