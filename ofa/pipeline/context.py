"""The stage context: what every stage after download starts from, and what identifies its run.

``StageContext.open`` seeds, picks the device (a rank's own GPU in a job of several), checks the budgets and
the memory before any data is loaded, loads the prepared splits onto the device and builds a fresh supernet
and the stage's BN calibration batches. ``load`` puts an upstream checkpoint's weights in; ``key`` digests
the stage's params and every input file into the key its resume states and stored search are kept under,
checked to be the same on every rank. Paths are relative to the project root.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import torch

from .. import data as data_mod
from ..io import md5_file, write_json
from ..model import OFANet, macs
from ..train import DeviceData, distributed, select_device
from .checkpoint import build_arch, build_net, load_checkpoint
from .config import Params, ParamsError

PREPARED, RAW, MODELS, METRICS = Path("data/prepared"), Path("data/raw"), Path("models"), Path("metrics")
CLASSES = PREPARED / "classes.json"  # the class names, in label order: the data, not the code, decides them
RESUME = Path(".resume")  # per-epoch training state of interrupted stages (git- and dvc-ignored)

# stage -> the stage whose checkpoint it starts from; what each one samples, and how, is ofa.pipeline.recipe
TRAINING_STAGES: dict[str, str | None] = {
    "train_supernet": None,
    "shrink_kernel": "train_supernet",
    "shrink_depth": "shrink_kernel",
    "shrink_width": "shrink_depth",
}

_SHRINK = ("seed", "space", "net", "train", "evaluate.bn_calibration_images", "shrink.kd_ratio", "shrink.teacher",
           "shrink.teacher_bn", "shrink.reduce", "shrink.subnets_per_step", "shrink.sample")
# The params each keyed stage's outputs depend on, as dvc.yaml lists them (a test holds the two equal): its resume
# state is keyed by these, so a change of another stage's params keeps the progress of a stopped stage; the key
# also names a rank whose params or inputs differ from rank 0's.
STAGE_PARAMS: dict[str, tuple[str, ...]] = {
    "train_supernet": ("seed", "space", "net", "train", "evaluate.bn_calibration_images", "supernet"),
    "shrink_kernel": (*_SHRINK, "shrink.kernel"),
    "shrink_depth": (*_SHRINK, "shrink.depth"),
    "shrink_width": (*_SHRINK, "shrink.width"),
    "evaluate_space": ("seed", "space", "net", "train.batch_size", "train.eval_batch_size", "train.momentum",
                       "train.nesterov", "train.weight_decay", "train.warmup_epochs", "train.label_smoothing",
                       "train.crop_padding", "train.flip", "train.device", "train.processes", "evaluate"),
    # the schedule's length (baseline.epochs null) and train_supernet's recipe; not the shrink stages' lr
    "baseline": ("seed", "space", "net", "train", "supernet", "shrink.kernel.epochs", "shrink.kernel.images_per_epoch",
                 "shrink.depth.epochs", "shrink.depth.images_per_epoch", "shrink.depth.first_phase.epochs",
                 "shrink.width.epochs", "shrink.width.images_per_epoch", "shrink.width.first_phase.epochs",
                 "baseline"),
    "compare": ("seed", "space", "net", "train.eval_batch_size", "train.device", "train.processes",
                "evaluate.bn_calibration_images"),
}


def stage_index(stage: str) -> int:
    """A stage's place among the training stages; evaluate_space and specialize come after all of them (and so
    calibrate batch norm on the same images: a uniform config scores on test in specialize as in Table 2)."""
    stages = list(TRAINING_STAGES)
    return stages.index(stage) if stage in stages else len(stages)


@dataclass
class StageContext:
    """One stage run on this process: its params and project root, its rank in the job, the prepared data on its
    device, the supernet (fresh until ``load``), the BN calibration batches, and the files its result depends on."""

    stage: str
    params: Params
    root: Path
    world: distributed.World
    data: DeviceData
    net: OFANet
    calibration: list[torch.Tensor]
    inputs: list[Path]  # the prepared splits and class names, then each checkpoint the stage loaded
    start: float = field(default_factory=time.perf_counter)

    @classmethod
    def open(cls, params: Params, root: Path, stage: str) -> StageContext:
        """Seed, the prepared data on the training device, a fresh supernet, and the stage's BN calibration batches.

        Checks first, before loading the data, that specialize.budgets fit the space and that the data fits the
        device.
        """
        start = time.perf_counter()
        torch.manual_seed(params.seed)
        device = distributed.device(select_device(params.train.device))  # a rank's own GPU in a job of several
        classes = load_classes(root)
        train = data_mod.load_split(root / PREPARED / "train.pt", mmap=True)  # its shape, nothing read yet
        input_shape = tuple(train.images.shape[1:])
        net = build_net(params, input_shape, classes)
        check_budgets(params, net.arch, input_shape)
        check_memory(params, root, device, len(train), input_shape)
        data = DeviceData.load(root / PREPARED, device)
        net = net.to(device, memory_format=torch.channels_last)
        calibration = data.calibration_batches(params.evaluate.bn_calibration_images, params.train.eval_batch_size,
                                               seed=params.seed + stage_index(stage))
        return cls(stage, params, root, distributed.world(), data, net, calibration, prepared_files(root), start)

    @property
    def index(self) -> int:
        return stage_index(self.stage)

    def load(self, checkpoint: str) -> Path:
        """Put models/<checkpoint>.pt's weights into the supernet; the stage's result now depends on that file."""
        path = self.root / MODELS / f"{checkpoint}.pt"
        load_checkpoint(self.net, path)
        self.depend_on(path)
        return path

    def depend_on(self, path: Path) -> None:
        """The stage's result depends on `path` too (a teacher's checkpoint): it goes into the key."""
        if path not in self.inputs:
            self.inputs.append(path)

    def key(self, values: Mapping[str, Any] | None = None) -> str:
        """The key of this run (``resume_key``: the stage's params, or `values`, and its inputs), checked the same
        on every rank before any collective: a rank with other params or inputs is named."""
        key = resume_key(self.params if values is None else values, self.stage, self.inputs)
        upstream = [str(p.relative_to(self.root)) for p in self.inputs if p not in prepared_files(self.root)]
        distributed.check_same_inputs(key, self.world, ", ".join(["params.yaml", f"{PREPARED}/", *upstream]))
        return key

    def resume_path(self, name: str) -> Path:
        """A resume state's path: under .resume/, outside DVC's outputs."""
        return self.root / RESUME / name

    def timing(self, **figures: Any) -> dict[str, Any]:
        """The stage's timing: wall seconds since the context opened, `figures`, device and processes."""
        return {"wall_s": round(time.perf_counter() - self.start, 1), **figures, "device": self.data.device.type,
                "processes": self.world.size}

    def write_timing(self, timing: dict[str, Any]) -> None:
        """Write metrics/timing/<stage>.json (rank 0)."""
        write_json(self.root / METRICS / "timing" / f"{self.stage}.json", timing)


def load_classes(root: Path) -> list[str]:
    """The class names the download stage saved (data/prepared/classes.json)."""
    path = root / CLASSES
    try:
        classes = json.loads(path.read_text())
    except FileNotFoundError:
        raise data_mod.DataError(f"{path}: not found (run the download stage first: dvc repro)") from None
    except (OSError, ValueError) as e:
        raise data_mod.DataError(f"{path}: unreadable ({type(e).__name__}; rerun the download stage)") from None
    if (not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes)
            or len(set(classes)) != len(classes)):
        raise data_mod.DataError(f"{path}: not a list of at least 2 distinct class names (rerun the download stage)")
    return classes


