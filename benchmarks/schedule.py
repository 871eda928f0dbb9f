"""Projected wall time of a params.yaml schedule on this machine, from the measured speed of each of its parts.

    python benchmarks/schedule.py                          # params.yaml as shipped: CIFAR-10, the default net
    python benchmarks/schedule.py --device cuda --steps 50 # on a GPU (more steps: steadier figures)
    python benchmarks/schedule.py --params my.yaml --shape 3 64 64 --train-images 9000 --test-images 1000
    python benchmarks/schedule.py -S supernet.epochs=30 -S train.batch_size=256   # overrides, as dvc exp run -S

Every training phase (``ofa.pipeline.recipe.phases``: the configs it samples, its subnets per step, its
teacher and what it trains, as the stage runs them) trains the params' network with ``fit`` on random uint8
images of the dataset's input shape: one warm-up epoch, then `--steps` measured steps. BN calibration
(`evaluate.bn_calibration_images`), evaluation and fine-tuning are timed the same way, on the smallest and
the largest subnet. The projection multiplies those speeds by the schedule: each phase's epochs of training
images, the max config's val accuracy after every epoch and the stage's closing test evaluations;
evaluate_space's configs (calibration, test, fine-tuning, test again); the baseline's configs trained alone (at
their subnet's fine-tuning speed) and tested; specialize's trials (calibration and val each; every trial
counted, though repeats are not re-evaluated) and its picks' tests. Subnets of middling
size are charged the mean of the smallest's and the largest's times. Not counted: loading the data,
writing checkpoints, ONNX exports and process start-up (seconds each). One process; with
`train.processes: N`, divide the training by what ``benchmarks/scaling.py`` measures.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ofa import data as data_mod
from ofa.model import OFANet
from ofa.pipeline import baseline, recipe
from ofa.pipeline.checkpoint import build_net, save_checkpoint
from ofa.pipeline.config import Params, ParamsError, load_params
from ofa.pipeline.context import TRAINING_STAGES
from ofa.train import DeviceData, calibrate_bn, evaluate, fit, select_device

ROOT = Path(__file__).resolve().parents[1]
TEST_IMAGES = {"cifar10": 10000, "cifar100": 10000, "fashion_mnist": 10000, "synthetic": 256}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _seconds(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _images_per_s(model, data: DeviceData, sched, steps: int, **kwargs) -> float:
    """Training images/s of `fit` with this schedule: one warm-up epoch, then `steps` measured steps."""
    sched = dataclasses.replace(sched, epochs=2, images_per_epoch=steps * sched.batch_size, warmup_epochs=0.0)
    history = fit(model, data, sched, progress=False, **kwargs)
    return history[1].images / history[1].seconds


def random_data(shape: tuple[int, ...], classes: int, images: int, device: torch.device) -> DeviceData:
    g = torch.Generator().manual_seed(0)
    split = data_mod.Split(torch.randint(0, 256, (images, *shape), dtype=torch.uint8, generator=g).to(device),
                           torch.randint(0, classes, (images,), generator=g).to(device))
    stat = lambda v: torch.full((1, shape[0], 1, 1), v, device=device)  # noqa: E731
    return DeviceData(split, split, split, stat(128.0), stat(64.0), device)


def measure_training(params: Params, net: OFANet, data: DeviceData, steps: int, tmp: Path) -> list[dict]:
    """One row per phase of each training stage: its sampler, subnets per step and teacher, measured."""
    full = tmp / "train_supernet.pt"
    save_checkpoint(net, full)  # the teacher of `shrink.teacher: full` (random weights time as well as trained)
    calibration = data.calibration_batches(params.evaluate.bn_calibration_images, params.train.eval_batch_size, 0)
    rows = []
    for stage, previous in TRAINING_STAGES.items():
        teacher = recipe.teacher(params, net, full, calibration, data.input_shape) if previous else None
        parameters = None
        if stage == "shrink_kernel" and params.shrink.kernel.transforms_only:
            parameters = [p for name, p in net.named_parameters() if ".transforms." in name]
        for phase in recipe.phases(params, stage, net.space):
            plan = recipe.schedule(params, phase.schedule, warmup_epochs=phase.warmup_epochs)
            rate = _images_per_s(net, data, plan, steps, sample=phase.sampler(net, stage),
                                 parameters=parameters, teacher=teacher, reduce=params.shrink.reduce,
                                 kd_ratio=params.shrink.kd_ratio if teacher is not None else 0.0)
            rows.append({"stage": stage, "phase": phase.suffix.lstrip(".") or "-", "epochs": phase.schedule.epochs,
                         "images": phase.schedule.images_per_epoch, "subnets": phase.subnets_per_step,
                         "images_per_s": rate})
            print(f"  {stage}{phase.suffix}: {rate:.1f} images/s", file=sys.stderr, flush=True)
    return rows


def measure_subnets(params: Params, net: OFANet, data: DeviceData, steps: int) -> dict[str, dict]:
    """Per subnet (smallest, largest): seconds to extract and calibrate BN, images/s to evaluate and fine-tune."""
    calibration = data.calibration_batches(params.evaluate.bn_calibration_images, params.train.eval_batch_size, 0)
    eval_bs = params.train.eval_batch_size
    out = {}
    for name, cfg in (("smallest", net.min_config()), ("largest", net.max_config())):
        calibrate_s, evaluate_s = [], []
        for _ in range(2):  # the second of each: warm
            sub = None

            def calibrate():
                nonlocal sub
                sub = net.extract(cfg)
                calibrate_bn(sub, calibration)

            calibrate_s.append(_seconds(calibrate, data.device))
            evaluate_s.append(_seconds(lambda: evaluate(sub, data, batch_size=eval_bs, split="test"), data.device))
        ft = params.evaluate.finetune
        out[name] = {"calibrate_s": calibrate_s[-1], "evaluate_per_s": len(data.test) / evaluate_s[-1],
                     "finetune_per_s": _images_per_s(sub, data, recipe.schedule(params, ft), steps)}
        print(f"  {name} subnet: calibration {calibrate_s[-1]:.2f} s, evaluation "
              f"{out[name]['evaluate_per_s']:.0f} images/s, fine-tuning {out[name]['finetune_per_s']:.1f} images/s",
              file=sys.stderr, flush=True)
    out["middling"] = {k: statistics.mean([out["smallest"][k], out["largest"][k]]) for k in out["smallest"]}
    return out


def project(params: Params, rows: list[dict], subnets: dict[str, dict], n_train: int, n_val: int, n_test: int,
            grid: int) -> list[tuple[str, str, float, float | None]]:
    """(stage, what, seconds, training images/s or None) for every part of the schedule."""
    big, mid, small = subnets["largest"], subnets["middling"], subnets["smallest"]
    check = lambda s, n: s["calibrate_s"] + n / s["evaluate_per_s"]  # noqa: E731 - extract, calibrate, evaluate n
    parts = []
    for stage in TRAINING_STAGES:
        mine = [r for r in rows if r["stage"] == stage]
        epochs = sum(r["epochs"] for r in mine)
        for r in mine:
            images = min(n_train, r["images"] or n_train)  # an epoch's
            what = f"train {r['epochs']} epochs x {images} images, {r['subnets']} subnets/step"
            parts.append((stage, what + ("" if r["phase"] == "-" else f" ({r['phase']})"),
                          r["epochs"] * images / r["images_per_s"], r["images_per_s"]))
        shrink = stage != "train_supernet"  # the max config on test at the end; a shrink stage's min config too
        parts.append((stage, f"val after each of {epochs} epochs, {1 + shrink} test at the end",
                      epochs * check(big, n_val) + check(big, n_test) + (check(small, n_test) if shrink else 0), None))
    configs = grid + params.evaluate.sampled_configs
    ft = params.evaluate.finetune
    ft_images = ft.epochs * (ft.images_per_epoch or n_train)
    parts.append(("evaluate_space", f"{configs} configs: test, fine-tune {ft.epochs} x "
                  f"{ft.images_per_epoch or n_train} images, test", configs * (
                      check(mid, n_test) + ft_images / mid["finetune_per_s"] + n_test / mid["evaluate_per_s"]), None))
    parts += _baseline(params, subnets, n_train, n_val, n_test)
    picks = len(params.specialize.budgets)
    parts.append(("specialize", f"{params.specialize.trials} trials on val, {picks} x 2 picks on test",
                  params.specialize.trials * check(mid, n_val) + 2 * picks * check(mid, n_test), None))
    return parts


def _baseline(params: Params, subnets: dict[str, dict], n_train: int, n_val: int,
              n_test: int) -> list[tuple[str, str, float, float | None]]:
    """Stage baseline: each config trained alone (at the fine-tuning speed of its subnet: the smallest's, the
    largest's, else the middling one's), then tested on val and test."""
    space, units = params.space.build(), len(params.net.units)
    configs = params.baseline.resolve(space, units)
    if not configs:
        return []
    phase = baseline.baseline_phase(params, space, n_train)
    images = phase.epochs * (phase.images_per_epoch or n_train)
    speeds = {space.min_config(units): subnets["smallest"], space.max_config(units): subnets["largest"]}
    seconds = sum(images / s["finetune_per_s"] + (n_val + n_test) / s["evaluate_per_s"]
                  for s in (speeds.get(c, subnets["middling"]) for c in configs))
    return [("baseline", f"{len(configs)} configs alone: {phase.epochs} epochs x {phase.images_per_epoch or n_train} "
             "images, val and test", seconds, None)]


def read_params(parser: argparse.ArgumentParser, path: Path, overrides: list[str]) -> Params:
    """The params of `path` with `overrides` applied as ``dvc exp run -S`` applies them (DVC's own code, imported
    only for them: without overrides the benchmark needs no DVC, as on a GPU machine with torch alone)."""
    if not path.is_file():
        parser.error(f"{path}: file not found")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "params.yaml"
        shutil.copyfile(path, copy)
        try:
            if overrides:
                from dvc.utils.hydra import apply_overrides

                apply_overrides(copy, overrides)
            return load_params(copy)
        except ParamsError as e:
            parser.error(str(e).replace(str(copy), str(path)))
        except Exception as e:  # noqa: BLE001 - DVC's override errors have no common base
            why = str(e.__cause__ or e).splitlines()[0]
            parser.error(f"-S {' -S '.join(overrides)}: {why}")


def native_input(params: Params) -> tuple[tuple[int, int, int], int]:
    """The input shape (C, H, W) and the number of classes of the params' dataset: its native ones, resized to
    `data.image_size` if set (a folder's, unknown without the data: CIFAR-10's)."""
    shape, classes = data_mod.NATIVE.get(params.data.dataset, ((3, 32, 32), 10))
    if params.data.image_size:
        shape = (shape[0], params.data.image_size, params.data.image_size)
    return shape, classes


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="default: train.device")
    parser.add_argument("--steps", type=int, default=10, help="measured training steps per part")
    parser.add_argument("--shape", type=int, nargs=3, metavar=("C", "H", "W"), help="default: the dataset's")
    parser.add_argument("--classes", type=int, help="default: the dataset's")
    parser.add_argument("--train-images", type=int, help="before val is held out; default: the dataset's")
    parser.add_argument("--test-images", type=int, help="default: the dataset's")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param of --params, in dvc exp run -S's syntax (repeatable)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps {args.steps}: at least 1")
    params = read_params(parser, args.params, args.set)
    d = params.data
    native_shape, native_classes = data_mod.NATIVE.get(d.dataset, (None, None))  # a folder's: unknown here
    shape = tuple(args.shape) if args.shape else native_shape
    classes = args.classes or native_classes
    train_all = args.train_images or data_mod.TRAIN_IMAGES.get(d.dataset)
    test_all = args.test_images or TEST_IMAGES.get(d.dataset)
    if shape is None or classes is None or train_all is None or test_all is None:
        parser.error(f"data.dataset {d.dataset}: give --shape, --classes, --train-images and --test-images")
    if d.image_size and not args.shape:
        shape = (shape[0], d.image_size, d.image_size)
    n_train = min(train_all, d.train_limit or train_all) - d.val_images
    n_val, n_test = d.val_images, min(test_all, d.test_limit or test_all)
    if n_train < 1:
        parser.error(f"data.val_images {d.val_images} leaves no training images of {train_all}")
    try:
        device = select_device(args.device or params.train.device)
    except ValueError as e:
        parser.error(str(e))
    torch.manual_seed(0)
    net = build_net(params, shape, [str(k) for k in range(classes)]).to(device, memory_format=torch.channels_last)
    images = max(args.steps * params.train.batch_size, params.evaluate.bn_calibration_images, 256)
    data = random_data(shape, classes, images, device)
    print(f"{args.params.name}: {d.dataset} {'x'.join(map(str, shape))}, {classes} classes, {n_train} training / "
          f"{n_val} val / {n_test} test images, batch {params.train.batch_size}; measuring on {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
             f" ({torch.get_num_threads()} threads)"), file=sys.stderr, flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure_training(params, net, data, args.steps, Path(tmp))
    subnets = measure_subnets(params, net, data, args.steps)
    parts = project(params, rows, subnets, n_train, n_val, n_test, net.space.grid_size())
    print(f"{'stage':<15} {'images/s':>9} {'projected':>12}  what")
    for stage, what, seconds, rate in parts:
        print(f"{stage:<15} {'' if rate is None else f'{rate:.1f}':>9} {_duration(seconds):>12}  {what}")
    total = sum(seconds for _, _, seconds, _ in parts)
    print(f"{'total':<15} {'':>9} {_duration(total):>12}  on {device}, one process")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
