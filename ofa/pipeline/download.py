"""Stage download: fetch and verify the dataset, apply the limits, hold out val, save uint8 splits to data/prepared."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import data as data_mod
from ..io import replaced_dir, write_json
from .checkpoint import build_arch
from .config import Params
from .context import CLASSES, PREPARED, RAW, check_budgets


def download(params: Params, root: Path = Path(".")) -> dict[str, Any]:
    """Fetch, verify and parse the dataset, apply the limits, hold out val, save uint8 splits to data/prepared.

    data/prepared is replaced as a whole once every file is written: a failed or killed run leaves the previous
    set (or none), never one split of this run beside another of the last.
    """
    d = params.data
    source = root / Path(d.source_dir).expanduser() if d.source_dir else None  # relative: to the project

    def check(preview: data_mod.Preview) -> None:  # before any image is fetched or decoded
        if not preview.has_val and d.val_images >= preview.train_images:
            raise data_mod.DataError(f"data.val_images: {d.val_images} is not smaller than the {preview.train_images} "
                                     "training images (fewer, to leave images to train on)")
        classes = [str(k) for k in range(preview.num_classes)]  # their names do not change any subnet's cost
        check_budgets(params, build_arch(params, preview.shape, classes), preview.shape)

    ds = data_mod.prepare(d.dataset, root / RAW / d.dataset, source_dir=source, seed=params.seed,
                          image_size=d.image_size, train_limit=d.train_limit, test_limit=d.test_limit, check=check)
    train, test, val = ds.train, ds.test, ds.val  # val: the dataset's own validation split (a folder's val/)
    if val is None:
        train, val = data_mod.hold_out(train, d.val_images, seed=params.seed)
    with replaced_dir(root / PREPARED) as staging:  # the splits and classes of one run, never a mix of two
        for name, split in (("train", train), ("val", val), ("test", test)):
            data_mod.save_split(split, staging / f"{name}.pt")
        write_json(staging / CLASSES.name, list(ds.classes))
    return {"dataset": d.dataset, "classes": len(ds.classes), "train_images": len(train), "val_images": len(val),
            "test_images": len(test), "image_shape": list(train.images.shape[1:])}
