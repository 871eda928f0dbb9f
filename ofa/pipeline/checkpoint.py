"""The supernet of the params, and its checkpoints: weights saved with the architecture they fit, refused for
another."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..io import atomic_write, load_tensors
from ..model import OFANet, architecture
from .config import Params


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or was built from other net/space params."""


def build_net(params: Params, input_shape: tuple[int, ...], classes: list[str]) -> OFANet:
    """The supernet of params.space / params.net for inputs of (C, H, W), one output per class."""
    return OFANet(params.space.build(), **_net_arguments(params, input_shape, classes), init=params.net.init)


def build_arch(params: Params, input_shape: tuple[int, ...], classes: list[str]) -> dict[str, Any]:
    """``build_net(...).arch`` without building the network (what pricing a config needs)."""
    return architecture(params.space.build(), **_net_arguments(params, input_shape, classes))


def _net_arguments(params: Params, input_shape: tuple[int, ...], classes: list[str]) -> dict[str, Any]:
    n = params.net
    return dict(in_channels=input_shape[0], num_classes=len(classes), units=n.unit_specs(),
                stem_channels=n.stem_channels, stem_stride=n.stem_stride, final_channels=n.final_channels,
                classes=classes, feature_mix_channels=n.feature_mix_channels, dropout=n.dropout)


def save_checkpoint(net: OFANet, path: Path) -> None:
    """Atomically save the supernet's weights with its architecture (CPU, contiguous tensors)."""
    state = {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}
    atomic_write(Path(path), lambda f: torch.save({"arch": net.arch, "state_dict": state}, f), binary=True)


def load_checkpoint(net: OFANet, path: Path) -> None:
    """Load weights saved by save_checkpoint (weights_only); refuse a checkpoint of another architecture."""
    ckpt = load_tensors(path, {"arch", "state_dict"}, CheckpointError, "checkpoint")
    ours, theirs = net.arch, ckpt["arch"]
    if not isinstance(theirs, dict) or not isinstance(ckpt["state_dict"], dict):
        raise CheckpointError(f"{path}: not a checkpoint of this pipeline (rerun the upstream stages: dvc repro)")
    for key in sorted(ours, key=lambda k: k != "classes"):  # the class names first: they say more than a count
        if theirs.get(key) == ours[key]:
            continue
        if key == "classes":
            raise CheckpointError(f"{path}: trained on {_names(theirs.get(key))}, the prepared data has "
                                  f"{_names(ours[key])} (data.dataset; rerun the upstream stages: dvc repro)")
        if key in ("in_channels", "num_classes"):
            raise CheckpointError(f"{path}: built for {key} = {theirs.get(key)!r}, the prepared data has "
                                  f"{ours[key]!r} (data.dataset; rerun the upstream stages: dvc repro)")
        where = {"space": "space", "units": "net.units"}.get(key, f"net.{key}")
        raise CheckpointError(f"{path}: built with {where} = {theirs.get(key)!r}, params give {ours[key]!r} "
                              "(rerun the upstream stages: dvc repro)")
    try:
        net.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:  # the architecture matches but the weights do not: a damaged or edited file
        first = str(e).split("\n\t")[1] if "\n\t" in str(e) else str(e)
        raise CheckpointError(f"{path}: its weights do not fit its architecture ({' '.join(first.split())[:200]}; "
                              "rerun the upstream stages: dvc repro)") from None


def _names(classes: list[str] | None, shown: int = 4) -> str:
    if classes is None:
        return "unnamed classes"
    more = f", ... ({len(classes)} in all)" if len(classes) > shown else ""
    return f"classes {', '.join(map(repr, classes[:shown]))}{more}"
