"""Learning-rate schedules (shared by every path), the AdamW every trainer builds, and AdamW for a stack of runs with
one learning rate each."""
from __future__ import annotations

import math

import torch

SCHEDULES = ("constant_with_warmup", "cosine_with_warmup")


def make_adamw(params, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW over the trainable ``params``: the fused implementation (one kernel for the whole update) when every
    parameter is on CUDA, torch's default elsewhere."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters (all have requires_grad=False)")
    fused = all(p.device.type == "cuda" for p in params) or None
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Factor on the peak learning rate at optimizer ``step`` (0-based), as transformers' schedules of those names:
    linear warmup from 0 over ``warmup_steps``, then constant or half-cosine decay to 0 at ``total_steps``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant_with_warmup":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


class StackedAdamW:
    """AdamW (Loshchilov & Hutter 2019) over parameters whose dim 0 indexes R independent runs, each with its own lr.

    torch.optim takes one learning rate per parameter group, and the runs of a sweep live in one tensor, so the
    per-run rates ``lr: [R]`` are broadcast here instead. Otherwise the update is torch.optim.AdamW's.
    """

    def __init__(self, params, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        self.params = [p for p in params if p.requires_grad]
        self.beta1, self.beta2 = betas
        self.eps, self.weight_decay = eps, weight_decay
        self.state = [(torch.zeros_like(p), torch.zeros_like(p)) for p in self.params]
        self.steps = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, lr: torch.Tensor) -> None:
        """One update with per-run learning rates ``lr: [R]`` (0 freezes a run)."""
        self.steps += 1
        bias1 = 1 - self.beta1 ** self.steps
        bias2 = 1 - self.beta2 ** self.steps
        for p, (exp_avg, exp_avg_sq) in zip(self.params, self.state):
            if p.grad is None:
                continue
            run_lr = lr.to(p.dtype).view(-1, *([1] * (p.ndim - 1)))
            if self.weight_decay:
                p.mul_(1 - run_lr * self.weight_decay)
            exp_avg.lerp_(p.grad, 1 - self.beta1)
            exp_avg_sq.mul_(self.beta2).addcmul_(p.grad, p.grad, value=1 - self.beta2)
            denom = (exp_avg_sq / bias2).sqrt_().add_(self.eps)
            p.sub_(run_lr * (exp_avg / bias1) / denom)
