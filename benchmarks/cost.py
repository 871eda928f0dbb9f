"""Cost of a config: ``net.macs`` / ``net.num_params`` (from the config) against calflops on the extracted subnet.

For the default CIFAR-10 network (5 units, 3x32x32) and the source's space, times per config: the exact
functions; ``ofa.count_macs`` (calflops) / ``ofa.count_params`` on the already extracted subnet; and with
the extraction they need (what a search would otherwise call), over the uniform grid and random per-block
configs. Checks that they agree and prints the median time per config of each and the ratios.

    python benchmarks/cost.py [--configs 24] [--threads 2]
"""

from __future__ import annotations

import argparse
import random
import statistics
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
    fast_rows: dict[str, list[float]] = {"macs": [], "num_params": [], "both": []}
    slow_rows: dict[str, list[float]] = {"extract": [], "calflops": [], "count_params": []}
    for cfg in configs:
        fast = {"macs": lambda: net.macs(cfg, shape), "num_params": lambda: net.num_params(cfg),
                "both": lambda: (net.macs(cfg, shape), net.num_params(cfg))}
        for name, fn in fast.items():  # best of 5 repeats of 50 calls: the machine's noise only adds time
            fast_rows[name].append(min(timeit.repeat(fn, number=50, repeat=5)) / 50)
        sub = net.extract(cfg)
        slow = {"extract": lambda: net.extract(cfg), "calflops": lambda: ofa.count_macs(sub, (1, *shape)),
                "count_params": lambda: ofa.count_params(sub)}
        for name, fn in slow.items():  # best of 3 single calls, likewise
            slow_rows[name].append(min(timeit.repeat(fn, number=1, repeat=3)))
        macs, params = ofa.count_macs(sub, (1, *shape)), ofa.count_params(sub)
        assert (macs, params) == fast["both"](), (str(cfg), macs, params, fast["both"]())
    median = {name: statistics.median(v) for name, v in (fast_rows | slow_rows).items()}
    print(f"{len(configs)} configs of the default CIFAR-10 network, 3x32x32, {args.threads} threads: all equal; "
          f"median per config (extract: {median['extract'] * 1e3:.1f} ms)")
    print(f"{'':<12}{'from the config':>17}{'on the extracted subnet':>25}{'ratio':>8}"
          f"{'extract + it':>14}{'ratio':>8}")
    for name, traced in (("macs", ("calflops",)), ("num_params", ("count_params",)),
                         ("both", ("calflops", "count_params"))):
        e = median[name]
        alone = sum(median[t] for t in traced)
        whole = alone + len(traced) * median["extract"]  # what a search would otherwise call: extract, then count
        print(f"{name:<12}{e * 1e6:14.1f} us{alone * 1e3:22.2f} ms{alone / e:7.0f}x{whole * 1e3:11.1f} ms"
              f"{whole / e:7.0f}x")


if __name__ == "__main__":
    main()
