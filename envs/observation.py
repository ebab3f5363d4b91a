"""Uniform observation for every vla-razor task: {"image": uint8 [H, W, 3], "state": float32 [19]}."""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from envs.registry import STATE_DIM


class VlaObservation(gym.ObservationWrapper):
    """ManiSkill's nested rgb obs → {"image": uint8 [H, W, 3], "state": float32 [19]}.

    `state` follows STATE_LAYOUT. With `render_images=False` there is no "image" key (state-only,
    ~4x faster; for experts and quick checks). `instruction` is the task's language instruction,
    and info["success"] is a plain bool.
    """

    def __init__(self, env: gym.Env, render_images: bool):
        super().__init__(env)
        self.render_images = render_images
        spaces = {"state": gym.spaces.Box(-np.inf, np.inf, (STATE_DIM,), np.float32)}
        if render_images:
            size = self.env.unwrapped.image_size
            spaces["image"] = gym.spaces.Box(0, 255, (size, size, 3), np.uint8)
        self.observation_space = gym.spaces.Dict(spaces)

    @property
    def instruction(self) -> str:
        return self.env.unwrapped.instruction

    @property
    def max_episode_steps(self) -> int:
        """Step limit of the episode (ManiSkill keeps it on its TimeLimitWrapper)."""
        env = self.env
        while not hasattr(env, "_max_episode_steps") and hasattr(env, "env"):
            env = env.env
        return int(env._max_episode_steps)

    def observation(self, obs: dict) -> dict:
        extra = obs["extra"]
        state = np.concatenate(
            [obs["agent"]["qpos"], extra["tcp_pose"][:3], extra["tcp_pose"][3:], extra["obj_pos"]]
        ).astype(np.float32)
        out = {"state": state}
        if self.render_images:
            out["image"] = np.ascontiguousarray(obs["sensor_data"]["base_camera"]["rgb"], dtype=np.uint8)
        return out

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        info["success"] = bool(info["success"])
        return obs, float(reward), bool(terminated), bool(truncated), info

    def reset(self, **kwargs):
        obs, info = super().reset(**kwargs)
        info["success"] = bool(info["success"])
        return obs, info
