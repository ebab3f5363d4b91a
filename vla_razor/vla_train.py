"""Training steps of the robot path: SFT on demonstrations, policy-gradient updates on collected trajectories,
and the KL probe -- all through the shared objectives and divergences, with any TokenVLAPolicy.

The update steps take ``model``: a callable ``model(batch, tokens) -> log-probs [B, 7]`` -- the policy inside
``vla_razor.distributed.PolicyForward``, bare or as ``accelerate`` prepared it (DDP / FSDP see every use of the
weights through its ``forward``) -- and optionally that ``accelerator``, whose processes then share one update:
gradients average over processes and the objective's baseline and token mean span every process's batch.
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from tensordict import TensorDictBase

from vla_razor.distributed import lockstep_passes, reduce_floats
from vla_razor.divergences import kl_base_to_policy_per_position
from vla_razor.objectives import get_objective, sequence_advantages, policy_gradient_objective

ACTION_TOKENS = ("vla_action", "tokens")
ACTION_LOG_PROBS = ("vla_action", "log_probs")  # the behaviour policy's, written at sampling time


def _backward(loss: torch.Tensor, accelerator) -> None:
    accelerator.backward(loss) if accelerator is not None else loss.backward()


def _clip_and_step(model, optimizer, max_grad_norm: float, accelerator) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    clip = accelerator.clip_grad_norm_ if accelerator is not None else torch.nn.utils.clip_grad_norm_
    grad_norm = clip(params, max_grad_norm)
    optimizer.step()
    # under FSDP the norm is a DTensor: its value is the same on every process
    return float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)


def _world(accelerator) -> tuple[int, int]:
    return (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)


def sft_step(model, batch: TensorDictBase, optimizer: torch.optim.Optimizer, max_grad_norm: float = 1.0,
             accelerator=None) -> dict:
    """One cross-entropy step on the batch's demo action tokens (the shared ``sft`` objective). Under several
    processes each takes its share of the rows (``batch[rank::world]``) and the gradients average."""
    rank, world = _world(accelerator)
    batch = batch[rank::world] if world > 1 else batch
    model.train()
    optimizer.zero_grad(set_to_none=True)
    log_probs = model(batch, batch.get(ACTION_TOKENS).reshape(-1, 7))
    loss, stats = get_objective("sft")(log_probs)
    _backward(loss, accelerator)
    return {**stats, "grad_norm": _clip_and_step(model, optimizer, max_grad_norm, accelerator)}


def _run_starts(ids: torch.Tensor) -> torch.Tensor:
    """``[S]`` True where a run of equal consecutive ids begins."""
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[1:] = ids[1:] != ids[:-1]
    return starts


def trajectory_index(steps: TensorDictBase) -> torch.Tensor:
    """``[S]`` index of each step's trajectory (0..N-1, in order of first appearance) in a flat collector batch
    (``traj_format="cat"``: trajectories contiguous, ``("collector", "traj_ids")`` constant within each)."""
    return torch.cumsum(_run_starts(steps.get(("collector", "traj_ids")).reshape(-1)).long(), 0) - 1


def per_trajectory(values: torch.Tensor, index: torch.Tensor, how: str) -> torch.Tensor:
    """Reduce per-step ``values [S]`` to per-trajectory ``[N]``: ``"any"`` (success) or ``"first"`` (start cell,
    policy version)."""
    n = int(index.max()) + 1 if len(index) else 0
    if how == "any":
        hits = torch.zeros(n, device=values.device).index_add_(0, index, values.reshape(len(index)).float())
        return hits > 0
    return values[_run_starts(index)]


def _gather_uneven(accelerator, values: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every process's ``values [n_r]`` concatenated in rank order, and where this process's part starts."""
    counts = accelerator.gather(torch.tensor([len(values)], device=accelerator.device)).tolist()
    padded = accelerator.pad_across_processes(values.to(accelerator.device), dim=0)
    gathered = accelerator.gather(padded).reshape(len(counts), -1)
    every = torch.cat([gathered[r, :n] for r, n in enumerate(counts)])
    return every.to(values.device), sum(counts[:accelerator.process_index])


