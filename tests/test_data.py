"""Tests for ofa.data: fetching over a local HTTP server, parsing CIFAR-10/100 and Fashion-MNIST, resizing,
synthetic data, persistence, augmentation.  (A folder of images and the memory checks: test_folder_data.py.)"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.server
import io
import socket
import struct
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ofa import data
from ofa.data import memory, splits
from ofa.data import DataError, Dataset, RemoteFile, Split

CIFAR_NAME = "cifar-10-binary.tar.gz"
CIFAR100_NAME = "cifar-100-binary.tar.gz"
RECORDS_PER_BATCH = 2
BATCH_NAMES = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FINE_NAMES = [f"fine_{k:02d}" for k in range(100)]
# (fine label, coarse label) of each record: the coarse label must be ignored
CIFAR100_LABELS = {"train": [(99, 19), (0, 0), (42, 7)], "test": [(5, 17), (63, 3)]}


# --------------------------------------------------------------------------------------------------
# helpers / fixtures


def md5(blob: bytes) -> str:
    return hashlib.md5(blob).hexdigest()


def cifar_record_images(batch_index: int, records: int = RECORDS_PER_BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """Known labels and pixels for one batch file: distinct per batch, record, channel and position."""
    labels = torch.tensor([(batch_index * RECORDS_PER_BATCH + r) % 10 for r in range(records)])
    base = torch.arange(3 * 32 * 32).reshape(3, 32, 32)
    images = torch.stack([(base * 7 + 31 * batch_index + 101 * r) % 256 for r in range(records)])
    return images.to(torch.uint8), labels.to(torch.int64)


def tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def make_cifar_archive(labels_override: dict[int, int] | None = None) -> bytes:
    """A tiny CIFAR-10 archive in the official binary format (2 records per batch file)."""
    members = {}
    for index, name in enumerate(BATCH_NAMES):
        images, labels = cifar_record_images(index)
        if labels_override and index in labels_override:
            labels = labels.clone()
            labels[0] = labels_override[index]
        payload = b"".join(bytes([int(lab)]) + img.numpy().tobytes() for img, lab in zip(images, labels))
        members[f"cifar-10-batches-bin/{name}"] = payload
    return tar_gz(members)


def cifar100_images(split: str) -> torch.Tensor:
    return cifar_record_images(7 if split == "train" else 8, len(CIFAR100_LABELS[split]))[0]


def make_cifar100_archive(
    fine_override: int | None = None, drop: str | None = None, names: list[str] = FINE_NAMES
) -> bytes:
    """A tiny CIFAR-100 archive in the official binary format: records of coarse label, fine label, 3072 pixels."""
    members = {"cifar-100-binary/fine_label_names.txt": ("\n".join(names) + "\n\n").encode(),
               "cifar-100-binary/coarse_label_names.txt": b"".join(b"coarse_%d\n" % k for k in range(20))}
    for split, pairs in CIFAR100_LABELS.items():
        records = []
        for r, (img, (fine, coarse)) in enumerate(zip(cifar100_images(split), pairs)):
            if fine_override is not None and split == "train" and r == 1:
                fine = fine_override
            records.append(bytes([coarse, fine]) + img.numpy().tobytes())
        members[f"cifar-100-binary/{split}.bin"] = b"".join(records)
    members.pop(drop, None)
    return tar_gz(members)


GOOD = make_cifar_archive()
CORRUPT = bytes(b ^ 0xFF if i % 97 == 0 else b for i, b in enumerate(GOOD))
BAD_LABEL = make_cifar_archive(labels_override={5: 10})
GOOD100 = make_cifar100_archive()


def _routes() -> dict[str, bytes]:
    """Each good archive under /good/, /truncated/ (connection dropped mid-body) and /nolength/ (no Content-Length)."""
    routes = {f"/{how}/{name}": blob for name, blob in ((CIFAR_NAME, GOOD), (CIFAR100_NAME, GOOD100))
              for how in ("good", "truncated", "nolength")}
    return routes | {f"/corrupt/{CIFAR_NAME}": CORRUPT, f"/badlabel/{CIFAR_NAME}": BAD_LABEL}


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict[str, bytes] = _routes()

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        body = self.routes.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if not self.path.startswith("/nolength/"):
            self.send_header("Content-Length", str(len(body)))  # full length, also for /truncated/
        self.end_headers()
        if self.path.startswith("/truncated/"):
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)  # drop the connection mid-body
        else:
            self.wfile.write(body)
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - silence the server log
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep urllib away from any proxy configured in the environment."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")


def unused_url(path: str = CIFAR_NAME) -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{path}"


def cifar_file(url: str, blob: bytes = GOOD, name: str = CIFAR_NAME) -> RemoteFile:
    return RemoteFile(url=url, filename=name, md5=md5(blob))


# --------------------------------------------------------------------------------------------------
# CIFAR-10 download / parse


def test_constants() -> None:
    assert data.DATASETS == ("cifar10", "cifar100", "fashion_mnist", "folder", "synthetic")
    assert data.TRAIN_IMAGES == {"cifar10": 50000, "cifar100": 50000, "fashion_mnist": 60000, "synthetic": 512}
    assert data.CIFAR10_CLASSES == CIFAR10_NAMES
    assert data.FASHION_MNIST_CLASSES[0] == "T-shirt/top" and data.FASHION_MNIST_CLASSES[-1] == "Ankle boot"
    assert len(set(data.FASHION_MNIST_CLASSES)) == 10 and data.SYNTHETIC_CLASSES == tuple("0123456789")
    assert data.CIFAR100_FILES == (RemoteFile("https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz", CIFAR100_NAME,
                                              "03b5dce01913d631647c71ecec9e9cb8"),)
    (cifar,) = data.CIFAR10_FILES
    assert cifar == RemoteFile(
        "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz", CIFAR_NAME, "c32a1d4ab5d03f1284b67883e8d87530"
    )
    names = [f.filename for f in data.FASHION_MNIST_FILES]
    assert names == [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]
    assert all(f.url == "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/" + f.filename for f in data.FASHION_MNIST_FILES)
    assert all(f.content_md5 is not None for f in data.FASHION_MNIST_FILES)
    assert all(f.offline_hint == "apt-get install dataset-fashion-mnist (provides /usr/share/datasets/fashion-mnist)"
               for f in data.FASHION_MNIST_FILES) and cifar.offline_hint is None


def test_ofa_data_exports_the_data_modules_public_names() -> None:
    from ofa.data import archives, folder, memory, remote

    modules = (archives, folder, memory, remote, splits)
    assert sorted(data.__all__) == sorted(set(data.__all__))
    for name in data.__all__:
        assert hasattr(data, name), name
        owner = next((m for m in modules if name in getattr(m, "__all__", ())), None)
        assert owner is None or getattr(data, name) is getattr(owner, name), name
    exported = {name for m in modules for name in m.__all__} - {"FOLDER_LAYOUT", "fetch_and_parse", "read_folder",
                                                               "size_text"}
    assert exported <= set(data.__all__), exported - set(data.__all__)


class _Stop(Exception):
    pass


def test_check_sees_the_preview_before_anything_is_fetched(server: str, tmp_path: Path) -> None:
    """prepare's check runs before the archive is fetched, and again with what came when that differs."""
    seen: list[data.Preview] = []

    def stop(preview: data.Preview) -> None:
        seen.append(preview)
        raise _Stop

    with pytest.raises(_Stop):  # an unreachable URL: the check stops it before any request
        data.prepare("cifar10", tmp_path / "raw", files=[cifar_file(unused_url())], image_size=16, check=stop)
    assert seen == [data.Preview((3, 16, 16), 10, 50000, False)] and not (tmp_path / "raw").exists()
    seen.clear()
    ds = data.prepare("cifar10", tmp_path / "raw", files=[cifar_file(f"{server}/good/{CIFAR_NAME}")], train_limit=7,
                      test_limit=1, check=seen.append, progress=False)
    assert (len(ds.train), len(ds.test)) == (7, 1)  # the first images of each split
    assert torch.equal(ds.train.images, torch.cat([cifar_record_images(i)[0] for i in range(5)])[:7])
    assert seen == [data.Preview((3, 32, 32), 10, 7, False)]  # the archive has 10 training images: 7 of them
    seen.clear()
    data.prepare("cifar10", tmp_path / "raw", files=[cifar_file(f"{server}/good/{CIFAR_NAME}")], check=seen.append,
                 progress=False)
    assert seen == [data.Preview((3, 32, 32), 10, 50000, False), data.Preview((3, 32, 32), 10, 10, False)]


