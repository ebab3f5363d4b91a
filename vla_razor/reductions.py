"""The one masked reduction every objective and divergence uses.

Averaging over padded positions dilutes losses and KL (STYLE.md, TorchRL lesson), so every reduction over
tokens or steps goes through :func:`masked_mean` / :func:`masked_sum` with an explicit validity mask.
"""
from __future__ import annotations

import torch


def _check_mask(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return torch.ones_like(values, dtype=torch.bool)
    if mask.shape != values.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal values shape {tuple(values.shape)}")
    return mask.to(torch.bool)


def masked_sum(values: torch.Tensor, mask: torch.Tensor | None = None, dim=None) -> torch.Tensor:
    """Sum of ``values`` where ``mask`` is true. ``values``, ``mask``: same shape; ``dim`` as in ``torch.sum``."""
    mask = _check_mask(values, mask)
    zeros = torch.zeros((), dtype=values.dtype, device=values.device)
    masked = torch.where(mask, values, zeros)
    return masked.sum() if dim is None else masked.sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None = None, dim=None) -> torch.Tensor:
    """Mean of ``values`` over valid entries only; an all-padding slice gives 0, not NaN."""
    mask = _check_mask(values, mask)
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1).to(values.dtype)
