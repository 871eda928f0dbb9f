"""Files every layer writes and reads: atomic writes (a stage killed at any moment leaves the old file or folder
or the new one, never a partial one), JSON, YAML refusing duplicate keys, tensor files loaded weights-only, and
content digests."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import yaml


def atomic_write(path: Path, write: Callable[[IO], None], binary: bool = False) -> None:
    """Call write(f) on a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes the file owner-only; give it a plain file's mode
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def replaced_dir(path: Path) -> Iterator[Path]:
    """Yield an empty staging folder beside `path`; once the block succeeds, it replaces `path` as a whole.

    A failure (or a kill) inside the block leaves `path` as it was; the staging folder of a killed run is
    cleared by the next one. The swap is two renames: in between, `path` is briefly absent, never mixed.
    """
    path = Path(path)
    staging, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    for leftover in (staging, old):
        shutil.rmtree(leftover, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        if path.exists():
            path.rename(old)
        staging.rename(path)
    finally:
        for leftover in (staging, old):
            shutil.rmtree(leftover, ignore_errors=True)


def md5_file(path: Path) -> str:
    """The md5 hex digest of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2) + "\n"))


def load_tensors(path: Path, keys: set[str], error: type[Exception], what: str, mmap: bool = False) -> dict:
    """A dict holding `keys`, read with torch.load(weights_only=True); else `error` with a one-line message.

    mmap: the tensors stay in the file, mapped, until read (their shapes cost nothing).
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} not found (run the upstream stage first: dvc repro)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types on corrupt files
        raise error(f"{path}: unreadable {what} ({type(e).__name__})") from None
    if not isinstance(obj, dict) or not keys <= obj.keys():
        raise error(f"{path}: not a {what} of this project (keys {', '.join(sorted(keys))})")
    return obj


class DuplicateKey(yaml.YAMLError):
    """A key given twice in one YAML mapping (`key`, at `line`)."""

    def __init__(self, key: Any, line: int) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key, self.line = key, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (the last one would win silently: a
    second `train:` section would drop every key of the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, typing.Hashable):
                if key in seen:
                    raise DuplicateKey(key, key_node.start_mark.line + 1)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """YAML's safe load, raising DuplicateKey for a key given twice in one mapping."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
