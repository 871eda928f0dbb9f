"""The pipeline's stages as library functions; ``stages/*.py`` call these with the parsed params.

download -> train_supernet -> shrink_kernel -> shrink_depth -> shrink_width -> evaluate_space. Paths are
relative to a project root; every output is written atomically.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch

from . import cost
from . import data as data_mod
from . import distributed
from .config import Params, ParamsError, PhaseParams
from .flops import count_macs, count_params
from .io import atomic_write, load_tensors, replaced_dir, write_json
from .space import SubnetConfig
from .supernet import OFANet, architecture
from .train import DeviceData, Schedule, calibrate_bn, evaluate, fit, select_device

PREPARED, RAW, MODELS, METRICS = Path("data/prepared"), Path("data/raw"), Path("models"), Path("metrics")
CLASSES = PREPARED / "classes.json"  # the class names, in label order: the data, not the code, decides them
RESUME = Path(".resume")  # per-epoch training state of interrupted stages (git- and dvc-ignored)

# stage -> the stage whose checkpoint it starts from; what each one samples, and how, is ofa.recipe
TRAINING_STAGES: dict[str, str | None] = {
    "train_supernet": None,
    "shrink_kernel": "train_supernet",
    "shrink_depth": "shrink_kernel",
    "shrink_width": "shrink_depth",
}

_SHRINK = ("seed", "space", "net", "train", "evaluate.bn_calibration_images", "shrink.kd_ratio", "shrink.teacher",
           "shrink.teacher_bn", "shrink.reduce", "shrink.subnets_per_step")
# The params each resumable stage's outputs depend on, as dvc.yaml lists them (a test holds the two equal): its
# resume state is keyed by these, so a change of another stage's params keeps the progress of a stopped stage.
STAGE_PARAMS: dict[str, tuple[str, ...]] = {
    "train_supernet": ("seed", "space", "net", "train", "evaluate.bn_calibration_images", "supernet"),
    "shrink_kernel": (*_SHRINK, "shrink.kernel"),
    "shrink_depth": (*_SHRINK, "shrink.depth"),
    "shrink_width": (*_SHRINK, "shrink.width"),
    "evaluate_space": ("seed", "space", "net", "train.batch_size", "train.eval_batch_size", "train.momentum",
                       "train.nesterov", "train.weight_decay", "train.warmup_epochs", "train.label_smoothing",
                       "train.crop_padding", "train.flip", "train.device", "train.processes", "evaluate"),
}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or was built from other net/space params."""


def save_checkpoint(net: OFANet, path: Path) -> None:
    """Atomically save the supernet's weights with its architecture (CPU, contiguous tensors)."""
    state = {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}
    atomic_write(Path(path), lambda f: torch.save({"arch": net.arch, "state_dict": state}, f), binary=True)


def load_checkpoint(net: OFANet, path: Path) -> None:
    """Load weights saved by save_checkpoint (weights_only); refuse a checkpoint of another architecture."""
    ckpt = load_tensors(path, {"arch", "state_dict"}, CheckpointError, "checkpoint")
    ours, theirs = net.arch, ckpt["arch"]
    if not isinstance(theirs, dict) or not isinstance(ckpt["state_dict"], dict):
        raise CheckpointError(f"{path}: not a checkpoint of this pipeline (rerun the upstream stages: dvc repro)")
    for key in sorted(ours, key=lambda k: k != "classes"):  # the class names first: they say more than a count
        if theirs.get(key) == ours[key]:
            continue
        if key == "classes":
            raise CheckpointError(f"{path}: trained on {_names(theirs.get(key))}, the prepared data has "
                                  f"{_names(ours[key])} (data.dataset; rerun the upstream stages: dvc repro)")
        if key in ("in_channels", "num_classes"):
            raise CheckpointError(f"{path}: built for {key} = {theirs.get(key)!r}, the prepared data has "
                                  f"{ours[key]!r} (data.dataset; rerun the upstream stages: dvc repro)")
        where = {"space": "space", "units": "net.units"}.get(key, f"net.{key}")
        raise CheckpointError(f"{path}: built with {where} = {theirs.get(key)!r}, params give {ours[key]!r} "
                              "(rerun the upstream stages: dvc repro)")
    try:
        net.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:  # the architecture matches but the weights do not: a damaged or edited file
        first = str(e).split("\n\t")[1] if "\n\t" in str(e) else str(e)
        raise CheckpointError(f"{path}: its weights do not fit its architecture ({' '.join(first.split())[:200]}; "
                              "rerun the upstream stages: dvc repro)") from None


