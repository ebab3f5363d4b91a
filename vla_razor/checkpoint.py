"""Resumable training state: one atomic file per checkpoint, shared by every training CLI.

A killed job (even ``kill -9``) leaves either the previous complete checkpoint or the new complete one, never a
torn file: the state goes to ``<name>.partial``, is fsynced, then renamed over the target. RNG states travel with
the model and optimizer so a resumed run draws the same samples an uninterrupted one would from that point.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be used (corrupt, or written by an incompatible run)."""


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU + CUDA when present) generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` (tensors, state dicts, plain Python) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    mmap: bool = False) -> dict[str, Any] | None:
    """The state saved at ``path``, or None when there is none yet. A corrupt file raises CheckpointError.
    ``mmap``: tensors stay in the file until read (a cheap look at a large file's metadata)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        # Our own files hold RNG states and config dicts, not only tensors.
        if mmap:
            try:
                return torch.load(path, map_location=map_location, weights_only=False, mmap=True)
            except RuntimeError:  # not a zip checkpoint (legacy format, or damaged): read it whole, for its own error
                pass
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # noqa: BLE001 -- torch raises many types for a damaged zip/pickle
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(error).__name__}: {error}); delete it to "
                              "start over, or restore it from a backup") from error