def architecture(params: Params, root: Path) -> tuple[dict[str, Any], tuple[int, ...]]:
    """The supernet's architecture (``OFANet.arch``) for the prepared data, and the data's input shape (C, H, W),
    without reading the images."""
    train = data_mod.load_split(root / PREPARED / "train.pt", mmap=True)  # its shape, nothing read yet
    input_shape = tuple(train.images.shape[1:])
    return build_arch(params, input_shape, load_classes(root)), input_shape


def prepared_files(root: Path) -> list[Path]:
    """The prepared splits: train, val, test; then the class names."""
    return [*(root / PREPARED / f"{name}.pt" for name in ("train", "val", "test")), root / CLASSES]


def check_budgets(params: Params, arch: Mapping[str, Any], input_shape: tuple[int, ...]) -> None:
    """ParamsError naming the first of specialize.budgets below the smallest subnet's MACs.

    Every stage checks it as soon as it knows the input (download before it fetches or decodes any image, the
    others before they load the data), so a budget that cannot be met stops a fresh ``dvc repro`` at its first
    stage, not at its last.
    """
    smallest_config = params.space.build().min_config(len(arch["units"]))
    smallest = macs(arch, smallest_config, input_shape)
    for i, b in enumerate(params.specialize.macs_budgets()):
        if b < smallest:
            shape = "x".join(map(str, input_shape))
            raise ParamsError(f"specialize.budgets[{i}]: {b} MACs is below the smallest subnet ({smallest_config}: "
                              f"{smallest} MACs on {shape} input); at least {smallest}")


