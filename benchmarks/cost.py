"""Cost of a config: ``net.macs`` / ``net.num_params`` (from the config) against calflops on the extracted subnet.

For the default CIFAR-10 network (5 units, 3x32x32) and the source's space, times per config: the exact
functions, and ``ofa.count_macs(net.extract(cfg))`` / ``ofa.count_params(net.extract(cfg))`` (what the search
would otherwise call), over the uniform grid and random per-block configs; checks that they agree and prints
the median time per config of each and their ratio.

    python benchmarks/cost.py [--configs 24] [--threads 2]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import timeit

import torch

import ofa


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=24, help="random per-block configs besides the uniform grid")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    net = ofa.OFANet(ofa.ConfigSpace(kernel=(5, 7), depth=(2, 3), width=(2, 4)), in_channels=3, num_classes=10)
    shape = (3, 32, 32)
    rng = random.Random(0)
    configs = net.uniform_configs() + [net.sample_config(rng) for _ in range(args.configs)]
    ofa.count_macs(net.extract(configs[0]), (1, *shape))  # imports calflops and transformers once
    rows = {"macs": ([], []), "num_params": ([], []), "both": ([], [])}
    for cfg in configs:
        fast = {"macs": lambda: net.macs(cfg, shape), "num_params": lambda: net.num_params(cfg),
                "both": lambda: (net.macs(cfg, shape), net.num_params(cfg))}
        for name, fn in fast.items():  # best of 5 repeats of 50 calls: the machine's noise only adds time
            rows[name][0].append(min(timeit.repeat(fn, number=50, repeat=5)) / 50)
        start = time.perf_counter()
        macs = ofa.count_macs(net.extract(cfg), (1, *shape))
        rows["macs"][1].append(time.perf_counter() - start)
        start = time.perf_counter()
        params = ofa.count_params(net.extract(cfg))
        rows["num_params"][1].append(time.perf_counter() - start)
        rows["both"][1].append(rows["macs"][1][-1] + rows["num_params"][1][-1])
        assert (macs, params) == fast["both"](), (str(cfg), macs, params, fast["both"]())
    print(f"{len(configs)} configs of the default CIFAR-10 network, 3x32x32, {args.threads} threads: all equal")
    print(f"{'':<22}{'from the config':>18}{'extract + calflops':>22}{'ratio':>10}")
    for name, (exact, traced) in rows.items():
        e, t = statistics.median(exact), statistics.median(traced)
        print(f"{name:<22}{e * 1e6:15.1f} us{t * 1e3:19.1f} ms{t / e:9.0f}x")

if __name__ == "__main__":
    main()
