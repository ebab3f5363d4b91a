"""Continuous robot actions <-> discrete action tokens, OpenVLA's exact mapping.

torchrl's :class:`~torchrl.data.vla.VocabTailActionTokenizer` reproduces OpenVLA's vocab-tail scheme (256 uniform
bin edges over [-1, 1]; ``id = vocab_size - digitize(clip(a))``, so a larger action gets a *smaller* id; decoding to
bin centres; q01/q99 un-normalization). We build on it and add the one guard it lacks: it encodes NaN as id 31744,
a real action, which would silently turn a simulator blow-up into training data.

Two id conventions (torchrl's): *window ids* in ``[0, num_bins)`` -- the index a policy's 256-way categorical
uses -- and *full ids* in the language model's vocabulary (``window_id + full_vocab_size - num_bins``).
"""
from __future__ import annotations

import torch
from torchrl.data.vla import VocabTailActionTokenizer

OPENVLA_NUM_BINS = 256
#: Llama-2's vocabulary before OpenVLA's padding to 32064; action ids are its last 256 entries.
OPENVLA_BASE_VOCAB_SIZE = 32000


class ActionTokenizer(VocabTailActionTokenizer):
    """:class:`VocabTailActionTokenizer` that refuses non-finite actions instead of encoding them as bin 0."""

    def encode(self, actions: torch.Tensor) -> torch.Tensor:
        if not torch.is_floating_point(actions):
            raise TypeError(f"actions must be a floating tensor, got dtype {actions.dtype}")
        bad = ~torch.isfinite(actions)
        if bad.any():
            first = tuple(int(i) for i in bad.nonzero()[0].tolist())
            raise ValueError(
                f"cannot tokenize non-finite actions ({int(bad.sum())} entries, first at index {first}, "
                f"value {actions[first].item()}); filter the episode or fix the expert/simulator that produced it"
            )
        return super().encode(actions)

    def decode_normalized(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids -> bin centres in ``[-1, 1]``: :meth:`decode` without the norm stats' un-normalization (the
        policy units a task maps to its robot itself)."""
        centers = self.bin_centers.to(tokens.device)
        digitized = (self.num_bins if self.full_vocab_size is None else self.full_vocab_size) - tokens
        return centers[(digitized - 1).clamp(0, centers.shape[0] - 1)]

    @property
    def window_offset(self) -> int:
        """Add this to a window id to get the full language-model id (0 for window-id tokenizers)."""
        return 0 if self.full_vocab_size is None else self.full_vocab_size - self.num_bins

    def to_window_ids(self, full_ids: torch.Tensor) -> torch.Tensor:
        """Full LM ids ``[...]`` -> window ids in ``[0, num_bins)``; raises if any id is not an action id."""
        window = full_ids - self.window_offset
        outside = (window < 0) | (window >= self.num_bins)
        if outside.any():
            raise ValueError(
                f"token ids {full_ids[outside][:5].tolist()} are not action ids "
                f"(expected [{self.window_offset}, {self.window_offset + self.num_bins}))"
            )
        return window

    def to_full_ids(self, window_ids: torch.Tensor) -> torch.Tensor:
        """Window ids ``[...]`` in ``[0, num_bins)`` -> full LM ids."""
        if ((window_ids < 0) | (window_ids >= self.num_bins)).any():
            raise ValueError(f"window ids must lie in [0, {self.num_bins}), got range "
                             f"[{int(window_ids.min())}, {int(window_ids.max())}]")
        return window_ids + self.window_offset


def make_action_tokenizer(
    num_bins: int = OPENVLA_NUM_BINS,
    full_vocab_size: int | None = None,
    norm_stats: dict | None = None,
    unnorm_key: str | None = None,
) -> ActionTokenizer:
    """Build the shared tokenizer; with ``norm_stats`` (an OpenVLA checkpoint's) decode un-normalizes to env units."""
    if norm_stats is None:
        return ActionTokenizer(num_bins, full_vocab_size=full_vocab_size)
    if unnorm_key is None:
        raise ValueError(f"norm_stats given without unnorm_key; choose one of {sorted(norm_stats)}")
    return ActionTokenizer.from_norm_stats(norm_stats, unnorm_key, num_bins=num_bins, full_vocab_size=full_vocab_size)
