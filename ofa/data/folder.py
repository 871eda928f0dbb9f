"""A folder of the user's own images as a dataset: ``train/<class>/<image>``, ``test/<class>/<image>`` and
optionally ``val/<class>/<image>``, PNG/JPEG/WebP/BMP decoded once with Pillow (on a thread pool), resized
(shorter side, then centre crop) and stored as uint8 like the published datasets.  Classes are the sorted
folder names; everything is listed in name order, so neither folder order nor file-system order changes the
result.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import ExifTags, Image, ImageOps
from tqdm import tqdm

from .memory import check_fits
from .splits import DataError, Dataset, Preview, Split, one_line

__all__ = ["FOLDER_LAYOUT", "IMAGE_EXTENSIONS", "read_folder"]

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".webp")  # of a folder dataset's images, in any case
# Pillow's one-channel modes
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_WIDE_GRAY_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})  # 16-bit grey (PNG): scaled to 8 bits
_WIDE_TO_8BIT = [(v * 255 + 32767) // 65535 for v in range(65536)]  # 16-bit value -> nearest 8-bit one (v / 257)
_RESAMPLE = Image.Resampling.BICUBIC
_REDUCING_GAP = 3.0  # Pillow shrinks by whole factors first while keeping at least 3x the target resolution
_DECODE_THREADS = max(1, min(8, os.cpu_count() or 1))  # Pillow releases the GIL while it decodes and resizes


_EXTENSIONS_TEXT = ", ".join(IMAGE_EXTENSIONS[:-1]) + f" or {IMAGE_EXTENSIONS[-1]} (any case)"
FOLDER_LAYOUT = "train/<class>/<image> and test/<class>/<image>, optionally val/<class>/<image>"


def _subfolders(folder: Path) -> list[str]:
    """Sorted names of the visible subfolders of folder."""
    try:
        return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".") and p.is_dir())
    except OSError as e:
        raise DataError(f"cannot list {folder}: {type(e).__name__}: {one_line(e)}") from e


def _image_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """The visible image files of a class folder and its other visible entries (left out), each sorted by name.

    A symbolic link with an image's name is kept even when it leads nowhere: reading it names it.
    """
    try:
        visible = sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)
    except OSError as e:
        raise DataError(f"cannot list {folder}: {type(e).__name__}: {one_line(e)}") from e
    images, others = [], []
    for p in visible:
        is_image = p.suffix.lower() in IMAGE_EXTENSIONS and (p.is_file() or p.is_symlink())
        (images if is_image else others).append(p)
    return images, others


def _list_folder(source: Path) -> tuple[tuple[str, ...], dict[str, list[tuple[Path, int]]]]:
    """(classes, split -> [(image path, label)]) of a folder dataset; every listing sorted by name."""
    if not source.is_dir():
        what = "is not a folder" if source.exists() else "does not exist"
        raise DataError(f"data.source_dir: {source} {what}; a folder dataset needs {FOLDER_LAYOUT} in it")
    dirs: dict[str, Path] = {}
    for split in ("train", "val", "test"):
        if (source / split).is_dir():
            dirs[split] = source / split
        elif split != "val":
            raise DataError(f"{source / split}: no such folder; a folder dataset needs {FOLDER_LAYOUT}")
    classes = _subfolders(dirs["train"])
    if not classes:
        raise DataError(f"{dirs['train']} has no class folders; put each class's images into {dirs['train']}/<class>/")
    for split in ("test", "val"):
        if split not in dirs:
            continue
        theirs = _subfolders(dirs[split])
        if theirs != classes:
            differences = [
                f"missing in {where}: {', '.join(sorted(set(have) - set(lack)))}"
                for where, have, lack in ((dirs[split], classes, theirs), (dirs["train"], theirs, classes))
                if set(have) - set(lack)
            ]
            raise DataError(f"class folders of {dirs['train']} and {dirs[split]} differ: {'; '.join(differences)} "
                            "(every split needs the same class folders)")
    if len(classes) < 2:
        raise DataError(f"{dirs['train']} has 1 class folder ({classes[0]}); a classifier needs at least 2")
    listed = {split: {name: _image_files(folder / name) for name in classes} for split, folder in dirs.items()}
    files = {split: {name: images for name, (images, _) in per_class.items()} for split, per_class in listed.items()}
    _report_skipped(source, dirs, classes, [p for per_class in listed.values() for _, others in per_class.values()
                                            for p in others])
    if not any(paths for per_class in files.values() for paths in per_class.values()):
        raise DataError(f"{source} holds no images: no file in its class folders ends in {_EXTENSIONS_TEXT}")
    for split, per_class in files.items():
        for name, paths in per_class.items():
            if not paths:
                raise DataError(f"{dirs[split] / name} has no images (files ending in {_EXTENSIONS_TEXT}); add some, "
                                "or remove that class folder from every split")
    listing = {split: _interleaved([per_class[name] for name in classes]) for split, per_class in files.items()}
    return tuple(classes), listing


def _report_skipped(source: Path, dirs: dict[str, Path], classes: list[str], others: list[Path]) -> None:
    """One line on stderr counting the visible entries the dataset leaves out, the first few named: entries beside
    the class folders, and `others`, the class folders' entries that are no image of a known format."""
    loose = [p for folder in dirs.values() for p in sorted(folder.iterdir(), key=lambda p: p.name)
             if not p.name.startswith(".") and p.name not in classes]
    skipped = sorted(loose + others)
    if skipped:
        named = ", ".join(str(p.relative_to(source)) + ("/" if p.is_dir() else "") for p in skipped[:3])
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        entries = "entry" if len(skipped) == 1 else "entries"
        print(f"download: skipped {len(skipped)} {entries} of {source} that are no image of a class folder "
              f"(images are files ending in {_EXTENSIONS_TEXT} directly in <split>/<class>/): {named}{more}",
              file=sys.stderr, flush=True)


