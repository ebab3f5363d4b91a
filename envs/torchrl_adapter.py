"""TorchRL EnvBase over one vla-razor task, in torchrl's VLA TensorDict schema.

Keys (torchrl.data.vla): ("observation", "image") uint8 [3, H, W] (CHW, like torchrl's LIBERO
adapter), ("observation", "state") float32 [D] (the task's layout: envs.state_layout), "language_instruction"
a NonTensor string at the root, "success" bool [1], "action" float32 [7] in [-1, 1] (a policy action: the
task's converter maps it to its env action, e.g. SimplerEnv's un-normalized axis-angle one), reward = success
as float [1], "obj_init_xy" float32 [2] the episode's requested object placement (NaN when the task drew it).
Episodes terminate on success and truncate at the task's step limit; done = either.
A custom EnvBase rather than torchrl's GymWrapper, which would rename the "state" key.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Bounded, Categorical, Composite, NonTensor, Unbounded
from torchrl.envs import EnvBase

from envs.registry import make_task


class ManiSkillVLAEnv(EnvBase):
    """One task env (`envs.make_task`: embedded ManiSkill3 or SimplerEnv) as a torchrl env; batch size ().

    Args:
        task: a task name (envs.known_tasks()).
        image_size: square camera resolution in pixels.
        placements: optional [n, 2] object (x, y) positions (see envs.placement); episode k
            uses row k mod n. Without it the task samples its own placement from the seed.
        seed: episode k resets with seed `seed + k`, so a run is reproducible.
        max_episode_steps: overrides the task's step limit.
        env_kwargs: passed to `make_task` (e.g. shader= for SimplerEnv tasks).
    """

    batch_locked = True

    def __init__(
        self,
        task: str,
        image_size: int = 128,
        placements: Sequence[Sequence[float]] | np.ndarray | None = None,
        seed: int = 0,
        max_episode_steps: int | None = None,
        device: str | torch.device = "cpu",
        **env_kwargs,
    ):
        super().__init__(device=device, batch_size=torch.Size([]))
        self.task = task
        self.gym_env = make_task(task, image_size=image_size, max_episode_steps=max_episode_steps, **env_kwargs)
        self.to_env_action = self.gym_env.policy_action_converter()
        self.instruction = self.gym_env.instruction
        self.max_episode_steps = self.gym_env.max_episode_steps
        if placements is not None:
            placements = np.asarray(placements, dtype=np.float64)
            if placements.ndim != 2 or placements.shape[1] != 2 or len(placements) == 0:
                raise ValueError(f"placements must be a non-empty [n, 2] array, got shape {placements.shape}")
        self.placements = placements
        self._base_seed = int(seed)
        self._episode_count = 0
        self._make_specs(image_size)

    def _make_specs(self, image_size: int) -> None:
        bool_flag = lambda: Categorical(2, dtype=torch.bool, shape=(1,), device=self.device)  # noqa: E731
        self.observation_spec = Composite(
            observation=Composite(
                image=Bounded(0, 255, shape=(3, image_size, image_size), dtype=torch.uint8, device=self.device),
                state=Unbounded(shape=self.gym_env.observation_space["state"].shape, dtype=torch.float32,
                                device=self.device),
                shape=(),
            ),
            language_instruction=NonTensor(shape=(), example_data=self.instruction, device=self.device),
            obj_init_xy=Unbounded(shape=(2,), dtype=torch.float32, device=self.device),
            success=bool_flag(),
            shape=(),
        )
        self.action_spec = Bounded(-1.0, 1.0, shape=(7,), dtype=torch.float32, device=self.device)
        self.reward_spec = Bounded(0.0, 1.0, shape=(1,), dtype=torch.float32, device=self.device)
        self.done_spec = Composite(
            done=bool_flag(), terminated=bool_flag(), truncated=bool_flag(), shape=()
        )

    def _observation(self, obs: dict, success: bool) -> TensorDict:
        image = torch.from_numpy(obs["image"]).permute(2, 0, 1).contiguous()  # [H, W, 3] -> [3, H, W]
        return TensorDict(
            {
                "observation": {"image": image, "state": torch.from_numpy(obs["state"])},
                "language_instruction": self.instruction,
                "success": torch.tensor([success], dtype=torch.bool),
                "obj_init_xy": self._obj_init_xy,
            },
            batch_size=(),
            device=self.device,
        )

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs) -> TensorDictBase:
        options = {}
        self._obj_init_xy = torch.full((2,), float("nan"))
        if self.placements is not None:
            xy = self.placements[self._episode_count % len(self.placements)]
            options["obj_init_xy"] = [float(xy[0]), float(xy[1])]
            self._obj_init_xy = torch.tensor(options["obj_init_xy"], dtype=torch.float32)
        obs, info = self.gym_env.reset(seed=self._base_seed + self._episode_count, options=options)
        self._episode_count += 1
        self.to_env_action.reset()
        self.instruction = self.gym_env.instruction  # some tasks draw it per episode
        out = self._observation(obs, info["success"])
        out.update(self.full_done_spec.zero())
        return out

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        action = tensordict.get("action").detach().cpu().numpy().astype(np.float32)
        obs, _, terminated, truncated, info = self.gym_env.step(self.to_env_action(action))
        success = info["success"]
        out = self._observation(obs, success)
        out["reward"] = torch.tensor([float(success)], dtype=torch.float32)
        out["terminated"] = torch.tensor([terminated], dtype=torch.bool)
        out["truncated"] = torch.tensor([truncated and not terminated], dtype=torch.bool)
        out["done"] = torch.tensor([terminated or truncated], dtype=torch.bool)
        return out

    def _set_seed(self, seed: int | None) -> None:
        if seed is not None:
            self._base_seed = int(seed)
            self._episode_count = 0

    def close(self, *, raise_if_closed: bool = True) -> None:
        self.gym_env.close()
        super().close(raise_if_closed=raise_if_closed)
