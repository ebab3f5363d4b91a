"""The LLM path (PROTOCOL.md, "LLM"): rollouts, updates and measurements of a :class:`CausalLMPolicy`.

Read top to bottom: algorithm config -> on-policy rollout (G responses per prompt, verified) -> the update of each
algorithm through the shared objectives -> divergences to the base on sampled continuations -> evaluation of a
checkpoint into a results-table row -> pretraining of the embedded default's base. The CLI
(``vla_razor.cli.train_llm``) only wires these together; the GPU benchmark calls the same update.

Batches may be split into micro-batches of sequences (``micro_batch``) so a 3B model's ``[b, T, V]`` logits fit:
advantages come from the whole batch first (``objectives.sequence_advantages``) and each slice's loss is weighted
by its share of the batch's aggregation, so the accumulated gradient equals the whole-batch gradient.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tensordict import TensorDict

from envs.llm_tasks import PromptSet
from policies.causal_lm import CausalLMPolicy
from vla_razor.divergences import (PER_POSITION_DIVERGENCES, average_over_inputs, kl_base_to_policy_mc,
                                   kl_policy_to_base_per_position)
from vla_razor.objectives import ON_POLICY_OBJECTIVES, get_objective, policy_gradient_objective, sequence_advantages
from vla_razor.policy import token_log_probs

OFFLINE_OBJECTIVES = ("sft", "simpo")


@dataclass
class AlgoConfig:
    """One fine-tuning algorithm: an objective of the shared registry + how its batches are made and optimized.

    Defaults are PROTOCOL's LLM settings for GRPO; the ``algo/`` configs set the other algorithms'.
    """
    name: str = "grpo"                # label of the method in the results table
    objective: str = "grpo"           # grpo | reinforce_1_0 | reinforce | sft | simpo (vla_razor.objectives)
    steps: int = 0                    # generation (on-policy) or minibatch (offline) steps; 0 = `epochs` passes
    epochs: int = 1                   # passes over the training prompts when steps = 0
    # on-policy sampling
    group_size: int = 64              # responses per prompt (GRPO's group)
    prompts_per_step: int = 8         # prompts per generation batch -> group_size * prompts_per_step responses
    mu: int = 1                       # optimizer passes over each generation batch; > 1 uses the PPO ratio/clip
    clip_eps: float = 0.2
    kl_coef: float = 0.0              # beta of an exact KL(pi || pi_0) penalty in the loss (PROTOCOL: 0)
    aggregation: str = "dr_grpo"      # token_mean | sequence_mean | dr_grpo (Liu et al. 2025)
    scale_by_std: bool = False        # divide group advantages by the group std (Dr. GRPO: no)
    temperature: float = 1.0
    # offline methods
    batch_size: int = 32              # prompts per SFT / SimPO step
    simpo_gamma: float = 1.0          # PROTOCOL: -log sigma(log pi(y_w) - log pi(y_l) - gamma), gamma = 1
    simpo_beta: float = 1.0
    simpo_samples: int = 4            # own samples per prompt searched for a wrong one (SimPO's negative)
    # optimizer: AdamW with a warmup schedule (vla_razor.optim)
    lr: float = 1e-5
    schedule: str = "constant_with_warmup"
    warmup_steps: int = 50            # optimizer steps
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    micro_batch: int = 0              # sequences per forward/backward; 0 = the whole batch at once

    @property
    def on_policy(self) -> bool:
        return self.objective in ON_POLICY_OBJECTIVES

    @property
    def prompts_per_batch(self) -> int:
        return self.prompts_per_step if self.on_policy else self.batch_size


def validate_algo(algo: AlgoConfig) -> None:
    get_objective(algo.objective)
    for name in ("group_size", "prompts_per_step", "mu", "batch_size", "epochs", "simpo_samples"):
        if getattr(algo, name) < 1:
            raise ValueError(f"algo.{name}={getattr(algo, name)} must be >= 1")
    if algo.steps < 0 or algo.micro_batch < 0:
        raise ValueError(f"algo.steps={algo.steps} and algo.micro_batch={algo.micro_batch} must be >= 0")
    if algo.objective == "grpo" and algo.group_size < 2:
        raise ValueError(f"algo.group_size={algo.group_size} with objective=grpo: a group of one response has no "
                         "baseline (advantage 0); use group_size >= 2")
    if algo.mu > 1 and not algo.on_policy:
        raise ValueError(f"algo.mu={algo.mu} reuses generation batches, which only on-policy objectives "
                         f"({ON_POLICY_OBJECTIVES}) have; set algo.mu=1 for {algo.objective!r}")


def total_steps(algo: AlgoConfig, num_prompts: int) -> int:
    return algo.steps or math.ceil(algo.epochs * num_prompts / algo.prompts_per_batch)


def step_indices(step: int, batch: int, num_prompts: int, seed: int) -> torch.Tensor:
    """Example indices of ``step``: consecutive slices of one fresh permutation per epoch.

    A pure function of (step, seed), so a resumed run draws exactly the prompts an uninterrupted one would.
    """
    start = step * batch
    parts, epoch = [], start // num_prompts
    offset = start - epoch * num_prompts
    while sum(len(p) for p in parts) < batch:
        order = torch.randperm(num_prompts, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        parts.append(order[offset:])
        epoch, offset = epoch + 1, 0
    return torch.cat(parts)[:batch]


def slices(count: int, size: int) -> list[slice]:
    size = size or count
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]


def slice_weight(mask: torch.Tensor, part: slice, aggregation: str) -> float:
    """Share of slice ``part`` in the whole batch's aggregated loss (tokens for token_mean, else sequences)."""
    if aggregation == "token_mean":
        return (mask[part].sum() / mask.sum().clamp(min=1)).item()
    return (part.stop - part.start) / mask.shape[0]


