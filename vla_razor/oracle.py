"""The KL-minimal correct policy for a binary reward (RL's Razor, Sec. 6 / PROTOCOL claim 4).

PROTOCOL writes the oracle as argmin_q KL(pi_0 || q) s.t. E_q[R] = 1. That objective is +infinity for every feasible
q whenever pi_0 puts any mass on a wrong output (q must be 0 there, and pi_0 log(pi_0 / 0) diverges), so it picks
nothing. The finite, well-defined target is the I-projection

    q* = argmin_q KL(q || pi_0)  s.t.  q(wrong) = 0,

whose solution is pi_0 restricted to the correct outputs and renormalized -- exactly the distribution that
rejection sampling from pi_0 onto {R = 1} produces, and the fixed point the paper's EM argument converges to.
That is what this module computes; ``tests/test_oracle.py`` checks it against brute-force constrained minimization.
"""
from __future__ import annotations

import torch

from vla_razor.policy import at_least_float32


def oracle_distribution(base_logits: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """pi_0 restricted to correct tokens, renormalized. ``base_logits: [..., K]``, ``correct: [..., K]`` bool.

    Returns probabilities ``[..., K]``. Raises if some input has no correct token (the constraint is infeasible).
    """
    if base_logits.shape != correct.shape:
        raise ValueError(f"correct mask {tuple(correct.shape)} != base logits {tuple(base_logits.shape)}")
    correct = correct.to(torch.bool)
    if not correct.any(-1).all():
        raise ValueError("every input needs at least one correct token; the I-projection is undefined otherwise")
    restricted = at_least_float32(base_logits).masked_fill(~correct, float("-inf"))
    return torch.softmax(restricted, dim=-1)
