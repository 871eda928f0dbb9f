"""Augmentation of a training batch on its device: random crop with zero padding and random horizontal flip."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
