"""How well a latency table predicts measured latency, and how well MACs rank it, for the quick profile's net.

    python benchmarks/latency.py [--configs 50] [--runtime onnxruntime] [--threads 1] [--batch-size 1]

Builds the table (``ofa.deploy.latency.LatencyTable``) for the quick profile's architecture on 1x28x28 inputs
(Fashion-MNIST), then measures every uniform config and `--configs` random per-block ones whole, as deployed
(``measure_latency``: exported and run by onnxruntime, or torch eager), and prints: the table's build time,
Kendall's tau between predicted and measured latency, the mean absolute percentage error, the share of
configs within +-10%, and Kendall's tau between MACs and measured latency. Weights are random: latency does
not depend on them.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ofa.deploy.latency import RUNTIMES, LatencyTable, measure_latency  # noqa: E402
from ofa.model import ConfigSpace, OFANet, Subnet, UnitSpec  # noqa: E402

QUICK_UNITS = [UnitSpec(16, 2, "relu", False), UnitSpec(32, 1, "relu", True), UnitSpec(48, 2, "hswish", True)]
SHAPE = (1, 28, 28)


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-b of two paired lists (ties in either count as neither concordant nor discordant)."""
    concordant = discordant = ties_a = ties_b = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            da, db = a[i] - a[j], b[i] - b[j]
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif (da > 0) == (db > 0):
                concordant += 1
            else:
                discordant += 1
    pairs = concordant + discordant
    return (concordant - discordant) / ((pairs + ties_a) * (pairs + ties_b)) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=50, help="random per-block configs besides the uniform grid")
    parser.add_argument("--runtime", default="onnxruntime", choices=RUNTIMES)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1)
    args = parser.parse_args()
    net = OFANet(ConfigSpace(kernel=(5, 7), depth=(2, 3), width=(2, 4)), 1, 10, units=QUICK_UNITS,
                 stem_channels=16, stem_stride=2, final_channels=256)
    table = LatencyTable.build(net.arch, SHAPE, runtime=args.runtime, batch_size=args.batch_size,
                               threads=args.threads, progress=False)
    rng = random.Random(0)
    configs = list(dict.fromkeys([*net.uniform_configs(), *(net.sample_config(rng) for _ in range(args.configs))]))
    predicted, measured, macs = [], [], []
    start = time.perf_counter()
    for cfg in configs:
        predicted.append(table.predict(cfg))
        measured.append(measure_latency(Subnet.build(net.arch, cfg), SHAPE, runtime=args.runtime,
                                        batch_size=args.batch_size, threads=args.threads))
        macs.append(net.macs(cfg, SHAPE))
    errors = [abs(p - m) / m for p, m in zip(predicted, measured)]
    print(f"{table.runtime_version}, {args.threads} thread(s), batch {args.batch_size}, {table.host['cpu']}")
    print(f"table: {len(table.blocks)} block variants, stem, head, overhead {table.overhead_ms:.4f} ms; "
          f"built in {table.build_s:.1f} s")
    print(f"{len(configs)} configs measured whole in {time.perf_counter() - start:.1f} s: "
          f"{min(measured):.4f}-{max(measured):.4f} ms")
    within = sum(e <= 0.1 for e in errors) / len(errors)
    print(f"predicted vs measured: Kendall tau {kendall_tau(predicted, measured):.3f}, mean abs error "
          f"{100 * sum(errors) / len(errors):.1f}%, within +-10%: {100 * within:.0f}%, mean predicted / measured "
          f"{sum(predicted) / sum(measured):.3f}")
    print(f"MACs vs measured: Kendall tau {kendall_tau(macs, measured):.3f}")


if __name__ == "__main__":
    main()
