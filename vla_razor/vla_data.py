"""Demonstration steps as training batches in torchrl's VLA schema.

A batch is a TensorDict ``[B]`` with ``("observation", "image")`` uint8 ``[B, 3, H, W]`` (CHW, as the env adapter
emits), ``("observation", "state")``, ``"language_instruction"`` (one string per row) and
``("vla_action", "tokens")`` window ids ``[B, 7]`` -- exactly what a rollout produces, so SFT, REINFORCE and the
KL probe feed the policy the same thing.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from tensordict import NonTensorStack, TensorDict

from data_collection.dataset import DemoDataset


def load_demo_steps(root: str, episode_fraction: float = 1.0, seed: int = 0) -> tuple[TensorDict, str]:
    """All steps of a demo folder (or of a seeded ``episode_fraction`` of its episodes) and its instruction."""
    if not 0.0 < episode_fraction <= 1.0:
        raise ValueError(f"episode fraction must be in (0, 1], got {episode_fraction} for {root}")
    dataset = DemoDataset(root)
    instruction = dataset.metadata["instruction"]
    parts = []
    for cell in dataset.cells:
        steps = dataset.shard(cell)["steps"]
        parts.append(TensorDict({
            "observation": {"image": steps["observation", "image"].clone().permute(0, 3, 1, 2).contiguous(),
                            "state": steps["observation", "state"].clone()},
            ("vla_action", "tokens"): steps["vla_action", "tokens"].clone(),
            "episode_key": steps["episode"].clone() + cell * 100_000,
        }, batch_size=[steps.batch_size[0]]))
    data = torch.cat(parts)
    if episode_fraction < 1.0:
        episodes = data["episode_key"].unique()
        keep_n = max(1, round(episode_fraction * len(episodes)))
        generator = torch.Generator().manual_seed(seed)
        keep = episodes[torch.randperm(len(episodes), generator=generator)[:keep_n]]
        data = data[torch.isin(data["episode_key"], keep)]
    return data, instruction


class DemoMixture:
    """Steps from several demo folders, each with its instruction, sampled in shuffled minibatches.

    ``fractions`` maps a folder to the fraction of its episodes to use: the knob that sets how much of the new
    task the pretrained base has seen.
    """

    def __init__(self, fractions: Mapping[str, float], seed: int = 0):
        if not fractions:
            raise ValueError("no demo folders given")
        parts, self.instructions, task_index = [], [], []
        for i, (root, fraction) in enumerate(fractions.items()):
            if fraction <= 0:
                continue
            data, instruction = load_demo_steps(root, fraction, seed)
            parts.append(data)
            self.instructions.append(instruction)
            task_index.append(torch.full((data.batch_size[0],), len(self.instructions) - 1))
        if not parts:
            raise ValueError(f"every demo fraction is 0 in {dict(fractions)}")
        self.steps = torch.cat(parts)
        self.task_index = torch.cat(task_index)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.steps.batch_size[0]

    def batch(self, index: torch.Tensor) -> TensorDict:
        out = self.steps[index].exclude("episode_key")
        out["language_instruction"] = NonTensorStack(*[self.instructions[i] for i in self.task_index[index].tolist()])
        return out

    def epoch(self, batch_size: int) -> Iterator[TensorDict]:
        """One pass in a random order; the last partial batch is kept (no demo is skipped)."""
        order = torch.randperm(len(self), generator=self.generator)
        for start in range(0, len(order), batch_size):
            yield self.batch(order[start:start + batch_size])

    def states(self) -> torch.Tensor:
        return self.steps["observation", "state"].float()

    def probe(self, n: int, seed: int = 0) -> TensorDict:
        """A fixed, seeded subset of ``n`` steps (the KL probe set of new-task states)."""
        generator = torch.Generator().manual_seed(seed)
        index = torch.randperm(len(self), generator=generator)[:n]
        return self.batch(index.sort().values)
