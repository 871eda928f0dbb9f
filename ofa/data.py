"""Datasets for Once-for-All training: fetch/verify raw files, parse them into uint8 splits, augment on device.

Supported datasets are CIFAR-10 and CIFAR-100 (official binary tar.gz, read with tarfile), Fashion-MNIST
(the four official IDX .gz files, also accepted from the Debian package ``dataset-fashion-mnist``), a
folder of the user's own images (``train/<class>/<image>``, ``test/<class>/<image>`` and optionally
``val/<class>/<image>``, decoded with Pillow) and a tiny deterministic synthetic dataset.  ``prepare``
returns a ``Dataset``: the splits and the class names in label order.  Images are uint8 (N, C, H, W);
``image_size`` resizes them (shorter side to the size, then a centre crop to a square).  ``check_fits``
turns "not enough memory" into a one-line error before a large tensor is made.  No torchvision and no
pickle: splits are saved as plain tensors and loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.client
import math
import os
import socket
import struct
import sys
import tarfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, ImageOps
from tqdm import tqdm

from .io import atomic_write, load_tensors

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_FILES",
    "CIFAR100_FILES",
    "DATASETS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_SYSTEM_DIR",
    "IMAGE_EXTENSIONS",
    "MIN_IMAGE_SIZE",
    "SYNTHETIC_CLASSES",
    "TRAIN_IMAGES",
    "DataError",
    "Dataset",
    "RemoteFile",
    "Split",
    "augment",
    "available_memory",
    "channel_stats",
    "check_fits",
    "fetch",
    "hold_out",
    "load_split",
    "prepare",
    "Preview",
    "resize_split",
    "save_split",
    "synthetic",
]

DATASETS = ("cifar10", "cifar100", "fashion_mnist", "folder", "synthetic")
# size of each official training split; a folder dataset's size is known only once it is read
TRAIN_IMAGES = {"cifar10": 50000, "cifar100": 50000, "fashion_mnist": 60000, "synthetic": 512}
# (C, H, W) of each published dataset's images and its number of classes, known before anything is read
NATIVE = {"cifar10": ((3, 32, 32), 10), "cifar100": ((3, 32, 32), 100), "fashion_mnist": ((1, 28, 28), 10),
          "synthetic": ((3, 16, 16), 10)}
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
SYNTHETIC_CLASSES = tuple(str(k) for k in range(10))
IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".webp")  # of a folder dataset's images, in any case
MIN_IMAGE_SIZE = 8  # smallest data.image_size

_CHUNK = 1 << 20
_CIFAR_PIXELS = 3 * 32 * 32
_CIFAR10_MEMBER_DIR = "cifar-10-batches-bin"
_CIFAR100_MEMBER_DIR = "cifar-100-binary"
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
_MEMINFO = Path("/proc/meminfo")
# Pillow's one-channel modes
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_WIDE_GRAY_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})  # 16-bit grey (PNG): scaled to 8 bits
_WIDE_TO_8BIT = [(v * 255 + 32767) // 65535 for v in range(65536)]  # 16-bit value -> nearest 8-bit one (v / 257)
_RESAMPLE = Image.Resampling.BICUBIC
_REDUCING_GAP = 3.0  # Pillow shrinks by whole factors first while keeping at least 3x the target resolution
_DECODE_THREADS = max(1, min(8, os.cpu_count() or 1))  # Pillow releases the GIL while it decodes and resizes
_IMAGE_CHUNK = 1024  # images at a time in resize_split and channel_stats (bounds their copies)


class DataError(RuntimeError):
    """A download, checksum or parse failure; str() is one line."""


@dataclass(frozen=True)
class RemoteFile:
    """A downloadable file with its expected md5 (and, for .gz files, optionally the md5 of its content)."""

    url: str
    filename: str
    md5: str  # md5 of the file as stored (the archive / .gz)
    content_md5: str | None = None  # md5 of the decompressed content (.gz files only)


CIFAR10_FILES: tuple[RemoteFile, ...] = (
    RemoteFile(
        url="https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
        filename="cifar-10-binary.tar.gz",
        md5="c32a1d4ab5d03f1284b67883e8d87530",
    ),
)
CIFAR100_FILES: tuple[RemoteFile, ...] = (
    RemoteFile(
        url="https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
        filename="cifar-100-binary.tar.gz",
        md5="03b5dce01913d631647c71ecec9e9cb8",
    ),
)

_FASHION_MNIST_BASE_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# Order matters for prepare(): train images, train labels, test images, test labels.
FASHION_MNIST_FILES: tuple[RemoteFile, ...] = tuple(
    RemoteFile(_FASHION_MNIST_BASE_URL + name, name, md5, content_md5)
    for name, md5, content_md5 in (
        ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
        ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9"),
        ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a"),
        ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965"),
    )
)
_FASHION_MNIST_NAMES = frozenset(f.filename for f in FASHION_MNIST_FILES)


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
                             f"{_one_line(classes)[:200]}")
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


def _limited(split: Split, limit: int | None) -> Split:
    return split if limit is None or limit >= len(split) else Split(split.images[:limit], split.labels[:limit])


# --------------------------------------------------------------------------------------------------
# verification / fetching


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _md5_file(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _md5_gunzip(path: Path) -> str | None:
    """md5 of the gunzipped content, or None if the file is not valid gzip."""
    h = hashlib.md5(usedforsecurity=False)
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    except (OSError, EOFError, zlib.error):
        return None
    return h.hexdigest()


def _verify(path: Path, rf: RemoteFile) -> tuple[bool, str]:
    """(verified, actual md5) of a local file against a RemoteFile."""
    actual = _md5_file(path)
    if actual == rf.md5.lower():
        return True, actual
    if rf.content_md5 is not None and _md5_gunzip(path) == rf.content_md5.lower():
        return True, actual
    return False, actual


def _check_filename(rf: RemoteFile) -> None:
    name = rf.filename
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.endswith(".part"):
        raise ValueError(f"RemoteFile filename {name!r} (url {rf.url}) must be a plain file name without '/' or '.part'")


def _offline_hint(rf: RemoteFile, raw_dir: Path) -> str:
    hint = f"offline alternative: put {rf.filename} into data.source_dir (params.yaml) or {raw_dir}"
    if rf.filename in _FASHION_MNIST_NAMES:
        hint += f", or apt-get install dataset-fashion-mnist (provides {FASHION_MNIST_SYSTEM_DIR})"
    return hint


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _copy_verified(src: Path, dest: Path, expected_md5: str) -> None:
    """Copy src to dest via dest.part, checking the copy's md5; atomic rename at the end."""
    part = dest.with_name(dest.name + ".part")
    ok = False
    try:
        h = hashlib.md5(usedforsecurity=False)
        with open(src, "rb") as fin, open(part, "wb") as fout:
            while chunk := fin.read(_CHUNK):
                fout.write(chunk)
                h.update(chunk)
        if h.hexdigest() != expected_md5:
            raise DataError(f"copy of {src} to {dest} changed its md5: expected {expected_md5}, got {h.hexdigest()}")
        os.replace(part, dest)
        ok = True
    except OSError as e:
        raise DataError(f"cannot copy {src} to {dest}: {_one_line(e)}") from e
    finally:
        if not ok:
            part.unlink(missing_ok=True)


