"""The published datasets' files: CIFAR-10 and CIFAR-100 (official binary tar.gz, read with tarfile) and
Fashion-MNIST (the four official IDX .gz files, also found in the Debian package ``dataset-fashion-mnist``),
fetched and verified by ``ofa.data.remote.fetch`` and parsed into uint8 splits.
"""

from __future__ import annotations

import gzip
import math
import struct
import tarfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .remote import RemoteFile, fetch
from .splits import DataError, Dataset, Split, one_line

__all__ = ["CIFAR10_CLASSES", "CIFAR10_FILES", "CIFAR100_FILES", "FASHION_MNIST_CLASSES", "FASHION_MNIST_FILES",
           "FASHION_MNIST_SYSTEM_DIR", "fetch_and_parse"]

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

_CIFAR_PIXELS = 3 * 32 * 32
_CIFAR10_MEMBER_DIR = "cifar-10-batches-bin"
_CIFAR100_MEMBER_DIR = "cifar-100-binary"
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049


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
    RemoteFile(_FASHION_MNIST_BASE_URL + name, name, md5, content_md5,
               offline_hint=f"apt-get install dataset-fashion-mnist (provides {FASHION_MNIST_SYSTEM_DIR})")
    for name, md5, content_md5 in (
        ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
        ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9"),
        ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a"),
        ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965"),
    )
)


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
        raise DataError(f"cannot read {layout.title} archive {archive}: {type(e).__name__}: {one_line(e)}") from e
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
        raise DataError(f"{where} is not UTF-8 text: {one_line(e)}") from e
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
        raise DataError(f"cannot read IDX file {path}: {type(e).__name__}: {one_line(e)}") from e
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


def fetch_and_parse(dataset: str, raw_dir: Path, sources: list[Path], files: Sequence[RemoteFile] | None,
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
