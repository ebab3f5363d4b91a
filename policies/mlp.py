"""The ParityMNIST policy: an MLP 785 -> 512 -> 256 -> 10 (PROTOCOL.md), as a stack of R independent copies.

A sweep trains many runs that differ only in hyperparameters; holding them as one stack of weights ``[R, ...]`` turns
R small matrix products into one large one, which is what makes the ~500-points-per-method study fit in minutes on
two CPU cores. R = 1 is the ordinary single model. Each member is one categorical token policy with T = 1 position.
"""
from __future__ import annotations

import math

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn

from vla_razor.policy import TokenPolicy

LAYER_SIZES = (785, 512, 256, 10)


class StackedMLP(nn.Module, TokenPolicy):
    """R MLPs in one module. Weights ``weight_i: [R, in, out]``, biases ``bias_i: [R, out]``.

    ``batch["observation"]``: ``[B, 785]`` (the same inputs for every member) or ``[R, B, 785]``.
    :meth:`token_logits` returns ``[R, B, 1, 10]``.
    """

    def __init__(self, num_members: int = 1, layer_sizes: tuple[int, ...] = LAYER_SIZES,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.layer_sizes = tuple(layer_sizes)
        self.num_members = num_members
        for i, (fan_in, fan_out) in enumerate(zip(layer_sizes[:-1], layer_sizes[1:])):
            bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default init, drawn per member
            weight = (torch.rand(num_members, fan_in, fan_out, generator=generator) * 2 - 1) * bound
            bias = (torch.rand(num_members, fan_out, generator=generator) * 2 - 1) * bound
            self.register_parameter(f"weight_{i}", nn.Parameter(weight))
            self.register_parameter(f"bias_{i}", nn.Parameter(bias))

    @property
    def num_layers(self) -> int:
        return len(self.layer_sizes) - 1

    def forward_with_hidden(self, inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``inputs [B, 785] | [R, B, 785]`` -> logits ``[R, B, 10]`` and hidden activations ``[R, B, 512], [R, B, 256]``."""
        if inputs.shape[-1] != self.layer_sizes[0]:
            raise ValueError(f"inputs last dim {inputs.shape[-1]} != model input size {self.layer_sizes[0]}")
        hidden, h = [], inputs
        for i in range(self.num_layers):
            weight, bias = getattr(self, f"weight_{i}"), getattr(self, f"bias_{i}")
            equation = "bi,rio->rbo" if h.ndim == 2 else "rbi,rio->rbo"
            h = torch.einsum(equation, h, weight) + bias.unsqueeze(1)
            if i < self.num_layers - 1:
                h = torch.relu(h)
                hidden.append(h)
        return h, hidden

    def token_logits(self, batch: TensorDictBase, tokens: torch.Tensor | None = None) -> torch.Tensor:
        logits, _ = self.forward_with_hidden(batch["observation"])
        return logits.unsqueeze(-2)                                                 # [R, B, 1, 10]

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """Shortcut: ``[B, 785] -> [R, B, 1, 10]`` without building a TensorDict."""
        return self.token_logits(TensorDict({"observation": inputs}, batch_size=inputs.shape[:-1]))

    def hidden_activations(self, inputs: torch.Tensor) -> torch.Tensor:
        """Both hidden layers concatenated, ``[R, B, 768]`` (the activation-change and CKA predictors' input)."""
        _, hidden = self.forward_with_hidden(inputs)
        return torch.cat(hidden, dim=-1)

    def member_state(self, index: int) -> dict[str, torch.Tensor]:
        """Parameters of member ``index`` without the stack dim (a detached copy)."""
        return {name: p[index].detach().clone() for name, p in self.named_parameters()}

    @classmethod
    def from_member_states(cls, states: list[dict[str, torch.Tensor]]) -> "StackedMLP":
        """Stack single-member states (e.g. R copies of the base) into one module."""
        sizes = [states[0]["weight_0"].shape[0]] + [states[0][f"weight_{i}"].shape[1]
                                                     for i in range(sum(k.startswith("weight") for k in states[0]))]
        model = cls(num_members=len(states), layer_sizes=tuple(sizes))
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                parameter.copy_(torch.stack([state[name] for state in states]))
        return model


def single_member_logits(params: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
    """Functional forward of ONE member (params without the stack dim): ``[B, 785] -> [B, 10]``.

    The form torch.func needs for per-sample gradients (the Fisher predictor).
    """
    num_layers = sum(name.startswith("weight_") for name in params)
    h = inputs
    for i in range(num_layers):
        h = h @ params[f"weight_{i}"] + params[f"bias_{i}"]
        if i < num_layers - 1:
            h = torch.relu(h)
    return h
