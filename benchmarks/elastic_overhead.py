"""Cost of training a subnet through the supernet, relative to training its extracted copy.

For the min, a middle and the max uniform config of the OFA paper's space ({3,5,7} / {2,3,4} / {3,4,6}),
times one SGD training step (forward + backward + step) of ``net(x, cfg)`` and of ``net.extract(cfg)`` in
alternating pairs, and prints the median ratio supernet / subnet per config.

    python benchmarks/elastic_overhead.py [--pairs 15] [--threads 2] [--batch 64]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch
import torch.nn.functional as F

import ofa


def _step(model, optimizer, x, y, *args) -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x, *args), y).backward()
    optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=25, help="timed (supernet, subnet) pairs per config")
    parser.add_argument("--warmup", type=int, default=5, help="untimed pairs per config")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gc.disable()  # as timeit does: no collector pauses inside timed steps

    space = ofa.ConfigSpace(kernel=(3, 5, 7), depth=(2, 3, 4), width=(3, 4, 6))
    net = ofa.OFANet(space, in_channels=3, num_classes=10)
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    configs = [("min", net.min_config()), ("middle", net.uniform_config(5, 3, 4)), ("max", net.max_config())]
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}x3x32x32, "
          f"{args.pairs} timed pairs after {args.warmup} warm-up pairs")
    print(f"{'config':>8} {'':>10} {'MMACs':>7} {'supernet s':>11} {'subnet s':>9} {'ratio':>6} {'ratio IQR':>13}")
    for name, cfg in configs:
        sub = net.extract(cfg).train()
        net.train()
        opt_net = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
        opt_sub = torch.optim.SGD(sub.parameters(), lr=1e-3, momentum=0.9)
        ratios, t_net, t_sub = [], [], []
        for i in range(args.warmup + args.pairs):
            # alternate which one goes first so drifts in machine speed cancel out
            if i % 2:
                a = _step(net, opt_net, x, y, cfg)
                b = _step(sub, opt_sub, x, y)
            else:
                b = _step(sub, opt_sub, x, y)
                a = _step(net, opt_net, x, y, cfg)
            if i >= args.warmup:
                ratios.append(a / b)
                t_net.append(a)
                t_sub.append(b)
        macs = ofa.count_macs(sub, (1, 3, 32, 32)) / 1e6
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        print(f"{name:>8} {str(cfg):>10} {macs:7.1f} {statistics.median(t_net):11.3f} "
              f"{statistics.median(t_sub):9.3f} {statistics.median(ratios):6.3f} {q1:6.3f}-{q3:.3f}", flush=True)


if __name__ == "__main__":
    main()
