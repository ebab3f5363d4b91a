"""One REINFORCE update of a tiny OpenVLA-layout policy under ``accelerate launch`` (run by tests/test_distributed.py).

Each rank starts from its OWN random weights and its own batch: after ``prepare`` DDP must have broadcast rank 0's
weights, and after the step every rank must hold rank 0's weights minus lr times the gradient averaged over ranks.
Each rank writes what it saw to ``OUT/rank{r}.pt``; :func:`reference_update` recomputes the update in one process.
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


def make_policy(seed: int):
    torch.manual_seed(seed)
    cfg = PolicyConfig(kind="openvla_tiny", model=VLAModelConfig(image_size=28, patch_size=14, proprio_dim=None),
                       openvla=OpenVLAOptions())
    return build_policy(cfg, INSTRUCTIONS)


def make_batch(rank: int):
    g = torch.Generator().manual_seed(rank)
    batch = TensorDict({("observation", "image"): torch.randint(0, 256, (4, 3, 28, 28), generator=g,
                                                                dtype=torch.uint8),
                        "language_instruction": [INSTRUCTIONS[(i + rank) % 2] for i in range(4)]}, batch_size=[4])
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0]) if rank == 0 else torch.tensor([0.0, 1.0, 1.0, 1.0])
    return batch, rewards


def reference_update(results: list[dict]) -> dict[str, torch.Tensor]:
    """Rank 0's initial weights after one SGD step on the gradient averaged over every rank's batch."""
    policy = make_policy(0)
    policy.load_state_dict(results[0]["initial"])
    for result in results:
        loss, _ = reinforce_objective(policy.token_log_probs(result["batch"], result["tokens"]), result["rewards"])
        (loss / len(results)).backward()
    with torch.no_grad():
        for p in policy.parameters():
            if p.grad is not None:
                p.sub_(LR * p.grad)
    return policy.state_dict()


def main(out: Path) -> None:
    from vla_razor.distributed import DistributedConfig, gather_stats, make_accelerator, prepare, rank, \
        unwrap_policy, world_size

    accelerator = make_accelerator(DistributedConfig(strategy="ddp", cpu=True))
    r = rank(accelerator)
    assert world_size(accelerator) == 2, "launch with --num_processes 2"
    policy = make_policy(seed=100 + r)
    initial = {k: v.clone() for k, v in policy.state_dict().items()}
    wrapped, optimizer = prepare(accelerator, policy, lambda params: torch.optim.SGD(params, lr=LR))
    batch, rewards = make_batch(r)
    tokens = wrapped(batch, generator=torch.Generator().manual_seed(10 + r))
    loss, stats = reinforce_objective(wrapped(batch, tokens), rewards)
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    torch.save({"initial": initial, "final": unwrap_policy(accelerator, wrapped).state_dict(), "batch": batch,
                "tokens": tokens, "rewards": rewards, "local_stats": stats,
                "stats": gather_stats(accelerator, stats)}, out / f"rank{r}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