# -- rollouts -------------------------------------------------------------------------------------------------------
@dataclass
class Rollout:
    """``group_size`` responses to each of ``indices`` (groups contiguous): prompts, responses, verified rewards."""
    indices: torch.Tensor          # [B] example index per response
    batch: TensorDict              # left-padded prompts, [B, P]
    tokens: torch.Tensor           # [B, T], T = max_new_tokens
    mask: torch.Tensor             # [B, T] real response tokens
    rewards: torch.Tensor          # [B] in {0, 1}
    texts: list[str]


def encode_grouped(policy: CausalLMPolicy, task: PromptSet, indices: torch.Tensor, group_size: int,
                   template=lambda prompt: prompt) -> TensorDict:
    """Prompts of ``indices``, each repeated ``group_size`` times in a row: ``[len(indices) * G, P]``."""
    batch = policy.encode_prompts([template(task.prompts[int(i)]) for i in indices])
    return batch.repeat_interleave(group_size, dim=0) if group_size > 1 else batch


@torch.no_grad()
def rollout(policy: CausalLMPolicy, task: PromptSet, indices: torch.Tensor, group_size: int, max_new_tokens: int,
            generator: torch.Generator | None, temperature: float = 1.0, greedy: bool = False,
            template=lambda prompt: prompt) -> Rollout:
    batch = encode_grouped(policy, task, indices, group_size, template)
    tokens = policy.sample_tokens(batch, greedy=greedy, temperature=temperature, generator=generator,
                                  max_new_tokens=max_new_tokens)
    texts = policy.decode(tokens)
    per_response = indices.repeat_interleave(group_size)
    rewards = task.rewards(per_response, texts).to(tokens.device)
    return Rollout(per_response, batch, tokens, policy.response_mask(tokens), rewards, texts)


