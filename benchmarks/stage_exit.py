"""Exit time of a stage process: from its last output to the end of the process, as `dvc repro` waits for it.

A child process imports what a training stage imports (``ofa.pipeline.process``, ``.training``), takes one SGD step on a small OFA net (the
optimizer imports torch._dynamo, as in every training stage), prints the time, then exits either as the stage
scripts do (``process._exit``: ``gc.freeze()``, then ``sys.exit``) or with a plain ``sys.exit``. Prints the
median exit time of each over a few runs, one after the other (never two torch processes at once).

    python benchmarks/stage_exit.py [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

CHILD = """
import sys, time
import torch
import ofa
from ofa.pipeline import process, training
net = ofa.OFANet(ofa.ConfigSpace(kernel=(5, 7), depth=(2, 3), width=(2, 4)), in_channels=3, num_classes=10)
opt = torch.optim.SGD(net.parameters(), lr=0.1)
net(torch.randn(2, 3, 32, 32)).sum().backward()
opt.step()
print(time.time(), flush=True)
process._exit(0) if sys.argv[1] == "stage" else sys.exit(0)
"""


def exit_seconds(how: str) -> float:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, how], stdout=subprocess.PIPE, text=True)
    printed = float(proc.stdout.readline())
    proc.wait()
    ended = time.time()
    assert proc.returncode == 0
    return ended - printed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    times = {"stage": [], "plain": []}
    for _ in range(args.runs):
        for how in times:
            times[how].append(exit_seconds(how))
    stage, plain = (statistics.median(times[h]) for h in ("stage", "plain"))
    print(f"exit after the last output, median of {args.runs} runs:")
    print(f"  sys.exit:                     {plain:.2f} s")
    print(f"  process._exit (gc.freeze):   {stage:.2f} s   ({plain - stage:.2f} s less per stage process)")


if __name__ == "__main__":
    main()
