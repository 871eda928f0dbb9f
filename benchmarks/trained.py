"""The trained supernet of a project, opened as specialize opens it: the setup shared by the benchmarks that score
its subnets for real (predictor.py, strategies.py, latency_search.py)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from ofa.pipeline import specialize
from ofa.pipeline.config import Params
from ofa.pipeline.context import StageContext
from schedule import read_params


@dataclass
class Trained:
    params: Params
    ctx: StageContext  # its net holds shrink_width's weights, in eval mode
    checkpoint: Path  # models/shrink_width.pt
    subnets: specialize._Subnets  # extracted, BN-calibrated and scored as specialize does


def add_project_options(parser: argparse.ArgumentParser, overrides: bool = True) -> None:
    """--root (the project) and, with `overrides`, -S KEY=VALUE (dvc exp run -S's syntax)."""
    parser.add_argument("--root", type=Path, default=Path("."), help="the project (default: here)")
    if overrides:
        parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                            help="override a param of the project's params.yaml, in dvc exp run -S's syntax")


def open_trained(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Trained:
    """The project's params (with its -S overrides), specialize's context and shrink_width's checkpoint loaded."""
    params = read_params(parser, args.root / "params.yaml", getattr(args, "set", []))
    ctx = StageContext.open(params, args.root, "specialize")
    checkpoint = ctx.load("shrink_width")
    subnets = specialize._Subnets(ctx.net.eval(), ctx.data, ctx.calibration, params.train.eval_batch_size)
    return Trained(params, ctx, checkpoint, subnets)