def check_memory(params: Params, root: Path, device: torch.device, train_images: int,
                 input_shape: tuple[int, ...]) -> None:
    """DataError when the prepared dataset (uint8) and the BN calibration images (float32), which a stage keeps
    on its device, do not fit there; on a CPU each process of the machine holds its own."""
    calibration = min(params.evaluate.bn_calibration_images, train_images)
    files = sum(p.stat().st_size for p in prepared_files(root) if p.is_file())
    nbytes = files + 4 * calibration * math.prod(input_shape)
    copies = distributed.local_processes() if device.type == "cpu" else 1  # the ranks of a machine share its RAM
    what = f"the prepared dataset with {calibration} BN calibration images"
    hint = "lower data.image_size, data.train_limit or evaluate.bn_calibration_images"
    if copies > 1:
        what, hint = f"{what}, once per process ({copies}),", f"{hint.replace(' or ', ', ')} or train.processes"
    data_mod.check_fits(copies * nbytes, device, what, hint=hint)
    if device.type != "cpu":  # each process reads the splits into host memory before it moves them over
        local = distributed.local_processes()
        per = f", once per process ({local})," if local > 1 else ""
        data_mod.check_fits(local * files, torch.device("cpu"),
                            f"reading the prepared dataset into host memory on its way to {device}{per}",
                            hint="lower data.image_size or data.train_limit")


def finished_records(path: Path, key: str, configs: list) -> list[dict]:
    """The per-config records an interrupted run of the same key saved to `path` ({"key", "records"}), when
    they are the first configs of `configs`, in order; [] otherwise (a missing or unreadable file too)."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):  # missing or unreadable: only a lost shortcut
        return []
    if not isinstance(saved, dict) or saved.get("key") != key or not isinstance(saved.get("records"), list):
        return []
    records = saved["records"]
    if len(records) > len(configs) or any(r.get("config") != str(c) for r, c in zip(records, configs)):
        return []
    return records


def stage_params(params: Params, stage: str) -> dict[str, Any]:
    """The values of the params `stage`'s outputs depend on (STAGE_PARAMS), by their dotted names."""
    values = {}
    for name in STAGE_PARAMS[stage]:
        node: Any = params
        for part in name.split("."):
            node = getattr(node, part)
        values[name] = asdict(node) if is_dataclass(node) else node
    return values


def resume_key(params: Params | Mapping[str, Any], stage: str, inputs: list[Path]) -> str:
    """Identifies a stage run: its params (those of STAGE_PARAMS[stage], or the given mapping of those that
    matter), the stage, the job's process count and the content of its input files.

    The process count is the job's own (torchrun's, which may differ from train.processes): a state saved by
    another number of processes holds other per-rank states and is not resumed.
    """
    values = dict(params) if isinstance(params, Mapping) else stage_params(params, stage)
    run = {"stage": stage, "params": values, "processes": distributed.world().size}
    h = hashlib.sha256(json.dumps(run, sort_keys=True).encode())
    for path in inputs:
        h.update(md5_file(path).encode())
    return h.hexdigest()
