"""How well an accuracy predictor fitted on the trained supernet ranks subnets it has not seen, by sample count.

    python benchmarks/predictor.py [--samples 40 80 160] [--held-out 80] [--root .] [-S key=value ...]

Run in a project where shrink_width has run (its checkpoint and data/prepared), with the params it ran with
(`-S` overrides of params.yaml, as `dvc exp run -S` takes them: the Makefile's QUICK_PARAMS for the quick
profile). Scores random per-block configs for real as specialize does (BN re-calibrated on its images, val
accuracy), keeps the scores in .resume/predictor_bench.json (keyed by the checkpoint, so a rerun scores
nothing twice), then fits each kind of ``ofa.deploy.predictor.AccuracyPredictor`` on the first N configs and
prints Kendall's tau and the RMSE (accuracy points) on held-out configs, never among the fitted ones.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ofa.deploy.latency import kendall_tau  # noqa: E402
from ofa.deploy.predictor import KINDS, AccuracyPredictor  # noqa: E402
from ofa.io import md5_file, write_json  # noqa: E402
from ofa.model import SubnetConfig  # noqa: E402
from trained import add_project_options, open_trained  # noqa: E402

CACHE = Path(".resume") / "predictor_bench.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[40, 80, 160], help="configs fitted on")
    parser.add_argument("--held-out", type=int, default=80, help="configs it is checked on")
    add_project_options(parser)
    args = parser.parse_args()
    root = args.root
    trained = open_trained(parser, args)
    params, ctx, checkpoint, subnets = trained.params, trained.ctx, trained.checkpoint, trained.subnets
    space, units = ctx.net.space, ctx.net.num_units

    rng = random.Random(params.seed)
    held_out: list[SubnetConfig] = []
    pool: list[SubnetConfig] = []
    while len(held_out) < args.held_out:  # distinct configs: held out first, the fitted ones never among them
        cfg = space.sample(units, rng)
        if cfg not in held_out:
            held_out.append(cfg)
    while len(pool) < max(args.samples):
        cfg = space.sample(units, rng)
        if cfg not in held_out and cfg not in pool:
            pool.append(cfg)

    key = md5_file(checkpoint)
    cache = json.loads((root / CACHE).read_text()) if (root / CACHE).is_file() else {}
    scores = cache.get(key, {})
    start, todo = time.perf_counter(), [c for c in held_out + pool if str(c) not in scores]
    for i, cfg in enumerate(todo, 1):
        scores[str(cfg)] = subnets.val_accuracy(cfg)
        print(f"scored {i}/{len(todo)}: {cfg} {scores[str(cfg)]:.4f}", file=sys.stderr, flush=True)
        if i % 20 == 0 or i == len(todo):
            write_json(root / CACHE, {key: scores})
    print(f"{len(held_out) + len(pool)} configs scored for real on val ({len(todo)} now, "
          f"{time.perf_counter() - start:.0f} s); held out: {len(held_out)}, val accuracy "
          f"{min(scores[str(c)] for c in held_out):.4f}-{max(scores[str(c)] for c in held_out):.4f}")
    truth = [scores[str(c)] for c in held_out]
    print("| fitted on | predictor | Kendall tau (held out) | RMSE, points | fit s |")
    print("|---:|---|---:|---:|---:|")
    for n in args.samples:
        fitted = pool[:n]
        for kind in KINDS:
            t = time.perf_counter()
            predictor = AccuracyPredictor(space, units, kind, seed=params.seed)
            predictor.fit(fitted, [scores[str(c)] for c in fitted])
            fit_s = time.perf_counter() - t
            predicted = predictor.predict(held_out)
            rmse = (sum((p - a) ** 2 for p, a in zip(predicted, truth)) / len(truth)) ** 0.5
            print(f"| {n} | {kind} | {kendall_tau(predicted, truth):.3f} | {100 * rmse:.2f} | {fit_s:.2f} |")


if __name__ == "__main__":
    main()
