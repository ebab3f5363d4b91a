"""What a training loop needs to run under ``accelerate launch``: DDP for models that fit one GPU (the tiny VLA, LoRA
on OpenVLA-7B), FSDP to shard a full fine-tune of the 7B.

The loop stays an explicit loop; these functions only create the engine, wrap the policy and optimizer, and make
logging, saving and statistics rank-aware. A one-process run (plain ``python``) gets the same code path with
``world_size == 1``.

DDP and FSDP act inside the wrapped module's ``forward`` (DDP arms its gradient all-reduce there, FSDP gathers the
sharded weights there), while a token policy is used through ``sample_tokens`` / ``token_log_probs``.
:class:`PolicyForward` routes both through ``forward`` so the wrapper sees every use of the weights.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

STRATEGIES = ("ddp", "fsdp")


@dataclass
class DistributedConfig:
    """``distributed/``: how the processes that ``accelerate launch`` started share the model."""

    strategy: str = "ddp"             # ddp: replicate (tiny / LoRA); fsdp: shard params, grads, optimizer state
    mixed_precision: str = "no"       # no | bf16 | fp16 (autocast; OpenVLA-7B's weights are bf16 already)
    # modules FSDP shards as units: Llama's decoder layers and the ViT blocks of policies/openvla_vision.py
    fsdp_wrap: list[str] = field(default_factory=lambda: ["LlamaDecoderLayer", "Block"])
    cpu: bool = False                 # force CPU (gloo backend); a machine without CUDA uses it anyway

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"distributed.strategy={self.strategy!r}; use one of {list(STRATEGIES)}")


def make_accelerator(cfg: DistributedConfig):
    """The ``accelerate.Accelerator`` for ``cfg`` (process group from ``accelerate launch``'s environment)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs, FullyShardedDataParallelPlugin

    # without CUDA, `accelerate launch --multi_gpu` processes must still form one (gloo) process group
    cpu = cfg.cpu or not torch.cuda.is_available()
    if cfg.strategy == "fsdp" and cpu:
        # accelerate runs FSDP only on accelerators (torch's FSDP1 computes on CUDA-like devices): on CPU it would
        # quietly replicate the model as DDP, and a run meant to shard would not
        raise ValueError("distributed.strategy=fsdp needs CUDA GPUs; on CPU use distributed.strategy=ddp")
    if cfg.strategy == "fsdp":
        # use_orig_params: LoRA mixes frozen and trainable parameters inside one FSDP unit
        plugin = FullyShardedDataParallelPlugin(
            auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=list(cfg.fsdp_wrap),
            use_orig_params=True, state_dict_type="FULL_STATE_DICT")
        return Accelerator(mixed_precision=cfg.mixed_precision, cpu=cpu, fsdp_plugin=plugin)
    # every trainable parameter gets a gradient each step (ViT heads OpenVLA never reads are frozen), so DDP need
    # not search the graph for unused ones; buffers (proprio statistics) are synced once at wrap time and never
    # change -- a broadcast per forward would deadlock processes that run different numbers of minibatches
    ddp = DistributedDataParallelKwargs(find_unused_parameters=False, broadcast_buffers=False)
    return Accelerator(mixed_precision=cfg.mixed_precision, cpu=cpu, kwargs_handlers=[ddp])


class PolicyForward(nn.Module):
    """``forward(batch)`` samples action tokens (no gradient); ``forward(batch, tokens)`` gives their log-probs."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, batch, tokens: torch.Tensor | None = None, generator: torch.Generator | None = None):
        if tokens is None:
            with torch.no_grad():
                return self.policy.sample_tokens(batch, generator=generator)
        return self.policy.token_log_probs(batch, tokens)


def prepare(accelerator, policy: nn.Module, make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]):
    """(wrapped :class:`PolicyForward`, prepared optimizer). The optimizer is built on the wrapped module's
    trainable parameters, which FSDP replaces when it shards."""
    wrapped = accelerator.prepare_model(PolicyForward(policy))
    optimizer = make_optimizer([p for p in wrapped.parameters() if p.requires_grad])
    return wrapped, accelerator.prepare_optimizer(optimizer)


def unwrap_policy(accelerator, wrapped: nn.Module) -> nn.Module:
    """The policy inside a :func:`prepare` wrapper (for saving and evaluation)."""
    return accelerator.unwrap_model(wrapped).policy


@contextmanager
def full_weights(accelerator, wrapped: nn.Module) -> Iterator[None]:
    """Inside, the bare policy (:func:`unwrap_policy`) holds all its weights on every process: FSDP gathers its
    shards for rollouts, evaluation and saving (every process must enter); DDP and one process hold them already."""
    if accelerator.distributed_type != "FSDP":
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(wrapped, writeback=False):
        yield


def rank(accelerator) -> int:
    return accelerator.process_index


def world_size(accelerator) -> int:
    return accelerator.num_processes


def is_main(accelerator) -> bool:
    return accelerator.is_main_process


def log_main(accelerator, logger: logging.Logger, message: str, *args) -> None:
    """Log once per run, from the main process."""
    if accelerator.is_main_process:
        logger.info(message, *args)


def save_main(accelerator, save: Callable[[], object]):
    """Run ``save`` on the main process only, after every process has arrived (no rank still writing)."""
    accelerator.wait_for_everyone()
    result = save() if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    return result


def reduce_floats(accelerator, values: list[float], reduction: str = "sum") -> list[float]:
    """``values`` summed (or averaged) over processes, the same on all of them; as they are for one process or
    ``accelerator=None``."""
    if accelerator is None or accelerator.num_processes == 1:
        return [float(v) for v in values]
    local = torch.tensor([float(v) for v in values], dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(local, reduction=reduction).tolist()


def gather_stats(accelerator, stats: dict[str, float]) -> dict[str, float]:
    """Average float statistics over processes (each process's batch counts once). Every process must pass the
    same keys; the result is the same on all of them."""
    keys = sorted(stats)
    return dict(zip(keys, reduce_floats(accelerator, [stats[k] for k in keys], reduction="mean")))
