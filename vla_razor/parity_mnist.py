"""The ParityMNIST study (PROTOCOL.md, "ParityMNIST"): pretrain a base, sweep every fine-tuning method, evaluate.

Read top to bottom: config dataclasses -> pretraining -> how each method turns a minibatch into a loss (through
the shared objectives) -> the sweep loop over stacked runs -> evaluation of a checkpoint into results-table rows.
All runs of one (method, epochs) group train side by side as one :class:`StackedMLP` on the same minibatches, each
with its own learning rate and schedule.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from envs.parity_mnist import ParityMNISTData, parity_correct_mask, parity_reward, random_same_parity_labels
from policies.mlp import StackedMLP, single_member_logits
from vla_razor import predictors
from vla_razor.divergences import average_over_inputs, kl_base_to_policy_per_position, kl_policy_to_base_per_position, policy_divergences
from vla_razor.objectives import get_objective
from vla_razor.optim import StackedAdamW, lr_multiplier
from vla_razor.oracle import oracle_distribution
from vla_razor.policy import sample_tokens, token_log_probs

log = logging.getLogger(__name__)


@dataclass
class MethodConfig:
    """One fine-tuning method = an objective from the shared registry + where its tokens come from."""
    objective: str = "sft"          # sft | grpo | reinforce_1_0 | simpo (vla_razor.objectives)
    targets: str = ""               # SFT/SimPO labels: parity_digit | sft2 | oracle | teacher; "" = own samples
    group_size: int = 8             # samples per image for the on-policy methods
    kl_coef: float = 0.0            # beta of the exact KL(pi || pi_0) penalty (GRPO + KL)
    simpo_gamma: float = 1.0


@dataclass
class PretrainConfig:
    epochs: int = 60
    batch_size: int = 64
    lr: float = 1e-3                # Adam, constant


@dataclass
class SweepConfig:
    lr_min: float = 3e-6
    lr_max: float = 1e-3
    num_lrs: int = 15               # log-spaced in [lr_min, lr_max]
    schedules: list[str] = field(default_factory=lambda: ["constant_with_warmup", "cosine_with_warmup"])
    epochs: list[int] = field(default_factory=lambda: [1, 2])
    batch_size: int = 64            # images per step (x group_size samples for on-policy methods)
    warmup_steps: int = 10
    checkpoints_per_run: int = 8    # evaluations spread evenly over each run, the last at its end
    dynamics_every: int = 10        # steps between gradient-cosine / KL-change measurements (0 = off)

    def learning_rates(self) -> list[float]:
        return np.geomspace(self.lr_min, self.lr_max, self.num_lrs).tolist()


@dataclass
class EvalConfig:
    probe_size: int = 256           # new-task inputs for activation change, CKA, CKNNA
    fisher_size: int = 200          # prior-task inputs for the Fisher (PROTOCOL: Fisher over PRIOR-task inputs)
    cknna_k: int = 10
    dynamics_probe_size: int = 128  # inputs per task for the per-step dynamics


def learning_rate_grid(sweep: SweepConfig) -> list[tuple[float, str]]:
    """(peak lr, schedule) for each run of a group, in stack order."""
    return [(lr, schedule) for schedule in sweep.schedules for lr in sweep.learning_rates()]


# -- pretraining ----------------------------------------------------------------------------------------------------
def pretrain_base(data: ParityMNISTData, cfg: PretrainConfig, seed: int) -> StackedMLP:
    """Joint SFT on ParityMNIST (random same-parity labels) + FashionMNIST: the base pi_0, a 1-member stack."""
    generator = torch.Generator().manual_seed(seed)
    model = StackedMLP(1, generator=generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    n = len(data.pretrain_inputs)
    for _ in tqdm(range(cfg.epochs), desc="pretrain", leave=False):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, cfg.batch_size):
            rows = order[start:start + cfg.batch_size]
            logits = model.logits(data.pretrain_inputs[rows])[0, :, 0]             # [B, 10]
            loss = F.cross_entropy(logits, data.pretrain_labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model


# -- what each method trains on ---------------------------------------------------------------------------------
@dataclass
class FixedTargets:
    """Per-fine-tune-image label sources computed once before a sweep."""
    sft2: torch.Tensor              # [N] long: even -> {0, 4}, odd -> {1, 5}
    oracle_probs: torch.Tensor      # [N, 10]: pi_0 restricted to correct labels (vla_razor.oracle)
    teacher_probs: torch.Tensor | None = None   # [N, 10]: an RL-trained teacher's policy, for SFT-distill


def build_fixed_targets(base: StackedMLP, data: ParityMNISTData, seed: int) -> FixedTargets:
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        base_logits = base.logits(data.finetune_inputs)[0, :, 0]
    return FixedTargets(
        sft2=random_same_parity_labels(data.finetune_digits, ((0, 4), (1, 5)), generator),
        oracle_probs=oracle_distribution(base_logits, parity_correct_mask(data.finetune_digits)))


def sft_targets(method: MethodConfig, rows: torch.Tensor, digits: torch.Tensor, fixed: FixedTargets,
                num_runs: int, generator: torch.Generator) -> torch.Tensor:
    """Labels ``[R, B]`` for the batch ``rows``: fixed ones shared by every run, sampled ones drawn per run."""
    if method.targets == "parity_digit":                     # SFT1: even -> 0, odd -> 1
        return (digits % 2).expand(num_runs, -1)
    if method.targets == "sft2":
        return fixed.sft2[rows].expand(num_runs, -1)
    if method.targets in ("oracle", "teacher"):
        probs = fixed.oracle_probs if method.targets == "oracle" else fixed.teacher_probs
        if probs is None:
            raise RuntimeError("SFT-distill needs an RL teacher: run a 'grpo' method before it in `methods`")
        return sample_tokens(probs[rows].log().expand(num_runs, -1, -1), generator=generator)
    raise ValueError(f"unknown SFT target source {method.targets!r}; "
                     "choose parity_digit | sft2 | oracle | teacher")


def method_loss(method: MethodConfig, logits: torch.Tensor, base_logits: torch.Tensor, rows: torch.Tensor,
                digits: torch.Tensor, fixed: FixedTargets, generator: torch.Generator):
    """Loss summed over the R runs of a stack, and the runs' mean stats.

    ``logits: [R, B, 1, 10]``, ``base_logits: [B, 1, 10]``. Runs are independent, so flattening them into the batch
    and scaling by R gives every run exactly the gradient of its own mean loss (all runs see equally many tokens).
    """
    num_runs, batch = logits.shape[:2]
    objective = get_objective(method.objective)
    if method.objective == "sft":
        targets = sft_targets(method, rows, digits, fixed, num_runs, generator)             # [R, B]
        log_probs = token_log_probs(logits, targets.unsqueeze(-1))                            # [R, B, 1]
        loss, stats = objective(log_probs.reshape(-1, 1))
    elif method.objective == "simpo":
        chosen = (digits % 2).expand(num_runs, -1).unsqueeze(-1)                              # SFT1's labels
        wrong = ~parity_correct_mask(digits)                                                  # [B, 10]
        rejected = sample_tokens(logits.detach().masked_fill(~wrong.unsqueeze(-2), -math.inf), generator=generator)
        loss, stats = objective(token_log_probs(logits, chosen).reshape(-1, 1),
                                token_log_probs(logits, rejected).reshape(-1, 1), gamma=method.simpo_gamma)
    else:                                                                                     # on-policy methods
        group = method.group_size
        grouped = logits.unsqueeze(2).expand(num_runs, batch, group, 1, logits.shape[-1])   # [R, B, G, 1, 10]
        samples = sample_tokens(grouped, generator=generator)                                 # [R, B, G, 1]
        rewards = parity_reward(digits.view(1, batch, 1), samples[..., 0])                    # [R, B, G]
        kwargs = {"group_size": group} if method.objective == "grpo" else {}
        if method.kl_coef:
            kl = kl_policy_to_base_per_position(base_logits.unsqueeze(0), logits)            # [R, B, 1] exact
            kwargs.update(kl_coef=method.kl_coef, kl_per_token=kl.unsqueeze(2).expand(-1, -1, group, -1).reshape(-1, 1))
        loss, stats = objective(token_log_probs(grouped, samples).reshape(-1, 1), rewards.reshape(-1), **kwargs)
    return loss * num_runs, stats


# -- evaluation ---------------------------------------------------------------------------------------------------
@dataclass
class BaseReference:
    """Everything about pi_0 that every checkpoint is compared against (computed once)."""
    model: StackedMLP
    state: dict[str, torch.Tensor]
    new_logits: torch.Tensor        # [N, 1, 10] on new-task eval inputs
    probe_hidden: torch.Tensor      # [P, 768]
    fisher: dict[str, torch.Tensor]
    new_score: float
    prior_score: float


@torch.no_grad()
def task_scores(model: StackedMLP, data: ParityMNISTData, new_logits: torch.Tensor | None = None):
    """Per run, in percent: new-task success probability of the sampling policy (what RL maximizes), new-task
    greedy accuracy, prior-task (FashionMNIST) greedy accuracy. Each ``[R]``. ``new_logits [R, N, 1, 10]`` may be
    passed when the caller already has them."""
    if new_logits is None:
        new_logits = model.logits(data.new_eval_inputs)
    new_probs = torch.softmax(new_logits[:, :, 0], -1)                                        # [R, N, 10]
    correct = parity_correct_mask(data.new_eval_digits)                                        # [N, 10]
    new_expected = (new_probs * correct).sum(-1).mean(-1) * 100
    new_greedy = parity_reward(data.new_eval_digits, new_probs.argmax(-1)).mean(-1) * 100
    prior_pred = model.logits(data.prior_eval_inputs)[:, :, 0].argmax(-1)
    prior_greedy = (prior_pred == data.prior_eval_labels).float().mean(-1) * 100
    return new_expected, new_greedy, prior_greedy


def build_base_reference(base: StackedMLP, data: ParityMNISTData, cfg: EvalConfig,
                         fisher: dict[str, torch.Tensor] | None = None) -> BaseReference:
    """pi_0's scores, logits, activations and Fisher; pass a saved ``fisher`` to skip its (slow) computation."""
    state = base.member_state(0)
    if fisher is None:
        fisher = predictors.expected_fisher_diagonal(single_member_logits, state,
                                                     data.prior_eval_inputs[:cfg.fisher_size])
    new_score, _, prior_score = task_scores(base, data)
    with torch.no_grad():
        return BaseReference(model=base, state=state, new_logits=base.logits(data.new_eval_inputs)[0],
                             probe_hidden=base.hidden_activations(data.new_eval_inputs[:cfg.probe_size])[0],
                             fisher=fisher, new_score=new_score.item(), prior_score=prior_score.item())


