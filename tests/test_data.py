"""Tests for ofa.data: fetching over a local HTTP server, parsing, synthetic data, persistence, augmentation."""

from __future__ import annotations

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
from ofa.data import DataError, RemoteFile, Split

CIFAR_NAME = "cifar-10-binary.tar.gz"
RECORDS_PER_BATCH = 2
BATCH_NAMES = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]


# --------------------------------------------------------------------------------------------------
# helpers / fixtures


def md5(blob: bytes) -> str:
    return hashlib.md5(blob).hexdigest()


def cifar_record_images(batch_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Known labels and pixels for one batch file: distinct per batch, record, channel and position."""
    labels = torch.tensor([(batch_index * RECORDS_PER_BATCH + r) % 10 for r in range(RECORDS_PER_BATCH)])
    base = torch.arange(3 * 32 * 32).reshape(3, 32, 32)
    images = torch.stack([(base * 7 + 31 * batch_index + 101 * r) % 256 for r in range(RECORDS_PER_BATCH)])
    return images.to(torch.uint8), labels.to(torch.int64)


def make_cifar_archive(labels_override: dict[int, int] | None = None) -> bytes:
    """A tiny CIFAR-10 archive in the official binary format (2 records per batch file)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for index, name in enumerate(BATCH_NAMES):
            images, labels = cifar_record_images(index)
            if labels_override and index in labels_override:
                labels = labels.clone()
                labels[0] = labels_override[index]
            payload = b"".join(bytes([int(lab)]) + img.numpy().tobytes() for img, lab in zip(images, labels))
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


GOOD = make_cifar_archive()
CORRUPT = bytes(b ^ 0xFF if i % 97 == 0 else b for i, b in enumerate(GOOD))
BAD_LABEL = make_cifar_archive(labels_override={5: 10})


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict[str, bytes] = {
        f"/good/{CIFAR_NAME}": GOOD,
        f"/corrupt/{CIFAR_NAME}": CORRUPT,
        f"/truncated/{CIFAR_NAME}": GOOD,
        f"/nolength/{CIFAR_NAME}": GOOD,
        f"/badlabel/{CIFAR_NAME}": BAD_LABEL,
    }

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


def cifar_file(url: str, blob: bytes = GOOD) -> RemoteFile:
    return RemoteFile(url=url, filename=CIFAR_NAME, md5=md5(blob))


# --------------------------------------------------------------------------------------------------
# CIFAR-10 download / parse


def test_constants() -> None:
    assert data.DATASETS == ("cifar10", "fashion_mnist", "synthetic")
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


def test_cifar10_download_and_parse(server: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "raw"
    files = [cifar_file(f"{server}/good/{CIFAR_NAME}")]
    (path,) = data.fetch(files, raw, progress=True)
    assert path == raw / CIFAR_NAME and path.read_bytes() == GOOD
    assert sorted(p.name for p in raw.iterdir()) == [CIFAR_NAME]
    err = capfd.readouterr().err
    assert f"{len(GOOD)}/{len(GOOD)} bytes (100%)" in err
    assert len(err.splitlines()) <= 13  # at most every 10 % plus start/end lines

    train, test = data.prepare("cifar10", raw, files=files)
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

    fm = RemoteFile(unused_url("train-labels-idx1-ubyte.gz"), "train-labels-idx1-ubyte.gz", "0" * 32)
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
    train, _ = data.prepare("cifar10", raw, source_dir=src, files=files)
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
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; allowed: cifar10, fashion_mnist, synthetic"):
        data.prepare("mnist", tmp_path)
    with pytest.raises(ValueError, match="plain file name"):
        data.fetch([RemoteFile("http://x/y", "../y", "0" * 32)], tmp_path)


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
    train, test = data.prepare("fashion_mnist", tmp_path / "raw", source_dir=src, files=files)
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
def fashion_system(tmp_path_factory: pytest.TempPathFactory) -> tuple[Split, Split]:
    if not all((data.FASHION_MNIST_SYSTEM_DIR / f.filename).is_file() for f in data.FASHION_MNIST_FILES):
        pytest.skip(f"{data.FASHION_MNIST_SYSTEM_DIR} absent: apt-get install dataset-fashion-mnist to run this test")
    return data.prepare("fashion_mnist", tmp_path_factory.mktemp("fm") / "raw")


def test_fashion_mnist_from_system_dir(fashion_system: tuple[Split, Split]) -> None:
    train, test = fashion_system
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
    prepared, _ = data.prepare("synthetic", Path("unused"), seed=1)
    assert torch.equal(prepared.images, a_train.images)


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
