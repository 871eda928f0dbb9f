"""The prepared splits resident on the training device, and the choice of that device."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import Split, channel_stats, load_split

SPLITS = ("train", "val", "test")


def select_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when available, else CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device: cuda is not available on this machine (auto or cpu)")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


@dataclass
class DeviceData:
    """The three splits resident on the training device (uint8) plus the normalisation of the training split.

    train: training only; val: held out of the training split (curves, search, selection); test: reported
    numbers only.
    """

    train: Split
    val: Split
    test: Split
    mean: torch.Tensor  # (1, C, 1, 1) float
    std: torch.Tensor  # (1, C, 1, 1) float
    device: torch.device

    @classmethod
    def load(cls, prepared_dir: Path, device: torch.device) -> DeviceData:
        train, val, test = (load_split(Path(prepared_dir) / f"{name}.pt") for name in SPLITS)
        mean, std = channel_stats(train)
        move = lambda s: Split(s.images.to(device), s.labels.to(device))  # noqa: E731
        return cls(move(train), move(val), move(test), mean.to(device), std.to(device), device)

    def split(self, name: str) -> Split:
        """The split called `name` ('train', 'val' or 'test')."""
        if name not in SPLITS:
            raise ValueError(f"split {name!r} is not allowed ({', '.join(SPLITS)})")
        return getattr(self, name)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> normalised float, channels_last (faster for depthwise convs on CPU and GPU)."""
        x = (images.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last)

    def calibration_batches(self, images: int, batch_size: int, seed: int) -> list[torch.Tensor]:
        """A fixed random subset of un-augmented training images, in batches, for BN re-calibration."""
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self.train), generator=g)[: min(images, len(self.train))].to(self.device)
        return [self.inputs(self.train.images[idx[i : i + batch_size]]) for i in range(0, len(idx), batch_size)]