def batch_advantages(objective: str, rewards: torch.Tensor, groups: torch.Tensor | None, accelerator=None):
    """The shared objective's advantages over the trajectories of every process (a reward-normalized baseline is
    the whole batch's mean, not one process's); returns this process's share."""
    if _world(accelerator)[1] == 1:
        return sequence_advantages(objective, rewards, groups=groups)
    every, start = _gather_uneven(accelerator, rewards)
    every_groups = None if groups is None else _gather_uneven(accelerator, groups)[0]
    return sequence_advantages(objective, every, groups=every_groups)[start:start + len(rewards)]


def policy_gradient_update(model, steps: TensorDictBase, step_trajectory: torch.Tensor, rewards: torch.Tensor,
                           optimizer, *, objective: str, groups: torch.Tensor | None = None,
                           minibatch_steps: int = 256, max_grad_norm: float = 1.0, accelerator=None) -> dict:
    """One optimizer step on N trajectories given as their steps ``[S]`` (``step_trajectory [S]`` says whose, in
    0..N-1; ``rewards`` / ``groups`` are ``[N]``): each trajectory is one "sequence" of its T x 7 action tokens.

    Advantages come from the named shared objective (``reinforce``: reward-normalized over the N trajectories;
    ``reinforce_1_0``: A = r; ``grpo``: normalized within ``groups`` (trajectories from the same start cell)) and
    the loss is the shared policy-gradient objective, token-mean aggregated over every action token of the batch --
    computed in step minibatches whose gradients add up to exactly the full-batch gradient. Under several
    processes each brings its own trajectories; the result is the same step as one process holding them all.
    ``behaviour_log_prob_gap``: mean |log-prob the rollout recorded - the learner's, before the step| per action
    token: ~1e-6 when the rollout ran the learner's weights (the batch is on-policy), larger when it did not; NaN
    for a batch without recorded log-probs (not 0, which would read as on-policy).
    """
    world = _world(accelerator)[1]
    model.train()
    trajectory_advantages = batch_advantages(objective, rewards.float(), groups, accelerator)          # [N]
    advantages = trajectory_advantages[step_trajectory]                                              # [S]
    local_tokens = steps.batch_size[0] * 7
    total_tokens = int(reduce_floats(accelerator, [local_tokens])[0])
    starts = list(range(0, steps.batch_size[0], minibatch_steps))
    passes = lockstep_passes(accelerator, model, len(starts))
    optimizer.zero_grad(set_to_none=True)
    loss_sum, gap_sum, recorded = 0.0, 0.0, ACTION_LOG_PROBS in steps.keys(True)
    # minibatches of steps whose weighted losses add up to the whole batch's (no graph outlives its minibatch)
    for index in range(passes):
        # a process with fewer minibatches than FSDP's lockstep asks for adds zero-weighted ones (its first step)
        padding = index >= len(starts)
        rows = slice(0, 1) if padding else slice(starts[index], starts[index] + minibatch_steps)
        part_steps = steps[rows]
        # gradients are synchronized once, on each process's last minibatch (DDP decides that at forward time)
        sync = world == 1 or index == passes - 1
        with nullcontext() if sync else accelerator.no_sync(model):
            log_probs = model(part_steps, part_steps.get(ACTION_TOKENS).reshape(-1, 7))
            part, _ = policy_gradient_objective(log_probs, advantages[rows])
            if recorded and not padding:
                behaviour = part_steps.get(ACTION_LOG_PROBS).reshape(-1, 7).to(log_probs)
                gap_sum += float((behaviour - log_probs.detach()).abs().sum())
            # token mean over every process's batch: DDP averages the processes' gradients, hence the factor world
            share = 0.0 if padding else log_probs.numel() / total_tokens
            _backward(part * (world * share), accelerator)
        loss_sum += float(part.detach()) * share
    grad_norm = _clip_and_step(model, optimizer, max_grad_norm, accelerator)
    loss, gap = reduce_floats(accelerator, [loss_sum, gap_sum])  # this process's shares -> the whole batch's
    return {"loss": loss, "grad_norm": grad_norm, "behaviour_log_prob_gap": gap / total_tokens if recorded else math.nan,
            "reward_mean": float(rewards.float().mean()),
            "advantage_std": float(trajectory_advantages.std(unbiased=False)) if len(rewards) > 1 else 0.0}


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