def _names(classes: list[str] | None, shown: int = 4) -> str:
    if classes is None:
        return "unnamed classes"
    more = f", ... ({len(classes)} in all)" if len(classes) > shown else ""
    return f"classes {', '.join(map(repr, classes[:shown]))}{more}"


def build_net(params: Params, input_shape: tuple[int, ...], classes: list[str]) -> OFANet:
    """The supernet of params.space / params.net for inputs of (C, H, W), one output per class."""
    return OFANet(params.space.build(), **_net_arguments(params, input_shape, classes), init=params.net.init)


def build_arch(params: Params, input_shape: tuple[int, ...], classes: list[str]) -> dict[str, Any]:
    """``build_net(...).arch`` without building the network (what pricing a config needs)."""
    return architecture(params.space.build(), **_net_arguments(params, input_shape, classes))


def _net_arguments(params: Params, input_shape: tuple[int, ...], classes: list[str]) -> dict[str, Any]:
    n = params.net
    return dict(in_channels=input_shape[0], num_classes=len(classes), units=n.unit_specs(),
                stem_channels=n.stem_channels, stem_stride=n.stem_stride, final_channels=n.final_channels,
                classes=classes, feature_mix_channels=n.feature_mix_channels, dropout=n.dropout)


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


def schedule(params: Params, phase: PhaseParams, images_per_epoch: int | None = None,
             warmup_epochs: float | None = None) -> Schedule:
    """The optimiser schedule of a phase: its epochs and lr, the rest from train (warm-up unless given)."""
    t = params.train
    warmup = t.warmup_epochs if warmup_epochs is None else warmup_epochs
    return Schedule(epochs=phase.epochs, lr=phase.lr, batch_size=t.batch_size, momentum=t.momentum,
                    nesterov=t.nesterov, weight_decay=t.weight_decay, warmup_epochs=warmup,
                    label_smoothing=t.label_smoothing, crop_padding=t.crop_padding, flip=t.flip,
                    images_per_epoch=images_per_epoch)


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


def subnet_accuracy(net: OFANet, cfg: SubnetConfig, data: DeviceData, calibration: list[torch.Tensor],
                    batch_size: int, split: str = "test") -> float:
    """Accuracy of subnet cfg on a split (test by default): extract, re-calibrate BN, evaluate."""
    sub = net.extract(cfg)
    calibrate_bn(sub, calibration)
    return evaluate(sub, data, batch_size=batch_size, split=split)


def check_budgets(params: Params, arch: Mapping[str, Any], input_shape: tuple[int, ...]) -> None:
    """ParamsError naming the first of specialize.budgets below the smallest subnet's MACs.

    Every stage checks it as soon as it knows the input (download before it fetches or decodes any image, the
    others before they load the data), so a budget that cannot be met stops a fresh ``dvc repro`` at its first
    stage, not at its last.
    """
    smallest_config = params.space.build().min_config(len(arch["units"]))
    smallest = cost.macs(arch, smallest_config, input_shape)
    for i, b in enumerate(params.specialize.macs_budgets()):
        if b < smallest:
            shape = "x".join(map(str, input_shape))
            raise ParamsError(f"specialize.budgets[{i}]: {b} MACs is below the smallest subnet ({smallest_config}: "
                              f"{smallest} MACs on {shape} input); at least {smallest}")