@torch.no_grad()
def evaluate_stack(model: StackedMLP, base: BaseReference, data: ParityMNISTData, cfg: EvalConfig) -> list[dict]:
    """One results row per run: scores, forgetting and every forgetting predictor of PROTOCOL's Table 1."""
    # one forward over the new-task inputs gives the logits and, on its first P rows, the probe activations
    logits, hidden_layers = model.forward_with_hidden(data.new_eval_inputs)
    logits = logits.unsqueeze(-2)                                                             # [R, N, 1, 10]
    hidden = torch.cat(hidden_layers, dim=-1)[:, :cfg.probe_size]                            # [R, P, 768]
    new_expected, new_greedy, prior = task_scores(model, data, logits)
    divergences = policy_divergences(base.new_logits.expand_as(logits), logits)              # each [R]
    rows = []
    for run in range(model.num_members):
        tuned = model.member_state(run)
        rows.append({
            "new_score": new_expected[run].item(), "new_greedy_accuracy": new_greedy[run].item(),
            "prior_score": prior[run].item(), "forgetting": base.prior_score - prior[run].item(),
            **{name: value[run].item() for name, value in divergences.items()},
            "weight_change_l1": predictors.weight_change_l1(base.state, tuned),
            "weight_change_fisher_l2": predictors.weight_change_fisher_l2(base.state, tuned, base.fisher),
            **predictors.update_spectrum(base.state, tuned),
            "update_sparsity": predictors.update_sparsity(base.state, tuned),
            "activation_change_l1": predictors.activation_change(base.probe_hidden, hidden[run], 1),
            "activation_change_l2": predictors.activation_change(base.probe_hidden, hidden[run], 2),
            "cka": predictors.linear_cka(base.probe_hidden, hidden[run]),
            "cknna": predictors.cknna(base.probe_hidden, hidden[run], cfg.cknna_k),
        })
    return rows


