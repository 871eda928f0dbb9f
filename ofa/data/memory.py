"""How much memory a device has free, and a one-line error before a tensor that would not fit is made."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from .splits import DataError

__all__ = ["available_memory", "check_fits", "size_text"]

_MEMINFO = Path("/proc/meminfo")


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


def size_text(nbytes: int) -> str:
    """nbytes in GiB, MiB or KiB with one decimal (bytes below a tenth of a KiB)."""
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
        need, have = size_text(nbytes), size_text(available)
        if need == have:  # too close to tell apart when rounded
            need, have = f"{nbytes} bytes", f"{available} bytes"
        raise DataError(f"{what} needs {need} but {device} has {have} available; {hint}")
