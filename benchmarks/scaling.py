"""Data-parallel scaling: images/s of a shrink_width training stage with 1, 2, ... processes, and the all-reduce.

    python benchmarks/scaling.py                       # 1 and 2 processes, the quick profile's net, CPU (gloo)
    python benchmarks/scaling.py --processes 1 2 4 8 --net default --device cuda   # a machine's GPUs (NCCL)

Each run launches its processes as the stages do (``ofa.train.launch.launch``), trains the supernet as
shrink_width does (kernel, depth and width sampled, `--subnets` subnets per step, summed, distilled from a
frozen full-network teacher unless `--kd-ratio 0`) on random images
of the net's input shape for two epochs of `--steps` steps, and reports the second epoch: images/s over all
ranks and the speed-up over one process (no timing inside it, so no host syncs training does not make), and
from the first epoch (its first step left out) the median time per step spent in the gradient all-reduce
(``distributed.average_gradients``, synchronised on CUDA around it), with the share of the reduced gradient that
belongs to parameters the step's subnets did not use (sent as zeros). The global batch is `--batch-size`
at every process count, as in training. `--ddp` adds, for each process count above 1, the same training
through DistributedDataParallel with find_unused_parameters=True instead (one all-reduce per subnet's
backward, overlapped with it, after a search of the autograd graph for unused parameters), for comparison.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ofa import ConfigSpace, OFANet, UnitSpec
from ofa import data as data_mod
from ofa.train import DeviceData, Schedule, distributed, fit, launch, select_device

NETS = {  # (input shape, macro structure)
    "quick": ((1, 28, 28), dict(units=[UnitSpec(16, 2, "relu", False), UnitSpec(32, 1, "relu", True),
                                       UnitSpec(48, 2, "hswish", True)], stem_channels=16, stem_stride=2,
                                final_channels=256)),
    "default": ((3, 32, 32), {}),  # params.yaml's CIFAR-10 supernet
}


def worker(args: argparse.Namespace) -> None:
    with distributed.process_group(args.device) as w:
        device = distributed.device(select_device(args.device))
        shape, structure = NETS[args.net]
        torch.manual_seed(0)
        net = OFANet(ConfigSpace(kernel=(5, 7), depth=(2, 3), width=(2, 4)), shape[0], 10, **structure)
        net = net.to(device, memory_format=torch.channels_last)
        n = args.steps * args.batch_size
        g = torch.Generator().manual_seed(0)
        split = data_mod.Split(torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g),
                               torch.randint(0, 10, (n,), generator=g))
        move = lambda s: data_mod.Split(s.images.to(device), s.labels.to(device))  # noqa: E731
        data = DeviceData(move(split), move(split), move(split), torch.full((1, shape[0], 1, 1), 128.0, device=device),
                          torch.full((1, shape[0], 1, 1), 64.0, device=device), device)
        reduce_s, sent, unused = [], [], []
        real = distributed.average_gradients

        def timed(params, world):  # the all-reduce of every step: timed in the first epoch only
            sent.append(sum(p.numel() for p in params))
            unused.append(sum(p.numel() for p in params if p.grad is None))
            if len(sent) > args.steps:  # the measured epoch: no host syncs but training's own (on CUDA)
                return real(params, world)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            real(params, world)
            if device.type == "cuda":
                torch.cuda.synchronize()
            reduce_s.append(time.perf_counter() - start)

        distributed.average_gradients = timed
        model = net
        if args.ddp and w.active:  # DDP reduces in backward: the project's all-reduce is not used
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(net, find_unused_parameters=True)
            distributed.average_gradients = lambda params, world: None
        schedule = Schedule(epochs=2, lr=0.01, batch_size=args.batch_size, warmup_epochs=0.0)
        # the shrink stages' teacher: the full network, frozen, batch norm in train mode (shrink.teacher_bn)
        teacher = net.extract(net.max_config()).requires_grad_(False) if args.kd_ratio > 0 else None
        history = fit(model, data, schedule, progress=False, reduce="sum", teacher=teacher, kd_ratio=args.kd_ratio,
                      sample=lambda rng: [net.sample_config(rng) for _ in range(args.subnets)])
        second = history[1]
        steps = args.steps
        if w.main:
            Path(args.json).write_text(json.dumps({
                "processes": w.size, "images_per_s": second.images / second.seconds,
                "step_ms": 1000 * second.seconds / steps,
                "allreduce_ms": 1000 * statistics.median(reduce_s[1:]) if reduce_s and w.active else None,
                "allreduce_mb": 4 * sent[-1] / 1e6 if sent and w.active else None,
                "unused_share": statistics.mean(u / s for u, s in zip(unused[steps:], sent[steps:]))
                if sent and w.active else None,
                "device": device.type, "ddp": bool(args.ddp and w.active),
            }))


def run(processes: int, args: argparse.Namespace, ddp: bool = False) -> dict | None:
    """One measurement in fresh processes (this one holds no device memory); None if it failed."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        flags = ["--worker", "--json", str(out), "--net", args.net, "--device", args.device, "--steps",
                 str(args.steps), "--batch-size", str(args.batch_size), "--subnets", str(args.subnets),
                 "--kd-ratio", str(args.kd_ratio)]
        flags += ["--ddp"] if ddp else []
        if processes == 1:  # no launcher: the single-process path, as train.processes 1 runs it
            code = subprocess.run([sys.executable, __file__, *flags]).returncode
        else:
            code = launch.launch(processes, __file__, flags)
        return json.loads(out.read_text()) if code == 0 and out.is_file() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--net", choices=list(NETS), default="quick")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--steps", type=int, default=20, help="steps per epoch; the second epoch is measured")
    parser.add_argument("--batch-size", type=int, default=256, help="global batch, at every process count")
    parser.add_argument("--subnets", type=int, default=4, help="sampled subnets per step (shrink_width: 4)")
    parser.add_argument("--kd-ratio", type=float, default=1.0,
                        help="distillation from a frozen full-network teacher, as the shrink stages (0: none)")
    parser.add_argument("--ddp", action="store_true", help="also DistributedDataParallel(find_unused_parameters)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    for p in args.processes:
        if args.batch_size % p:
            parser.error(f"--batch-size {args.batch_size} does not split evenly across {p} processes")
    teacher = f", teacher (kd_ratio {args.kd_ratio:g})" if args.kd_ratio > 0 else ", no teacher"
    print(f"net {args.net}, batch {args.batch_size}, {args.subnets} subnets per step{teacher}, device {args.device}")
    print(f"{'processes':>9} {'reduce':>6} {'images/s':>9} {'speed-up':>8} {'step ms':>8} {'all-reduce ms':>13} "
          f"{'MB':>6} {'unused':>6}", flush=True)
    num = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    base, failed = None, []
    for p, ddp in [(p, ddp) for p in args.processes for ddp in (False, True) if not ddp or (args.ddp and p > 1)]:
        r = run(p, args, ddp)  # each row printed as it comes: a later failure loses nothing
        reduce = "ddp" if ddp else "ours"
        if r is None:
            failed.append(p)
            print(f"{p:>9} {reduce:>6}  failed (its error is above)", flush=True)
            continue
        base = base or r["images_per_s"] / r["processes"]  # per process, of the first count measured
        print(f"{r['processes']:>9} {reduce:>6} {r['images_per_s']:>9.1f} {r['images_per_s'] / base:>8.2f} "
              f"{r['step_ms']:>8.1f} {num(r['allreduce_ms'], '.2f'):>13} {num(r['allreduce_mb'], '.2f'):>6} "
              f"{num(r['unused_share'], '.1%'):>6}  ({r['device']})", flush=True)
    if failed:
        sys.exit(f"failed: {', '.join(f'{p} processes' for p in failed)}")


if __name__ == "__main__":
    main()
