"""Stage baseline: the configs of baseline.configs trained alone from the seed's init, each the from-scratch twin
of a supernet subnet (stage compare sets the two side by side).

Each config is extracted from a freshly built supernet, the one train_supernet starts from, and trained alone
with train_supernet's recipe: its lr (or baseline.lr), train's batch size, warm-up, cosine decay, label
smoothing and augmentation. It trains for baseline.epochs epochs, each the schedule's average epoch (the
progressive-shrinking schedule's training images over its epochs); by default for as many epochs as the whole
schedule (train_supernet and the three shrink stages, first phases included), so on as many images as the
supernet saw. With baseline.kd it distils from train_supernet's full network as official OFA distils (ratio 1,
the teacher's batch norm on batch statistics); that network is then an input, recorded by its md5.

Resumable per config and per epoch: each finished config's model and record wait in .resume/baseline/ and
.resume/baseline.json, the config in training saves its state after every epoch to .resume/baseline.pt, all
under the stage's key; a rerun with the same params and inputs continues there and writes the bytes an
uninterrupted run would. With several processes each config trains data-parallel on all of them.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from ..deploy import save_subnet
from ..io import md5_file, replaced_dir, write_json
from ..model import ConfigSpace, SubnetConfig, count_params, macs
from ..train import distributed, evaluate, fit
from . import recipe
from .checkpoint import build_net, load_checkpoint
from .config import Params, ParamsError, PhaseParams
from .context import METRICS, MODELS, TRAINING_STAGES, StageContext, finished_records

RECORDS = METRICS / "baseline_alone.json"  # what the stage measured; compare's metrics/baseline.json adds the rest
OUT = MODELS / "baseline"  # one saved subnet per config (load_subnet)
TEACHER = MODELS / "train_supernet.pt"
KD_RATIO = 1.0  # official OFA's


def schedule_length(params: Params, space: ConfigSpace, train_images: int) -> tuple[int, int]:
    """The epochs and training images of the whole progressive-shrinking schedule (every stage's phases)."""
    epochs = images = 0
    for stage in TRAINING_STAGES:
        for phase in recipe.phases(params, stage, space):
            p = phase.schedule
            epochs += p.epochs
            images += p.epochs * min(p.images_per_epoch or train_images, train_images)
    return epochs, images


def baseline_phase(params: Params, space: ConfigSpace, train_images: int) -> PhaseParams:
    """A config's training alone: baseline.epochs (or the schedule's) epochs of the schedule's average epoch, at
    baseline.lr (or supernet.lr)."""
    epochs, images = schedule_length(params, space, train_images)
    per_epoch = round(images / epochs) if epochs else train_images
    b = params.baseline
    return PhaseParams(b.epochs if b.epochs is not None else epochs, b.lr or params.supernet.lr,
                       per_epoch if per_epoch < train_images else None)


def config_seed(seed: int, cfg: SubnetConfig) -> int:
    """The seed of a config's training (shuffling, augmentation, dropout): the params' seed and the config alone,
    so a config trains to the same weights whichever others baseline.configs lists."""
    return int.from_bytes(hashlib.sha256(f"baseline:{seed}:{cfg}".encode()).digest()[:6], "big")


def file_name(cfg: SubnetConfig) -> str:
    """A config's model file in models/baseline/: its string, `|` written `_`."""
    return f"{str(cfg).replace('|', '_')}.pt"


def baseline(params: Params, root: Path = Path("."), progress: bool = True) -> dict[str, Any] | None:
    """Train every config of baseline.configs alone; write models/baseline/ and metrics/baseline_alone.json.

    Returns what metrics/baseline_alone.json holds on rank 0, None on the other ranks.
    """
    ctx = StageContext.open(params, root, "baseline")  # ctx.net: the seed's fresh init, never trained here
    configs = params.baseline.resolve(ctx.net.space, ctx.net.num_units)
    teacher = _teacher(ctx) if params.baseline.kd else None
    key = ctx.key()  # before any collective: a rank with other inputs is named
    w = ctx.world
    phase = baseline_phase(params, ctx.net.space, len(ctx.data.train))
    done_path, staged = ctx.resume_path("baseline.json"), ctx.resume_path("baseline")
    records = distributed.broadcast(_finished(done_path, staged, key, configs) if w.main else None, w)
    if records and w.main:
        print(f"baseline: resuming after config {len(records)}/{len(configs)} from {done_path}", file=sys.stderr)
    elif w.main:
        shutil.rmtree(staged, ignore_errors=True)
    for i in range(len(records), len(configs)):
        record, sub = _train_alone(ctx, configs, i, phase, teacher, key, progress)
        if w.main:
            staged.mkdir(parents=True, exist_ok=True)
            save_subnet(sub, staged / file_name(configs[i]))
            records.append(record)
            write_json(done_path, {"key": key, "records": records})
            named = f" ({record['name']})" if record["name"] != record["config"] else ""
            print(f"[{i + 1}/{len(configs)}] {record['config']}{named}: {record['macs'] / 1e6:.2f}M MACs, "
                  f"trained alone {record['epochs']} epochs in {record['train_s']:.0f} s: test "
                  f"{record['accuracy']:.4f}", flush=True)
    ctx.resume_path("baseline.pt").unlink(missing_ok=True)
    if not w.main:
        return None
    result = _result(ctx, phase, records)
    with replaced_dir(root / OUT) as out:
        for cfg in configs:  # each file complete: moved, not written, into the folder that replaces models/baseline
            (staged / file_name(cfg)).rename(out / file_name(cfg))
    write_json(root / RECORDS, result)
    ctx.write_timing(ctx.timing(configs=len(records), train_s=round(sum(r["train_s"] for r in records), 1)))
    done_path.unlink(missing_ok=True)
    shutil.rmtree(staged, ignore_errors=True)
    return result


def _teacher(ctx: StageContext) -> torch.nn.Module:
    """train_supernet's full network, frozen, to distil from; the stage's result now depends on its file."""
    path = ctx.root / TEACHER
    if not path.is_file():
        raise ParamsError(f"baseline.kd: true distils from {TEACHER}, which is not there (run dvc repro "
                          "train_supernet first, or baseline.kd: false)")
    source = build_net(ctx.params, ctx.data.input_shape, ctx.net.arch["classes"])
    load_checkpoint(source, path)
    ctx.depend_on(path)
    return recipe.frozen_max(source, ctx.data.device)


def _train_alone(ctx: StageContext, configs: list[SubnetConfig], i: int, phase: PhaseParams,
                 teacher: torch.nn.Module | None, key: str, progress: bool) -> tuple[dict[str, Any], torch.nn.Module]:
    """Config i extracted from the fresh supernet and trained alone (resumable per epoch); its record and model."""
    params, cfg, eval_bs = ctx.params, configs[i], ctx.params.train.eval_batch_size
    sub = ctx.net.extract(cfg)  # a copy of the fresh init's weights: ctx.net stays untouched
    history = fit(sub, ctx.data, recipe.schedule(params, phase), teacher=teacher,
                  kd_ratio=KD_RATIO if teacher is not None else 0.0, seed=config_seed(params.seed, cfg),
                  desc=f"baseline {cfg}", resume=ctx.resume_path("baseline.pt"), resume_key=f"{key}:{cfg}",
                  progress=progress and ctx.world.main, sync_bn=params.train.sync_bn)
    train_s = sum(h.seconds for h in history)
    record = {
        "config": str(cfg),
        "name": params.baseline.configs[i],
        "macs": macs(ctx.net.arch, cfg, ctx.data.input_shape),
        "params": count_params(sub),
        "accuracy": evaluate(sub, ctx.data, batch_size=eval_bs),
        "val_accuracy": evaluate(sub, ctx.data, batch_size=eval_bs, split="val"),
        "epochs": len(history),
        "images": sum(h.images for h in history),
        "train_s": round(train_s, 1),
        "images_per_s": round(sum(h.images for h in history) / train_s, 1) if train_s else None,
        "subnet": cfg.to_dict(),
    }
    return record, sub


def _finished(done_path: Path, staged: Path, key: str, configs: list[SubnetConfig]) -> list[dict]:
    """The records an interrupted run of the same key finished, in order, when their models wait in `staged`."""
    records = finished_records(done_path, key, configs)
    return records if all((staged / file_name(c)).is_file() for c in configs[:len(records)]) else []


def _result(ctx: StageContext, phase: PhaseParams, records: list[dict]) -> dict[str, Any]:
    """metrics/baseline_alone.json: how the configs trained, the schedule they are measured against, each record."""
    params = ctx.params
    epochs, images = schedule_length(params, ctx.net.space, len(ctx.data.train))
    teacher = ctx.root / TEACHER
    return {
        "epochs": phase.epochs,
        "images_per_epoch": phase.images_per_epoch or len(ctx.data.train),
        "lr": phase.lr,
        "kd": params.baseline.kd,
        "teacher_md5": md5_file(teacher) if params.baseline.kd else None,
        "schedule": {"epochs": epochs, "images": images},  # progressive shrinking's, all four stages
        "device": ctx.data.device.type,
        "processes": ctx.world.size,
        "records": records,
    }

