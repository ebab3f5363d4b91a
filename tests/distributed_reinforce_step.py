"""One REINFORCE update of a tiny OpenVLA-layout policy under ``accelerate launch`` (run by tests/test_distributed.py).

Each rank starts from its OWN random weights and its own batch: after ``prepare`` DDP must have broadcast rank 0's
weights, and after the step every rank must hold rank 0's weights minus lr times the gradient averaged over ranks.
Each rank writes what it saw to ``OUT/rank{r}.pt``; :func:`reference_update` recomputes the update in one process.

Then train-vla's update (``vla_razor.vla_train.policy_gradient_update``) on UNEVEN trajectory batches -- rank 0 has
3 trajectories (6 steps) in 2 minibatches, rank 1 has 2 (3 steps) in 1 -- must equal one process's update on the union of both:
reward-normalized baseline over all 5, token mean over all their action tokens (:func:`reference_trajectory_update`).

``python ... OUT STRATEGY [LORA_TARGETS]``: with LORA_TARGETS (e.g. ``all_linear``) the policy trains rank-4 LoRA
adapters on those layers instead of every weight.
"""
import sys
from pathlib import Path

import torch
from tensordict import TensorDict

from policies.openvla import OpenVLAOptions
from policies.vla_factory import PolicyConfig, build_policy
from policies.vla_model import VLAModelConfig
from vla_razor.objectives import reinforce_objective

INSTRUCTIONS = ["pick coke can", "open the top drawer"]
LR = 0.5


def make_policy(seed: int, lora_targets: str | None = None):
    torch.manual_seed(seed)
    options = OpenVLAOptions(lora_rank=4, lora_alpha=8, lora_targets=lora_targets) if lora_targets else OpenVLAOptions()
    cfg = PolicyConfig(kind="openvla_tiny", model=VLAModelConfig(image_size=28, patch_size=14, proprio_dim=None),
                       openvla=options)
    return build_policy(cfg, INSTRUCTIONS)


def make_batch(rank: int):
    g = torch.Generator().manual_seed(rank)
    batch = TensorDict({("observation", "image"): torch.randint(0, 256, (4, 3, 28, 28), generator=g,
                                                                dtype=torch.uint8),
                        "language_instruction": [INSTRUCTIONS[(i + rank) % 2] for i in range(4)]}, batch_size=[4])
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0]) if rank == 0 else torch.tensor([0.0, 1.0, 1.0, 1.0])
    return batch, rewards


def trajectories(rank: int) -> tuple[TensorDict, torch.Tensor, torch.Tensor]:
    """A flat collector batch: rank 0 has 3 trajectories of 2, 1 and 3 steps, rank 1 has 2 of 1 and 2 steps;
    returns (steps, per-step trajectory index, per-trajectory rewards)."""
    lengths = [2, 1, 3] if rank == 0 else [1, 2]
    n = sum(lengths)
    g = torch.Generator().manual_seed(50 + rank)
    steps = TensorDict({("observation", "image"): torch.randint(0, 256, (n, 3, 28, 28), generator=g,
                                                                dtype=torch.uint8),
                        ("vla_action", "tokens"): torch.randint(0, 256, (n, 1, 7), generator=g),
                        "language_instruction": [INSTRUCTIONS[i % 2] for i in range(n)]}, batch_size=[n])
    index = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    rewards = torch.tensor([1.0, 0.0, 1.0]) if rank == 0 else torch.tensor([0.0, 0.0])
    return steps, index, rewards


def union(parts: list[tuple]) -> tuple[TensorDict, torch.Tensor, torch.Tensor]:
    """Every rank's trajectories as one batch, trajectory indices offset rank after rank."""
    offsets = [0]
    for _, _, rewards in parts[:-1]:
        offsets.append(offsets[-1] + len(rewards))
    return (torch.cat([steps for steps, _, _ in parts]),
            torch.cat([index + offset for (_, index, _), offset in zip(parts, offsets)]),
            torch.cat([rewards for _, _, rewards in parts]))


