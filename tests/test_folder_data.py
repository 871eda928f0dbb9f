"""Tests for ofa.data's folder dataset (the user's own images, decoded with Pillow) and its memory checks."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from ofa import data
from ofa.data import folder, memory
from ofa.data import DataError

S = 8  # data.image_size of these tests
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
ANT, BEE, CAT = (200, 30, 30), (30, 200, 30), (30, 30, 200)


# --------------------------------------------------------------------------------------------------
# helpers


def solid(colour: tuple[int, ...] | int, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    return Image.new(mode, size, colour)


def bands() -> Image.Image:
    """64 x 16: green | red | blue | green, the colours changing at columns 24, 32 and 40.

    Shorter side to 8 (a 2x shrink) then the centre crop keeps source columns 24..39: red left, blue right.
    Squeezing the whole width instead would give a mostly green image.
    """
    img = solid(GREEN, (64, 16))
    img.paste(RED, (24, 0, 32, 16))
    img.paste(BLUE, (32, 0, 40, 16))
    return img


def save(img: Image.Image, path: Path, **kwargs: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)


def rgb_files() -> dict[str, Callable[[Path], None]]:
    """Relative path -> writer of an RGB dataset: 3 classes, PNG/JPEG/BMP/WebP, several sizes, one grey image."""
    return {
        "train/ant/a.png": lambda p: save(solid(ANT, (12, 10)), p),
        "train/ant/b.JPG": lambda p: save(solid(ANT, (16, 16)), p, quality=95),
        "train/bee/a.webp": lambda p: save(solid(BEE, (20, 9)), p, lossless=True),
        "train/bee/b.png": lambda p: save(solid(90, (9, 14), "L"), p),  # the one grey image
        "train/cat/bands.png": lambda p: save(bands(), p),
        "train/cat/c.bmp": lambda p: save(solid(CAT, (8, 8)), p),
        "train/cat/notes.txt": lambda p: p.write_text("not an image: ignored"),
        "train/cat/.hidden.png": lambda p: p.write_bytes(b"hidden files are ignored, even broken ones"),
        "train/.git/x.png": lambda p: p.write_bytes(b"hidden folders are no classes"),
        "test/ant/x.jpeg": lambda p: save(solid(ANT, (30, 40)), p, quality=95),
        "test/bee/y.PNG": lambda p: save(solid(BEE, (5, 7)), p),  # smaller than S: enlarged
        "test/cat/z.bmp": lambda p: save(solid(CAT, (11, 8)).convert("P", palette=Image.Palette.ADAPTIVE), p),
    }


def write(root: Path, files: dict[str, Callable[[Path], None]], reverse: bool = False) -> Path:
    for rel in sorted(files, reverse=reverse):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        files[rel](path)
    return root


def prepare(source: Path | None, image_size: int | None = S, **kwargs: object) -> data.Dataset:
    return data.prepare("folder", Path("unused"), source_dir=source, image_size=image_size, progress=False, **kwargs)


def error(source: Path | None, image_size: int | None = S) -> str:
    with pytest.raises(DataError) as info:
        prepare(source, image_size)
    message = str(info.value)
    assert "\n" not in message
    return message


def close(images: torch.Tensor, colour: tuple[int, ...], tolerance: int) -> bool:
    """Every pixel of (C, H, W) images within tolerance of colour."""
    target = torch.tensor(colour, dtype=torch.int16).view(-1, 1, 1)
    return bool(((images.to(torch.int16) - target).abs() <= tolerance).all())


# --------------------------------------------------------------------------------------------------
# reading


def test_rgb_folder(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    source = write(tmp_path / "images", rgb_files())
    ds = data.prepare("folder", tmp_path / "raw", source_dir=source, image_size=S, progress=True)
    assert "decoding" in capfd.readouterr().err  # a progress bar on stderr
    assert ds.classes == ("ant", "bee", "cat") and ds.val is None and ds.image_shape == (3, S, S)
    assert ds.train.images.shape == (6, 3, S, S) and ds.train.images.dtype == torch.uint8
    # the classes in turn (each one's first image, then each one's second), so a limit keeps every class
    assert ds.train.labels.tolist() == [0, 1, 2, 0, 1, 2] and ds.train.labels.dtype == torch.int64
    assert ds.test.images.shape == (3, 3, S, S) and ds.test.labels.tolist() == [0, 1, 2]
    train, test = ds.train.images, ds.test.images
    assert close(train[0], ANT, 0)  # PNG: exact
    assert close(train[3], ANT, 3) and close(test[0], ANT, 3)  # JPEG: nearly
    assert close(train[1], BEE, 0)  # lossless WebP
    assert close(train[4], (90, 90, 90), 0)  # the grey PNG, as RGB
    assert close(train[5], CAT, 0) and close(test[2], CAT, 0)  # BMP, palette BMP
    assert close(test[1], BEE, 0)  # 5 x 7 enlarged to 8 x 8
    assert not (tmp_path / "raw").exists()  # nothing is copied



def test_what_is_left_out_is_counted_and_named(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    source = write(tmp_path / "images", rgb_files())  # with train/cat/notes.txt and hidden files
    prepare(source)
    assert capfd.readouterr().err.strip() == (
        f"download: skipped 1 entry of {source} that are no image of a class folder (images are files ending in "
        f"{folder._EXTENSIONS_TEXT} directly in <split>/<class>/): train/cat/notes.txt")
    save(solid(ANT, (8, 8)), source / "train" / "loose.png")
    save(solid(ANT, (8, 8)), source / "test" / "ant" / "nested" / "n.png")
    save(solid(ANT, (8, 8)), source / "test" / "bee" / "photo.tif")
    save(solid(ANT, (8, 8)), source / "train" / "ant" / "c.gif")
    before = prepare(source)
    err = capfd.readouterr().err.strip()
    assert err.startswith(f"download: skipped 5 entries of {source} ") and err.endswith(
        ": test/ant/nested/, test/bee/photo.tif, train/ant/c.gif and 2 more")
    assert before.train.images.shape[0] == 6 and before.test.images.shape[0] == 3  # none of them read


def test_shorter_side_resize_then_centre_crop(tmp_path: Path) -> None:
    source = write(tmp_path / "images", rgb_files())
    out = prepare(source).train.images[2].to(torch.int16)  # train/cat/bands.png
    assert bool((out == out[:, :1]).all())  # every row alike
    assert close(out[:, :, 1:3], RED, 12) and close(out[:, :, 5:7], BLUE, 12)
    assert int(out[0, 0, 0]) > 200 and int(out[1, 0, 0]) < 60  # the edges are red and blue, not green
    assert int(out[2, 0, 7]) > 200 and int(out[1, 0, 7]) < 60
    # sideways the same: 16 x 64 keeps the middle rows
    save(bands().transpose(Image.Transpose.ROTATE_90), source / "train" / "cat" / "bands.png")
    turned = prepare(source).train.images[2].to(torch.int16)
    assert torch.equal(turned, out.transpose(1, 2).flip(1))


def test_classes_take_turns_so_a_limit_keeps_every_class(tmp_path: Path) -> None:
    files = {f"{split}/{name}/{i}.png": (lambda p, c=colour: save(solid(c, (8, 8)), p))
             for split, count in (("train", 4), ("test", 1)) for name, colour in (("ant", ANT), ("bee", BEE))
             for i in range(count)}
    files["train/cat/0.png"] = lambda p: save(solid(CAT, (8, 8)), p)  # a class with fewer images
    ds = prepare(write(tmp_path / "images", {**files, "test/cat/0.png": files["train/cat/0.png"]}))
    assert ds.train.labels.tolist() == [0, 1, 2, 0, 1, 0, 1, 0, 1]
    assert close(ds.train.images[2], CAT, 0) and close(ds.train.images[3], ANT, 0)
    assert sorted(ds.train.labels[:3].tolist()) == [0, 1, 2]  # data.train_limit 3: one image of each class


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    """A camera stores a portrait photo sideways with an EXIF orientation; it is decoded as it is shown."""
    stored = solid((250, 250, 250), (24, 12))  # stored 24 wide, 12 high: white left half, black right half
    stored.paste((0, 0, 0), (12, 0, 24, 12))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: shown turned 90 degrees clockwise, 12 wide and 24 high, white on top
    files = {**rgb_files(), "train/cat/bands.png": lambda p: save(stored, p.with_suffix(".jpg"), exif=exif,
                                                                  quality=95)}
    out = prepare(write(tmp_path / "images", files)).train.images[2].to(torch.int16)
    assert bool((out[:, :3] > 220).all()) and bool((out[:, -3:] < 30).all())  # rows 6..17 of the shown image
    assert bool(((out[:, :, :1] - out[:, :, -1:]).abs() < 30).all())  # columns alike: not the stored halves


def test_file_order_never_changes_the_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = prepare(write(tmp_path / "a", rgb_files()))
    b_root = write(tmp_path / "b", rgb_files(), reverse=True)  # created in the opposite order
    listed = Path.iterdir
    for order in (lambda paths: sorted(paths, reverse=True), lambda paths: sorted(paths, key=lambda p: p.name[::-1])):
        # the file system may list a folder in any order: make it list them backwards, then otherwise
        monkeypatch.setattr(Path, "iterdir", lambda self, order=order: iter(order(list(listed(self)))))
        b = prepare(b_root)
        for name in ("train", "test"):
            split_a, split_b = getattr(a, name), getattr(b, name)
            assert torch.equal(split_a.images, split_b.images) and torch.equal(split_a.labels, split_b.labels)
        assert a.classes == b.classes == ("ant", "bee", "cat")


def test_grey_pixels_stored_in_colour_give_one_channel_and_the_values_of_grey_files(tmp_path: Path) -> None:
    """WebP stores no grayscale, and a grey photo is often saved as RGB: what counts is the pixels."""
    def grey_files(mode: str) -> dict[str, Callable[[Path], None]]:
        def grey(value: int) -> Image.Image:
            img = bands().convert("L").point(lambda v: (v + value) % 256)  # not flat: resizing has work to do
            return img.convert(mode)
        return {"train/x/a.png": lambda p: save(grey(10), p), "train/y/b.webp": lambda p: save(grey(60), p, lossless=True),
                "train/x/c.jpg": lambda p: save(grey(90), p, quality=95), "test/x/d.bmp": lambda p: save(grey(120), p),
                "test/y/e.png": lambda p: save(grey(150), p)}

    stored_grey = prepare(write(tmp_path / "L", grey_files("L")))
    stored_rgb = prepare(write(tmp_path / "RGB", grey_files("RGB")))
    assert stored_rgb.image_shape == stored_grey.image_shape == (1, S, S)
    assert torch.equal(stored_rgb.test.images, stored_grey.test.images)  # PNG and BMP: the same bytes
    assert (stored_rgb.train.images.int() - stored_grey.train.images.int()).abs().max() <= 2  # WebP/JPEG coding
    files = {**grey_files("RGB"), "test/y/f.png": lambda p: save(solid((120, 121, 120), (8, 8)), p)}  # one tinted
    assert prepare(write(tmp_path / "tinted", files)).image_shape == (3, S, S)


def test_all_grey_gives_one_channel_and_val(tmp_path: Path) -> None:
    wide = Image.new("I;16", (10, 12), 257 * 100)  # 16-bit grey PNG: scaled to 8 bits, not clipped
    files = {
        "train/x/a.png": lambda p: save(solid(90, (9, 14), "L"), p),
        "train/x/b.png": lambda p: save(wide, p),
        "train/y/a.png": lambda p: save(solid(1, (12, 12), "1"), p),  # 1-bit: white
        "train/y/b.jpg": lambda p: save(solid(40, (12, 12), "L"), p, quality=95),
        "test/x/a.png": lambda p: save(solid(10, (8, 8), "L"), p),
        "test/y/a.png": lambda p: save(solid(20, (8, 8), "LA"), p),
        "test/x/b.png": lambda p: save(solid(70, (8, 8), "L").convert("P"), p),  # a palette of greys
        "val/x/v.png": lambda p: save(solid(30, (8, 9), "L"), p),
        "val/y/v.png": lambda p: save(solid(50, (9, 8), "L"), p),
    }
    ds = prepare(write(tmp_path / "grey", files))
    assert ds.channels == 1 and ds.classes == ("x", "y")
    assert ds.train.images.shape == (4, 1, S, S) and ds.test.images.shape == (3, 1, S, S)
    assert [int(img.float().mean().round()) for img in ds.train.images] == [90, 255, 100, 40]  # x, y, x, y
    assert ds.test.images.flatten(1).float().mean(1).tolist() == [10.0, 20.0, 70.0]
    assert ds.val is not None and ds.val.labels.tolist() == [0, 1] and ds.val.images.shape == (2, 1, S, S)
    assert ds.val.images.flatten(1).float().mean(1).tolist() == [30.0, 50.0]
    # one colour image anywhere, here in val/, makes every split RGB
    save(solid((30, 60, 90), (8, 8)), tmp_path / "grey" / "val" / "y" / "v.png")
    rgb = prepare(tmp_path / "grey")
    assert rgb.channels == 3 and close(rgb.val.images[1], (30, 60, 90), 0)
    assert close(rgb.test.images[0], (10, 10, 10), 0)


# --------------------------------------------------------------------------------------------------
# errors


def test_corrupt_images_are_named(tmp_path: Path) -> None:
    source = write(tmp_path / "images", rgb_files())
    noise = Image.frombytes("RGB", (24, 24), bytes(range(256)) * 6 + bytes(range(192)))
    buf = io.BytesIO()
    noise.save(buf, format="PNG")
    truncated = source / "train" / "bee" / "t.png"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # a good header, half the pixels
    message = error(source)
    assert message.startswith(f"cannot read image {truncated}: ")
    truncated.unlink()
    garbage = source / "test" / "cat" / "g.webp"
    garbage.write_bytes(b"RIFF but not really a WebP file")
    assert error(source).startswith(f"cannot read image {garbage}: UnidentifiedImageError")
    garbage.unlink()
    broken = source / "train" / "ant" / "c.png"
    broken.symlink_to(tmp_path / "nowhere.png")  # a link that leads nowhere is named, not skipped
    assert error(source).startswith(f"cannot read image {broken}: FileNotFoundError")


def test_folder_errors_name_the_folder_or_key(tmp_path: Path) -> None:
    source = write(tmp_path / "images", rgb_files())
    assert error(source, 7) == ("data.image_size: 7 is not allowed; an int of at least 8, or null for the dataset's "
                                "own size")
    assert error(source, None).startswith("data.image_size: required for data.dataset folder")
    assert error(None).startswith("data.source_dir: required for data.dataset folder")
    assert error(tmp_path / "absent").startswith(f"data.source_dir: {tmp_path / 'absent'} does not exist; ")
    (tmp_path / "file").write_text("")
    assert error(tmp_path / "file").startswith(f"data.source_dir: {tmp_path / 'file'} is not a folder; ")

    (source / "test" / "cat").rename(source / "test" / "dog")
    (source / "test" / "bee").rename(source / "test" / "eel")
    assert error(source) == (f"class folders of {source / 'train'} and {source / 'test'} differ: missing in "
                             f"{source / 'test'}: bee, cat; missing in {source / 'train'}: dog, eel (every split "
                             "needs the same class folders)")
    (source / "test").rename(source / "val")
    assert error(source) == f"{source / 'test'}: no such folder; a folder dataset needs train/<class>/<image> and " \
                            "test/<class>/<image>, optionally val/<class>/<image>"
    write(source, {"test/ant/a.png": lambda p: save(solid(ANT, (8, 8)), p),
                   "test/bee/a.png": lambda p: save(solid(BEE, (8, 8)), p),
                   "test/cat/a.png": lambda p: save(solid(CAT, (8, 8)), p)})
    assert error(source).startswith(f"class folders of {source / 'train'} and {source / 'val'} differ: missing in "
                                    f"{source / 'val'}: bee, cat; missing in {source / 'train'}: dog, eel")
    for f in (source / "val").rglob("*.*"):
        f.unlink()
    for d in sorted((source / "val").iterdir()):
        d.rmdir()
    (source / "val" / "ant").mkdir()
    assert "missing in" in error(source)
    (source / "val" / "ant").rmdir()
    (source / "val").rmdir()
    assert len(prepare(source).test) == 3  # consistent again

    (source / "empty_class").mkdir(parents=True)
    (source / "train" / "dog").mkdir()
    (source / "test" / "dog").mkdir()
    (source / "train" / "dog" / "readme.md").write_text("no images here")
    assert error(source) == (f"{source / 'train' / 'dog'} has no images (files ending in .bmp, .jpeg, .jpg, .png or "
                             ".webp (any case)); add some, or remove that class folder from every split")


def test_no_images_and_too_few_classes(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    for rel in ("train/a", "train/b", "test/a", "test/b"):
        (empty / rel).mkdir(parents=True)
    (empty / "train" / "a" / "photo.gif").write_bytes(b"GIF89a")  # not an allowed extension
    assert error(empty) == (f"{empty} holds no images: no file in its class folders ends in .bmp, .jpeg, .jpg, .png "
                            "or .webp (any case)")
    (empty / "train" / "b").rmdir()
    (empty / "test" / "b").rmdir()
    assert error(empty) == f"{empty / 'train'} has 1 class folder (a); a classifier needs at least 2"
    (empty / "train" / "a" / "photo.gif").unlink()
    (empty / "train" / "a").rmdir()
    assert error(empty) == (f"{empty / 'train'} has no class folders; put each class's images into "
                            f"{empty / 'train'}/<class>/")


# --------------------------------------------------------------------------------------------------
# memory


def test_check_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "available_memory", lambda device: int(1.1 * 2**30))
    with pytest.raises(DataError) as info:
        data.check_fits(int(3.2 * 2**30), torch.device("cpu"), "the prepared dataset")
    assert str(info.value) == ("the prepared dataset needs 3.2 GiB but cpu has 1.1 GiB available; lower "
                               "data.image_size or data.train_limit")
    assert data.check_fits(int(1.1 * 2**30), torch.device("cpu"), "the prepared dataset") is None  # exactly fits
    monkeypatch.setattr(memory, "available_memory", lambda device: 2**20 - 1)
    with pytest.raises(DataError) as info:
        data.check_fits(2**20, torch.device("cuda", 0), "a batch", hint="free some")
    assert str(info.value) == "a batch needs 1048576 bytes but cuda:0 has 1048575 bytes available; free some"


def test_limits_keep_the_first_images_and_the_check_comes_before_decoding(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    source = write(tmp_path / "images", rgb_files())
    beyond = source / "train" / "cat" / "z.png"  # the 7th training image in turn: beyond a limit of 6
    beyond.write_bytes(b"not a PNG")
    assert error(source).startswith(f"cannot read image {beyond}: ")
    ds = prepare(source, train_limit=6, test_limit=2)  # the images past the limits are never opened
    assert (len(ds.train), len(ds.test)) == (6, 2) and ds.train.labels.tolist() == [0, 1, 2, 0, 1, 2]
    seen: list[data.Preview] = []
    decoded: list[Path] = []
    monkeypatch.setattr(folder, "_decode", lambda path, size, gray: decoded.append(path))

    def stop(preview: data.Preview) -> None:
        seen.append(preview)
        raise DataError("stop")

    with pytest.raises(DataError, match="^stop$"):
        prepare(source, train_limit=6, check=stop)
    assert seen == [data.Preview((3, S, S), 3, 6, False)] and decoded == []


def test_folder_checks_memory_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = write(tmp_path / "images", rgb_files())
    seen: list[torch.device] = []
    monkeypatch.setattr(memory, "available_memory", lambda device: seen.append(device) or 100)
    decoded: list[Path] = []
    monkeypatch.setattr(folder, "_decode", lambda path, size, gray: decoded.append(path))
    # twice 9 x 3 x 8 x 8 bytes: the decoded images and the copy that holding out val or saving makes
    assert error(source) == (f"decoding the 9 images of {source} at data.image_size 8 (and copying them once) needs "
                             "3.4 KiB but cpu has 100 bytes available; lower data.image_size, data.train_limit or "
                             "data.test_limit")
    assert seen == [torch.device("cpu")] and decoded == []


def test_available_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < data.available_memory(torch.device("cpu")) <= total
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        2000 kB\nMemFree:          100 kB\nMemAvailable:    1234 kB\n")
    monkeypatch.setattr(memory, "_MEMINFO", meminfo)
    assert data.available_memory(torch.device("cpu")) == 1234 * 1024
    monkeypatch.setattr(memory, "_MEMINFO", tmp_path / "absent")
    monkeypatch.setattr(memory.os, "sysconf", {"SC_AVPHYS_PAGES": 3, "SC_PAGE_SIZE": 4096}.__getitem__)
    assert data.available_memory(torch.device("cpu")) == 3 * 4096
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (5 * 2**30, 80 * 2**30))
    assert data.available_memory(torch.device("cuda", 0)) == 5 * 2**30
