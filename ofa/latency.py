"""The command line that builds a latency table on the machine a model will run on, from an architecture file:

    python -m ofa.latency build --arch arch.json --out table.json [--runtime ... --threads ... --batch-size ...]

It needs this package installed and nothing else: no DVC, no data, no checkpoint. ``arch.json`` is the
pipeline's models/arch.json (``{"arch": <OFANet.arch>, "input_shape": [C, H, W]}``); the table is
``ofa.deploy.latency.LatencyTable``'s JSON. A module of its own at the top of the package, so that
``python -m`` runs it without importing it first.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .deploy.latency import LatencyTable
from .deploy.timing import RUNTIMES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ofa.latency",
                                     description="Build a latency table on this machine from an architecture file.")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="time every part of the architecture's subnets here")
    build.add_argument("--arch", required=True, type=Path,
                       help="the architecture file the pipeline writes (models/arch.json)")
    build.add_argument("--out", required=True, type=Path, help="where to write the table (JSON)")
    build.add_argument("--runtime", default="onnxruntime", choices=RUNTIMES)
    build.add_argument("--threads", type=int, default=1)
    build.add_argument("--batch-size", type=int, default=1)
    build.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args(argv)
    if args.threads < 1 or args.batch_size < 1:
        parser.error("--threads and --batch-size: at least 1")
    try:
        spec = json.loads(args.arch.read_text())
        if not isinstance(spec, dict) or not {"arch", "input_shape"} <= set(spec):
            raise ValueError('not an architecture file ({"arch": ..., "input_shape": [C, H, W]}, as the latency '
                             "stage writes models/arch.json)")
        table = LatencyTable.build(spec["arch"], tuple(spec["input_shape"]), runtime=args.runtime,
                                   batch_size=args.batch_size, threads=args.threads, device=args.device)
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"error: {args.arch}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    table.save(args.out)
    print(f"{args.out}: {len(table.blocks)} block variants, stem, head and overhead in {table.build_s} s "
          f"({table.runtime_version}, {table.threads} threads, batch {table.batch_size}, {table.host['cpu']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
