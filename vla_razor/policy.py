"""The token-policy contract shared by the robot, ParityMNIST and LLM paths.

A policy is a categorical distribution over a path's token set at each output position:
7 action-bin positions x 256 bins for a VLA, 1 position x 10 digits for ParityMNIST, T text positions x vocabulary
for an LLM. Everything downstream (objectives, divergences, samplers) sees only ``logits: [..., T, K]`` and
``tokens: [..., T]``, so one implementation of each idea serves every path. Policies never compute losses.
"""
from __future__ import annotations

import abc
import copy
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from tensordict import TensorDictBase


def at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits -> float32 (small probabilities vanish in half precision); float32/float64 kept."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _check_tokens(logits: torch.Tensor, tokens: torch.Tensor) -> None:
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"tokens shape {tuple(tokens.shape)} must equal logits shape {tuple(logits.shape)} "
                         "without its last (token-set) dimension")


def token_log_probs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log pi(token) per position. ``logits: [..., T, K]``, ``tokens: [..., T]`` (long) -> ``[..., T]``."""
    _check_tokens(logits, tokens)
    return torch.log_softmax(at_least_float32(logits), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy per position in nats. ``logits: [..., T, K]`` -> ``[..., T]``."""
    log_p = torch.log_softmax(at_least_float32(logits), dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def sample_tokens(logits: torch.Tensor, *, greedy: bool = False, temperature: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per position, no gradient. ``logits: [..., T, K]`` -> ``tokens: [..., T]`` (long).

    Sampling goes through the Gumbel-max trick so a ``generator`` makes it reproducible on any batch shape.
    """
    with torch.no_grad():
        if greedy:
            return logits.argmax(-1)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 (use greedy=True for argmax), got {temperature}")
        uniform = torch.rand(logits.shape, generator=generator, device=logits.device).clamp_(1e-12, 1.0)
        gumbel = -torch.log(-torch.log(uniform))
        return (logits.float() / temperature + gumbel).argmax(-1)


def adapter_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """``model``'s peft adapter layers (LoRA's ``lora.Linear`` ...) by module name. Cached on ``model``: walking a
    7B's modules costs ~1 ms per call, and adapters come once, when the policy is built."""
    layers = model.__dict__.get("_adapter_layers")
    if layers is None:
        layers = model.__dict__["_adapter_layers"] = {name: m for name, m in model.named_modules()
                                                      if "_disable_adapters" in m.__dict__}
    return layers


@contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Inside, every peft adapter layer of ``model`` computes its base layer alone: the weights the adapters were
    added to (the fused LoRA forward and the residual-epilogue GEMMs of policies.fast_kernels step aside too).

    Sets the flag peft's layers read (``disable_adapters``) rather than calling ``enable_adapters(False)``, which
    also switches the adapters' ``requires_grad`` off and on again: which parameters train is the trainer's state
    (DDP's and the optimizer's), not a forward's. A compiled layer compiles once more, for the switched-off state.
    """
    layers = list(adapter_layers(model).values())
    was = [m._disable_adapters for m in layers]
    for module in layers:
        module._disable_adapters = True
    try:
        yield
    finally:
        for module, value in zip(layers, was):
            module._disable_adapters = value


class TokenPolicy(abc.ABC):
    """Mixin for ``nn.Module`` policies: one method to implement, the rest derived.

    ``batch`` is a TensorDict in that path's schema (torchrl's VLA keys for robots, ``observation`` for MNIST,
    ``input_ids``/``attention_mask`` for LLMs). Autoregressive policies take the tokens to condition on
    (teacher forcing) and override :meth:`sample_tokens` with their sequential decoder. Method names carry
    ``token`` so they never shadow torchrl's ``VLAWrapperBase.log_prob`` / ``forward`` in a subclass of both.
    """

    @abc.abstractmethod
    def token_logits(self, batch: TensorDictBase, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[..., T, K]`` over the token set at every output position (teacher-forced on ``tokens``)."""

    def sample_tokens(self, batch: TensorDictBase, *, greedy: bool = False, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Tokens ``[..., T]`` drawn from the policy (no gradient)."""
        with torch.no_grad():
            logits = self.token_logits(batch)
        return sample_tokens(logits, greedy=greedy, temperature=temperature, generator=generator)

    def token_log_probs(self, batch: TensorDictBase, tokens: torch.Tensor) -> torch.Tensor:
        """log pi(tokens) per position, ``[..., T]``, from one (teacher-forced) forward; differentiable."""
        return token_log_probs(self.token_logits(batch, tokens), tokens)

    def token_entropy(self, batch: TensorDictBase, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Per-position entropy ``[..., T]`` in nats."""
        return token_entropy(self.token_logits(batch, tokens))

    adapters_off = False  # True in an adapters_off_view

    def adapters_off_view(self):
        """This policy with its LoRA adapters switched off -- the model they were added to -- sharing every module,
        parameter and buffer with it: the base of a LoRA fine-tune (peft starts the adapters at zero) without a
        second copy of the model (15 GB for a 7B). It follows the policy's frozen weights, never its adapters.
        ``eval()`` on it switches the shared modules too (updates call ``train()``)."""
        view = copy.copy(self)  # a new __dict__ over the same _modules / _parameters / _buffers dicts
        view.adapters_off = True
        return view

    def adapters_as_set(self, model: torch.nn.Module):
        """Context for a forward of ``model`` (this policy's network): its adapters off in a view, as they are
        otherwise. Subclasses run every forward inside it."""
        return adapters_disabled(model) if self.adapters_off else nullcontext()

    def frozen_copy(self):
        """A deep copy in eval mode with gradients off: the reference pi_0 for KL and forgetting."""
        if any(isinstance(p, torch.nn.parameter.UninitializedParameter) for p in self.parameters()):
            raise ValueError(f"{type(self).__name__} has lazy, uninitialized parameters: run one forward "
                             "(e.g. token_logits on a batch) before taking the frozen reference copy")
        reference = copy.deepcopy(self)
        reference.eval()
        for parameter in reference.parameters():
            parameter.requires_grad_(False)
        return reference
