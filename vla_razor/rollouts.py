"""Policy rollouts on task envs: evaluation over fixed positions, and the TorchRL collector REINFORCE learns from.

Env workers are torchrl ``ParallelEnv`` processes (one CPU ManiSkill env each; ManiSkill3 needs a GPU for several
envs in one process) and the policy runs once per step in this process on the batch of all workers, so the model
is batched across workers and never copied into them.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torchrl.envs import EnvBase, ParallelEnv, SerialEnv
from torchrl.envs.utils import ExplorationType, set_exploration_type


@contextmanager
def policy_threads(n: int = 1):
    """Run the in-process policy on ``n`` torch threads while env workers render on the other cores: on a 2-core
    machine a 2-thread policy spinning beside two renderers slows both several-fold."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def split_positions(positions: Sequence[Sequence[float]], num_workers: int) -> list[np.ndarray]:
    """Worker w gets rows w, w + W, ... so each evaluation round covers W consecutive positions."""
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    num_workers = min(num_workers, len(positions))
    return [positions[w::num_workers] for w in range(num_workers)]


def _env_factory(task: str, placements: np.ndarray, image_size: int, seed: int,
                 max_episode_steps: int | None) -> Callable[[], EnvBase]:
    def make() -> EnvBase:
        # Imported in the worker: the simulator (and its Vulkan device) lives only there.
        from envs.torchrl_adapter import ManiSkillVLAEnv

        return ManiSkillVLAEnv(task, image_size=image_size, placements=placements, seed=seed,
                               max_episode_steps=max_episode_steps)
    return make


def make_task_envs(task: str, positions: Sequence[Sequence[float]] | None, num_workers: int, *,
                   image_size: int = 128, seed: int = 0, max_episode_steps: int | None = None,
                   processes: bool = True, episodes: int | None = None) -> EnvBase:
    """A batched env of ``num_workers`` task envs; worker w cycles through its share of ``positions``.

    ``positions=None``: the task places its object itself (from the reset seed); ``episodes`` then bounds the
    worker count. ``processes=False`` steps the workers in this process (tests, debugging).
    """
    from envs.registry import require_simulator

    require_simulator(task)
    if positions is None:
        shares = [None] * max(1, min(num_workers, episodes or num_workers))
    else:
        shares = split_positions(positions, num_workers)
    factories = [_env_factory(task, share, image_size, seed + 1000 * w, max_episode_steps)
                 for w, share in enumerate(shares)]
    if processes and len(factories) > 1:
        # workers report their specs: no throwaway env per worker in this process (~15 s of CPU each)
        return ParallelEnv(len(factories), factories, mp_start_method="spawn", metadata_from_workers=True,
                           use_buffers=False)
    return SerialEnv(len(factories), factories)


@dataclass
class EpisodeResults:
    """Per-episode outcome of an evaluation, in the order of the positions its env was built with."""

    success: np.ndarray            # bool [n]
    length: np.ndarray             # int [n]
    frames: list[np.ndarray] = field(default_factory=list)  # per episode uint8 [T + 1, H, W, 3] when kept

    @property
    def success_rate(self) -> float:
        return float(self.success.mean()) if len(self.success) else float("nan")


def evaluate(policy, env: EnvBase, episodes: int, *, seed: int = 0, greedy: bool = False,
             keep_frames: bool = False, progress: Callable[[int], None] | None = None,
             max_steps: int = 10_000) -> EpisodeResults:
    """Roll ``policy`` for ``episodes`` episodes: once from every position ``env`` was built with
    (:func:`make_task_envs`), in their order.

    Runs ceil(n / W) rounds of W lock-stepped episodes (finished workers wait for the round to end and are not
    stepped; the envs truncate at their own step limit, ``max_steps`` only bounds a round). Reseeding first makes every policy evaluated on ``env`` see the same episodes.
    The policy's action draws come from torch's global generator, seeded with ``seed`` for the call (and restored
    after): evaluating a policy twice gives the same result, and policies compared on one env share their random
    numbers. Unseeded, one base policy scored 50 % and 30 % on the same 20 pick-can positions.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _evaluate(policy, env, int(episodes), seed, greedy, keep_frames, progress, max_steps)


def _evaluate(policy, env: EnvBase, n: int, seed: int, greedy: bool, keep_frames: bool,
              progress: Callable[[int], None] | None, max_steps: int) -> EpisodeResults:
    workers = env.batch_size[0]
    env.set_seed(seed)
    success = np.zeros(n, dtype=bool)
    length = np.zeros(n, dtype=np.int64)
    frames: list[np.ndarray | None] = [None] * n
    mode = ExplorationType.DETERMINISTIC if greedy else ExplorationType.RANDOM
    for round_index in range(math.ceil(n / workers)):
        with set_exploration_type(mode), torch.no_grad(), policy_threads():
            rollout = env.rollout(max_steps, policy, break_when_any_done=False, break_when_all_done=True,
                                  auto_reset=True)
        done = rollout["next", "done"].squeeze(-1)                       # [W, T]
        ok = rollout["next", "success"].squeeze(-1)                      # [W, T]
        for w in range(workers):
            row = w + round_index * workers
            if row >= n:
                continue
            # A finished worker's later entries repeat its last step; the episode ends at its first done.
            ends = done[w].nonzero()
            last = int(ends[0]) if len(ends) else done.shape[1] - 1
            length[row] = last + 1
            success[row] = bool(ok[w, : last + 1].any())
            if keep_frames:
                images = rollout["observation", "image"][w, : last + 1]
                final = rollout["next", "observation", "image"][w, last : last + 1]
                frames[row] = torch.cat([images, final]).permute(0, 2, 3, 1).cpu().numpy()
        if progress is not None:
            progress(min(workers, n - round_index * workers))
    # rows are worker-major within a round: row w + k W is worker w's k-th episode = positions[w + k W]
    return EpisodeResults(success, length, [f for f in frames if f is not None])
