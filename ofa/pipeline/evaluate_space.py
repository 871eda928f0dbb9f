"""Stage evaluate_space: every uniform config plus sampled ones: MACs, params, accuracy after BN calibration and
after fine-tuning, printed in the shape of the source's Table 2."""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import torch

from ..io import write_json
from ..model import OFANet, SubnetConfig, count_macs, count_params
from ..train import DeviceData, calibrate_bn, distributed, evaluate, fit
from . import figures
from .config import Params
from .context import METRICS, StageContext, finished_records
from .recipe import schedule


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
    ctx = StageContext.open(params, root, "evaluate_space")
    ctx.load("shrink_width")
    configs = _space_configs(ctx.net, params)
    key = ctx.key()
    w = ctx.world
    done_path = ctx.resume_path("evaluate_space.json")
    state = ctx.resume_path("evaluate_space.pt" if w.main else f"evaluate_space.rank{w.rank}.pt")
    done = _resumed_records(done_path, key, configs, w)
    records = _evaluate_remaining(ctx, configs, done, done_path, state, key, progress)
    state.unlink(missing_ok=True)
    if not w.main:
        return None
    summary = _summary(records, ctx.net)
    write_json(root / METRICS / "space.json", records)
    figures.space_scatter(records, params.evaluate.finetune.epochs, root / METRICS / "space.png")
    write_json(root / METRICS / "evaluate_space.json", summary)
    ctx.write_timing(ctx.timing())
    done_path.unlink(missing_ok=True)
    return records, summary


def _resumed_records(done_path: Path, key: str, configs: list[SubnetConfig], w: distributed.World) -> list[dict]:
    """The records an interrupted run finished (rank 0's, on every rank); rank 0 says so when there are some."""
    records = distributed.broadcast(finished_records(done_path, key, configs) if w.main else None, w)
    if records and w.main:
        print(f"evaluate_space: resuming after config {len(records)}/{len(configs)} from {done_path}",
              file=sys.stderr)
    return records


def _evaluate_remaining(ctx: StageContext, configs: list[SubnetConfig], done: list[dict], done_path: Path,
                        state: Path, key: str, progress: bool) -> list[dict]:
    """The records of every config: `done` (the first configs') and the rest, evaluated one per rank at a time;
    rank 0 saves those finished to `done_path` after each round."""
    w = ctx.world

    def evaluate_one(i: int) -> dict:  # alone on this rank: no collective inside
        return _evaluate_config(ctx.params, ctx.net, configs[i], ctx.data, ctx.calibration, i, state, f"{key}:{i}",
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


def _space_configs(net: OFANet, params: Params) -> list[SubnetConfig]:
    """The configs evaluate_space reports: the uniform grid, then evaluate.sampled_configs random ones (no repeats)."""
    rng = random.Random(params.seed)
    configs = net.uniform_configs()
    for _ in range(params.evaluate.sampled_configs):
        configs.append(net.sample_config(rng))
    return list(dict.fromkeys(configs))


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
    fit(sub, data, schedule(params, ft), seed=params.seed * 1000 + 100 + index,
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


def _summary(records: list[dict], net: OFANet) -> dict[str, Any]:
    """The headline figures (the metrics DVC shows): the max and the min config's test accuracy after BN
    calibration, and the mean after fine-tuning over every config evaluated. space.json holds the rest."""
    by_name = {r["config"]: r for r in records}
    largest, smallest = by_name[str(net.max_config())], by_name[str(net.min_config())]
    return {
        "accuracy_max": largest["accuracy"],
        "accuracy_min": smallest["accuracy"],
        "finetuned_mean": round(sum(r["accuracy_finetuned"] for r in records) / len(records), 6),
    }


def table(records: list[dict], finetune_epochs: int | None = None):
    """The source's Table 2: config, MACs, accuracy, accuracy after fine-tuning (a pandas DataFrame); the last
    column's heading is "Accuracy #<finetune_epochs>" as in the source, or "Fine-tuned" when not given."""
    import pandas as pd

    def name(r: dict) -> str:
        return f"({r['kernel']}, {r['depth']}, {r['width']:g})" if r["kernel"] is not None else r["config"]

    return pd.DataFrame({
        "Config: (k, d, w)": [name(r) for r in records],
        "MACs": [f"{r['macs'] / 1e6:.2f}M" for r in records],
        "Accuracy": [f"{r['accuracy']:.4f}" for r in records],
        f"Accuracy #{finetune_epochs}" if finetune_epochs is not None else "Fine-tuned":
            [f"{r['accuracy_finetuned']:.4f}" for r in records],
    })
