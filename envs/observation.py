"""Uniform observation for every vla-razor task: {"image": uint8 [H, W, 3], "state": float32 [D]}.

`TaskObservation` holds what every task wrapper shares (bool success, float reward, the step limit, the
policy <-> env action maps); `VlaObservation` adapts the embedded ManiSkill3 tasks (D = 19, envs.STATE_LAYOUT)
and `SimplerObservation` SimplerEnv's Google-robot tasks (D = 18, envs.simpler.SIMPLER_STATE_LAYOUT).
"""

from __future__ import annotations

from collections.abc import Callable

import gymnasium as gym
import numpy as np

from envs.registry import STATE_DIM


class IdentityActions:
    """Policy -> env action map of a task whose env takes policy actions as they are."""

    def reset(self) -> None:
        pass

    def __call__(self, action: np.ndarray) -> np.ndarray:
        return np.asarray(action, dtype=np.float32)


class TaskObservation(gym.ObservationWrapper):
    """Base of the task wrappers: info["success"] a bool, reward a float, and the action conventions.

    A policy emits *policy actions* (7-D in [-1, 1], what its tokens decode to); `policy_action_converter()`
    maps them to env actions step by step (stateful: reset it each episode), and `to_policy_actions` maps one
    recorded episode of env actions back (SFT labels). Both are the identity for tasks whose env takes
    policy actions directly.
    """

    def __init__(self, env: gym.Env, render_images: bool, state_dim: int, image_size: int):
        super().__init__(env)
        self.render_images = render_images
        spaces = {"state": gym.spaces.Box(-np.inf, np.inf, (state_dim,), np.float32)}
        if render_images:
            spaces["image"] = gym.spaces.Box(0, 255, (image_size, image_size, 3), np.uint8)
        self.observation_space = gym.spaces.Dict(spaces)

    @property
    def max_episode_steps(self) -> int:
        """Step limit of the episode (kept on the TimeLimit wrapper)."""
        env = self.env
        while not hasattr(env, "_max_episode_steps") and hasattr(env, "env"):
            env = env.env
        return int(env._max_episode_steps)

    def policy_action_converter(self) -> IdentityActions:
        return IdentityActions()

    def to_policy_actions(self, env_actions: np.ndarray) -> np.ndarray:
        """[T, 7] env actions of one episode -> [T, 7] float32 policy actions."""
        return np.asarray(env_actions, dtype=np.float32)

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        info["success"] = bool(info["success"])
        return obs, float(reward), bool(terminated), bool(truncated), info

    def reset(self, **kwargs):
        obs, info = super().reset(**kwargs)
        info["success"] = bool(info.get("success", False))
        return obs, info


class VlaObservation(TaskObservation):
    """ManiSkill's nested rgb obs → {"image": uint8 [H, W, 3], "state": float32 [19]}.

    `state` follows STATE_LAYOUT. With `render_images=False` there is no "image" key (state-only,
    ~4x faster; for experts and quick checks). `instruction` is the task's language instruction.
    """

    def __init__(self, env: gym.Env, render_images: bool):
        super().__init__(env, render_images, STATE_DIM, env.unwrapped.image_size)

    @property
    def instruction(self) -> str:
        return self.env.unwrapped.instruction

    def observation(self, obs: dict) -> dict:
        extra = obs["extra"]
        state = np.concatenate(
            [obs["agent"]["qpos"], extra["tcp_pose"][:3], extra["tcp_pose"][3:], extra["obj_pos"]]
        ).astype(np.float32)
        out = {"state": state}
        if self.render_images:
            out["image"] = np.ascontiguousarray(obs["sensor_data"]["base_camera"]["rgb"], dtype=np.uint8)
        return out


class SimplerObservation(TaskObservation):
    """SimplerEnv's obs → {"image": uint8 [S, S, 3], "state": float32 [18]} (envs.simpler.SIMPLER_STATE_LAYOUT).

    The image is the overhead camera (512 x 640, background photo overlaid) resized to S x S by area
    averaging, like SimplerEnv's OpenVLA adapter (cv2 INTER_AREA to 224 x 224, aspect not kept); the
    full-size frame stays available as `overhead_rgb` for policies with their own preprocessing (RT-1).
    `reset_options` turns vla-razor reset options into SimplerEnv's (envs.simpler.reset_options).
    """

    def __init__(self, env: gym.Env, render_images: bool, image_size: int,
                 reset_options: Callable[[dict | None], dict]):
        from envs.simpler import SIMPLER_STATE_DIM

        super().__init__(env, render_images, SIMPLER_STATE_DIM, image_size)
        self.image_size = image_size
        self._reset_options = reset_options
        self.overhead_rgb: np.ndarray | None = None  # uint8 [512, 640, 3] of the latest observation

    @property
    def instruction(self) -> str:
        # Generic drawer tasks draw the drawer per episode, so ask the env every time.
        return self.env.unwrapped.get_language_instruction()

    def observation(self, obs: dict) -> dict:
        from envs.simpler import OVERHEAD_CAMERA

        agent = obs["agent"]
        out = {"state": np.concatenate([agent["qpos"], agent["base_pose"]]).astype(np.float32)}
        if self.render_images:
            from PIL import Image

            self.overhead_rgb = np.asarray(obs["image"][OVERHEAD_CAMERA]["rgb"], dtype=np.uint8)
            size = (self.image_size, self.image_size)
            out["image"] = np.array(Image.fromarray(self.overhead_rgb).resize(size, Image.Resampling.BOX))
        return out

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        return super().reset(seed=seed, options=self._reset_options(options))

    def policy_action_converter(self):
        from envs.simpler_actions import PolicyToSimplerActions

        return PolicyToSimplerActions()

    def to_policy_actions(self, env_actions: np.ndarray) -> np.ndarray:
        from envs.simpler_actions import simpler_to_policy_actions

        return simpler_to_policy_actions(env_actions)
