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
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ofa.deploy.latency import RUNTIMES, LatencyTable, validate, validation_configs  # noqa: E402
from ofa.deploy.timing import measure_many  # noqa: E402
from ofa.model import ConfigSpace, OFANet, Subnet, UnitSpec  # noqa: E402

QUICK_UNITS = [UnitSpec(16, 2, "relu", False), UnitSpec(32, 1, "relu", True), UnitSpec(48, 2, "hswish", True)]
SHAPE = (1, 28, 28)


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
    configs = validation_configs(net.arch, args.configs, seed=0)
    start = time.perf_counter()
    figures, records = validate(table, configs, lambda cfgs: measure_many(
        [Subnet.build(net.arch, cfg) for cfg in cfgs], SHAPE, runtime=args.runtime, batch_size=args.batch_size,
        threads=args.threads))
    measured = [r["measured_ms"] for r in records]
    predicted = [r["predicted_ms"] for r in records]
    print(f"{table.runtime_version}, {args.threads} thread(s), batch {args.batch_size}, {table.host['cpu']}")
    print(f"table: {len(table.blocks)} block variants, stem, head, overhead {table.overhead_ms:.4f} ms; "
          f"built in {table.build_s:.1f} s")
    print(f"{len(configs)} configs measured whole in {time.perf_counter() - start:.1f} s: "
          f"{min(measured):.4f}-{max(measured):.4f} ms")
    print(f"predicted vs measured: Kendall tau {figures['kendall_tau']:.3f}, mean abs error "
          f"{figures['mape_pct']:.1f}%, within +-10%: {100 * figures['within_10pct']:.0f}%, mean predicted / measured "
          f"{sum(predicted) / sum(measured):.3f}")
    print(f"MACs vs measured: Kendall tau {figures['macs_kendall_tau']:.3f}")


if __name__ == "__main__":
    main()
