"""Files fetched once and verified: a local copy, else a download, each checked against its md5.

``fetch`` makes every ``RemoteFile`` present in a raw folder: a verified copy already there is kept, else one
is copied from the first source folder that has a verified copy, else it is downloaded (streamed to a
``.part`` file, its length and md5 checked, then renamed), so no half-written file is ever left behind.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import math
import os
import socket
import sys
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..io import md5_file
from .splits import DataError, one_line

__all__ = ["RemoteFile", "fetch"]

_CHUNK = 1 << 20


@dataclass(frozen=True)
class RemoteFile:
    """A downloadable file with its expected md5 (and, for .gz files, optionally the md5 of its content)."""

    url: str
    filename: str
    md5: str  # md5 of the file as stored (the archive / .gz)
    content_md5: str | None = None  # md5 of the decompressed content (.gz files only)
    offline_hint: str | None = None  # one more way to get the file without a network, named when a download fails


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
    actual = md5_file(path)
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
    """Where to put rf so that fetch finds it without a network."""
    hint = f"offline alternative: put {rf.filename} into data.source_dir (params.yaml) or {raw_dir}"
    return hint + (f", or {rf.offline_hint}" if rf.offline_hint else "")


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
        raise DataError(f"cannot copy {src} to {dest}: {one_line(e)}") from e
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
        raise DataError(f"download of {url} failed: HTTP {e.code} {one_line(e.reason)}; {hint}") from e
    except urllib.error.URLError as e:
        raise DataError(f"download of {url} failed: network error: {one_line(e.reason)}; {hint}") from e
    except (TimeoutError, socket.timeout, ConnectionError, http.client.HTTPException) as e:
        raise DataError(
            f"download of {url} failed: network error: {type(e).__name__}: {one_line(e)}; {hint}"
        ) from e
    except OSError as e:
        raise DataError(f"download of {url} to {part} failed: {type(e).__name__}: {one_line(e)}") from e
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