def _download(rf: RemoteFile, dest: Path, *, timeout: float, progress: bool) -> None:
    """Stream rf.url into dest.part, check length and md5, then rename to dest; the .part never survives a failure."""
    part = dest.with_name(dest.name + ".part")
    hint = _offline_hint(rf, dest.parent)
    url = rf.url
    ok = False
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "ofa-data/1.0"})
        with urllib.request.urlopen(request, timeout=timeout) as response, open(part, "wb") as out:
            total = _content_length(response)
            if progress:
                _log(f"downloading {url} -> {dest}" + (f" ({total} bytes)" if total is not None else ""))
            received, actual = _stream(response, out, rf.filename, total, progress)
        if total is not None and received != total:
            raise DataError(
                f"download of {url} incomplete: got {received} of {total} bytes (connection dropped?); retry or use the {hint}"
            )
        _check_md5(rf, part, actual)
        os.replace(part, dest)
        ok = True
        if progress:
            _log(f"  {rf.filename}: done, {received} bytes, md5 verified")
    except DataError:
        raise
    except urllib.error.HTTPError as e:
        raise DataError(f"download of {url} failed: HTTP {e.code} {_one_line(e.reason)}; {hint}") from e
    except urllib.error.URLError as e:
        raise DataError(f"download of {url} failed: network error: {_one_line(e.reason)}; {hint}") from e
    except (TimeoutError, socket.timeout, ConnectionError, http.client.HTTPException) as e:
        raise DataError(
            f"download of {url} failed: network error: {type(e).__name__}: {_one_line(e)}; {hint}"
        ) from e
    except OSError as e:
        raise DataError(f"download of {url} to {part} failed: {type(e).__name__}: {_one_line(e)}") from e
    finally:
        if not ok:
            part.unlink(missing_ok=True)


