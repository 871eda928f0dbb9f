"""Evaluation and BN re-calibration speed by batch size (`train.eval_batch_size`), on the params' network.

    python benchmarks/evaluation.py                         # params.yaml's network (CIFAR-10 default)
    python benchmarks/evaluation.py -S data.dataset=fashion_mnist -S net.stem_stride=2 ...   # as dvc exp run -S
    python benchmarks/evaluation.py --batches 100 250 1000 --images 5000 --repeats 3

Every stage scores subnets the same way (``ofa.train.evaluation``): extract, re-calibrate BN on
`evaluate.bn_calibration_images` training images in batches of `train.eval_batch_size`, then evaluate in
batches of that size. This times both at each batch size given, on the smallest and the largest subnet of the
params' space (random weights and images of the dataset's shape: speed does not depend on them), on this
machine's CPU: images/s, medians of --repeats rounds over the batch sizes in turn, against the largest batch's,
and the share of the time spent in the kernel. Glibc's allocator hands a tensor of more than 32 MB out as
pages of its own and returns them to the OS when it is freed, so every such activation page-faults afresh:
at batch 1000 the max config's are 75 MB, at 250 under 20 MB (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from schedule import ROOT, native_input, random_data, read_params  # noqa: E402

from ofa.pipeline.checkpoint import build_net  # noqa: E402
from ofa.train import calibrate_bn, evaluate  # noqa: E402
from ofa.train.distributed import SINGLE  # noqa: E402


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, system CPU seconds) of one call."""
    sys_before, start = resource.getrusage(resource.RUSAGE_SELF).ru_stime, time.perf_counter()
    fn()
    return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_stime - sys_before


def measure(sub, data, batches: list[int], calibration_images: int, repeats: int) -> dict[int, dict[str, float]]:
    """Per batch size: calibration and evaluation images/s of the extracted subnet `sub`, and the share of their
    time spent in the kernel (system time: the page faults of memory the allocator returned to the OS), medians of
    `repeats` rounds over all batch sizes in turn after one warm-up round."""
    calibration = {batch: data.calibration_batches(calibration_images, batch, seed=0) for batch in batches}
    runs: dict[int, list[tuple[float, float, float]]] = {batch: [] for batch in batches}
    for r in range(repeats + 1):
        for batch in batches:
            calibrate, sys_calibrate = _timed(lambda: calibrate_bn(sub, calibration[batch], world=SINGLE))
            score, sys_score = _timed(lambda: evaluate(sub, data, batch_size=batch, world=SINGLE))
            if r:
                runs[batch].append((calibrate, score, (sys_calibrate + sys_score) / (calibrate + score)))
    calibrated = sum(len(b) for b in calibration[batches[0]])
    return {batch: {"calibrate": calibrated / statistics.median(c for c, _, _ in rows),
                    "evaluate": len(data.test) / statistics.median(e for _, e, _ in rows),
                    "system": statistics.median(s for _, _, s in rows)} for batch, rows in runs.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--batches", type=int, nargs="+", default=[100, 250, 500, 1000], metavar="N",
                        help="batch sizes to time (default: 100 250 500 1000)")
    parser.add_argument("--images", type=int, default=5000, help="images evaluated per run (default: 5000)")
    parser.add_argument("--repeats", type=int, default=3, help="measured runs of each (default: 3)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    if min(args.batches) < 1 or args.images < 1 or args.repeats < 1:
        parser.error("--batches, --images and --repeats: positive integers")
    params = read_params(parser, args.params, args.set)
    shape, classes = native_input(params)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = random_data(shape, classes, args.images, torch.device("cpu"))
    net = build_net(params, shape, [str(k) for k in range(classes)])
    cal = params.evaluate.bn_calibration_images
    print(f"{params.data.dataset} {'x'.join(map(str, shape))}, {args.threads} threads, {args.images} images "
          f"evaluated, {cal} calibrated, medians of {args.repeats} runs (train.eval_batch_size "
          f"{params.train.eval_batch_size})")
    largest = max(args.batches)
    for name, cfg in (("min", net.min_config()), ("max", net.max_config())):
        sub = net.extract(cfg).to(memory_format=torch.channels_last)
        rows = measure(sub, data, sorted(args.batches), cal, args.repeats)
        print(f"\n{name} config   batch   calibrate img/s (x batch {largest}'s)   evaluate img/s "
              f"(x batch {largest}'s)   system time")
        for batch, row in rows.items():
            print(f"{batch:20d}{row['calibrate']:18.0f} ({row['calibrate'] / rows[largest]['calibrate']:5.2f}x)"
                  f"{row['evaluate']:24.0f} ({row['evaluate'] / rows[largest]['evaluate']:5.2f}x)"
                  f"{100 * row['system']:15.0f}%")

if __name__ == "__main__":
    main()
