"""What a training loop needs to run under ``accelerate launch``: DDP for models that fit one GPU (the tiny VLA, LoRA
on OpenVLA-7B), FSDP (torch's ``fully_shard``) to shard a full fine-tune of the 7B.

The loop stays an explicit loop; these functions only create the engine, wrap the policy and optimizer, and make
logging, saving and statistics rank-aware. A one-process run (plain ``python``) gets the same code path with
``world_size == 1``. ``accelerate`` runs the process group, devices and DDP; FSDP is torch's per-module
``fully_shard`` applied here (accelerate's FSDP plugin turns into DDP on CPU and needs the optimizer prepared with the
model), so the sharded path runs and is tested on CPU processes too.

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

log = logging.getLogger(__name__)

STRATEGIES = ("ddp", "fsdp")


@dataclass
class DistributedConfig:
    """``distributed/``: how the processes that ``accelerate launch`` started share the model."""

    strategy: str = "ddp"             # ddp: replicate (tiny / LoRA); fsdp: shard params, grads, optimizer state
    mixed_precision: str = "no"       # no | bf16 | fp16 (DDP: autocast; FSDP: bf16 compute, fp32 gradient reduction)
    # modules FSDP shards as units: Llama's decoder layers and the ViT blocks of policies/openvla_vision.py
    fsdp_wrap: list[str] = field(default_factory=lambda: ["LlamaDecoderLayer", "Block"])
    cpu: bool = False                 # force CPU (gloo backend); a machine without CUDA uses it anyway

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"distributed.strategy={self.strategy!r}; use one of {list(STRATEGIES)}")
        if self.strategy == "fsdp" and self.mixed_precision == "fp16":
            raise ValueError("distributed.strategy=fsdp takes mixed_precision=bf16 or no (fp16 would need a sharded "
                             "gradient scaler)")


def make_accelerator(cfg: DistributedConfig):
    """The ``accelerate.Accelerator`` for ``cfg`` (process group from ``accelerate launch``'s environment)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    # without CUDA, `accelerate launch --multi_gpu` processes must still form one (gloo) process group
    cpu = cfg.cpu or not torch.cuda.is_available()
    # every trainable parameter gets a gradient each step (ViT heads OpenVLA never reads are frozen), so DDP need
    # not search the graph for unused ones; buffers (proprio statistics) are synced once at wrap time and never
    # change -- a broadcast per forward would deadlock processes that run different numbers of minibatches
    ddp = DistributedDataParallelKwargs(find_unused_parameters=False, broadcast_buffers=False)
    # FSDP's precision is its own MixedPrecisionPolicy (prepare); accelerate's autocast would only wrap DDP models
    precision = cfg.mixed_precision if cfg.strategy == "ddp" else "no"
    return Accelerator(mixed_precision=precision, cpu=cpu, kwargs_handlers=[ddp])


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


def prepare(accelerator, policy: nn.Module, make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
            cfg: DistributedConfig | None = None):
    """(wrapped :class:`PolicyForward`, prepared optimizer) for ``cfg``'s strategy (default DDP). The optimizer is
    built on the wrapped module's trainable parameters, which FSDP replaces by their shards."""
    cfg = cfg or DistributedConfig()
    if cfg.strategy == "fsdp" and accelerator.num_processes > 1:
        wrapped = _shard(PolicyForward(policy), cfg, accelerator)
    else:
        wrapped = accelerator.prepare_model(PolicyForward(policy))
    optimizer = make_optimizer([p for p in wrapped.parameters() if p.requires_grad])
    return wrapped, accelerator.prepare_optimizer(optimizer)


def _shard(wrapped: PolicyForward, cfg: DistributedConfig, accelerator) -> PolicyForward:
    """``fully_shard`` every ``cfg.fsdp_wrap`` module, then the rest as the root unit, over all processes; rank 0's
    weights first, as DDP does (processes may have built the policy from different seeds)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    for tensor in wrapped.state_dict().values():
        dist.broadcast(tensor.data, src=0)
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
    precision = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32 if low else None)
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    units = [m for m in wrapped.modules() if type(m).__name__ in cfg.fsdp_wrap]
    if not units:
        raise ValueError(f"distributed.fsdp_wrap={list(cfg.fsdp_wrap)} names no module of "
                         f"{type(wrapped.policy).__name__}; list its layer classes")
    compiled = [m for m in wrapped.modules() if m._compiled_call_impl is not None]
    if compiled:  # a regionally compiled unit would trace FSDP's hooks: shard eager layers (not measured together)
        log.warning("FSDP: %d compiled layers run eagerly (policy.openvla.compile_layers applies to DDP)", len(compiled))
        for module in compiled:
            module._compiled_call_impl = None
    for module in units:
        fully_shard(module, mesh=mesh, mp_policy=precision)
    root = fully_shard(wrapped, mesh=mesh, mp_policy=precision)
    # FSDP makes the first unit to run forward the root; rollouts run the bare policy's units first (full_weights)
    root._get_fsdp_state()._lazy_init()
    return root


def unwrap_policy(accelerator, wrapped: nn.Module) -> nn.Module:
    """The policy inside a :func:`prepare` wrapper (for saving and evaluation)."""
    return accelerator.unwrap_model(wrapped).policy


def _fsdp_units(wrapped: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in wrapped.modules() if isinstance(m, FSDPModule)]


def is_sharded(wrapped: nn.Module) -> bool:
    """Whether :func:`prepare` sharded the policy (FSDP over several processes)."""
    return bool(_fsdp_units(wrapped))


@contextmanager
def full_weights(accelerator, wrapped: nn.Module) -> Iterator[None]:
    """Inside, the bare policy (:func:`unwrap_policy`) runs with all its weights on every process: FSDP gathers its
    shards (every process must enter) and keeps them gathered through its forwards, so the main process alone may
    run rollouts, evaluation and KL; changes to them inside are not kept. Its parameters still read as shards
    outside a forward: save through :func:`policy_state`. DDP and one process hold the weights already."""
    units = _fsdp_units(wrapped)
    for unit in units:
        unit.set_reshard_after_forward(False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            # FSDP keeps the root unit's weights gathered after forward (its backward needs them next)
            unit.set_reshard_after_forward(unit is not wrapped)


def policy_state(accelerator, wrapped: nn.Module, everywhere: bool = False) -> dict:
    """The policy's whole weights (its ``state_dict``, plain tensors) on the main process, or on every process with
    ``everywhere``. Under FSDP every process must call it: the shards are gathered (to CPU memory on the main
    process, the others get an empty dict unless ``everywhere``)."""
    if not is_sharded(wrapped):
        return unwrap_policy(accelerator, wrapped).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=not everywhere))
    return {name.removeprefix("policy."): tensor.cpu() if everywhere else tensor for name, tensor in full.items()}


def lockstep_passes(accelerator, wrapped: nn.Module, passes: int) -> int:
    """How many forward/backward passes this process must run for an update of ``passes`` minibatches: its own, or
    under FSDP -- whose every forward gathers weights and every backward reduces gradients, collectively -- the most
    any process runs (the rest pad with zero-weighted passes)."""
    if accelerator is None or accelerator.num_processes == 1 or not is_sharded(wrapped):
        return passes
    import torch.distributed as dist

    most = torch.tensor([passes], device=accelerator.device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(most.item())


def optimizer_state(wrapped: nn.Module, optimizer) -> dict:
    """The optimizer's state to save, whole, on the main process (FSDP gathers the shards to its CPU memory, keyed by
    parameter name, and leaves the other processes an empty dict; every process must call it)."""
    if not is_sharded(wrapped):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(wrapped, _inner(optimizer), options=StateDictOptions(full_state_dict=True,
                                                                                        cpu_offload=True))


def load_state(wrapped: nn.Module, policy: nn.Module, optimizer, saved_policy: dict, saved_optimizer: dict,
               partial: bool = False) -> None:
    """Load a saved policy and :func:`optimizer_state` (each process holds the whole of both); under FSDP each
    process keeps its shard of them. ``partial``: ``saved_policy`` holds some of the weights (those that train),
    the rest stay as they are; a name the policy lacks is still an error."""
    if not is_sharded(wrapped):
        unexpected = policy.load_state_dict(saved_policy, strict=not partial).unexpected_keys
        if unexpected:
            raise KeyError(f"saved weights the policy lacks: {unexpected[:4]}")
        optimizer.load_state_dict(saved_optimizer)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, \
        set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, strict=not partial)
    unexpected = set_model_state_dict(wrapped, {f"policy.{k}": v for k, v in saved_policy.items()},
                                      options=options).unexpected_keys
    if unexpected:
        raise KeyError(f"saved weights the policy lacks: {list(unexpected)[:4]}")
    set_optimizer_state_dict(wrapped, _inner(optimizer), saved_optimizer, options=options)


def _inner(optimizer):
    """The torch optimizer under accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


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
