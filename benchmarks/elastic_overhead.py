"""Cost of training a subnet through the supernet, relative to training its extracted copy.

For the min, a middle and the max uniform config of the OFA paper's space ({3,5,7} / {2,3,4} / {3,4,6}),
times one SGD training step (forward + backward + step, momentum and weight decay as in training) of
``net(x, cfg)`` and of ``net.extract(cfg)`` in alternating pairs, and prints the median ratio supernet /
subnet per config: ratio = median supernet step / median subnet step, and the median, interquartile range and
95% bootstrap interval of the median of the per-pair ratios. ``--repeats R`` runs R rounds over the configs
(interleaved, so a slow spell of the machine falls on all of them) and pools their pairs. Two memory formats:
channels_last (what the pipeline trains with: the supernet, the extracted subnet and the input all
channels_last) and NCHW.

    python benchmarks/elastic_overhead.py [--pairs 25] [--repeats 1] [--threads 2] [--batch 64] [--formats channels_last nchw]
    python benchmarks/elastic_overhead.py --profile middle   # where the time goes, per operator
    python benchmarks/elastic_overhead.py --parts --batch 2  # the fixed cost per step: forward, backward, optimizer
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time

import torch
import torch.nn.functional as F

import ofa

FORMATS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}


def _step(model, optimizer, x, y, *args) -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x, *args), y).backward()
    optimizer.step()
    return time.perf_counter() - start


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD as training builds it: Nesterov momentum, weight decay on weights, none on BN and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD([{"params": [p for p in params if p.ndim > 1], "weight_decay": 3e-5},
                            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}],
                           lr=1e-3, momentum=0.9, nesterov=True)


def _setup(args, fmt: torch.memory_format):
    torch.manual_seed(0)
    space = ofa.ConfigSpace(kernel=(3, 5, 7), depth=(2, 3, 4), width=(3, 4, 6))
    net = ofa.OFANet(space, in_channels=3, num_classes=10).to(memory_format=fmt)
    x = torch.randn(args.batch, 3, 32, 32).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (args.batch,))
    configs = {"min": net.min_config(), "middle": net.uniform_config(5, 3, 4), "max": net.max_config()}
    return net, x, y, configs


def _pairs(count: int, warmup: int, net, sub, opt_net, opt_sub, x, y, cfg) -> tuple[list[float], list[float]]:
    """Step times of `count` (supernet, subnet) pairs after `warmup` untimed ones."""
    t_net, t_sub = [], []
    for i in range(warmup + count):
        # alternate which one goes first so drifts in machine speed cancel out
        if i % 2:
            a = _step(net, opt_net, x, y, cfg)
            b = _step(sub, opt_sub, x, y)
        else:
            b = _step(sub, opt_sub, x, y)
            a = _step(net, opt_net, x, y, cfg)
        if i >= warmup:
            t_net.append(a)
            t_sub.append(b)
    return t_net, t_sub


def _median_interval(ratios: list[float], resamples: int = 2000) -> tuple[float, float]:
    """95% bootstrap interval of the median of the per-pair ratios (pairs resampled with replacement)."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def measure(args) -> None:
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}x3x32x32, {args.repeats} x "
          f"{args.pairs} timed pairs per config (rounds interleaved over the configs), {args.warmup} warm-up pairs")
    print(f"{'format':>13} {'config':>8} {'':>10} {'MMACs':>7} {'supernet s':>11} {'subnet s':>9} {'ratio':>6} "
          f"{'pairs':>6} {'pairs IQR':>13} {'pairs 95% CI':>14}" + ("  per round" if args.repeats > 1 else ""))
    for fmt_name in args.formats:
        fmt = FORMATS[fmt_name]
        net, x, y, configs = _setup(args, fmt)
        net.train()
        runs = {}
        for name, cfg in configs.items():
            sub = net.extract(cfg).to(memory_format=fmt).train()
            runs[name] = (cfg, sub, _optimizer(net), _optimizer(sub), [], [], [])
        for r in range(args.repeats):
            for name, (cfg, sub, opt_net, opt_sub, t_net, t_sub, rounds) in runs.items():
                a, b = _pairs(args.pairs, args.warmup if r == 0 else min(args.warmup, 1), net, sub, opt_net, opt_sub, x, y, cfg)
                t_net += a
                t_sub += b
                rounds.append(statistics.median(a) / statistics.median(b))
        for name, (cfg, _, _, _, t_net, t_sub, rounds) in runs.items():
            ratios = [a / b for a, b in zip(t_net, t_sub)]
            macs = net.macs(cfg, (3, 32, 32)) / 1e6
            q1, _, q3 = statistics.quantiles(ratios, n=4)
            lo, hi = _median_interval(ratios)
            a, b = statistics.median(t_net), statistics.median(t_sub)
            per_round = "  " + " ".join(f"{v:.3f}" for v in rounds) if args.repeats > 1 else ""
            print(f"{fmt_name:>13} {name:>8} {str(cfg):>10} {macs:7.1f} {a:11.3f} {b:9.3f} {a / b:6.3f} "
                  f"{statistics.median(ratios):6.3f} {q1:6.3f}-{q3:.3f} {lo:6.3f}-{hi:.3f}{per_round}", flush=True)


def _timed_parts(model, optimizer, x, y, *args) -> tuple[float, float, float]:
    """Seconds of one training step's forward (with the loss), backward and optimizer step."""
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x, *args), y)
    forward = time.perf_counter()
    loss.backward()
    backward = time.perf_counter()
    optimizer.step()
    return forward - start, backward - forward, time.perf_counter() - backward


