"""Training steps of the robot path: SFT on demonstrations, policy-gradient updates on collected trajectories,
and the KL probe -- all through the shared objectives and divergences, with any TokenVLAPolicy.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from tensordict import TensorDictBase

from vla_razor.divergences import kl_base_to_policy_per_position
from vla_razor.objectives import get_objective, sequence_advantages, policy_gradient_objective

ACTION_TOKENS = ("vla_action", "tokens")


def make_optimizer(policy: torch.nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    params = [p for p in policy.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the policy has no trainable parameters")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def sft_step(policy, batch: TensorDictBase, optimizer: torch.optim.Optimizer, max_grad_norm: float = 1.0) -> dict:
    """One cross-entropy step on the batch's demo action tokens (the shared ``sft`` objective)."""
    policy.train()
    optimizer.zero_grad(set_to_none=True)
    log_probs = policy.token_log_probs(batch, batch.get(ACTION_TOKENS).reshape(-1, 7))
    loss, stats = get_objective("sft")(log_probs)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)
    optimizer.step()
    return {**stats, "grad_norm": float(grad_norm)}


def trajectory_log_probs(policy, trajectories: TensorDictBase, minibatch_steps: int) -> Iterable[tuple]:
    """Teacher-forced log-probs of the collected action tokens, step-minibatch by step-minibatch.

    ``trajectories`` is a padded collector batch ``[N, T]``; yields ``(log_probs [n, 7], trajectory index [n])`` for
    the valid steps so the caller can accumulate one loss over all trajectories without holding every graph.
    """
    mask = trajectories.get(("collector", "mask"))
    traj_index, step_index = mask.nonzero(as_tuple=True)
    for start in range(0, len(traj_index), minibatch_steps):
        rows, cols = traj_index[start:start + minibatch_steps], step_index[start:start + minibatch_steps]
        steps = trajectories[rows, cols]
        yield policy.token_log_probs(steps, steps.get(ACTION_TOKENS).reshape(-1, 7)), rows


def policy_gradient_update(policy, trajectories: TensorDictBase, rewards: torch.Tensor, optimizer, *, objective: str,
                           groups: torch.Tensor | None = None, minibatch_steps: int = 256,
                           max_grad_norm: float = 1.0) -> dict:
    """One optimizer step on N trajectories: each trajectory is one "sequence" of its T x 7 action tokens.

    Advantages come from the named shared objective (``reinforce``: reward-normalized over the N trajectories;
    ``reinforce_1_0``: A = r; ``grpo``: normalized within ``groups`` (trajectories from the same start cell)) and
    the loss is the shared policy-gradient objective, token-mean aggregated over every action token of the batch --
    computed in step minibatches whose gradients add up to exactly the full-batch gradient.
    """
    policy.train()
    advantages = sequence_advantages(objective, rewards.float(), groups=groups)          # [N]
    mask = trajectories.get(("collector", "mask"))
    total_tokens = int(mask.sum()) * 7
    optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for log_probs, rows in trajectory_log_probs(policy, trajectories, minibatch_steps):
        part, _ = policy_gradient_objective(log_probs, advantages[rows])
        weight = log_probs.numel() / total_tokens  # token_mean over the whole batch = weighted minibatch means
        (part * weight).backward()
        loss_sum += float(part.detach()) * weight
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)
    optimizer.step()
    return {"loss": loss_sum, "grad_norm": float(grad_norm), "reward_mean": float(rewards.float().mean()),
            "advantage_std": float(advantages.std(unbiased=False)) if len(advantages) > 1 else 0.0}


@torch.no_grad()
def kl_to_base(policy, base, probe: TensorDictBase, *, seed: int = 0, minibatch: int = 256) -> float:
    """E_{s ~ probe} KL(pi_0(.|s) || pi(.|s)) per action dimension, in nats.

    The 7 action tokens are autoregressive, so the joint KL is the chain-rule sum over positions of the exact
    256-bin KL of each conditional, with prefixes drawn from the base (forward KL's expectation is under pi_0).
    Tokens come from a seeded generator, so the probe is the same for every checkpoint and the KL of an unchanged
    policy is exactly 0.
    """
    policy.eval()
    generator = torch.Generator(device=policy.action_token_ids.device).manual_seed(seed)
    total, count = 0.0, 0
    for start in range(0, probe.batch_size[0], minibatch):
        states = probe[start:start + minibatch]
        tokens = base.sample_tokens(states, generator=generator)
        base_logits = base.token_logits(states, tokens)
        policy_logits = policy.token_logits(states, tokens)
        per_position = kl_base_to_policy_per_position(base_logits, policy_logits)        # [n, 7]
        total += float(per_position.sum())
        count += per_position.numel()
    return total / count
