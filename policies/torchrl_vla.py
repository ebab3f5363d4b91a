"""The shared token-policy interface over torchrl's VLA policies (``torchrl.modules.vla.VLAWrapperBase``).

torchrl's token-head VLAs emit logits ``[B, chunk, action_dim, bins]`` in its VLA TensorDict schema. Objectives and
divergences see positions, not (chunk, dim) pairs, so this view flattens them: ``[B, chunk * action_dim, bins]`` --
7 positions of 256 bins for one OpenVLA step. Token ids are window ids of the shared
:class:`~vla_razor.action_tokens.ActionTokenizer` (``full_vocab_size=None``).
"""
from __future__ import annotations

import torch
from tensordict import TensorDictBase
from torchrl.modules.vla import TinyVLA

from vla_razor.policy import TokenPolicy


class VLATokenPolicy(TokenPolicy):
    """Mixin for a ``VLAWrapperBase`` subclass with ``action_head="tokens"``."""

    def token_logits(self, batch: TensorDictBase, tokens: torch.Tensor | None = None) -> torch.Tensor:
        # One forward gives every position: torchrl's token heads are not autoregressive over action dims.
        logits = self._action_logits(batch)                                      # [B, chunk, action_dim, bins]
        return logits.flatten(-3, -2)                                            # [B, chunk * action_dim, bins]

    def tokens_to_chunk(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, chunk * action_dim]`` window ids -> ``[B, chunk, action_dim]`` for torchrl's tokenizer/decoder."""
        return tokens.unflatten(-1, (self.chunk_size, self.action_dim))


class TinyTokenVLA(TinyVLA, VLATokenPolicy):
    """torchrl's CPU reference VLA with its 256-bin token head, behind the shared interface (tests, smoke runs)."""

    def __init__(self, action_dim: int = 7, chunk_size: int = 1, **kwargs):
        # log_probs_mode="token": torchrl's own log_prob then matches ours position by position
        super().__init__(action_dim=action_dim, chunk_size=chunk_size, action_head="tokens", vocab_size=256,
                         log_probs_mode="token", **kwargs)
