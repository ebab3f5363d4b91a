"""Divergences between a base policy pi_0 and a fine-tuned policy pi, over categorical token distributions.

KL is a measurement first (STYLE.md habit 4): the functions here are *exact* sums over the token set, with the
direction in the name -- ``kl_base_to_policy`` is KL(pi_0 || pi), the forward KL that RL's Razor (Shenfeld et al.
2025, Sec. 4) finds predicts forgetting when measured on the new task's inputs. Monte-Carlo estimators, needed only
when the token set is a whole LLM vocabulary and the caller holds sampled log-probs alone, carry ``_mc`` / ``_k3``.

Shapes: ``logits: [..., N, T, K]`` -- N inputs, T output positions, K tokens. A divergence is summed over the T
positions of one input (the 7 action dims of a VLA step, the tokens of a response) and averaged over the N inputs,
leaving the leading ``...`` (e.g. a stack of R runs trained side by side).
"""
from __future__ import annotations

import torch

from vla_razor.policy import at_least_float32
from vla_razor.reductions import masked_mean, masked_sum


def _check_pair(base_logits: torch.Tensor, policy_logits: torch.Tensor) -> None:
    if base_logits.shape[-1] != policy_logits.shape[-1] or base_logits.ndim != policy_logits.ndim:
        raise ValueError(f"base logits {tuple(base_logits.shape)} and policy logits {tuple(policy_logits.shape)} "
                         "must have the same rank and token-set size")


def _log_probs(base_logits, policy_logits):
    _check_pair(base_logits, policy_logits)
    return torch.log_softmax(at_least_float32(base_logits), -1), torch.log_softmax(at_least_float32(policy_logits), -1)


def kl_base_to_policy_per_position(base_logits: torch.Tensor, policy_logits: torch.Tensor) -> torch.Tensor:
    """KL(pi_0 || pi) at each position: sum_k pi_0 (log pi_0 - log pi). ``[..., T, K] -> [..., T]``."""
    log_p0, log_p = _log_probs(base_logits, policy_logits)
    return (log_p0.exp() * (log_p0 - log_p)).sum(-1)


def kl_policy_to_base_per_position(base_logits: torch.Tensor, policy_logits: torch.Tensor) -> torch.Tensor:
    """KL(pi || pi_0) at each position (the reverse KL, the one a KL-regularized RL loss penalizes)."""
    return kl_base_to_policy_per_position(policy_logits, base_logits)


def total_variation_per_position(base_logits: torch.Tensor, policy_logits: torch.Tensor) -> torch.Tensor:
    """TV(pi_0, pi) = 1/2 sum_k |pi_0 - pi| at each position, in [0, 1]."""
    log_p0, log_p = _log_probs(base_logits, policy_logits)
    return 0.5 * (log_p0.exp() - log_p.exp()).abs().sum(-1)


def l2_distance_per_position(base_logits: torch.Tensor, policy_logits: torch.Tensor) -> torch.Tensor:
    """Euclidean distance ||pi_0 - pi||_2 between the probability vectors at each position."""
    log_p0, log_p = _log_probs(base_logits, policy_logits)
    return (log_p0.exp() - log_p.exp()).pow(2).sum(-1).sqrt()


def average_over_inputs(per_position: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over valid positions of each input, then mean over inputs: ``[..., N, T] -> [...]``.

    Inputs with no valid position are left out of the mean rather than counted as zero divergence.
    """
    if per_position.ndim < 2:
        raise ValueError(f"expected [..., N, T], got shape {tuple(per_position.shape)}")
    per_input = masked_sum(per_position, mask, dim=-1)
    has_tokens = torch.ones_like(per_input, dtype=torch.bool) if mask is None else mask.any(-1)
    return masked_mean(per_input, has_tokens, dim=-1)


PER_POSITION_DIVERGENCES = {
    "kl_base_to_policy": kl_base_to_policy_per_position,
    "kl_policy_to_base": kl_policy_to_base_per_position,
    "total_variation": total_variation_per_position,
    "l2_distance": l2_distance_per_position,
}


def policy_divergences(base_logits: torch.Tensor, policy_logits: torch.Tensor,
                       mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Every output divergence of PROTOCOL's Table-1 list, exact, averaged over inputs: ``[..., N, T, K] -> [...]``."""
    if base_logits.shape != policy_logits.shape:
        raise ValueError(f"base logits {tuple(base_logits.shape)} != policy logits {tuple(policy_logits.shape)}")
    return {name: average_over_inputs(fn(base_logits, policy_logits), mask)
            for name, fn in PER_POSITION_DIVERGENCES.items()}


def kl_base_to_policy_mc(policy_log_probs: torch.Tensor, base_log_probs: torch.Tensor,
                         mask: torch.Tensor | None = None) -> torch.Tensor:
    """Monte-Carlo estimate of KL(pi_0 || pi) from tokens SAMPLED FROM pi: E_pi[r log r], r = pi_0 / pi.

    Unbiased by importance weighting, but high-variance where pi_0 puts mass pi rarely samples; prefer the exact
    per-position KL whenever full logits fit in memory. ``*_log_probs: [..., N, T]`` of the sampled tokens -> ``[...]``.
    """
    if policy_log_probs.shape != base_log_probs.shape:
        raise ValueError(f"policy log-probs {tuple(policy_log_probs.shape)} != base {tuple(base_log_probs.shape)}")
    log_ratio = at_least_float32(base_log_probs) - at_least_float32(policy_log_probs)
    return average_over_inputs(log_ratio.exp() * log_ratio, mask)


def kl_policy_to_base_k3(policy_log_probs: torch.Tensor, base_log_probs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || pi_0) on tokens sampled from pi: (r - 1) - log r with r = pi_0 / pi.

    Non-negative, unbiased, low variance (Schulman 2020, "Approximating KL divergence"); the usual estimator inside
    GRPO's KL penalty. Differentiable in ``policy_log_probs``. Shapes ``[..., T] -> [..., T]``.
    """
    if policy_log_probs.shape != base_log_probs.shape:
        raise ValueError(f"policy log-probs {tuple(policy_log_probs.shape)} != base {tuple(base_log_probs.shape)}")
    log_ratio = base_log_probs - policy_log_probs
    return log_ratio.exp() - 1.0 - log_ratio
