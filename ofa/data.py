"""Datasets for Once-for-All training: fetch/verify raw files, parse them into uint8 splits, augment on device.

Supported datasets are CIFAR-10 (official binary tar.gz, read with tarfile), Fashion-MNIST (the four
official IDX .gz files, also accepted from the Debian package ``dataset-fashion-mnist``) and a tiny
deterministic synthetic dataset.  No torchvision and no pickle: splits are saved as plain tensors and
loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .io import atomic_write, load_tensors

__all__ = [
    "CIFAR10_FILES",
    "DATASETS",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_SYSTEM_DIR",
    "TRAIN_IMAGES",
    "DataError",
    "RemoteFile",
    "Split",
    "augment",
    "channel_stats",
    "fetch",
    "hold_out",
    "load_split",
    "prepare",
    "save_split",
    "synthetic",
]

DATASETS = ("cifar10", "fashion_mnist", "synthetic")
TRAIN_IMAGES = {"cifar10": 50000, "fashion_mnist": 60000, "synthetic": 512}  # size of each official training split
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist

_CHUNK = 1 << 20
_CIFAR10_MEMBER_DIR = "cifar-10-batches-bin"
_CIFAR10_TRAIN_MEMBERS = tuple(f"{_CIFAR10_MEMBER_DIR}/data_batch_{i}.bin" for i in range(1, 6))
_CIFAR10_TEST_MEMBER = f"{_CIFAR10_MEMBER_DIR}/test_batch.bin"
_CIFAR10_RECORD = 1 + 3 * 32 * 32
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
_NUM_CLASSES = 10


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
            length_header = response.headers.get("Content-Length")
            total: int | None = None
            if length_header is not None:
                try:
                    total = int(length_header)
                except ValueError:
                    total = None
            if progress:
                _log(f"downloading {url} -> {dest}" + (f" ({total} bytes)" if total is not None else ""))
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
                            _log(f"  {rf.filename}: {received}/{total} bytes ({min(fraction, 1.0):.0%})")
                            next_report = math.floor(fraction * 10 + 1e-9) / 10 + 0.1
                    elif received >= unknown_step:
                        _log(f"  {rf.filename}: {received} bytes")
                        unknown_step += 16 * _CHUNK
        if total is not None and received != total:
            raise DataError(
                f"download of {url} incomplete: got {received} of {total} bytes (connection dropped?); retry or use the {hint}"
            )
        actual = h.hexdigest()
        if actual != rf.md5.lower():
            content = _md5_gunzip(part) if rf.content_md5 is not None else None
            if content is None or content != rf.content_md5.lower():
                extra = f" (content md5 expected {rf.content_md5}, got {content})" if rf.content_md5 is not None else ""
                raise DataError(
                    f"md5 mismatch for {rf.filename} downloaded from {url}: expected {rf.md5}, got {actual}{extra}"
                )
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


def _parse_cifar10(archive: Path) -> tuple[Split, Split]:
    """Read the official CIFAR-10 binary tar.gz (members read in one sequential pass, nothing extracted)."""
    wanted = set(_CIFAR10_TRAIN_MEMBERS) | {_CIFAR10_TEST_MEMBER}
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
        raise DataError(f"cannot read CIFAR-10 archive {archive}: {type(e).__name__}: {_one_line(e)}") from e
    missing = sorted(wanted - data.keys())
    if missing:
        raise DataError(f"CIFAR-10 archive {archive} lacks member(s) {', '.join(missing)}")

    def batch(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        raw = data[name]
        if not raw or len(raw) % _CIFAR10_RECORD:
            raise DataError(
                f"CIFAR-10 member {name} in {archive} has {len(raw)} bytes; must be a positive multiple of {_CIFAR10_RECORD}"
            )
        records = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(-1, _CIFAR10_RECORD)
        labels = records[:, 0].to(torch.int64)
        bad = labels >= _NUM_CLASSES
        if bool(bad.any()):
            raise DataError(
                f"CIFAR-10 member {name} in {archive} has label {int(labels[bad][0])}; allowed 0..{_NUM_CLASSES - 1}"
            )
        return records[:, 1:].reshape(-1, 3, 32, 32), labels

    train_parts = [batch(n) for n in _CIFAR10_TRAIN_MEMBERS]
    test_images, test_labels = batch(_CIFAR10_TEST_MEMBER)
    train = Split(torch.cat([p[0] for p in train_parts]).contiguous(), torch.cat([p[1] for p in train_parts]))
    test = Split(test_images.contiguous(), test_labels.contiguous())
    return train, test


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


def _idx_split(images_path: Path, labels_path: Path) -> Split:
    images = _read_idx(images_path, _IDX_IMAGES_MAGIC)
    labels = _read_idx(labels_path, _IDX_LABELS_MAGIC).to(torch.int64)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"IDX image file {images_path} has {images.shape[0]} items but label file {labels_path} has {labels.shape[0]}"
        )
    bad = labels >= _NUM_CLASSES
    if bool(bad.any()):
        raise DataError(f"IDX label file {labels_path} has label {int(labels[bad][0])}; allowed 0..{_NUM_CLASSES - 1}")
    return Split(images.unsqueeze(1).contiguous(), labels)


def prepare(
    dataset: str,
    raw_dir: Path,
    *,
    source_dir: Path | None = None,
    seed: int = 0,
    files: Sequence[RemoteFile] | None = None,
) -> tuple[Split, Split]:
    """(train, test) uint8 splits of a dataset; cifar10/fashion_mnist via fetch (files overrides the default RemoteFiles, for tests and mirrors), synthetic generated."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; allowed: {', '.join(DATASETS)}")
    if dataset == "synthetic":
        return synthetic(seed=seed)
    raw_dir = Path(raw_dir)
    sources: list[Path] = [Path(source_dir)] if source_dir is not None else []
    if dataset == "cifar10":
        files = CIFAR10_FILES if files is None else tuple(files)
        if len(files) != 1:
            raise ValueError(f"cifar10 files must be exactly 1 RemoteFile (the binary tar.gz), got {len(files)}")
        (archive,) = fetch(files, raw_dir, source_dirs=sources)
        return _parse_cifar10(archive)
    files = FASHION_MNIST_FILES if files is None else tuple(files)
    if len(files) != 4:
        raise ValueError(
            f"fashion_mnist files must be 4 RemoteFiles (train images, train labels, test images, test labels), got {len(files)}"
        )
    sources.append(FASHION_MNIST_SYSTEM_DIR)
    train_images, train_labels, test_images, test_labels = fetch(files, raw_dir, source_dirs=sources)
    return _idx_split(train_images, train_labels), _idx_split(test_images, test_labels)


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
    """Per-channel mean and std (at least 1) of a split's pixels, each (1, C, 1, 1) float: the normalisation."""
    pixels = split.images.float().transpose(0, 1).reshape(split.images.shape[1], -1)  # (C, N*H*W)
    return pixels.mean(dim=1).view(1, -1, 1, 1), pixels.std(dim=1).clamp_min(1.0).view(1, -1, 1, 1)


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


def load_split(path: Path) -> Split:
    """Load a Split written by save_split (torch.load with weights_only=True)."""
    obj = load_tensors(path, {"images", "labels"}, DataError, "split file")
    try:
        return Split(images=obj["images"], labels=obj["labels"])
    except ValueError as e:
        raise DataError(f"split file {path} is invalid: {e}") from e


# --------------------------------------------------------------------------------------------------
# augmentation


def augment(images: torch.Tensor, generator: torch.Generator, padding: int = 4, flip: bool = True) -> torch.Tensor:
    """Random crop with zero padding (+ random horizontal flip), as batched tensor ops on the tensor's device (no per-sample Python loop)."""
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
    flip = (torch.rand(b, generator=generator, device=device) < 0.5) & flip
    offset_y = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=device)
    offset_x = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=device)
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    cols = torch.arange(w, device=device)
    cols = torch.where(flip[:, None], (w - 1) - cols, cols) + offset_x[:, None]  # (B, W), flip folded into the gather
    rows = torch.arange(h, device=device) + offset_y[:, None]  # (B, H)
    batch = torch.arange(b, device=device)[:, None, None, None]
    channel = torch.arange(c, device=device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]