def reference_trajectory_update(initial: dict, lora_targets: str | None = None) -> dict[str, torch.Tensor]:
    from vla_razor.distributed import PolicyForward
    from vla_razor.vla_train import policy_gradient_update

    policy = make_policy(0, lora_targets)
    policy.load_state_dict(initial)
    policy_gradient_update(PolicyForward(policy), *union([trajectories(0), trajectories(1)]), torch.optim.SGD(policy.parameters(), lr=LR),
                           objective="reinforce", minibatch_steps=3, max_grad_norm=1e9)
    return policy.state_dict()


def reference_update(results: list[dict]) -> dict[str, torch.Tensor]:
    """Rank 0's initial weights after one SGD step on the gradient averaged over every rank's batch."""
    policy = make_policy(0, results[0]["lora_targets"])
    policy.load_state_dict(results[0]["initial"])
    for result in results:
        loss, _ = reinforce_objective(policy.token_log_probs(result["batch"], result["tokens"]), result["rewards"])
        (loss / len(results)).backward()
    with torch.no_grad():
        for p in policy.parameters():
            if p.grad is not None:
                p.sub_(LR * p.grad)
    return policy.state_dict()


def main(out: Path, strategy: str, lora_targets: str | None = None) -> None:
    from vla_razor.distributed import DistributedConfig, gather_stats, load_state, make_accelerator, optimizer_state, \
        policy_state, prepare, rank, unwrap_policy, world_size

    distributed = DistributedConfig(strategy=strategy, cpu=True)
    accelerator = make_accelerator(distributed)
    r = rank(accelerator)
    assert world_size(accelerator) == 2, "launch with --num_processes 2"
    policy = make_policy(seed=100 + r, lora_targets=lora_targets)
    initial = {k: v.clone() for k, v in policy.state_dict().items()}
    wrapped, optimizer = prepare(accelerator, policy, lambda params: torch.optim.SGD(params, lr=LR), distributed)

    def weights():  # what a checkpoint would hold: whole, plain tensors
        return {k: v.detach().clone() for k, v in policy_state(accelerator, wrapped, everywhere=True).items()}

    batch, rewards = make_batch(r)
    tokens = wrapped(batch, generator=torch.Generator().manual_seed(10 + r))
    loss, stats = reinforce_objective(wrapped(batch, tokens), rewards)
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    final = weights()

    from vla_razor.vla_train import policy_gradient_update

    update = policy_gradient_update(wrapped, *trajectories(r), optimizer, objective="reinforce",
                                    minibatch_steps=3 if r == 0 else 5, max_grad_norm=1e9, accelerator=accelerator)
    after = weights()

    # a resume: Adam's state is what a checkpoint must carry whole (sharded under FSDP). Save after one Adam step,
    # take a second; then load the save and take the second step again: the same weights must come out.
    adam = accelerator.prepare_optimizer(torch.optim.Adam([p for p in wrapped.parameters() if p.requires_grad],
                                                          lr=1e-3))

    def adam_step():
        policy_gradient_update(wrapped, *trajectories(r), adam, objective="reinforce", minibatch_steps=4,
                               max_grad_norm=1e9, accelerator=accelerator)

    adam_step()
    saved_weights, saved_optimizer = weights(), optimizer_state(wrapped, adam)
    if r == 0:  # a checkpoint as train-vla writes it: the main process's whole state, read back by every process
        torch.save(saved_optimizer, out / "optimizer.pt")
    accelerator.wait_for_everyone()
    saved_optimizer = torch.load(out / "optimizer.pt", weights_only=False)
    adam_step()
    continued = weights()
    load_state(wrapped, unwrap_policy(accelerator, wrapped), adam, saved_weights, saved_optimizer)
    reloaded = weights()
    adam_step()
    torch.save({"initial": initial, "final": final, "batch": batch, "tokens": tokens, "rewards": rewards,
                "local_stats": stats, "stats": gather_stats(accelerator, stats), "after_trajectory_update": after,
                "update": update, "saved_weights": saved_weights, "continued": continued, "reloaded": reloaded,
                "resumed": weights(), "saved_optimizer_keys": len(saved_optimizer.get("state", {})),
                "lora_targets": lora_targets},
               out / f"rank{r}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "ddp", sys.argv[3] if len(sys.argv) > 3 else None)
