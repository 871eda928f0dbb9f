"""The splits of a dataset: uint8 images with their labels, the class names, and what is done with them whole.

``Split`` (images and labels), ``Dataset`` (the splits and the class names), ``Preview`` (what ``prepare``
will produce, before it reads anything), ``DataError`` (every data failure, as one line), holding a
validation split out, per-channel statistics, and saving and loading splits as plain tensors
(``torch.load(weights_only=True)``, no pickle).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..io import atomic_write, load_tensors

__all__ = ["DataError", "Dataset", "Preview", "Split", "channel_stats", "hold_out", "load_split", "save_split"]

IMAGE_CHUNK = 1024  # images at a time in resize_split and channel_stats (bounds their copies)


class DataError(RuntimeError):
    """A data failure (download, checksum, parse, unreadable image, not enough memory); str() is one line."""


def one_line(text: object) -> str:
    """text with every run of whitespace (newlines too) made one space."""
    return " ".join(str(text).split())


@dataclass(frozen=True)
class Split:
    """Images (uint8, (N, C, H, W), contiguous) and labels (int64, (N,)) of one dataset split."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        """Validate dtypes and shapes; make images contiguous."""
        if not isinstance(self.images, torch.Tensor) or not isinstance(self.labels, torch.Tensor):
            raise ValueError(
                f"Split images/labels must be torch.Tensor, got {type(self.images).__name__}/{type(self.labels).__name__}"
            )
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"Split images must be uint8 with shape (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.ndim != 1:
            raise ValueError(f"Split labels must be int64 with shape (N,), got {self.labels.dtype} {tuple(self.labels.shape)}")
        if self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(
                f"Split has {self.images.shape[0]} images but {self.labels.shape[0]} labels; counts must be equal"
            )
        if not self.images.is_contiguous():
            object.__setattr__(self, "images", self.images.contiguous())
        if not self.labels.is_contiguous():
            object.__setattr__(self, "labels", self.labels.contiguous())

    def __len__(self) -> int:
        """Number of samples."""
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class Dataset:
    """The splits of one dataset and its class names: label k means classes[k].

    val is the dataset's own validation split (a folder dataset's val/) or None, in which case the
    pipeline holds validation images out of train.
    """

    train: Split
    test: Split
    classes: tuple[str, ...]
    val: Split | None = None

    def __post_init__(self) -> None:
        """Validate the class names, that every split has the train images' shape and labels in 0..len(classes)-1."""
        object.__setattr__(self, "classes", tuple(self.classes))
        classes = self.classes
        if len(classes) < 2 or len(set(classes)) != len(classes) or not all(isinstance(c, str) and c for c in classes):
            raise ValueError(f"Dataset classes must be at least 2 distinct non-empty strings, got {len(classes)}: "
                             f"{one_line(classes)[:200]}")
        for name, split in self.splits().items():
            if not isinstance(split, Split):
                raise ValueError(f"Dataset {name} must be a Split, got {type(split).__name__}")
            if split.images.shape[1:] != self.train.images.shape[1:]:
                raise ValueError(f"Dataset {name} images are {tuple(split.images.shape[1:])} but train images are "
                                 f"{self.image_shape}; every split must have the same (C, H, W)")
            if len(split) and not 0 <= int(split.labels.min()) <= int(split.labels.max()) < len(classes):
                raise ValueError(f"Dataset {name} labels span {int(split.labels.min())}..{int(split.labels.max())}; "
                                 f"allowed 0..{len(classes) - 1} ({len(classes)} classes)")

    def splits(self) -> dict[str, Split]:
        """{"train", "val" (if any), "test"} -> Split."""
        return {"train": self.train, **({"val": self.val} if self.val is not None else {}), "test": self.test}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        c, h, w = self.train.images.shape[1:]
        return int(c), int(h), int(w)

    @property
    def channels(self) -> int:
        """Colour channels: 3 (RGB) or 1 (grey)."""
        return self.image_shape[0]

    @property
    def num_classes(self) -> int:
        """len(classes)."""
        return len(self.classes)


@dataclass(frozen=True)
class Preview:
    """What `prepare` will produce, known before it fetches, parses or decodes any image (for checks of params
    that depend on the data, so they fail before the expensive work)."""

    shape: tuple[int, int, int]  # (C, H, W) of every prepared image
    num_classes: int
    train_images: int  # after the train limit
    has_val: bool  # the dataset brings its own validation split


def channel_stats(split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (at least 1) of a split's uint8 pixels, each (1, C, 1, 1) float: the normalisation.

    Exact, from each channel's histogram of the 256 pixel values (counted a chunk of images at a time), so it
    needs no float copy of the split.
    """
    images = split.images
    counts = torch.zeros(images.shape[1], 256, dtype=torch.int64)
    for start in range(0, len(images), IMAGE_CHUNK):
        chunk = images[start : start + IMAGE_CHUNK].transpose(0, 1).reshape(images.shape[1], -1).cpu()
        for c in range(images.shape[1]):
            counts[c] += torch.bincount(chunk[c], minlength=256)
    values = torch.arange(256, dtype=torch.float64)
    n = counts.sum(dim=1, keepdim=True).double()
    mean = (counts * values).sum(dim=1, keepdim=True) / n
    var = (counts * (values - mean) ** 2).sum(dim=1) / (n.squeeze(1) - 1).clamp_min(1)  # unbiased, as Tensor.std
    as_shape = lambda t: t.float().view(1, -1, 1, 1)  # noqa: E731
    return as_shape(mean), as_shape(var.sqrt().clamp_min(1.0))


def hold_out(split: Split, images: int, seed: int) -> tuple[Split, Split]:
    """(rest, held out): `images` samples drawn at random (from `seed`) out of `split`, both kept in split order."""
    if not 0 < images < len(split):
        raise ValueError(f"cannot hold out {images} of {len(split)} images (1 to {len(split) - 1})")
    g = torch.Generator().manual_seed(seed)
    held = torch.zeros(len(split), dtype=torch.bool)
    held[torch.randperm(len(split), generator=g)[:images]] = True
    take = lambda mask: Split(split.images[mask].contiguous(), split.labels[mask].contiguous())  # noqa: E731
    return take(~held), take(held)


def _compact(t: torch.Tensor) -> torch.Tensor:
    """CPU tensor that owns exactly its own storage (torch.save would otherwise save a whole base tensor)."""
    t = t.detach().cpu().contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset() != 0:
        t = t.clone()
    return t


def save_split(split: Split, path: Path) -> None:
    """Atomically save a Split as a dict of tensors."""
    atomic_write(Path(path), lambda f: torch.save({"images": _compact(split.images), "labels": _compact(split.labels)}, f),
                 binary=True)


def load_split(path: Path, mmap: bool = False) -> Split:
    """Load a Split written by save_split (torch.load with weights_only=True; mmap: left in the file until read)."""
    obj = load_tensors(path, {"images", "labels"}, DataError, "split file", mmap=mmap)
    try:
        return Split(images=obj["images"], labels=obj["labels"])
    except ValueError as e:
        raise DataError(f"split file {path} is invalid: {e}") from e
