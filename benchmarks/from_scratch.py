"""Subnets trained from scratch beside the supernet's: each config trained alone, from the supernet's fresh
init, on as many training images as the whole progressive-shrinking schedule, against the same config taken
from the trained supernet.

    python benchmarks/from_scratch.py [--configs min max] [--scale 1.0] [--root .] [-S key=value ...]

Run in a project where specialize has run, with the params it ran with (`-S` overrides of params.yaml, as
`dvc exp run -S` takes them: the Makefile's QUICK_PARAMS for the quick profile). A config is `min`, `max` or a
config string as evaluate_space and specialize print it (`k5-d2-w4`, `kxw-...`). Each one is extracted from
the supernet as train_supernet builds it (the seed's init) and trained alone with train_supernet's recipe
(its lr, train's batch size, warm-up, label smoothing and augmentation) for as many epochs as the schedule's
phases (train_supernet and the three shrink stages, first phases included) and as many images in all:
`--scale` times those. Its test accuracy is set beside the supernet subnet's (metrics/space.json: BN
re-calibrated, and fine-tuned; for a config evaluate_space did not evaluate, specialize's test figure where
it is a pick, else n/a), and its training seconds beside the four training stages' (metrics/timing/). One
process, the params' device; nothing is kept.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ofa.pipeline import recipe  # noqa: E402
from ofa.pipeline.config import PhaseParams  # noqa: E402
from ofa.pipeline.context import METRICS, TRAINING_STAGES, StageContext  # noqa: E402
from ofa.train import distributed, evaluate, fit  # noqa: E402
from schedule import read_params  # noqa: E402
from trained import add_project_options  # noqa: E402


def schedule_images(params, space, train_images: int) -> tuple[int, int]:
    """The epochs and training images of the whole progressive-shrinking schedule (every stage's phases)."""
    epochs = images = 0
    for stage in TRAINING_STAGES:
        for phase in recipe.phases(params, stage, space):
            p = phase.schedule
            epochs += p.epochs
            images += p.epochs * min(p.images_per_epoch or train_images, train_images)
    return epochs, images


def supernet_figures(root: Path) -> dict[str, dict]:
    """config string -> the supernet's test accuracy of it (and fine-tuned), where a stage reported one."""
    found = {p["config"]: {"accuracy": p["accuracy"]}
             for p in json.loads((root / METRICS / "picks.json").read_text())["budgets"].values()}
    for r in json.loads((root / METRICS / "space.json").read_text()):
        found[r["config"]] = {"accuracy": r["accuracy"], "finetuned": r["accuracy_finetuned"]}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["min", "max"], help="min, max or config strings")
    parser.add_argument("--scale", type=float, default=1.0, help="times the schedule's images (default 1)")
    add_project_options(parser)
    args = parser.parse_args()
    root = args.root
    if args.scale <= 0:
        parser.error(f"--scale {args.scale:g}: a positive number")
    params = read_params(parser, root / "params.yaml", args.set)
    space, units = params.space.build(), len(params.net.unit_specs())
    named = {"min": space.min_config(units), "max": space.max_config(units)}
    try:  # before any work
        configs = [named.get(c) or space.parse(c, units) for c in args.configs]
    except ValueError as e:
        parser.error(f"--configs: {e}")
    found = supernet_figures(root)
    ctx = StageContext.open(params, root, "train_supernet")  # the seed's fresh supernet, as train_supernet starts
    net, data = ctx.net, ctx.data
    epochs, images = schedule_images(params, net.space, len(data.train))
    epochs = max(1, round(epochs * args.scale))
    per_epoch = round(images * args.scale / epochs)
    timing = {s: json.loads((root / METRICS / "timing" / f"{s}.json").read_text()) for s in TRAINING_STAGES}
    supernet_s = sum(t["train_s"] for t in timing.values())
    print(f"from scratch: {epochs} epochs of {per_epoch} images ({epochs * per_epoch} in all; the schedule's "
          f"{images} x {args.scale:g}), lr {params.supernet.lr}", file=sys.stderr, flush=True)
    rows = []
    for i, cfg in enumerate(configs):
        sub = ctx.net.extract(cfg)  # the fresh init's weights: ctx.net is never trained
        plan = recipe.schedule(params, PhaseParams(epochs, params.supernet.lr, per_epoch))
        start = time.perf_counter()
        fit(sub, data, plan, seed=params.seed * 1000 + 300 + i, desc=f"scratch {cfg}", world=distributed.SINGLE)
        seconds = time.perf_counter() - start
        alone = evaluate(sub, data, batch_size=params.train.eval_batch_size, world=distributed.SINGLE)
        rows.append((str(cfg), found.get(str(cfg), {}), alone, seconds))
    print(f"| config | supernet subnet, test | fine-tuned | trained alone, test | alone s | "
          f"supernet's 4 stages s: {supernet_s:.0f} |")
    print("|---|---:|---:|---:|---:|---|")
    for config, sup, alone, seconds in rows:
        acc = f"{sup['accuracy']:.4f}" if "accuracy" in sup else "n/a"
        ft = f"{sup['finetuned']:.4f}" if "finetuned" in sup else "n/a"
        print(f"| `{config}` | {acc} | {ft} | {alone:.4f} | {seconds:.0f} | |")


if __name__ == "__main__":
    main()
