"""The depthwise convs' own weight gradient (``ofa.model.depthwise``) against PyTorch's, per conv and per step.

    python benchmarks/depthwise.py                         # params.yaml's network (CIFAR-10 default)
    python benchmarks/depthwise.py -S data.dataset=fashion_mnist -S net.stem_stride=2 ...   # as dvc exp run -S
    python benchmarks/depthwise.py --pairs 20 --batch 256

Two tables, on the params' network at its training batch (`train.batch_size`, or --batch), on this machine:
1. Each depthwise conv of the max config (its map, kernel and stride), forward + backward: PyTorch's
   ``F.conv2d`` against ``depthwise_conv2d`` (the Toeplitz weight gradient where the kernel is wider than the
   map, PyTorch's conv elsewhere), medians of --pairs alternating runs.
2. One SGD training step of the supernet at its min and max config (forward, backward, step), with PyTorch's
   conv for every depthwise conv against the library's, in alternating pairs (a slow spell of the machine falls
   on both): median ms per step, images/s, and the median of the per-pair ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from schedule import ROOT, native_input, read_params  # noqa: E402

from ofa.model import elastic  # noqa: E402
from ofa.model.depthwise import depthwise_conv2d  # noqa: E402
from ofa.pipeline.checkpoint import build_net  # noqa: E402


def pytorch_depthwise(x: torch.Tensor, weight: torch.Tensor, stride: int = 1) -> torch.Tensor:
    return F.conv2d(x, weight, None, stride, weight.shape[-1] // 2, 1, x.shape[1])


def _median_ms(samples: list[float]) -> float:
    return 1000 * statistics.median(samples)


def conv_shapes(net, cfg, x: torch.Tensor) -> list[tuple[int, int, int, int, int]]:
    """(channels, height, width, kernel, stride) of each depthwise conv the config runs, in order."""
    shapes = []

    def record(conv, args, kwargs):
        inp = args[0]
        k = kwargs.get("kernel_size") or conv.kernel_sizes[-1]
        shapes.append((inp.shape[1], inp.shape[2], inp.shape[3], k, conv.stride))

    hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for m in net.modules()
             if isinstance(m, elastic.ElasticConv2d) and m.depthwise]
    with torch.no_grad():
        net(x, cfg)
    for h in hooks:
        h.remove()
    return shapes


def time_conv(fn, shape, batch: int, pairs: int) -> list[float]:
    channels, height, width, k, stride = shape
    x = torch.randn(batch, channels, height, width).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(channels, 1, k, k, requires_grad=True)
    grad = torch.randn_like(pytorch_depthwise(x, weight, stride))
    times = []
    for i in range(pairs + 2):
        start = time.perf_counter()
        fn(x, weight, stride).backward(grad)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return times


def time_steps(net, cfg, x, y, pairs: int) -> tuple[list[float], list[float]]:
    """Alternating SGD steps with PyTorch's depthwise conv and with the library's: seconds of each."""
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, nesterov=True)
    own, plain = [], []
    for i in range(pairs + 2):
        for fn, out in ((pytorch_depthwise, plain), (depthwise_conv2d, own)):
            elastic.depthwise_conv2d = fn
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(net(x, cfg), y).backward()
            optimizer.step()
            if i >= 2:
                out.append(time.perf_counter() - start)
    elastic.depthwise_conv2d = depthwise_conv2d
    return plain, own


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--batch", type=int, help="default: train.batch_size")
    parser.add_argument("--pairs", type=int, default=10, help="measured runs of each side")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    params = read_params(parser, args.params, args.set)
    shape, classes = native_input(params)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch = args.batch or params.train.batch_size
    net = build_net(params, shape, [str(k) for k in range(classes)]).to(memory_format=torch.channels_last).train()
    x = torch.randn(batch, *shape).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,))
    print(f"{params.data.dataset} {'x'.join(map(str, shape))}, batch {batch}, {args.threads} threads, "
          f"medians of {args.pairs} runs")
    print("\ndepthwise conv of the max config (forward + backward)   PyTorch ms   library ms   speed-up")
    for s in sorted(set(conv_shapes(net, net.max_config(), x)), key=lambda s: (-s[1], s[3])):
        plain = _median_ms(time_conv(pytorch_depthwise, s, batch, args.pairs))
        own = _median_ms(time_conv(depthwise_conv2d, s, batch, args.pairs))
        wide = "  (kernel wider than the map)" if s[3] > min(s[1], s[2]) else ""
        print(f"  {s[0]:4d} channels {s[1]}x{s[2]}, kernel {s[3]}, stride {s[4]}{wide:30s}"
              f"{plain:9.1f} {own:12.1f} {plain / own:9.2f}x")
    print("\ntraining step of the supernet   PyTorch ms/step (img/s)   library ms/step (img/s)   ratio of pairs")
    for name, cfg in (("min", net.min_config()), ("max", net.max_config())):
        plain, own = time_steps(net, cfg, x, y, args.pairs)
        ratio = statistics.median(p / o for p, o in zip(plain, own))
        p, o = _median_ms(plain), _median_ms(own)
        print(f"  {name:4s}{p:30.0f} ({1000 * batch / p:5.0f}){o:19.0f} ({1000 * batch / o:5.0f}){ratio:17.2f}x")


if __name__ == "__main__":
    main()