def _content_length(response) -> int | None:
    try:
        return int(response.headers["Content-Length"])
    except (KeyError, TypeError, ValueError):  # absent or not a number: progress in bytes, no length check
        return None


def _stream(response, out, filename: str, total: int | None, progress: bool) -> tuple[int, str]:
    """Copy `response` into `out`, reporting every tenth (or every 16 chunks of unknown length); bytes and md5."""
    h = hashlib.md5(usedforsecurity=False)
    received = 0
    next_report = 0.1
    unknown_step = 16 * _CHUNK
    while chunk := response.read(_CHUNK):
        out.write(chunk)
        h.update(chunk)
        received += len(chunk)
        if progress:
            if total:
                fraction = received / total
                if fraction >= next_report:
                    _log(f"  {filename}: {received}/{total} bytes ({min(fraction, 1.0):.0%})")
                    next_report = math.floor(fraction * 10 + 1e-9) / 10 + 0.1
            elif received >= unknown_step:
                _log(f"  {filename}: {received} bytes")
                unknown_step += 16 * _CHUNK
    return received, h.hexdigest()


def _check_md5(rf: RemoteFile, part: Path, actual: str) -> None:
    """DataError unless the download's md5 (or, for a gzip file that has one, its content's md5) is the expected one."""
    if actual == rf.md5.lower():
        return
    content = _md5_gunzip(part) if rf.content_md5 is not None else None
    if content is None or content != rf.content_md5.lower():
        extra = f" (content md5 expected {rf.content_md5}, got {content})" if rf.content_md5 is not None else ""
        raise DataError(f"md5 mismatch for {rf.filename} downloaded from {rf.url}: expected {rf.md5}, got {actual}{extra}")


def fetch(
    files: Sequence[RemoteFile],
    raw_dir: Path,
    *,
    source_dirs: Sequence[Path] = (),
    timeout: float = 60.0,
    progress: bool = True,
) -> list[Path]:
    """Make every file present and verified in raw_dir: reuse a verified copy there, else copy from the first source dir that has a verified copy, else download."""
    raw_dir = Path(raw_dir)
    for rf in files:
        _check_filename(rf)
    raw_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for rf in files:
        dest = raw_dir / rf.filename
        paths.append(dest)
        if dest.is_file():
            ok, actual = _verify(dest, rf)
            if ok:
                continue
            if progress:
                _log(f"{dest}: md5 {actual} does not match expected {rf.md5}; deleting and re-fetching")
            dest.unlink()
        elif dest.exists():
            raise DataError(f"{dest} exists but is not a regular file; remove it so {rf.filename} can be fetched")
        for source_dir in source_dirs:
            candidate = Path(source_dir) / rf.filename
            if not candidate.is_file():
                continue
            ok, actual = _verify(candidate, rf)
            if ok:
                if progress:
                    _log(f"copying {candidate} -> {dest}")
                _copy_verified(candidate, dest, actual)
                break
            if progress:
                _log(f"{candidate}: md5 {actual} does not match expected {rf.md5}; ignoring it")
        else:
            _download(rf, dest, timeout=timeout, progress=progress)
    return paths


# --------------------------------------------------------------------------------------------------
# parsing


@dataclass(frozen=True)
class _CifarLayout:
    """Where an official CIFAR binary archive keeps its records: label byte(s), then 3072 pixel bytes (C, H, W)."""

    title: str
    train: tuple[str, ...]  # members holding the training records, in order
    test: str
    label_bytes: int  # CIFAR-10: 1 (the label); CIFAR-100: 2 (coarse label, fine label): the last one is used
    classes: tuple[str, ...] = ()  # the class names when the archive lacks them (CIFAR-10), else:
    names: str | None = None  # member listing the class names, one a line
    num_classes: int = 10  # expected lines of the names member

    @property
    def record(self) -> int:
        return self.label_bytes + _CIFAR_PIXELS