def _interleaved(per_class: list[list[Path]]) -> list[tuple[Path, int]]:
    """(path, label) pairs taking the classes in turn: the first image of each class, then the second, ...

    So the first N images of a split (data.train_limit, data.test_limit) hold every class, as evenly as the
    class sizes allow, instead of the first classes only.
    """
    longest = max(len(paths) for paths in per_class)
    return [(paths[i], label) for i in range(longest) for label, paths in enumerate(per_class) if i < len(paths)]


def _image_error(path: Path, e: BaseException) -> DataError:
    return DataError(f"cannot read image {path}: {type(e).__name__}: {one_line(e)}")


def _is_gray(path: Path) -> bool:
    """Whether an image has one channel, from its header alone (also rejects files that are no image).

    A palette image counts as grey when every colour of its palette is a grey.
    """
    try:
        with Image.open(path) as img:
            if img.mode == "P":
                palette = img.getpalette() or []
                return all(palette[i] == palette[i + 1] == palette[i + 2] for i in range(0, len(palette) - 2, 3))
            return img.mode in _GRAY_MODES
    except Exception as e:  # noqa: BLE001 - Pillow's plugins raise many types on broken headers
        raise _image_error(path, e) from e


def _to_mode(img: Image.Image, gray: bool) -> Image.Image:
    """img as 8-bit "L" (gray) or "RGB"; 16-bit grey is scaled down (not clipped) to 8 bits."""
    if img.mode in _WIDE_GRAY_MODES:
        img = img.convert("I").point(_WIDE_TO_8BIT, "L")
    target = "L" if gray else "RGB"
    return img if img.mode == target else img.convert(target)