def test_cifar10_download_and_parse(server: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "raw"
    files = [cifar_file(f"{server}/good/{CIFAR_NAME}")]
    (path,) = data.fetch(files, raw, progress=True)
    assert path == raw / CIFAR_NAME and path.read_bytes() == GOOD
    assert sorted(p.name for p in raw.iterdir()) == [CIFAR_NAME]
    err = capfd.readouterr().err
    assert f"{len(GOOD)}/{len(GOOD)} bytes (100%)" in err
    assert len(err.splitlines()) <= 13  # at most every 10 % plus start/end lines

    ds = data.prepare("cifar10", raw, files=files, progress=False)
    assert ds.classes == CIFAR10_NAMES and ds.val is None and ds.image_shape == (3, 32, 32) and ds.num_classes == 10
    train, test = ds.train, ds.test
    expected = [cifar_record_images(i) for i in range(6)]
    assert train.images.shape == (5 * RECORDS_PER_BATCH, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64 and train.images.is_contiguous()
    assert torch.equal(train.images, torch.cat([e[0] for e in expected[:5]]))
    assert torch.equal(train.labels, torch.cat([e[1] for e in expected[:5]]))
    assert train.labels.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert test.images.shape == (RECORDS_PER_BATCH, 3, 32, 32)
    assert torch.equal(test.images, expected[5][0]) and test.labels.tolist() == [0, 1]
    # channel-major layout: pixel (c=1, y=2, x=3) of the first record is byte 1 + 1024 + 2*32 + 3 of the record
    assert int(train.images[0, 1, 2, 3]) == ((1024 + 64 + 3) * 7) % 256


def test_no_content_length_is_accepted(server: str, tmp_path: Path) -> None:
    (path,) = data.fetch([cifar_file(f"{server}/nolength/{CIFAR_NAME}")], tmp_path, progress=False)
    assert path.read_bytes() == GOOD


def test_corrupt_truncated_then_retry(server: str, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    with pytest.raises(DataError) as info:
        data.fetch([cifar_file(f"{server}/corrupt/{CIFAR_NAME}")], raw, progress=False)
    msg = str(info.value)
    assert "md5" in msg and CIFAR_NAME in msg and md5(GOOD) in msg and md5(CORRUPT) in msg
    assert "\n" not in msg
    assert list(raw.iterdir()) == []

    url = f"{server}/truncated/{CIFAR_NAME}"
    with pytest.raises(DataError) as info:
        data.fetch([cifar_file(url)], raw, progress=False)
    msg = str(info.value)
    assert url in msg and f"{len(GOOD) // 2} of {len(GOOD)} bytes" in msg and "\n" not in msg
    assert list(raw.iterdir()) == []

    (path,) = data.fetch([cifar_file(f"{server}/good/{CIFAR_NAME}")], raw, progress=False)
    assert path.read_bytes() == GOOD
    assert sorted(p.name for p in raw.iterdir()) == [CIFAR_NAME]


def test_connection_refused_names_url_and_offline_alternative(tmp_path: Path) -> None:
    url = unused_url()
    with pytest.raises(DataError) as info:
        data.fetch([cifar_file(url)], tmp_path / "raw", timeout=5, progress=False)
    msg = str(info.value)
    assert url in msg and "data.source_dir" in msg and CIFAR_NAME in msg and "\n" not in msg
    assert "dataset-fashion-mnist" not in msg
    assert list((tmp_path / "raw").iterdir()) == []

    fm = dataclasses.replace(data.FASHION_MNIST_FILES[1], url=unused_url("train-labels-idx1-ubyte.gz"))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        data.fetch([fm], tmp_path / "raw2", timeout=5, progress=False)


def test_http_404_is_data_error(server: str, tmp_path: Path) -> None:
    url = f"{server}/missing/{CIFAR_NAME}"
    with pytest.raises(DataError, match="HTTP 404") as info:
        data.fetch([cifar_file(url)], tmp_path, progress=False)
    assert url in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_source_dir_and_reuse_without_network(tmp_path: Path) -> None:
    src, raw = tmp_path / "src", tmp_path / "raw"
    src.mkdir()
    (src / CIFAR_NAME).write_bytes(GOOD)
    files = [cifar_file(unused_url())]  # any download attempt would fail
    train = data.prepare("cifar10", raw, source_dir=src, files=files).train
    assert (raw / CIFAR_NAME).read_bytes() == GOOD and len(train) == 10
    (src / CIFAR_NAME).unlink()
    (path,) = data.fetch(files, raw, progress=False)  # verified copy in raw_dir is reused
    assert path.read_bytes() == GOOD


def test_bad_copy_in_raw_dir_is_replaced(tmp_path: Path) -> None:
    src, raw = tmp_path / "src", tmp_path / "raw"
    src.mkdir()
    raw.mkdir()
    (raw / CIFAR_NAME).write_bytes(CORRUPT)
    (raw / f"{CIFAR_NAME}.part").write_bytes(b"left over from a crash")
    (src / CIFAR_NAME).write_bytes(GOOD)
    (path,) = data.fetch([cifar_file(unused_url())], raw, source_dirs=[tmp_path / "absent", src], progress=False)
    assert path.read_bytes() == GOOD


def test_bad_source_copy_is_skipped_then_downloaded(server: str, tmp_path: Path) -> None:
    bad_src, raw = tmp_path / "bad", tmp_path / "raw"
    bad_src.mkdir()
    (bad_src / CIFAR_NAME).write_bytes(CORRUPT)
    (path,) = data.fetch([cifar_file(f"{server}/good/{CIFAR_NAME}")], raw, source_dirs=[bad_src], progress=False)
    assert path.read_bytes() == GOOD
    assert (bad_src / CIFAR_NAME).read_bytes() == CORRUPT  # source dirs are never modified


def test_cifar_bad_label_and_bad_archive(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / CIFAR_NAME).write_bytes(BAD_LABEL)
    with pytest.raises(DataError, match=r"test_batch\.bin.*label 10; allowed 0\.\.9"):
        data.prepare("cifar10", tmp_path / "raw", source_dir=src, files=[cifar_file(unused_url(), BAD_LABEL)])

    blob = b"this is not a tar.gz"
    (src / CIFAR_NAME).write_bytes(blob)
    with pytest.raises(DataError, match="cannot read CIFAR-10 archive"):
        data.prepare("cifar10", tmp_path / "raw2", source_dir=src, files=[cifar_file(unused_url(), blob)])


def test_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; allowed: cifar10, cifar100, fashion_mnist, folder, synthetic"):
        data.prepare("mnist", tmp_path)
    with pytest.raises(ValueError, match="plain file name"):
        data.fetch([RemoteFile("http://x/y", "../y", "0" * 32)], tmp_path)


def test_image_size_is_checked_before_any_fetch(tmp_path: Path) -> None:
    files = [cifar_file(unused_url())]  # a fetch would fail with a network error instead
    for bad in (4, 7, 0, True, 8.0):
        with pytest.raises(DataError) as info:
            data.prepare("cifar10", tmp_path / "raw", files=files, image_size=bad)
        assert str(info.value) == (f"data.image_size: {bad!r} is not allowed; an int of at least 8, or null for the "
                                   "dataset's own size")
    assert not (tmp_path / "raw").exists()


# --------------------------------------------------------------------------------------------------
# CIFAR-100


def test_cifar100_download_and_parse(server: str, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    files = [cifar_file(f"{server}/good/{CIFAR100_NAME}", GOOD100, CIFAR100_NAME)]
    ds = data.prepare("cifar100", raw, files=files, progress=False)
    assert (raw / CIFAR100_NAME).read_bytes() == GOOD100  # fetched, md5-verified, kept
    assert ds.classes == tuple(FINE_NAMES) and ds.num_classes == 100 and ds.val is None
    assert ds.train.labels.tolist() == [99, 0, 42] and ds.test.labels.tolist() == [5, 63]  # fine, not coarse
    assert ds.train.images.shape == (3, 3, 32, 32) and ds.train.images.dtype == torch.uint8
    assert torch.equal(ds.train.images, cifar100_images("train"))
    assert torch.equal(ds.test.images, cifar100_images("test"))
    # pixel (c=2, y=5, x=9) of the second training record: byte 2 + 2048 + 5*32 + 9 of the record
    assert int(ds.train.images[1, 2, 5, 9]) == ((2048 + 160 + 9) * 7 + 31 * 7 + 101) % 256

    small = data.prepare("cifar100", raw, files=files, image_size=16, progress=False)  # reuses the verified copy
    assert small.image_shape == (3, 16, 16) and small.classes == ds.classes
    assert torch.equal(small.train.images, data.resize_split(ds.train, 16).images)
    assert torch.equal(small.test.labels, ds.test.labels)


@pytest.mark.parametrize(
    ("archive", "message"),
    [
        (make_cifar100_archive(fine_override=100), r"CIFAR-100 member cifar-100-binary/train\.bin in .* has label 100; "
                                                  r"allowed 0\.\.99$"),
        (make_cifar100_archive(drop="cifar-100-binary/fine_label_names.txt"),
         r"CIFAR-100 archive .* lacks member\(s\) cifar-100-binary/fine_label_names\.txt$"),
        (make_cifar100_archive(drop="cifar-100-binary/test.bin"), r"lacks member\(s\) cifar-100-binary/test\.bin$"),
        (make_cifar100_archive(names=FINE_NAMES[:99]),
         r"fine_label_names\.txt in .* has 99 lines; expected 100 distinct"),
        (make_cifar100_archive(names=FINE_NAMES[:99] + ["fine_00"]), r"has 100 lines; expected 100 distinct non-empty"),
    ],
    ids=["label-100", "no-names", "no-test", "99-names", "duplicate-name"],
)
def test_cifar100_bad_archive(tmp_path: Path, archive: bytes, message: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / CIFAR100_NAME).write_bytes(archive)
    files = [cifar_file(unused_url(CIFAR100_NAME), archive, CIFAR100_NAME)]
    with pytest.raises(DataError, match=message) as info:
        data.prepare("cifar100", tmp_path / "raw", source_dir=src, files=files, progress=False)
    assert "\n" not in str(info.value) and str(tmp_path / "raw" / CIFAR100_NAME) in str(info.value)


# --------------------------------------------------------------------------------------------------
# resizing / Dataset


def test_resize_split_shorter_side_then_centre_crop() -> None:
    gen = torch.Generator().manual_seed(0)
    wide = torch.randint(0, 256, (3, 2, 8, 16), generator=gen, dtype=torch.uint8)
    labels = torch.tensor([2, 0, 1])
    # the shorter side is already 8: no resampling, only the centre crop (columns 4..11) remains
    out = data.resize_split(Split(wide, labels), 8)
    assert torch.equal(out.images, wide[..., 4:12]) and torch.equal(out.labels, labels)
    tall = wide.transpose(2, 3).contiguous()  # (16, 8): rows 4..11
    assert torch.equal(data.resize_split(Split(tall, labels), 8).images, tall[:, :, 4:12, :])
    # constant images stay constant whether shrunk, enlarged or cropped
    flat = Split(torch.full((2, 3, 10, 14), 77, dtype=torch.uint8), labels[:2])
    for size in (8, 10, 23):
        resized = data.resize_split(flat, size)
        assert resized.images.shape == (2, 3, size, size) and bool((resized.images == 77).all())
    # a 2x shrink of 2x2 blocks: antialiasing averages each block's neighbourhood (no aliasing to one pixel)
    stripes = torch.zeros(1, 1, 16, 16, dtype=torch.uint8)
    stripes[..., ::2] = 200  # alternate columns: 200, 0, 200, 0 ...
    shrunk = data.resize_split(Split(stripes, labels[:1]), 8).images
    # without antialiasing every pixel would be 200 or 0; the border columns see half a neighbourhood
    assert bool(((shrunk[..., 1:7].float() - 100).abs() <= 1).all())
    assert bool(((shrunk.float() - 100).abs() <= 15).all())
    same = Split(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), labels[:1])
    assert data.resize_split(same, 8) is same
    with pytest.raises(ValueError, match="size=0"):
        data.resize_split(same, 0)


def test_cifar10_image_size_resizes_every_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / CIFAR_NAME).write_bytes(GOOD)
    files = [cifar_file(unused_url())]
    native = data.prepare("cifar10", tmp_path / "raw", source_dir=src, files=files, progress=False)
    big = data.prepare("cifar10", tmp_path / "raw", source_dir=src, files=files, image_size=40, progress=False)
    assert big.image_shape == (3, 40, 40) and big.classes == CIFAR10_NAMES
    assert len(big.train) == 10 and len(big.test) == 2
    assert torch.equal(big.train.images, data.resize_split(native.train, 40).images)
    assert torch.equal(big.test.labels, native.test.labels)
    assert data.prepare("cifar10", tmp_path / "raw", files=files, image_size=32, progress=False).train.images.equal(
        native.train.images)  # already 32 x 32: untouched
    monkeypatch.setattr(memory, "available_memory", lambda device: 2 * 12 * 3 * 40 * 40 - 1)  # one byte short
    with pytest.raises(DataError, match=r"^resizing the 12 images of cifar10 to data\.image_size 40 \(and copying them "
                                        r"once\) needs 115200 bytes but cpu has 115199 bytes available; lower "
                                        r"data\.image_size or data\.train_limit$"):
        data.prepare("cifar10", tmp_path / "raw", files=files, image_size=40, progress=False)


def test_dataset_validation() -> None:
    train, test = data.synthetic(n_train=6, n_test=4, size=8, num_classes=3)
    ds = Dataset(train, test, ["a", "b", "c"])
    assert ds.classes == ("a", "b", "c") and ds.image_shape == (3, 8, 8) and ds.channels == 3
    assert list(ds.splits()) == ["train", "test"]
    assert list(Dataset(train, test, "abc", val=test).splits()) == ["train", "val", "test"]
    with pytest.raises(ValueError, match="labels span 0..2; allowed 0..1"):
        Dataset(train, test, ("a", "b"))
    with pytest.raises(ValueError, match="at least 2 distinct non-empty"):
        Dataset(train, test, ("a", "b", "a"))
    gray, _ = data.synthetic(n_train=4, n_test=1, channels=1, size=8, num_classes=3)
    with pytest.raises(ValueError, match=r"val images are \(1, 8, 8\) but train images are \(3, 8, 8\)"):
        Dataset(train, test, "abc", val=gray)


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST


def idx_bytes(array: torch.Tensor, magic: int) -> bytes:
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.to(torch.uint8).numpy().tobytes()


def tiny_fashion(tmp_path: Path, compresslevel: int = 9) -> tuple[Path, list[RemoteFile], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    arrays = {
        "train-images-idx3-ubyte.gz": (torch.randint(0, 256, (5, 28, 28), generator=gen), 2051),
        "train-labels-idx1-ubyte.gz": (torch.tensor([9, 0, 3, 3, 7]), 2049),
        "t10k-images-idx3-ubyte.gz": (torch.randint(0, 256, (3, 28, 28), generator=gen), 2051),
        "t10k-labels-idx1-ubyte.gz": (torch.tensor([1, 2, 9]), 2049),
    }
    src = tmp_path / "fm_src"
    src.mkdir(exist_ok=True)
    files = []
    for name, (array, magic) in arrays.items():
        gz = gzip.compress(idx_bytes(array, magic), compresslevel=compresslevel, mtime=0)
        (src / name).write_bytes(gz)
        files.append(RemoteFile(unused_url(name), name, md5(gz), md5(idx_bytes(array, magic))))
    return src, files, {name: array for name, (array, _) in arrays.items()}


def test_fashion_tiny_idx_parsed_exactly(tmp_path: Path) -> None:
    src, files, arrays = tiny_fashion(tmp_path)
    ds = data.prepare("fashion_mnist", tmp_path / "raw", source_dir=src, files=files)
    assert ds.classes == data.FASHION_MNIST_CLASSES and ds.channels == 1
    train, test = ds.train, ds.test
    assert train.images.shape == (5, 1, 28, 28) and train.images.dtype == torch.uint8
    assert torch.equal(train.images[:, 0], arrays["train-images-idx3-ubyte.gz"].to(torch.uint8))
    assert train.labels.tolist() == [9, 0, 3, 3, 7] and train.labels.dtype == torch.int64
    assert torch.equal(test.images[:, 0], arrays["t10k-images-idx3-ubyte.gz"].to(torch.uint8))
    assert test.labels.tolist() == [1, 2, 9]


def test_fashion_recompressed_gz_accepted_by_content_md5(tmp_path: Path) -> None:
    _, files, _ = tiny_fashion(tmp_path, compresslevel=9)
    other = tmp_path / "recompressed"
    other.mkdir()
    src1 = tmp_path / "fm_src"
    for f in files:  # a different gzip stream of identical content, as in the Debian package
        (other / f.filename).write_bytes(gzip.compress(gzip.decompress((src1 / f.filename).read_bytes()), 1, mtime=7))
        assert md5((other / f.filename).read_bytes()) != f.md5
    paths = data.fetch(files, tmp_path / "raw", source_dirs=[other], progress=False)
    assert [p.name for p in paths] == [f.filename for f in files]

    wrong = [RemoteFile(f.url, f.filename, f.md5, "f" * 32) for f in files]
    with pytest.raises(DataError, match="network error"):  # neither md5 matches -> falls through to (refused) download
        data.fetch(wrong[:1], tmp_path / "raw3", source_dirs=[other], timeout=5, progress=False)


def test_fashion_bad_idx(tmp_path: Path) -> None:
    src, files, _ = tiny_fashion(tmp_path)
    # swap images and labels: magic mismatch must be reported
    bad = gzip.compress(idx_bytes(torch.tensor([1, 2]), 2049), mtime=0)
    (src / files[0].filename).write_bytes(bad)
    files[0] = RemoteFile(files[0].url, files[0].filename, md5(bad))
    with pytest.raises(DataError, match="magic 2049; expected 2051"):
        data.prepare("fashion_mnist", tmp_path / "raw", source_dir=src, files=files)
    short = gzip.compress(idx_bytes(torch.zeros(4, 28, 28), 2051)[:-5], mtime=0)
    (src / files[0].filename).write_bytes(short)
    files[0] = RemoteFile(files[0].url, files[0].filename, md5(short))
    with pytest.raises(DataError, match="data bytes"):
        data.prepare("fashion_mnist", tmp_path / "raw", source_dir=src, files=files)


@pytest.fixture(scope="module")
def fashion_system(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    if not all((data.FASHION_MNIST_SYSTEM_DIR / f.filename).is_file() for f in data.FASHION_MNIST_FILES):
        pytest.skip(f"{data.FASHION_MNIST_SYSTEM_DIR} absent: apt-get install dataset-fashion-mnist to run this test")
    return data.prepare("fashion_mnist", tmp_path_factory.mktemp("fm") / "raw")


def test_fashion_mnist_from_system_dir(fashion_system: Dataset) -> None:
    train, test = fashion_system.train, fashion_system.test
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == test.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64
    assert torch.bincount(train.labels, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(test.labels, minlength=10).tolist() == [1000] * 10
    assert int(train.labels[0]) == 9 and int(test.labels[0]) == 9  # first items are ankle boots
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0


# --------------------------------------------------------------------------------------------------
# synthetic / persistence


def test_synthetic_deterministic() -> None:
    a_train, a_test = data.synthetic(seed=1)
    b_train, b_test = data.synthetic(seed=1)
    c_train, _ = data.synthetic(seed=2)
    assert torch.equal(a_train.images, b_train.images) and torch.equal(a_train.labels, b_train.labels)
    assert torch.equal(a_test.images, b_test.images) and torch.equal(a_test.labels, b_test.labels)
    assert not torch.equal(a_train.images, c_train.images)
    assert a_train.images.shape == (512, 3, 16, 16) and a_test.images.shape == (256, 3, 16, 16)
    assert a_train.images.dtype == torch.uint8 and a_train.labels.dtype == torch.int64
    assert torch.bincount(a_train.labels, minlength=10).min() >= 50
    small, _ = data.synthetic(seed=0, n_train=20, n_test=4, channels=1, size=8, num_classes=4)
    assert small.images.shape == (20, 1, 8, 8) and set(small.labels.tolist()) == {0, 1, 2, 3}
    prepared = data.prepare("synthetic", Path("unused"), seed=1)
    assert torch.equal(prepared.train.images, a_train.images) and prepared.classes == tuple("0123456789")
    big = data.prepare("synthetic", Path("unused"), seed=1, image_size=24)
    assert big.image_shape == (3, 24, 24) and len(big.train) == 512 and len(big.test) == 256


def test_synthetic_is_learnable_by_nearest_class_mean() -> None:
    train, test = data.synthetic(seed=0)
    means = torch.stack([train.images[train.labels == k].float().mean(0) for k in range(10)])
    dist = ((test.images.float()[:, None] - means[None]) ** 2).flatten(2).sum(-1)
    accuracy = (dist.argmin(1) == test.labels).float().mean().item()
    assert accuracy > 0.9


def test_split_validation() -> None:
    with pytest.raises(ValueError, match="uint8"):
        Split(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="int64"):
        Split(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="counts must be equal"):
        Split(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))
    s = Split(torch.zeros(2, 4, 4, 1, dtype=torch.uint8).permute(0, 3, 1, 2), torch.zeros(2, dtype=torch.int64))
    assert s.images.is_contiguous()


def test_hold_out_is_drawn_from_the_seed_and_disjoint() -> None:
    images = torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1)  # each image's pixel is its index
    split = Split(images, torch.arange(50) % 5)
    rest, val = data.hold_out(split, 10, seed=3)
    again_rest, again_val = data.hold_out(split, 10, seed=3)
    assert torch.equal(val.images, again_val.images) and torch.equal(rest.images, again_rest.images)
    taken, kept = val.images.flatten().tolist(), rest.images.flatten().tolist()
    assert len(taken) == 10 and sorted(taken + kept) == list(range(50))  # disjoint, nothing lost
    assert taken == sorted(taken) and kept == sorted(kept)  # split order kept
    assert val.labels.tolist() == [i % 5 for i in taken]  # labels travel with their images
    assert taken != list(range(10)) and data.hold_out(split, 10, seed=4)[1].images.flatten().tolist() != taken
    with pytest.raises(ValueError, match="cannot hold out 50 of 50"):
        data.hold_out(split, 50, seed=3)


def test_channel_stats_are_exact_chunk_by_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (37, 3, 5, 4), dtype=torch.uint8, generator=g)
    images[:, 2] = 7  # a constant channel: std clamped to 1
    monkeypatch.setattr(splits, "IMAGE_CHUNK", 8)  # several chunks, the last one short
    mean, std = data.channel_stats(Split(images, torch.zeros(37, dtype=torch.int64)))
    pixels = images.double().transpose(0, 1).reshape(3, -1)
    assert mean.shape == std.shape == (1, 3, 1, 1) and mean.dtype == std.dtype == torch.float32
    assert torch.allclose(mean.view(-1).double(), pixels.mean(1), atol=1e-5)
    assert torch.allclose(std.view(-1)[:2].double(), pixels.std(1)[:2], atol=1e-5)
    assert mean.view(-1)[2] == 7 and std.view(-1)[2] == 1


def test_save_load_round_trip(tmp_path: Path) -> None:
    train, _ = data.synthetic(seed=5, n_train=40, n_test=8)
    view = Split(train.images[10:20], train.labels[10:20])
    path = tmp_path / "sub" / "train.pt"
    data.save_split(view, path)
    loaded = data.load_split(path)
    assert torch.equal(loaded.images, view.images) and torch.equal(loaded.labels, view.labels)
    assert loaded.images.dtype == torch.uint8 and loaded.labels.dtype == torch.int64
    assert path.stat().st_size < 10 * 3 * 16 * 16 + 4096  # only the view's storage is saved
    assert sorted(p.name for p in path.parent.iterdir()) == ["train.pt"]  # no temp file left


def test_load_missing_or_garbage(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pt"
    with pytest.raises(DataError, match="missing.pt") as info:
        data.load_split(missing)
    assert "\n" not in str(info.value)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01 not a torch file" * 10)
    with pytest.raises(DataError) as info:
        data.load_split(garbage)
    assert str(garbage) in str(info.value) and "\n" not in str(info.value)
    wrong = tmp_path / "wrong.pt"
    torch.save({"images": torch.zeros(2)}, wrong)
    with pytest.raises(DataError, match="wrong.pt"):
        data.load_split(wrong)


# --------------------------------------------------------------------------------------------------
# augmentation


def distinct_images(b: int = 64, c: int = 2, h: int = 6, w: int = 7) -> torch.Tensor:
    return (torch.arange(b * c * h * w, dtype=torch.float32).reshape(b, c, h, w) + 1.0)


def test_augment_deterministic_and_shape() -> None:
    images = distinct_images()
    a = data.augment(images, torch.Generator().manual_seed(0))
    b = data.augment(images, torch.Generator().manual_seed(0))
    c = data.augment(images, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == images.shape and a.dtype == images.dtype


def test_augment_of_a_ranks_rows_is_those_rows_of_the_whole_batch_augmented() -> None:
    """A rank augments its share of a batch only, each image as in the whole batch (same draws at any split)."""
    images = distinct_images()
    whole = data.augment(images, torch.Generator().manual_seed(3), padding=2)
    for first, count in ((0, 32), (32, 32), (48, 16)):
        share = data.augment(images[first : first + count], torch.Generator().manual_seed(3), padding=2,
                             rows_of=(first, 64))
        assert torch.equal(share, whole[first : first + count])
    with pytest.raises(ValueError, match=r"^augment rows_of=\(40, 64\): 32 images do not fit in a batch of 64 "
                                         r"from row 40$"):
        data.augment(images[:32], torch.Generator(), rows_of=(40, 64))


def test_augment_flip_only() -> None:
    images = distinct_images()
    out = data.augment(images, torch.Generator().manual_seed(0), padding=0)
    same = (out == images).flatten(1).all(1)
    mirrored = (out == images.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert 10 < int(mirrored.sum()) < 54  # roughly half of the 64 samples are flipped


def test_augment_without_flip_only_crops() -> None:
    images = distinct_images()
    assert torch.equal(data.augment(images, torch.Generator().manual_seed(0), padding=0, flip=False), images)
    out = data.augment(images, torch.Generator().manual_seed(0), padding=2, flip=False)
    padded = torch.nn.functional.pad(images, (2,) * 4)
    h, w = images.shape[-2:]
    for i in range(images.shape[0]):
        assert any(torch.equal(out[i], padded[i, :, dy : dy + h, dx : dx + w]) for dy in range(5) for dx in range(5))


def test_augment_crop_matches_reference() -> None:
    padding = 2
    images = distinct_images()
    out = data.augment(images, torch.Generator().manual_seed(4), padding=padding)
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    h, w = images.shape[-2:]
    seen: set[tuple[int, int, bool]] = set()
    for i in range(images.shape[0]):  # reference: find the unique window (and flip) that produced sample i
        matches = [
            (dy, dx, flip)
            for dy in range(2 * padding + 1)
            for dx in range(2 * padding + 1)
            for flip in (False, True)
            if torch.equal(out[i], (lambda win: win.flip(-1) if flip else win)(padded[i, :, dy : dy + h, dx : dx + w]))
        ]
        assert len(matches) == 1, f"sample {i} is not a (flipped) window of the padded input"
        seen.add(matches[0])
    assert len({(dy, dx) for dy, dx, _ in seen}) > 10  # offsets really vary


def test_augment_uint8() -> None:
    images = torch.randint(1, 256, (32, 3, 8, 8), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    out = data.augment(images, torch.Generator().manual_seed(0), padding=4)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert bool((out == 0).any())  # zero padding shows up in some crops
    flat_in, flat_out = images.flatten(1), out.flatten(1)
    nonzero = flat_out != 0
    # every non-padding output value comes from the same sample's pixels
    for i in range(0, 32, 8):
        assert set(flat_out[i][nonzero[i]].tolist()) <= set(flat_in[i].tolist())
    ref = data.augment(images.float(), torch.Generator().manual_seed(0), padding=4)
    assert torch.equal(ref.to(torch.uint8), out)


def test_augment_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        data.augment(torch.zeros(3, 4, 4), torch.Generator())
    with pytest.raises(ValueError, match="padding"):
        data.augment(torch.zeros(1, 1, 4, 4), torch.Generator(), padding=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_augment_cuda_matches_shape_and_windows() -> None:
    images = distinct_images().cuda()
    out = data.augment(images, torch.Generator(device="cuda").manual_seed(0), padding=0)
    assert out.device == images.device
    same = (out == images).flatten(1).all(1)
    mirrored = (out == images.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all())