_CIFAR_LAYOUTS = {
    "cifar10": _CifarLayout(
        "CIFAR-10",
        train=tuple(f"{_CIFAR10_MEMBER_DIR}/data_batch_{i}.bin" for i in range(1, 6)),
        test=f"{_CIFAR10_MEMBER_DIR}/test_batch.bin",
        label_bytes=1,
        classes=CIFAR10_CLASSES,
    ),
    "cifar100": _CifarLayout(
        "CIFAR-100",
        train=(f"{_CIFAR100_MEMBER_DIR}/train.bin",),
        test=f"{_CIFAR100_MEMBER_DIR}/test.bin",
        label_bytes=2,
        names=f"{_CIFAR100_MEMBER_DIR}/fine_label_names.txt",
        num_classes=100,
    ),
}


def _parse_cifar(archive: Path, layout: _CifarLayout) -> Dataset:
    """Read an official CIFAR-10/100 binary tar.gz (members read in one sequential pass, nothing extracted)."""
    wanted = {*layout.train, layout.test} | ({layout.names} if layout.names else set())
    data: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if name in wanted and member.isfile():
                    fileobj = tar.extractfile(member)
                    if fileobj is not None:
                        data[name] = fileobj.read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read {layout.title} archive {archive}: {type(e).__name__}: {_one_line(e)}") from e
    missing = sorted(wanted - data.keys())
    if missing:
        raise DataError(f"{layout.title} archive {archive} lacks member(s) {', '.join(missing)}")
    classes = layout.classes if layout.names is None else _class_names(data[layout.names], layout, archive)

    def records(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        raw = data[name]
        if not raw or len(raw) % layout.record:
            raise DataError(f"{layout.title} member {name} in {archive} has {len(raw)} bytes; must be a positive "
                            f"multiple of {layout.record}")
        rows = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(-1, layout.record)
        labels = rows[:, layout.label_bytes - 1].to(torch.int64)
        bad = labels >= len(classes)
        if bool(bad.any()):
            raise DataError(f"{layout.title} member {name} in {archive} has label {int(labels[bad][0])}; "
                            f"allowed 0..{len(classes) - 1}")
        return rows[:, layout.label_bytes :].reshape(-1, 3, 32, 32), labels

    train_parts = [records(n) for n in layout.train]
    test_images, test_labels = records(layout.test)
    train = Split(torch.cat([p[0] for p in train_parts]).contiguous(), torch.cat([p[1] for p in train_parts]))
    return Dataset(train, Split(test_images.contiguous(), test_labels.contiguous()), classes)


def _class_names(raw: bytes, layout: _CifarLayout, archive: Path) -> tuple[str, ...]:
    """The class names of a names member: one a line, trailing blank lines ignored."""
    where = f"{layout.title} member {layout.names} in {archive}"
    try:
        names = [line.strip() for line in raw.decode("utf-8").splitlines()]
    except UnicodeDecodeError as e:
        raise DataError(f"{where} is not UTF-8 text: {_one_line(e)}") from e
    while names and not names[-1]:
        names.pop()
    if len(names) != layout.num_classes or not all(names) or len(set(names)) != len(names):
        raise DataError(f"{where} has {len(names)} lines; expected {layout.num_classes} distinct non-empty class "
                        "names, one a line")
    return tuple(names)


def _read_idx(path: Path, magic: int) -> torch.Tensor:
    """Parse a (gzipped) IDX file of unsigned bytes with the given magic into a uint8 tensor."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read IDX file {path}: {type(e).__name__}: {_one_line(e)}") from e
    ndim = {_IDX_IMAGES_MAGIC: 3, _IDX_LABELS_MAGIC: 1}[magic]
    header = 4 + 4 * ndim
    found = struct.unpack(">I", raw[:4])[0] if len(raw) >= 4 else None
    if found != magic:
        raise DataError(f"IDX file {path} has magic {found}; expected {magic}")
    if len(raw) < header:
        raise DataError(f"IDX file {path} is {len(raw)} bytes, shorter than its {header}-byte header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    count = math.prod(dims)
    if len(raw) != header + count:
        raise DataError(f"IDX file {path} has {len(raw) - header} data bytes; header dims {dims} require {count}")
    if count == 0:
        raise DataError(f"IDX file {path} is empty (dims {dims}); expected at least one item")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(dims)


def _idx_split(images_path: Path, labels_path: Path, num_classes: int) -> Split:
    images = _read_idx(images_path, _IDX_IMAGES_MAGIC)
    labels = _read_idx(labels_path, _IDX_LABELS_MAGIC).to(torch.int64)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"IDX image file {images_path} has {images.shape[0]} items but label file {labels_path} has {labels.shape[0]}"
        )
    bad = labels >= num_classes
    if bool(bad.any()):
        raise DataError(f"IDX label file {labels_path} has label {int(labels[bad][0])}; allowed 0..{num_classes - 1}")
    return Split(images.unsqueeze(1).contiguous(), labels)


# --------------------------------------------------------------------------------------------------
# a folder of the user's own images


_EXTENSIONS_TEXT = ", ".join(IMAGE_EXTENSIONS[:-1]) + f" or {IMAGE_EXTENSIONS[-1]} (any case)"
_FOLDER_LAYOUT = "train/<class>/<image> and test/<class>/<image>, optionally val/<class>/<image>"


def _subfolders(folder: Path) -> list[str]:
    """Sorted names of the visible subfolders of folder."""
    try:
        return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".") and p.is_dir())
    except OSError as e:
        raise DataError(f"cannot list {folder}: {type(e).__name__}: {_one_line(e)}") from e


def _image_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """The visible image files of a class folder and its other visible entries (left out), each sorted by name.

    A symbolic link with an image's name is kept even when it leads nowhere: reading it names it.
    """
    try:
        visible = sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)
    except OSError as e:
        raise DataError(f"cannot list {folder}: {type(e).__name__}: {_one_line(e)}") from e
    images, others = [], []
    for p in visible:
        is_image = p.suffix.lower() in IMAGE_EXTENSIONS and (p.is_file() or p.is_symlink())
        (images if is_image else others).append(p)
    return images, others


def _list_folder(source: Path) -> tuple[tuple[str, ...], dict[str, list[tuple[Path, int]]]]:
    """(classes, split -> [(image path, label)]) of a folder dataset; every listing sorted by name."""
    if not source.is_dir():
        what = "is not a folder" if source.exists() else "does not exist"
        raise DataError(f"data.source_dir: {source} {what}; a folder dataset needs {_FOLDER_LAYOUT} in it")
    dirs: dict[str, Path] = {}
    for split in ("train", "val", "test"):
        if (source / split).is_dir():
            dirs[split] = source / split
        elif split != "val":
            raise DataError(f"{source / split}: no such folder; a folder dataset needs {_FOLDER_LAYOUT}")
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
    return DataError(f"cannot read image {path}: {type(e).__name__}: {_one_line(e)}")


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


def _read_folder(source: Path, size: int, limits: dict[str, int | None], check: Callable[[Preview], None] | None,
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


# --------------------------------------------------------------------------------------------------
# resizing and memory


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
    for start in range(0, n, _IMAGE_CHUNK):
        chunk = split.images[start : start + _IMAGE_CHUNK].float()
        resized = F.interpolate(chunk, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        out[start : start + _IMAGE_CHUNK] = resized[:, :, top : top + size, left : left + size].round().clamp(0, 255)
    return Split(out, split.labels)


def available_memory(device: torch.device) -> int:
    """Bytes free for new tensors on device.

    CUDA: the free memory torch.cuda.mem_get_info reports.  Otherwise (CPU, and MPS, which shares it):
    MemAvailable of /proc/meminfo, else the free physical pages (os.sysconf); sys.maxsize when neither is
    known, so that check_fits never refuses on a guess.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open(_MEMINFO) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return sys.maxsize


def _size_text(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale // 10:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def check_fits(nbytes: int, device: torch.device, what: str, *,
               hint: str = "lower data.image_size or data.train_limit") -> None:
    """Raise DataError (one line, naming what, the sizes and hint) when nbytes exceed available_memory(device)."""
    device = torch.device(device)
    available = available_memory(device)
    if nbytes > available:
        need, have = _size_text(nbytes), _size_text(available)
        if need == have:  # too close to tell apart when rounded
            need, have = f"{nbytes} bytes", f"{available} bytes"
        raise DataError(f"{what} needs {need} but {device} has {have} available; {hint}")


# --------------------------------------------------------------------------------------------------
# preparing a dataset


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
        raise DataError(f"data.source_dir: required for data.dataset folder (a folder holding {_FOLDER_LAYOUT})")
    _check_image_size(image_size, dataset)
    limits = {"train": train_limit, "test": test_limit}
    if dataset == "folder":
        return _read_folder(Path(source_dir), image_size, limits, check, progress)
    (channels, *native), num_classes = NATIVE[dataset]
    expected = Preview((channels, image_size, image_size) if image_size else (channels, *native), num_classes,
                       min(TRAIN_IMAGES[dataset], train_limit or TRAIN_IMAGES[dataset]), False)
    if check is not None:
        check(expected)
    if dataset == "synthetic":
        train, test = synthetic(seed=seed) if image_size is None else synthetic(seed=seed, size=image_size)
        return Dataset(_limited(train, train_limit), _limited(test, test_limit), SYNTHETIC_CLASSES)
    sources = [Path(source_dir)] if source_dir is not None else []
    ds = _fetch_and_parse(dataset, Path(raw_dir), sources, files, progress)
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


def _fetch_and_parse(dataset: str, raw_dir: Path, sources: list[Path], files: Sequence[RemoteFile] | None,
                     progress: bool) -> Dataset:
    """A published dataset (CIFAR-10/100, Fashion-MNIST): its verified files fetched into raw_dir, then parsed."""
    if dataset in _CIFAR_LAYOUTS:
        files = (CIFAR10_FILES if dataset == "cifar10" else CIFAR100_FILES) if files is None else tuple(files)
        if len(files) != 1:
            raise ValueError(f"{dataset} files must be exactly 1 RemoteFile (the binary tar.gz), got {len(files)}")
        (archive,) = fetch(files, raw_dir, source_dirs=sources, progress=progress)
        return _parse_cifar(archive, _CIFAR_LAYOUTS[dataset])
    files = FASHION_MNIST_FILES if files is None else tuple(files)
    if len(files) != 4:
        raise ValueError(
            f"fashion_mnist files must be 4 RemoteFiles (train images, train labels, test images, test labels), got {len(files)}"
        )
    train_images, train_labels, test_images, test_labels = fetch(
        files, raw_dir, source_dirs=[*sources, FASHION_MNIST_SYSTEM_DIR], progress=progress)
    n = len(FASHION_MNIST_CLASSES)
    return Dataset(_idx_split(train_images, train_labels, n), _idx_split(test_images, test_labels, n),
                   FASHION_MNIST_CLASSES)


# --------------------------------------------------------------------------------------------------
# synthetic data


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


def channel_stats(split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (at least 1) of a split's uint8 pixels, each (1, C, 1, 1) float: the normalisation.

    Exact, from each channel's histogram of the 256 pixel values (counted a chunk of images at a time), so it
    needs no float copy of the split.
    """
    images = split.images
    counts = torch.zeros(images.shape[1], 256, dtype=torch.int64)
    for start in range(0, len(images), _IMAGE_CHUNK):
        chunk = images[start : start + _IMAGE_CHUNK].transpose(0, 1).reshape(images.shape[1], -1).cpu()
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


# --------------------------------------------------------------------------------------------------
# persistence


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


# --------------------------------------------------------------------------------------------------
# augmentation


def augment(images: torch.Tensor, generator: torch.Generator, padding: int = 4, flip: bool = True,
            rows_of: tuple[int, int] | None = None) -> torch.Tensor:
    """Random crop with zero padding (+ random horizontal flip), as batched tensor ops on the tensor's device (no per-sample Python loop).

    rows_of=(first, total): `images` are rows first.. of a batch of `total` (a rank's share); the draws are made
    for the whole batch and those rows' applied, so each row is augmented as it would be in the whole batch.
    """
    if images.ndim != 4:
        raise ValueError(f"augment images must have shape (B, C, H, W), got {tuple(images.shape)}")
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f"augment padding={padding!r} must be an int >= 0")
    if generator.device.type != images.device.type:
        raise ValueError(
            f"augment generator is on {generator.device} but images are on {images.device}; they must be on the same device"
        )
    b, c, h, w = images.shape
    device = images.device
    first, total = rows_of or (0, b)
    if first < 0 or first + b > total:
        raise ValueError(f"augment rows_of={rows_of!r}: {b} images do not fit in a batch of {total} from row {first}")
    mine = slice(first, first + b)
    flip = ((torch.rand(total, generator=generator, device=device) < 0.5) & flip)[mine]
    offset_y = torch.randint(0, 2 * padding + 1, (total,), generator=generator, device=device)[mine]
    offset_x = torch.randint(0, 2 * padding + 1, (total,), generator=generator, device=device)[mine]
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    cols = torch.arange(w, device=device)
    cols = torch.where(flip[:, None], (w - 1) - cols, cols) + offset_x[:, None]  # (B, W), flip folded into the gather
    rows = torch.arange(h, device=device) + offset_y[:, None]  # (B, H)
    batch = torch.arange(b, device=device)[:, None, None, None]
    channel = torch.arange(c, device=device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]