def _decode(path: Path, size: int, gray: bool) -> bytes:
    """The image at path as size x size pixels ((H, W, C) bytes, C = 1 or 3): shorter side resized, centre crop."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            if min(w, h) > size * _REDUCING_GAP:  # JPEG: decode at 1/2, 1/4 or 1/8 scale, still >= 3x the target
                scale = size * _REDUCING_GAP / min(w, h)
                img.draft(None, (math.ceil(w * scale), math.ceil(h * scale)))
            img.load()  # the whole file: a truncated one fails here
            if img.getexif().get(ExifTags.Base.Orientation, 1) != 1:  # a camera's rotated photo: as it is shown
                img = ImageOps.exif_transpose(img)
            img = _to_mode(img, gray)
            w, h = img.size
            side = min(w, h)  # the centred square that the crop keeps, in source pixels
            box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
            return img.resize((size, size), _RESAMPLE, box=box, reducing_gap=_REDUCING_GAP).tobytes()
    except Exception as e:  # noqa: BLE001 - Pillow raises many types on broken files
        raise _image_error(path, e) from e


def _run_ordered(fn: Callable[[int], object], n: int, desc: str, progress: bool) -> list[object]:
    """[fn(0), ..., fn(n - 1)] on a thread pool; the first failure in index order is raised, the rest cancelled."""
    pool = ThreadPoolExecutor(max_workers=_DECODE_THREADS, thread_name_prefix="ofa-data")
    try:
        with tqdm(total=n, desc=desc, unit="img", disable=not progress, file=sys.stderr,
                  mininterval=1.0 if sys.stderr.isatty() else 30.0) as bar:
            results = []
            for result in pool.map(fn, range(n)):
                results.append(result)
                bar.update()
            return results
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def read_folder(source: Path, size: int, limits: dict[str, int | None], check: Callable[[Preview], None] | None,
                progress: bool) -> Dataset:
    """Decode a folder dataset into size x size uint8 splits: RGB, or one channel when every image is grey (by
    its stored mode, or, for images stored in colour, by R = G = B in every decoded pixel).

    Only the images within `limits` (split -> first N, None = all) are read; `check` sees the Preview once the
    folders are listed and the headers read, before anything is decoded.
    """
    classes, listing = _list_folder(source)
    listing = {split: pairs[: limits.get(split)] for split, pairs in listing.items()}
    items = [(split, path, label) for split, pairs in listing.items() for path, label in pairs]
    gray = all(_run_ordered(lambda i: _is_gray(items[i][1]), len(items), f"reading headers of {source}", progress))
    channels = 1 if gray else 3  # at most: colour files whose pixels all turn out grey give 1 channel below
    if check is not None:
        check(Preview((channels, size, size), len(classes), len(listing["train"]), "val" in listing))
    # twice the decoded bytes: holding val out of train and saving the splits copy them once more at most
    check_fits(2 * len(items) * channels * size * size, torch.device("cpu"),
               f"decoding the {len(items)} images of {source} at data.image_size {size} (and copying them once)",
               hint="lower data.image_size, data.train_limit or data.test_limit")
    images = torch.empty((len(items), channels, size, size), dtype=torch.uint8)
    hwc = images.permute(0, 2, 3, 1)  # a view: each image's (H, W, C) bytes land in its (C, H, W) slot

    def decode_into(i: int) -> None:
        pixels = _decode(items[i][1], size, gray)
        hwc[i].copy_(torch.frombuffer(bytearray(pixels), dtype=torch.uint8).view(size, size, channels))

    _run_ordered(decode_into, len(items), f"decoding {source}", progress)
    if channels == 3 and torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2]):
        images = images[:, :1].clone()  # every image grey, though stored in colour (WebP, RGB PNGs or JPEGs)
    labels = torch.tensor([label for _, _, label in items], dtype=torch.int64)
    splits, start = {}, 0
    for split, pairs in listing.items():
        splits[split] = Split(images[start : start + len(pairs)], labels[start : start + len(pairs)])
        start += len(pairs)
    return Dataset(splits["train"], splits["test"], classes, splits.get("val"))
