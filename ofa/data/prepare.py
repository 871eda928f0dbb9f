"""Prepared splits of a dataset: ``prepare`` reads a published dataset, a folder or synthetic images, applies the
limits and the resize, and returns uint8 splits with their class names.

Images are uint8 (N, C, H, W); ``image_size`` resizes them (shorter side to the size, then a centre crop to a
square).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .archives import fetch_and_parse
from .folder import FOLDER_LAYOUT, read_folder
from .memory import check_fits
from .remote import RemoteFile
from .splits import IMAGE_CHUNK, DataError, Dataset, Preview, Split

DATASETS = ("cifar10", "cifar100", "fashion_mnist", "folder", "synthetic")
# size of each official training split; a folder dataset's size is known only once it is read
TRAIN_IMAGES = {"cifar10": 50000, "cifar100": 50000, "fashion_mnist": 60000, "synthetic": 512}
# (C, H, W) of each published dataset's images and its number of classes, known before anything is read
NATIVE = {"cifar10": ((3, 32, 32), 10), "cifar100": ((3, 32, 32), 100), "fashion_mnist": ((1, 28, 28), 10),
          "synthetic": ((3, 16, 16), 10)}
SYNTHETIC_CLASSES = tuple(str(k) for k in range(10))
MIN_IMAGE_SIZE = 8  # smallest data.image_size


def _limited(split: Split, limit: int | None) -> Split:
    return split if limit is None or limit >= len(split) else Split(split.images[:limit], split.labels[:limit])


def resize_split(split: Split, size: int) -> Split:
    """The split's images resized so the shorter side is `size`, then centre-cropped to size x size.

    Bicubic with antialiasing (torch interpolate), rounded and clamped to uint8; a split already at
    size x size is returned as is.
    """
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"resize_split size={size!r} must be an int >= 1")
    n, c, h, w = split.images.shape
    if (h, w) == (size, size):
        return split
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    out = torch.empty((n, c, size, size), dtype=torch.uint8, device=split.images.device)
    for start in range(0, n, IMAGE_CHUNK):
        chunk = split.images[start : start + IMAGE_CHUNK].float()
        resized = F.interpolate(chunk, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        out[start : start + IMAGE_CHUNK] = resized[:, :, top : top + size, left : left + size].round().clamp(0, 255)
    return Split(out, split.labels)


def _check_image_size(image_size: int | None, dataset: str) -> None:
    if image_size is None:
        if dataset == "folder":
            raise DataError("data.image_size: required for data.dataset folder (the side, in pixels, that every "
                            f"image is resized and centre-cropped to; at least {MIN_IMAGE_SIZE})")
    elif not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < MIN_IMAGE_SIZE:
        raise DataError(f"data.image_size: {image_size!r} is not allowed; an int of at least {MIN_IMAGE_SIZE}, "
                        "or null for the dataset's own size")


def prepare(
    dataset: str,
    raw_dir: Path,
    *,
    source_dir: Path | None = None,
    seed: int = 0,
    files: Sequence[RemoteFile] | None = None,
    image_size: int | None = None,
    train_limit: int | None = None,
    test_limit: int | None = None,
    check: Callable[[Preview], None] | None = None,
    progress: bool = True,
) -> Dataset:
    """The Dataset (uint8 splits and class names) of `dataset`.

    cifar10, cifar100 and fashion_mnist are fetched into raw_dir (source_dir is looked in first; files
    overrides the default RemoteFiles, for tests and mirrors); folder is decoded from source_dir
    (image_size required); synthetic is generated from seed.  image_size, when given, makes every image
    image_size x image_size (shorter side resized, centre crop); None keeps the dataset's own size.
    train_limit / test_limit keep the first N images of a split (a folder's others are never decoded, nor
    any archive's resized). `check`, when given, is called with the Preview before the expensive work: before
    fetching a published dataset, before decoding a folder's images (after listing them and reading headers).
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; allowed: {', '.join(DATASETS)}")
    if dataset == "folder" and source_dir is None:
        raise DataError(f"data.source_dir: required for data.dataset folder (a folder holding {FOLDER_LAYOUT})")
    _check_image_size(image_size, dataset)
    limits = {"train": train_limit, "test": test_limit}
    if dataset == "folder":
        return read_folder(Path(source_dir), image_size, limits, check, progress)
    (channels, *native), num_classes = NATIVE[dataset]
    expected = Preview((channels, image_size, image_size) if image_size else (channels, *native), num_classes,
                       min(TRAIN_IMAGES[dataset], train_limit or TRAIN_IMAGES[dataset]), False)
    if check is not None:
        check(expected)
    if dataset == "synthetic":
        train, test = synthetic(seed=seed) if image_size is None else synthetic(seed=seed, size=image_size)
        return Dataset(_limited(train, train_limit), _limited(test, test_limit), SYNTHETIC_CLASSES)
    sources = [Path(source_dir)] if source_dir is not None else []
    ds = fetch_and_parse(dataset, Path(raw_dir), sources, files, progress)
    ds = Dataset(_limited(ds.train, train_limit), _limited(ds.test, test_limit), ds.classes)
    actual = dataclasses.replace(expected, num_classes=ds.num_classes, train_images=len(ds.train))
    if check is not None and actual != expected:  # files from elsewhere (a mirror's, a test's): check what came
        check(actual)
    if image_size is None or ds.image_shape[1:] == (image_size, image_size):
        return ds
    images = sum(len(s) for s in ds.splits().values())
    check_fits(2 * images * ds.channels * image_size * image_size, torch.device("cpu"),  # as a folder's: 2x
               f"resizing the {images} images of {dataset} to data.image_size {image_size} (and copying them once)",
               hint="lower data.image_size or data.train_limit")
    resized = {name: resize_split(split, image_size) for name, split in ds.splits().items()}
    return Dataset(resized["train"], resized["test"], ds.classes, resized.get("val"))


def synthetic(
    seed: int = 0,
    n_train: int = 512,
    n_test: int = 256,
    channels: int = 3,
    size: int = 16,
    num_classes: int = 10,
) -> tuple[Split, Split]:
    """Deterministic tiny learnable dataset."""
    for name, value, minimum in (
        ("n_train", n_train, 1),
        ("n_test", n_test, 1),
        ("channels", channels, 1),
        ("size", size, 1),
        ("num_classes", num_classes, 2),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"synthetic() argument {name}={value!r} must be an int >= {minimum}")
    g = torch.Generator().manual_seed(int(seed))
    # Each class: a fixed random low-frequency colour pattern (coarse grid upsampled bilinearly).
    coarse = min(4, size)
    low = torch.rand(num_classes, channels, coarse, coarse, generator=g) * 200.0 + 28.0
    templates = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)

    def make(n: int) -> Split:
        labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
        brightness = torch.randn(n, 1, 1, 1, generator=g) * 12.0
        noise = torch.randn(n, channels, size, size, generator=g) * 24.0
        images = (templates[labels] + brightness + noise).round().clamp(0, 255).to(torch.uint8)
        return Split(images.contiguous(), labels.to(torch.int64))

    return make(n_train), make(n_test)
