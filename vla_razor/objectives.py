"""Fine-tuning objectives: small pure functions ``(log_probs, ...) -> (loss, stats)``, registered by name.

Every path (robot, ParityMNIST, LLM) computes the log-probs of its tokens with its policy and hands them here, so
SFT, REINFORCE and GRPO differ only in which function a config names (PROTOCOL.md, "Objectives").

Shapes: ``log_probs: [B, T]`` -- log pi of each of the T tokens of B sequences (T = 7 action dims for a VLA step,
1 for ParityMNIST, the response length for an LLM) -- with ``mask: [B, T]`` marking real tokens. Rewards and
advantages are per sequence, ``[B]``. Gradients never flow through sampling: advantages and old log-probs are
detached here, whatever the caller passes.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from vla_razor.reductions import masked_mean, masked_sum

Stats = dict[str, float]
AGGREGATIONS = ("token_mean", "sequence_mean", "dr_grpo")


def _check(log_probs: torch.Tensor, mask: torch.Tensor | None, per_sequence: torch.Tensor | None = None):
    if log_probs.ndim != 2:
        raise ValueError(f"log_probs must be [B, T], got shape {tuple(log_probs.shape)}")
    if mask is not None and mask.shape != log_probs.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != log_probs shape {tuple(log_probs.shape)}")
    if per_sequence is not None and per_sequence.shape != log_probs.shape[:1]:
        raise ValueError(f"per-sequence values must be [B]={tuple(log_probs.shape[:1])}, "
                         f"got {tuple(per_sequence.shape)}")
    return torch.ones_like(log_probs, dtype=torch.bool) if mask is None else mask.to(torch.bool)


def aggregate_tokens(per_token: torch.Tensor, mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """Reduce a per-token loss ``[B, T]`` to a scalar.

    - ``token_mean``: mean over all valid tokens of the batch (long sequences weigh more).
    - ``sequence_mean``: per-sequence token mean, then mean over sequences (original GRPO, Shao et al. 2024).
    - ``dr_grpo``: per-sequence token *sum* divided by the constant T, then mean over sequences -- no per-sequence
      length normalization, which biases towards long wrong answers (Liu et al. 2025, "Dr. GRPO").
    """
    if aggregation == "token_mean":
        return masked_mean(per_token, mask)
    if aggregation == "sequence_mean":
        return masked_mean(per_token, mask, dim=-1).mean()
    if aggregation == "dr_grpo":
        return (masked_sum(per_token, mask, dim=-1) / per_token.shape[-1]).mean()
    raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {AGGREGATIONS}")


# -- advantages ---------------------------------------------------------------------------------------------------
def reward_normalized_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """A = (r - mean) / (std + eps) over the whole batch ``[B]`` -- REINFORCE with a reward-normalization baseline."""
    rewards = rewards.float()
    return (rewards - rewards.mean()) / (rewards.std(unbiased=False) + eps)


def group_normalized_advantages(rewards: torch.Tensor, group_size: int = 1, scale_by_std: bool = True,
                                eps: float = 1e-6, groups: torch.Tensor | None = None) -> torch.Tensor:
    """GRPO advantages: ``rewards [B]`` in contiguous groups of ``group_size`` samples of the same input.

    A = r - group mean, divided by the group std unless ``scale_by_std=False`` (Dr. GRPO drops it).
    ``groups [B]`` (any ids) instead names each sample's group, for groups of unequal size (robot rollouts from
    the same start cell, where a collector returns whichever trajectories finished first).
    """
    if groups is not None:
        if groups.shape != rewards.shape:
            raise ValueError(f"groups {tuple(groups.shape)} must match rewards {tuple(rewards.shape)}")
        _, index = torch.unique(groups, return_inverse=True)
        rewards = rewards.float()
        count = torch.zeros(int(index.max()) + 1).index_add_(0, index, torch.ones_like(rewards))
        mean = torch.zeros_like(count).index_add_(0, index, rewards) / count
        centred = rewards - mean[index]
        if scale_by_std:
            var = torch.zeros_like(count).index_add_(0, index, centred ** 2) / count
            centred = centred / (var.sqrt()[index] + eps)
        return centred
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"batch of {rewards.numel()} rewards is not a whole number of groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)
    centred = grouped - grouped.mean(-1, keepdim=True)
    if scale_by_std:
        centred = centred / (grouped.std(-1, unbiased=False, keepdim=True) + eps)
    return centred.reshape(-1)


ON_POLICY_OBJECTIVES = ("reinforce", "reinforce_1_0", "grpo")


def sequence_advantages(objective: str, rewards: torch.Tensor, *, group_size: int = 1,
                        scale_by_std: bool = True, groups: torch.Tensor | None = None) -> torch.Tensor:
    """The per-sequence advantage ``[B]`` each on-policy objective uses, from the WHOLE batch's ``rewards [B]``.

    The registered objectives below are ``policy_gradient_objective`` on these advantages; a caller that splits
    a large batch into micro-batches (an LLM path) computes them once here, then calls
    ``policy_gradient_objective`` per micro-batch, so every slice sees the batch's baseline.
    """
    if objective == "reinforce":
        return reward_normalized_advantages(rewards)
    if objective == "reinforce_1_0":
        return rewards.float()
    if objective == "grpo":
        return group_normalized_advantages(rewards, group_size, scale_by_std, groups=groups)
    raise ValueError(f"{objective!r} is not an on-policy objective; choose one of {ON_POLICY_OBJECTIVES}")


# -- losses --------------------------------------------------------------------------------------------------------
def sft_objective(log_probs: torch.Tensor, mask: torch.Tensor | None = None,
                  aggregation: str = "token_mean") -> tuple[torch.Tensor, Stats]:
    """Negative log-likelihood of given (external or self-generated) target tokens: -E log pi(y | x)."""
    mask = _check(log_probs, mask)
    loss = aggregate_tokens(-log_probs, mask, aggregation)
    return loss, {"loss/nll": loss.item()}


def policy_gradient_objective(log_probs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor | None = None,
                              *, old_log_probs: torch.Tensor | None = None, clip_eps: float = 0.2,
                              kl_per_token: torch.Tensor | None = None, kl_coef: float = 0.0,
                              aggregation: str = "token_mean") -> tuple[torch.Tensor, Stats]:
    """Clipped policy gradient -E[min(rho A, clip(rho, 1 +- eps) A)] (+ kl_coef * KL), rho = pi / pi_old.

    With ``old_log_probs=None`` the batch is fresh (mu = 1): pi_old = pi detached, rho = 1 and the gradient is
    exactly REINFORCE's A * grad log pi. With a reused batch (mu > 1) the ratio/clip is PPO's (Schulman et al. 2017).
    ``kl_per_token [B, T]`` is a differentiable KL(pi || pi_0) estimate supplied by the caller (exact or k3).
    """
    mask = _check(log_probs, mask, advantages)
    advantages = advantages.detach().float().unsqueeze(-1)                                # [B, 1]
    old = log_probs.detach() if old_log_probs is None else old_log_probs.detach()
    ratio = torch.exp(log_probs - old)                                                    # [B, T]
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    per_token = -torch.minimum(ratio * advantages, clipped * advantages)
    policy_loss = aggregate_tokens(per_token, mask, aggregation)
    stats = {"loss/policy": policy_loss.item(), "advantage/mean": advantages.mean().item(),
             "advantage/std": advantages.std(unbiased=False).item(),
             "ratio/clip_fraction": masked_mean(((ratio - 1).abs() > clip_eps).float(), mask).item()}
    loss = policy_loss
    if kl_per_token is not None and kl_coef != 0.0:
        if kl_per_token.shape != log_probs.shape:
            raise ValueError(f"kl_per_token {tuple(kl_per_token.shape)} != log_probs {tuple(log_probs.shape)}")
        kl_loss = aggregate_tokens(kl_per_token, mask, aggregation)
        loss = loss + kl_coef * kl_loss
        stats["loss/kl_policy_to_base"] = kl_loss.item()
    stats["loss/total"] = loss.item()
    return loss, stats


def reinforce_objective(log_probs, rewards, mask=None, **kwargs) -> tuple[torch.Tensor, Stats]:
    """REINFORCE with the reward-normalization baseline (PROTOCOL, robot RL): A = (r - mean) / std over the batch."""
    _check(log_probs, mask, rewards)
    loss, stats = policy_gradient_objective(log_probs, sequence_advantages("reinforce", rewards), mask, **kwargs)
    return loss, {**stats, "reward/mean": rewards.float().mean().item()}


def reinforce_1_0_objective(log_probs, rewards, mask=None, **kwargs) -> tuple[torch.Tensor, Stats]:
    """1-0 REINFORCE: A = r in {0, 1}, i.e. SFT on the policy's own correct samples (RL's Razor, Sec. 5)."""
    _check(log_probs, mask, rewards)
    loss, stats = policy_gradient_objective(log_probs, sequence_advantages("reinforce_1_0", rewards), mask, **kwargs)
    return loss, {**stats, "reward/mean": rewards.float().mean().item()}


def grpo_objective(log_probs, rewards, mask=None, *, group_size: int, scale_by_std: bool = True,
                   **kwargs) -> tuple[torch.Tensor, Stats]:
    """GRPO (Shao et al. 2024): group-normalized advantages over ``group_size`` samples of each input."""
    _check(log_probs, mask, rewards)
    advantages = sequence_advantages("grpo", rewards, group_size=group_size, scale_by_std=scale_by_std)
    loss, stats = policy_gradient_objective(log_probs, advantages, mask, **kwargs)
    return loss, {**stats, "reward/mean": rewards.float().mean().item()}


def simpo_objective(chosen_log_probs: torch.Tensor, rejected_log_probs: torch.Tensor,
                    chosen_mask: torch.Tensor | None = None, rejected_mask: torch.Tensor | None = None,
                    *, gamma: float = 1.0, beta: float = 1.0) -> tuple[torch.Tensor, Stats]:
    """SimPO (Meng et al. 2024): -log sigmoid(beta * (avg log pi(y_w) - avg log pi(y_l)) - gamma).

    Log-likelihoods are averaged over each response's tokens (SimPO's length normalization); with one-token
    responses (ParityMNIST) this is PROTOCOL's -log sigma(log pi(y_w|x) - log pi(y_l|x) - gamma).
    ``chosen_log_probs: [B, Tw]``, ``rejected_log_probs: [B, Tl]``.
    """
    chosen_mask = _check(chosen_log_probs, chosen_mask)
    rejected_mask = _check(rejected_log_probs, rejected_mask)
    if chosen_log_probs.shape[0] != rejected_log_probs.shape[0]:
        raise ValueError(f"chosen batch {chosen_log_probs.shape[0]} != rejected batch {rejected_log_probs.shape[0]}")
    chosen = masked_mean(chosen_log_probs, chosen_mask, dim=-1)
    rejected = masked_mean(rejected_log_probs, rejected_mask, dim=-1)
    margin = beta * (chosen - rejected) - gamma
    loss = -F.logsigmoid(margin).mean()
    return loss, {"loss/simpo": loss.item(), "simpo/margin": margin.mean().item(),
                  "simpo/accuracy": (margin > 0).float().mean().item()}


OBJECTIVES: dict[str, Callable[..., tuple[torch.Tensor, Stats]]] = {
    "sft": sft_objective,
    "reinforce": reinforce_objective,
    "reinforce_1_0": reinforce_1_0_objective,
    "grpo": grpo_objective,
    "simpo": simpo_objective,
}


def get_objective(name: str) -> Callable[..., tuple[torch.Tensor, Stats]]:
    """The objective registered as ``name``; an unknown name lists the known ones."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise KeyError(f"unknown objective {name!r}; known objectives: {sorted(OBJECTIVES)}") from None