# -- divergences to the base on sampled continuations --------------------------------------------------------------
def sequence_divergences(policy_logits: torch.Tensor, base_logits: torch.Tensor, tokens: torch.Tensor,
                         mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per response ``[b]``: each exact divergence summed over its tokens, the MC estimate of KL(pi_0 || pi) from
    the sampled tokens, and the token count. ``*_logits: [b, T, V]``, ``tokens``/``mask``: ``[b, T]``.

    A response is one input of ``average_over_inputs`` (shape ``[b, 1, T]``), so the sums are the shared ones.
    """
    mask3 = mask.unsqueeze(1)
    sums = {name: average_over_inputs(fn(base_logits, policy_logits).unsqueeze(1), mask3)
            for name, fn in PER_POSITION_DIVERGENCES.items()}
    sums["kl_base_to_policy_mc"] = kl_base_to_policy_mc(token_log_probs(policy_logits, tokens).unsqueeze(1),
                                                        token_log_probs(base_logits, tokens).unsqueeze(1), mask3)
    sums["tokens"] = mask.sum(-1).float()
    return sums


def reduce_divergences(sums: dict[str, torch.Tensor], group_size: int) -> dict[str, float]:
    """Per-token divergences (masked mean over each prompt's G responses' tokens, then mean over prompts) under
    their plain names -- the forgetting-law predictors -- and per-response sums (``*_seq``) beside the MC one."""
    tokens = sums["tokens"].view(-1, group_size).sum(-1).clamp(min=1)                       # [prompts]
    out = {name: (values.view(-1, group_size).sum(-1) / tokens).mean().item()
           for name, values in sums.items() if name in PER_POSITION_DIVERGENCES}
    out["kl_base_to_policy_seq"] = sums["kl_base_to_policy"].mean().item()
    out["kl_base_to_policy_mc_seq"] = sums["kl_base_to_policy_mc"].mean().item()
    return out


def _cat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


# -- updates --------------------------------------------------------------------------------------------------------
def optimizer_step(policy: CausalLMPolicy, optimizer: torch.optim.Optimizer, lr: float, max_grad_norm: float):
    """Clip the gradient norm, set the scheduled ``lr``, step; returns the pre-clip norm (a 0-d tensor)."""
    params = [p for p in policy.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def on_policy_update(policy: CausalLMPolicy, reference: CausalLMPolicy | None, optimizer, algo: AlgoConfig,
                     ro: Rollout, lr_at, first_optimizer_step: int, measure: bool = True) -> dict[str, float]:
    """``algo.mu`` optimizer steps on one generation batch (GRPO, 1-0 REINFORCE, REINFORCE).

    Divergences to the base are measured on the first pass, with the pre-update policy that drew the samples.
    ``lr_at(optimizer_step) -> lr``. ``reference`` may be None when nothing needs pi_0 (no KL term, no measure).
    """
    policy.train()  # gradient checkpointing and dropout act in training mode only
    advantages = sequence_advantages(algo.objective, ro.rewards, group_size=algo.group_size,
                                     scale_by_std=algo.scale_by_std)
    parts = slices(len(ro.tokens), algo.micro_batch)
    old: list[torch.Tensor | None] = [None] * len(parts)
    measured, stats = [], {}
    for epoch in range(algo.mu):
        for k, part in enumerate(parts):
            batch, tokens, mask = ro.batch[part], ro.tokens[part], ro.mask[part]
            logits = policy.token_logits(batch, tokens)                                   # [b, T, V]
            log_probs = token_log_probs(logits, tokens)                                   # [b, T]
            base_logits = None
            if reference is not None and (algo.kl_coef or (measure and epoch == 0)):
                with torch.no_grad():
                    base_logits = reference.token_logits(batch, tokens)
            kl_kwargs = {}
            if algo.kl_coef:
                kl_kwargs = {"kl_coef": algo.kl_coef,
                             "kl_per_token": kl_policy_to_base_per_position(base_logits, logits)}
            loss, part_stats = policy_gradient_objective(
                log_probs, advantages[part], mask, old_log_probs=old[k], clip_eps=algo.clip_eps,
                aggregation=algo.aggregation, **kl_kwargs)
            (loss * slice_weight(ro.mask, part, algo.aggregation)).backward()
            if epoch == 0:
                if algo.mu > 1:
                    old[k] = log_probs.detach()
                if measure and base_logits is not None:
                    measured.append(sequence_divergences(logits.detach(), base_logits, tokens, mask))
            for key, value in part_stats.items():
                stats[key] = stats.get(key, 0.0) + value / len(parts)
        norm = optimizer_step(policy, optimizer, lr_at(first_optimizer_step + epoch), algo.max_grad_norm)
    stats.update({"reward/mean": ro.rewards.float().mean().item(), "grad_norm": norm.item(),
                  "response/tokens": ro.mask.sum(-1).float().mean().item()})
    if measured:
        stats.update({f"kl/{k}": v for k, v in reduce_divergences(_cat(measured), algo.group_size).items()})
    return stats


def sft_update(policy: CausalLMPolicy, optimizer, algo: AlgoConfig, batch: TensorDict, targets: torch.Tensor,
               lr: float) -> dict[str, float]:
    """One SFT step on target responses ``targets [B, T]`` (eos then pad after the text)."""
    policy.train()
    mask = policy.response_mask(targets)
    objective = get_objective("sft")
    loss_total = 0.0
    for part in slices(len(targets), algo.micro_batch):
        log_probs = policy.token_log_probs(batch[part], targets[part])
        loss, stats = objective(log_probs, mask[part], aggregation=algo.aggregation)
        (loss * slice_weight(mask, part, algo.aggregation)).backward()
        loss_total += stats["loss/nll"] * slice_weight(mask, part, algo.aggregation)
    norm = optimizer_step(policy, optimizer, lr, algo.max_grad_norm)
    return {"loss/nll": loss_total, "grad_norm": norm.item()}


def simpo_update(policy: CausalLMPolicy, optimizer, algo: AlgoConfig, task: PromptSet, indices: torch.Tensor,
                 max_new_tokens: int, generator, lr: float, template=lambda p: p) -> dict[str, float]:
    """One SimPO step: chosen = the task's SFT response, rejected = one of the policy's own WRONG samples.

    Prompts where none of ``simpo_samples`` draws is wrong have no negative and sit this step out.
    """
    ro = rollout(policy, task, indices, algo.simpo_samples, max_new_tokens, generator, algo.temperature,
                 template=template)
    wrong = (ro.rewards == 0).view(-1, algo.simpo_samples)                               # [N, S]
    keep = wrong.any(-1)
    if not bool(keep.any()):
        return {"simpo/pairs": 0.0}
    rows = torch.arange(len(indices), device=wrong.device)[keep] * algo.simpo_samples + wrong[keep].int().argmax(-1)
    rejected, prompts = ro.tokens[rows], ro.batch[rows]
    chosen = policy.encode_responses([task.responses[int(i)] for i in indices[keep.cpu()]], max_new_tokens)
    objective = get_objective("simpo")
    stats_total: dict[str, float] = {}
    policy.train()
    for part in slices(len(rows), algo.micro_batch):
        loss, stats = objective(policy.token_log_probs(prompts[part], chosen[part]),
                                policy.token_log_probs(prompts[part], rejected[part]),
                                policy.response_mask(chosen[part]), policy.response_mask(rejected[part]),
                                gamma=algo.simpo_gamma, beta=algo.simpo_beta)
        share = (part.stop - part.start) / len(rows)
        (loss * share).backward()
        for key, value in stats.items():
            stats_total[key] = stats_total.get(key, 0.0) + value * share
    norm = optimizer_step(policy, optimizer, lr, algo.max_grad_norm)
    return {**stats_total, "simpo/pairs": float(len(rows)), "grad_norm": norm.item()}


# -- evaluation -----------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(policy: CausalLMPolicy, reference: CausalLMPolicy, new_task: PromptSet, prior_task: PromptSet | None,
             samples: int, max_new_tokens: int, micro_batch: int, seed: int, template=lambda p: p) -> dict[str, float]:
    """Scores in percent and divergences to the base on the new task's evaluation prompts.

    ``new_score``: mean verified reward of ``samples`` sampled responses per prompt (the success probability of
    the sampling policy, what RL maximizes); ``new_greedy_accuracy`` and ``prior_score``: greedy decoding.
    Divergences: exact, per token, on the sampled continuations (``reduce_divergences``). ``prior_task=None``
    leaves the prior score to the caller (e.g. lm-eval).
    """
    policy.eval()
    generator = torch.Generator(device=policy.device).manual_seed(seed)
    indices = torch.arange(len(new_task))
    ro = rollout(policy, new_task, indices, samples, max_new_tokens, generator, template=template)
    measured = []
    for part in slices(len(ro.tokens), micro_batch):
        batch, tokens = ro.batch[part], ro.tokens[part]
        measured.append(sequence_divergences(policy.token_logits(batch, tokens), reference.token_logits(batch, tokens),
                                             tokens, ro.mask[part]))
    greedy = rollout(policy, new_task, indices, 1, max_new_tokens, None, greedy=True, template=template)
    row = {"new_score": 100 * ro.rewards.mean().item(), "new_greedy_accuracy": 100 * greedy.rewards.mean().item(),
           **reduce_divergences(_cat(measured), samples)}
    if prior_task is not None:
        prior = rollout(policy, prior_task, torch.arange(len(prior_task)), 1, max_new_tokens, None, greedy=True,
                        template=template)
        row["prior_score"] = 100 * prior.rewards.mean().item()
    return row


# -- the embedded default's base ------------------------------------------------------------------------------------
def pretrain(policy: CausalLMPolicy, prompts: list[str], responses: list[str], steps: int, batch_size: int,
             lr: float, seed: int, max_new_tokens: int) -> float:
    """SFT on (prompt, response) pairs through the shared SFT objective; returns the last loss."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr)
    objective = get_objective("sft")
    loss = torch.tensor(float("nan"))
    policy.train()
    for _ in range(steps):
        rows = torch.randint(len(prompts), (batch_size,), generator=generator).tolist()
        batch = policy.encode_prompts([prompts[i] for i in rows])
        targets = policy.encode_responses([responses[i] for i in rows], max_new_tokens)
        loss, _ = objective(policy.token_log_probs(batch, targets), policy.response_mask(targets))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()