# -- the sweep ----------------------------------------------------------------------------------------------------
def prior_loss_gradients(model: StackedMLP, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Gradient of each run's prior-task cross-entropy, flattened: ``[R, num_params_per_run]``."""
    logits = model.logits(inputs)[:, :, 0]                                                    # [R, P, 10]
    loss = F.cross_entropy(logits.flatten(0, 1), labels.repeat(model.num_members), reduction="sum") / len(labels)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return torch.cat([g.flatten(1) for g in grads], dim=1)


def flat_parameters(model: StackedMLP) -> torch.Tensor:
    return torch.cat([p.detach().flatten(1) for p in model.parameters()], dim=1)            # [R, D]


def train_group(name: str, method: MethodConfig, epochs: int, base: BaseReference, data: ParityMNISTData,
                fixed: FixedTargets, sweep: SweepConfig, eval_cfg: EvalConfig, seed: int):
    """Fine-tune every (lr, schedule) run of one (method, epochs) group together.

    Returns (results rows, per-step dynamics rows, the final stacked model).
    """
    grid = learning_rate_grid(sweep)
    model = StackedMLP.from_member_states([base.state] * len(grid))
    optimizer = StackedAdamW(model.parameters())
    peak_lrs = torch.tensor([lr for lr, _ in grid])
    generator = torch.Generator().manual_seed(seed)
    n = len(data.finetune_inputs)
    steps_per_epoch = math.ceil(n / sweep.batch_size)
    total_steps = steps_per_epoch * epochs
    eval_steps = {round(total_steps * k / sweep.checkpoints_per_run) for k in range(1, sweep.checkpoints_per_run + 1)}
    probe = data.new_eval_inputs[:eval_cfg.dynamics_probe_size]
    prior_probe = (data.prior_eval_inputs[:eval_cfg.dynamics_probe_size],
                   data.prior_eval_labels[:eval_cfg.dynamics_probe_size])
    with torch.no_grad():
        base_probe_logits = base.model.logits(probe)[0]
    rows, dynamics, step = [], [], 0
    progress = tqdm(total=total_steps, desc=f"{name} x{epochs}ep", leave=False, mininterval=5)
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, sweep.batch_size):
            batch_rows = order[start:start + sweep.batch_size]
            x, digits = data.finetune_inputs[batch_rows], data.finetune_digits[batch_rows]
            measure = sweep.dynamics_every and step % sweep.dynamics_every == 0
            if measure:
                prior_grad = prior_loss_gradients(model, *prior_probe)
                before = flat_parameters(model)
                with torch.no_grad():
                    kl_before = _probe_kl(model, probe, base_probe_logits)
            with torch.no_grad():
                base_logits = base.model.logits(x)[0]
            loss, stats = method_loss(method, model.logits(x), base_logits, batch_rows, digits, fixed, generator)
            optimizer.zero_grad()
            loss.backward()
            multipliers = torch.tensor([lr_multiplier(step, total_steps, sweep.warmup_steps, s) for _, s in grid])
            optimizer.step(peak_lrs * multipliers)
            if measure:
                update = flat_parameters(model) - before
                cosine = F.cosine_similarity(update, prior_grad, dim=1)
                with torch.no_grad():
                    kl_change = _probe_kl(model, probe, base_probe_logits) - kl_before
                dynamics += [{"method": name, "epochs": epochs, "lr": lr, "schedule": schedule, "step": step,
                              "update_prior_grad_cosine": cosine[i].item(), "kl_change": kl_change[i].item()}
                             for i, (lr, schedule) in enumerate(grid)]
            step += 1
            progress.update()
            progress.set_postfix({k: f"{v:.3g}" for k, v in stats.items() if k in ("loss/total", "loss/nll",
                                                                                   "reward/mean", "loss/simpo")})
            if step in eval_steps:
                for row, (lr, schedule) in zip(evaluate_stack(model, base, data, eval_cfg), grid):
                    rows.append({"method": name, "lr": lr, "schedule": schedule, "epochs": epochs, "step": step,
                                 "progress": step / total_steps, **row})
    progress.close()
    return rows, dynamics, model


def _probe_kl(model: StackedMLP, probe: torch.Tensor, base_probe_logits: torch.Tensor) -> torch.Tensor:
    logits = model.logits(probe)                                                              # [R, P, 1, 10]
    return average_over_inputs(kl_base_to_policy_per_position(base_probe_logits.expand_as(logits), logits))  # [R]