def parts(args) -> None:
    """Per config, the medians of a step's forward, backward and optimizer step, supernet and subnet in
    alternating order, and their differences: at a small batch (--batch 2), where the convolutions cost
    almost nothing, the difference is the fixed cost per step of training through the supernet."""
    fmt_name = args.formats[0]
    fmt = FORMATS[fmt_name]
    net, x, y, configs = _setup(args, fmt)
    net.train()
    steps = args.pairs * args.repeats
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}x3x32x32, {fmt_name}, {steps} "
          f"steps each after {args.warmup} warm-up steps; medians in ms")
    print(f"{'config':>8} {'':>10} {'model':>9} {'forward':>8} {'backward':>9} {'optimizer':>10} {'step':>8}")
    for name, cfg in configs.items():
        sub = net.extract(cfg).to(memory_format=fmt).train()
        runs = {"supernet": (net, _optimizer(net), (cfg,), []), "subnet": (sub, _optimizer(sub), (), [])}
        for i in range(args.warmup + steps):
            for model, opt, extra, times in (runs.values() if i % 2 else reversed(runs.values())):
                t = _timed_parts(model, opt, x, y, *extra)
                if i >= args.warmup:
                    times.append((*t, sum(t)))
        medians = {key: [statistics.median(col) * 1e3 for col in zip(*times)] for key, (*_, times) in runs.items()}
        medians["difference"] = [a - b for a, b in zip(medians["supernet"], medians["subnet"])]
        for key, row in medians.items():
            print(f"{name:>8} {str(cfg):>10} {key:>9} " + " ".join(f"{v:{w}.2f}" for v, w in zip(row, (8, 9, 10, 8))),
                  flush=True)


def _op_times(model, x, y, extra, steps: int, warmup: int) -> tuple[dict[str, tuple[float, int]], float]:
    """Self CPU seconds and calls per operator over `steps` profiled training steps; the steps' wall time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    opt = _optimizer(model)
    for _ in range(warmup):
        _step(model, opt, x, y, *extra)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        wall = sum(_step(model, opt, x, y, *extra) for _ in range(steps))
    return {e.key: (e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()}, wall


def profile(args) -> None:
    """Where a supernet step spends more than a subnet step: per-operator self CPU time, per step, both profiled
    in alternating rounds; operators sorted by the difference."""
    fmt = FORMATS[args.formats[0]]
    net, x, y, configs = _setup(args, fmt)
    cfg = configs[args.profile]
    sub = net.extract(cfg).to(memory_format=fmt).train()
    totals: dict[str, dict[str, list[float]]] = {"supernet": {}, "subnet": {}}
    walls = {"supernet": 0.0, "subnet": 0.0}
    for _ in range(args.rounds):
        for name, model, extra in (("supernet", net, (cfg,)), ("subnet", sub, ())):
            ops, wall = _op_times(model, x, y, extra, args.steps, args.warmup)
            walls[name] += wall
            for key, (seconds, count) in ops.items():
                acc = totals[name].setdefault(key, [0.0, 0])
                acc[0] += seconds
                acc[1] += count
    steps = args.rounds * args.steps
    print(f"{cfg} ({args.formats[0]}), {steps} profiled steps each: supernet {walls['supernet'] / steps:.3f} s/step, "
          f"subnet {walls['subnet'] / steps:.3f} s/step (profiler on)")
    keys = set(totals["supernet"]) | set(totals["subnet"])
    rows = []
    for key in keys:
        a, b = totals["supernet"].get(key, [0.0, 0]), totals["subnet"].get(key, [0.0, 0])
        rows.append((key, (a[0] - b[0]) / steps * 1e3, a[0] / steps * 1e3, b[0] / steps * 1e3, a[1] / steps, b[1] / steps))
    rows.sort(key=lambda r: -abs(r[1]))
    print(f"{'operator':<52} {'diff ms':>8} {'super ms':>9} {'sub ms':>8} {'super calls':>12} {'sub calls':>10}")
    for key, diff, a, b, ca, cb in rows[: args.rows]:
        print(f"{key[:52]:<52} {diff:8.2f} {a:9.2f} {b:8.2f} {ca:12.0f} {cb:10.0f}")
    print(f"{'total self CPU':<52} {sum(r[1] for r in rows):8.2f} {sum(r[2] for r in rows):9.2f} "
          f"{sum(r[3] for r in rows):8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=25, help="timed (supernet, subnet) pairs per config and round")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the configs, their pairs pooled")
    parser.add_argument("--warmup", type=int, default=5, help="untimed pairs (steps with --profile) per config")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--formats", nargs="+", choices=list(FORMATS), default=list(FORMATS))
    parser.add_argument("--profile", choices=["min", "middle", "max"], help="profile one config instead of timing")
    parser.add_argument("--parts", action="store_true",
                        help="time forward, backward and optimizer apart (pairs x repeats steps each)")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per round (with --profile)")
    parser.add_argument("--rounds", type=int, default=4, help="alternating profiled rounds (with --profile)")
    parser.add_argument("--rows", type=int, default=25, help="operators shown (with --profile)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gc.disable()  # as timeit does: no collector pauses inside timed steps
    (profile if args.profile else parts if args.parts else measure)(args)


if __name__ == "__main__":
    main()