def stage_setup(params: Params, root: Path, stage_index: int) -> tuple[DeviceData, OFANet, list[torch.Tensor]]:
    """Seed, the prepared data on the training device, a fresh supernet, and the stage's BN calibration batches.

    Checks first, before loading the data, that specialize.budgets fit the space and that the data fits the
    device.
    """
    torch.manual_seed(params.seed)
    device = distributed.device(select_device(params.train.device))  # a rank's own GPU in a job of several
    classes = load_classes(root)
    train = data_mod.load_split(root / PREPARED / "train.pt", mmap=True)  # its shape, nothing read yet
    input_shape = tuple(train.images.shape[1:])
    net = build_net(params, input_shape, classes)
    check_budgets(params, net.arch, input_shape)
    _check_memory(params, root, device, len(train), input_shape)
    data = DeviceData.load(root / PREPARED, device)
    net = net.to(device, memory_format=torch.channels_last)
    calibration = data.calibration_batches(params.evaluate.bn_calibration_images, params.train.eval_batch_size,
                                           seed=params.seed + stage_index)
    return data, net, calibration


def _check_memory(params: Params, root: Path, device: torch.device, train_images: int,
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


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def prepared_files(root: Path) -> list[Path]:
    """The prepared splits: train, val, test; then the class names."""
    return [*(root / PREPARED / f"{name}.pt" for name in ("train", "val", "test")), root / CLASSES]


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
        h.update(_md5(path).encode())
    return h.hexdigest()


def same_inputs_on_every_rank(key: str, w: distributed.World, root: Path, inputs: list[Path]) -> None:
    """ValueError naming a rank whose `key` (a stage's params and `inputs`, digested) is not rank 0's."""
    upstream = [str(p.relative_to(root)) for p in inputs if p not in prepared_files(root)]
    distributed.check_same_inputs(key, w, ", ".join(["params.yaml", f"{PREPARED}/", *upstream]))


def train_stage(params: Params, stage: str, root: Path = Path("."), progress: bool = True) -> dict[str, Any]:
    """Run one training stage: load the previous stage's supernet, train its phases, save checkpoint, curves, metrics.

    What each stage trains, in which phases and against which teacher is ``ofa.recipe``. After every epoch
    the training state goes to .resume/<stage>[.phase1].pt (outside DVC's outputs); rerunning an
    interrupted stage with the same params and inputs continues from there. Removed once outputs are written.
    With several processes every rank trains (``ofa.distributed``) and rank 0 alone writes.
    """
    from . import recipe

    start = time.perf_counter()
    w = distributed.world()
    stage_index = list(TRAINING_STAGES).index(stage)
    data, net, calibration = stage_setup(params, root, stage_index)
    inputs = _start_from_previous(params, stage, root, net)
    key = resume_key(params, stage, inputs)
    same_inputs_on_every_rank(key, w, root, inputs)  # before any collective: a rank with other inputs is named
    teacher = None if TRAINING_STAGES[stage] is None else recipe.teacher(
        params, net, root / MODELS / "train_supernet.pt", calibration, data.input_shape)
    parameters = _trained_parameters(params, stage, net)
    curves = _Curves(root, stage, w.main)
    history, states = _train_phases(params, stage, stage_index, root, net, data, calibration, teacher, parameters,
                                    key, curves, progress)
    metrics = _stage_metrics(net, data, calibration, params.train.eval_batch_size, history,
                             shrink=TRAINING_STAGES[stage] is not None)
    timing = _stage_timing(start, history, data.device, w)
    if w.main:
        _write_stage_outputs(root, stage, net, metrics, timing, curves, states)
    return {**metrics, **timing}


def _trained_parameters(params: Params, stage: str, net: OFANet) -> list[torch.nn.Parameter] | None:
    """The parameters a training stage updates: the kernel transforms alone when shrink.kernel.transforms_only
    says so, else None (all)."""
    if stage == "shrink_kernel" and params.shrink.kernel.transforms_only:
        return [p for name, p in net.named_parameters() if ".transforms." in name]
    return None


def _train_phases(params: Params, stage: str, stage_index: int, root: Path, net: OFANet, data: DeviceData,
                  calibration: list[torch.Tensor], teacher: torch.nn.Module | None,
                  parameters: list[torch.nn.Parameter] | None, key: str, curves: _Curves,
                  progress: bool) -> tuple[list, list[Path]]:
    """Train a stage's phases in order (``ofa.recipe``); the epochs' stats of all of them, and their resume states."""
    from . import recipe

    eval_bs = params.train.eval_batch_size
    history, states = [], []
    for phase in recipe.phases(params, stage, net.space):
        if stage == "shrink_width":
            net.sort_channels(phase.protect)  # before each phase: narrower widths take the most important channels
        states.append(root / RESUME / f"{stage}{phase.suffix}.pt")
        plan = schedule(params, phase.schedule, warmup_epochs=phase.warmup_epochs)
        history += fit(
            net, data, plan, sample=phase.sampler(net, stage), parameters=parameters,
            teacher=teacher, kd_ratio=params.shrink.kd_ratio if teacher is not None else 0.0,
            reduce=params.shrink.reduce, seed=params.seed * 1000 + stage_index + (50 if phase.suffix else 0),
            desc=stage + phase.suffix, log=curves.log, resume=states[-1], resume_key=key + phase.suffix,
            progress=progress, sync_bn=params.train.sync_bn,
            epoch_metrics=lambda: {
                "val/accuracy_max": subnet_accuracy(net, net.max_config(), data, calibration, eval_bs, "val")},
        )
    return history, states


def _stage_timing(start: float, history: list, device: torch.device, w: distributed.World) -> dict[str, Any]:
    """A training stage's timing: wall and training seconds since `start`, images per second, device, processes."""
    train_s = sum(h.seconds for h in history)
    return {
        "wall_s": round(time.perf_counter() - start, 1),
        "train_s": round(train_s, 1),
        "images_per_s": round(sum(h.images for h in history) / train_s, 1) if train_s else None,
        "device": device.type,
        "processes": w.size,
    }


def _write_stage_outputs(root: Path, stage: str, net: OFANet, metrics: dict[str, Any], timing: dict[str, Any],
                         curves: _Curves, states: list[Path]) -> None:
    """Rank 0's outputs of a training stage: checkpoint, metrics, timing and curves; then its resume states go."""
    save_checkpoint(net, root / MODELS / f"{stage}.pt")
    write_json(root / METRICS / f"{stage}.json", metrics)
    write_json(root / METRICS / "timing" / f"{stage}.json", timing)
    curves.publish()
    for state in states:
        state.unlink(missing_ok=True)


def _start_from_previous(params: Params, stage: str, root: Path, net: OFANet) -> list[Path]:
    """Load the previous stage's weights into `net`; returns the files the stage's result depends on (the data,
    the previous stage's weights, the teacher's)."""
    inputs = prepared_files(root)
    previous = TRAINING_STAGES[stage]
    if previous is None:
        return inputs
    inputs.append(root / MODELS / f"{previous}.pt")
    load_checkpoint(net, inputs[-1])
    full = root / MODELS / "train_supernet.pt"
    if params.shrink.kd_ratio > 0 and params.shrink.teacher == "full" and full not in inputs:
        inputs.append(full)
    return inputs


class _Curves:
    """A stage's per-epoch curves (DVCLive, rank 0 only): written beside the resume state while the stage runs,
    moved to metrics/live/<stage> when it succeeds, so a failed stage leaves none in its outputs."""

    def __init__(self, root: Path, stage: str, main: bool) -> None:
        self.dir, self.final = root / RESUME / "live" / stage, root / METRICS / "live" / stage
        self.live = None
        if main:
            from dvclive import Live

            shutil.rmtree(self.dir, ignore_errors=True)
            self.live = Live(dir=str(self.dir), save_dvc_exp=False, dvcyaml=None)

    def log(self, entry: dict[str, float]) -> None:  # rank 0 only (fit logs nowhere else)
        for name, value in entry.items():
            self.live.log_metric(name, value)
        self.live.next_step()

    def publish(self) -> None:
        self.live.end()
        shutil.rmtree(self.final, ignore_errors=True)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.dir.mkdir(parents=True, exist_ok=True)  # DVCLive writes nothing when there are no epochs
        self.dir.rename(self.final)


def _stage_metrics(net: OFANet, data: DeviceData, calibration: list[torch.Tensor], eval_bs: int, history: list,
                   shrink: bool) -> dict[str, Any]:
    """Epochs, the max config's test and val accuracy (and the min config's for a shrink stage), final loss."""
    val = history[-1].logged["val/accuracy_max"] if history else None  # the final weights' accuracy
    metrics: dict[str, Any] = {
        "epochs": len(history),
        "accuracy_max": subnet_accuracy(net, net.max_config(), data, calibration, eval_bs),
        "val_accuracy_max": val if val is not None else subnet_accuracy(
            net, net.max_config(), data, calibration, eval_bs, "val"),
    }
    if shrink:
        metrics["accuracy_min"] = subnet_accuracy(net, net.min_config(), data, calibration, eval_bs)
    metrics["train_loss"] = round(history[-1].loss, 6) if history else None
    return metrics


def evaluate_space(params: Params, root: Path = Path("."),
                   progress: bool = True) -> tuple[list[dict], dict] | None:
    """Every uniform config plus sampled ones: MACs, params, accuracy after BN calibration, after fine-tuning.

    Resumable per config: each finished config's record goes to .resume/evaluate_space.json and the
    fine-tuning in progress saves its state per epoch to .resume/evaluate_space.pt, both keyed like the
    training stages; a rerun with the same params and inputs continues there and writes the same files an
    uninterrupted run would. Returns the records and the summary on rank 0, None on the other ranks.

    With several processes the configs are dealt out round-robin, each rank evaluating and fine-tuning its
    own alone (same seeds, so the same records as one process with the same threads on the same device);
    rank 0 gathers the records in order and writes them, and each rank keeps the fine-tuning state of its own
    config (.resume/evaluate_space.pt, .resume/evaluate_space.rank<r>.pt).
    """
    start = time.perf_counter()
    w = distributed.world()
    data, net, calibration, configs, key = _space_setup(params, root, w)
    done_path = root / RESUME / "evaluate_space.json"
    state = root / RESUME / ("evaluate_space.pt" if w.main else f"evaluate_space.rank{w.rank}.pt")
    done = _resumed_records(done_path, key, configs, w)
    records = _evaluate_remaining(params, net, configs, data, calibration, done, done_path, state, key, progress, w)
    state.unlink(missing_ok=True)
    if not w.main:
        return None
    summary = _write_space(root, records, net, params, start, data.device, w)
    done_path.unlink(missing_ok=True)
    return records, summary


def _space_setup(params: Params, root: Path,
                 w: distributed.World) -> tuple[DeviceData, OFANet, list[torch.Tensor], list[SubnetConfig], str]:
    """evaluate_space's data, trained supernet, calibration batches, configs and resume key (checked the same on
    every rank)."""
    data, net, calibration = stage_setup(params, root, len(TRAINING_STAGES))
    checkpoint = root / MODELS / "shrink_width.pt"
    load_checkpoint(net, checkpoint)
    configs = _space_configs(net, params)
    inputs = [*prepared_files(root), checkpoint]
    key = resume_key(params, "evaluate_space", inputs)
    same_inputs_on_every_rank(key, w, root, inputs)
    return data, net, calibration, configs, key


def _resumed_records(done_path: Path, key: str, configs: list[SubnetConfig], w: distributed.World) -> list[dict]:
    """The records an interrupted run finished (rank 0's, on every rank); rank 0 says so when there are some."""
    records = distributed.broadcast(_finished_records(done_path, key, configs) if w.main else None, w)
    if records and w.main:
        print(f"evaluate_space: resuming after config {len(records)}/{len(configs)} from {done_path}",
              file=sys.stderr)
    return records


def _evaluate_remaining(params: Params, net: OFANet, configs: list[SubnetConfig], data: DeviceData,
                        calibration: list[torch.Tensor], done: list[dict], done_path: Path, state: Path, key: str,
                        progress: bool, w: distributed.World) -> list[dict]:
    """The records of every config: `done` (the first configs') and the rest, evaluated one per rank at a time;
    rank 0 saves those finished to `done_path` after each round."""

    def evaluate_one(i: int) -> dict:  # alone on this rank: no collective inside
        return _evaluate_config(params, net, configs[i], data, calibration, i, state, f"{key}:{i}",
                                progress and w.main)

    records = list(done)
    for first in range(len(records), len(configs), w.size):  # one config per rank at a time
        new = distributed.map_ordered(evaluate_one, range(first, min(first + w.size, len(configs))), w)
        records += new
        if w.main:
            write_json(done_path, {"key": key, "records": records})
        for i, r in enumerate(new, first):
            if progress and w.main:
                print(f"[{i + 1}/{len(configs)}] {r['config']}: {r['macs'] / 1e6:.2f}M MACs, accuracy "
                      f"{r['accuracy']:.4f}, fine-tuned {r['accuracy_finetuned']:.4f}", flush=True)
    return records


def _write_space(root: Path, records: list[dict], net: OFANet, params: Params, start: float, device: torch.device,
                 w: distributed.World) -> dict[str, Any]:
    """Writes metrics/space.json, evaluate_space.json (the summary, returned) and timing/evaluate_space.json."""
    summary = _summary(records, net, params.evaluate.finetune.epochs)
    write_json(root / METRICS / "space.json", records)
    write_json(root / METRICS / "evaluate_space.json", summary)
    write_json(root / METRICS / "timing" / "evaluate_space.json", {
        "wall_s": round(time.perf_counter() - start, 1), "device": device.type, "processes": w.size})
    return summary


def _space_configs(net: OFANet, params: Params) -> list[SubnetConfig]:
    """The configs evaluate_space reports: the uniform grid, then evaluate.sampled_configs random ones (no repeats)."""
    rng = random.Random(params.seed)
    configs = net.uniform_configs()
    for _ in range(params.evaluate.sampled_configs):
        configs.append(net.sample_config(rng))
    return list(dict.fromkeys(configs))


def _finished_records(path: Path, key: str, configs: list[SubnetConfig]) -> list[dict]:
    """The records an interrupted run of the same key finished, in order; [] when there are none."""
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


def _evaluate_config(params: Params, net: OFANet, cfg: SubnetConfig, data: DeviceData,
                     calibration: list[torch.Tensor], index: int, state: Path, key: str, progress: bool) -> dict:
    """One config's record: MACs, params, accuracy after BN calibration and after fine-tuning (resumable per epoch).

    Runs on one process alone, also in a job of several.
    """
    eval_bs, alone = params.train.eval_batch_size, distributed.SINGLE
    sub = net.extract(cfg)
    calibrate_bn(sub, calibration, world=alone)
    accuracy = evaluate(sub, data, batch_size=eval_bs, world=alone)
    macs, n_params = count_macs(sub, (1, *data.input_shape)), count_params(sub)
    ft = params.evaluate.finetune
    fit(sub, data, schedule(params, ft, ft.images_per_epoch), seed=params.seed * 1000 + 100 + index,
        desc=f"finetune {cfg}", resume=state, resume_key=key, progress=progress, world=alone)
    uniform = cfg.uniform_values()
    return {
        "config": str(cfg),
        "kernel": uniform[0] if uniform else None,
        "depth": uniform[1] if uniform else None,
        "width": uniform[2] if uniform else None,
        "macs": macs,
        "params": n_params,
        "accuracy": accuracy,
        "accuracy_finetuned": evaluate(sub, data, batch_size=eval_bs, world=alone),
        "subnet": cfg.to_dict(),
    }


def _summary(records: list[dict], net: OFANet, finetune_epochs: int) -> dict[str, Any]:
    by_name = {r["config"]: r for r in records}
    largest, smallest = by_name[str(net.max_config())], by_name[str(net.min_config())]
    acc = [r["accuracy"] for r in records]
    acc_ft = [r["accuracy_finetuned"] for r in records]
    return {
        "configs": len(records),
        "accuracy_largest": largest["accuracy"],
        "accuracy_smallest": smallest["accuracy"],
        "accuracy_mean": round(sum(acc) / len(acc), 6),
        "accuracy_min": min(acc),
        "accuracy_finetuned_mean": round(sum(acc_ft) / len(acc_ft), 6),
        "macs_largest": largest["macs"],
        "macs_smallest": smallest["macs"],
        "finetune_epochs": finetune_epochs,
    }


def table(records: list[dict], finetune_epochs: int):
    """The source's Table 2: config, MACs, accuracy, accuracy after fine-tuning (a pandas DataFrame)."""
    import pandas as pd

    def name(r: dict) -> str:
        return f"({r['kernel']}, {r['depth']}, {r['width']:g})" if r["kernel"] is not None else r["config"]

    return pd.DataFrame({
        "Config: (k, d, w)": [name(r) for r in records],
        "MACs": [f"{r['macs'] / 1e6:.2f}M" for r in records],
        "Accuracy": [f"{r['accuracy']:.4f}" for r in records],
        f"Accuracy #{finetune_epochs}": [f"{r['accuracy_finetuned']:.4f}" for r in records],
    })


def main(stage: Callable[[Params], Any], parallel: bool = True) -> None:
    """Run a stage script: load params.yaml, run, print the result; a failure the user can act on is one line.

    Exit status 2 for a mistake in params or data (a bad value, a checkpoint of other params, a divergence),
    1 for a failed write or exhausted memory, 130 for Ctrl-C; any other exception is a bug and shows its
    traceback. With train.processes > 1 the script starts that many copies of itself
    (``distributed.launch``) and waits for them; a copy started so, or by torchrun, joins its job
    (``distributed.process_group``). A stage with nothing to divide among processes (download) passes
    ``parallel=False``: it runs as this one process whatever train.processes says.
    """
    from .config import load_params

    try:
        params = load_params("params.yaml")
    except ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        _exit(2)
    if parallel and params.train.processes > 1 and not distributed.launched():
        _exit(distributed.launch(params.train.processes, sys.argv[0], sys.argv[1:]))
    group = distributed.process_group(params.train.device) if parallel else nullcontext(distributed.SINGLE)
    try:
        with group as w:
            result = stage(params)
    except KeyboardInterrupt:  # Ctrl-C: what a training stage finished is in its resume state
        if not distributed.launched():  # a worker's launcher reports it, once for all of them
            print(f"\nerror: {distributed.interrupted()}", file=sys.stderr)
        _exit(128 + signal.SIGINT)
    except Exception as e:
        failure = _failure(e)
        if failure is None and distributed.world().active:  # a bug on a rank: its traceback, then leave at once
            traceback.print_exc()
            _exit(1)
        if failure is None:
            raise
        distributed.report_error(failure[0])
        _exit(failure[1])
    if result is not None and w.main:
        print(json.dumps(result, indent=2))
    _exit(0)


def _failure(e: Exception) -> tuple[str, int] | None:
    """The one line and exit status of an exception a stage ended with; None for a bug."""
    from .export import ExportError
    from .train import DivergenceError

    if isinstance(e, (ParamsError, data_mod.DataError, CheckpointError, DivergenceError, ExportError, ValueError)):
        return str(e), 2
    if isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e)):
        return (f"out of memory ({_allocation_failure(e)}); lower train.batch_size or train.eval_batch_size, or "
                "the network (net.units, net.final_channels, space.width)"), 1
    if isinstance(e, OSError):  # a write that failed: a full disk, a read-only folder, a file where a folder goes
        return f"{type(e).__name__}: {' '.join(str(e).split())}", 1
    return None


def _allocation_failure(e: RuntimeError) -> str:
    """The first two sentences of an allocator's message, on one line (CUDA's goes on with tuning advice)."""
    text = re.sub(r"^\[enforce fail at [^\]]*\] \S+ == 0\. ", "", " ".join(str(e).split()))
    return ". ".join(text.split(". ")[:2]).rstrip(".")


def _exit(code: int) -> NoReturn:
    """Exit a stage script. Its outputs are written and closed by now; freezing the objects first keeps the
    garbage collections of the interpreter's shutdown off the ~300,000 objects that torch and torch._dynamo
    (which the optimizer imports) create: about 0.8 s of every stage process on a 2-core CPU
    (benchmarks/stage_exit.py).

    A rank that failed inside its job leaves at once, without the interpreter's shutdown: its process group
    is still up (its peers may be inside a collective, which tearing it down would wait for), and gloo's
    threads destroyed by that shutdown end the process now and then with SIGABRT ("terminate called without
    an active exception") after its error was reported, which would turn exit status 2 into a crash.
    """
    if distributed.world().active:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    gc.freeze()
    sys.exit(code)
