"""A training run's resume state: model, optimizer and every generator, saved by rank 0 after each epoch and put
back on every rank, so a resumed run ends exactly where an uninterrupted one would."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from torch import nn

from ..io import atomic_write
from . import distributed
from .distributed import World

FORMAT = 2  # of the saved state; 2: each epoch's stats hold its curve points. Another format is not resumed.


def load(path: Path | None, key: str) -> dict | None:
    """The state saved at `path` under `key`; None when there is none (missing, unreadable, another key)."""
    if path is None or not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - an unreadable resume state is only a lost shortcut
        return None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        return None
    return state if state.get("key") == key else None


def restore(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer, rng: random.Random,
            shuffle: torch.Generator, aug: torch.Generator, device: torch.device, w: World) -> list[dict]:
    """Put a saved training state back (this rank's dropout generator among them); the finished
    epochs' stats, as saved."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    rng.setstate(_tuples(state["rng"]))
    shuffle.set_state(state["shuffle"])
    aug.set_state(state["aug"].to(aug.get_state().device))
    _set_global_rng(state["global_rng"] if not w.active else state["global_rngs"][w.rank], device)
    return state["history"]


def save(path: Path, w: World, state: dict, device: torch.device) -> None:
    """Rank 0 writes the training state; dropout's generator (torch's global one) is every rank's own."""
    rngs = distributed.gather(_global_rng(device), w)
    if w.main:
        state["format"] = FORMAT
        state["global_rng"] = rngs[0]
        if w.active:
            state["global_rngs"] = rngs
        atomic_write(path, lambda f: torch.save(state, f), binary=True)


def _global_rng(device: torch.device) -> torch.Tensor:
    """torch's global generator state on `device` (CPU, or the current CUDA device)."""
    return (torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()).cpu()


def _set_global_rng(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _tuples(x):
    """random.Random state comes back from torch.load with lists where setstate wants tuples."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
