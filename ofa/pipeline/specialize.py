"""Stage specialize: the most accurate subnet within each budget, searched on val, reported on test, exported.

Every candidate is scored on the validation split after re-calibrating its batch norm; its cost is
``OFANet.macs`` (exact, no tracing), or with specialize.cost latency the latency table's prediction
(models/latency_table.json, from the latency stage), budgets then in milliseconds per batch. specialize.strategy
chooses how candidates are found (``ofa.pipeline.strategy``): direct NSGA-II on real scores, or NSGA-II on an
accuracy predictor fitted on a scored sample, its best predicted configs verified for real. Either way the
uniform grid is scored, and for each budget the pick is the most accurate config scored for real within it,
beside it the best uniform config within the same budget, so the pick is never worse on val. Only the picks are
evaluated on test. Each pick is exported as ONNX (raw pixels in, normalisation inside) and as a saved subnet;
every reported config records its MACs and its predicted latency, and each pick its measured latency here (its
ONNX model on onnxruntime; with latency.runtime torch, its module too). The real scores and the direct search's
trials stay in .resume/specialize.db: a rerun with other budgets, another strategy or number of trials, or other
params of other stages that leave the checkpoint as it was, reuses them.

With several processes each batch of new configs is dealt out, one config per rank (``distributed.lead`` /
``serve``); rank 0 keeps the search state, picks, tests and exports.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..deploy import (AccuracyPredictor, LatencyTable, export_onnx_many, measure_many, measure_onnx_many, save_subnet,
                      search)
from ..deploy.timing import check_runtime
from ..io import md5_file, replaced_dir, write_json
from ..model import OFANet, Subnet, SubnetConfig
from ..train import DeviceData, calibrate_bn, distributed, evaluate
from . import figures, strategy
from .config import LatencyParams, Params, ParamsError
from .context import METRICS, MODELS, StageContext, architecture
from .latency import TABLE

SPECIALIZED = MODELS / "specialized"
# MACs vs val accuracy: every evaluated config, the Pareto front and the uniform grid (JSON), and search.png
PLOT_DIR = METRICS / "search_plot"


def budget_name(budget: float, cost: str = "macs") -> str:
    """File-name label of a budget: 2500000 MACs -> 'macs-2.5M', 0.25 ms -> 'ms-0.25'."""
    if cost == "latency":
        return "ms-" + f"{budget:.6f}".rstrip("0").rstrip(".")
    return "macs-" + f"{budget / 1e6:.6f}".rstrip("0").rstrip(".") + "M"


def cost_label(cost: str) -> Callable[[float], str]:
    """How the search's progress and the picks print a cost."""
    return (lambda ms: f"{ms:.4f} ms predicted") if cost == "latency" else (lambda m: f"{m / 1e6:.2f}M MACs")


class _Subnets:
    """Subnets of the trained supernet, extracted and BN-calibrated; the reported ones kept, tested once."""

    def __init__(self, net: OFANet, data: DeviceData, calibration: list[torch.Tensor], batch_size: int,
                 table: LatencyTable | None = None) -> None:
        self.net, self.data, self.calibration, self.batch_size, self.table = net, data, calibration, batch_size, table
        self.kept: dict[SubnetConfig, Subnet] = {}
        self.test: dict[SubnetConfig, float] = {}

    def calibrated(self, cfg: SubnetConfig) -> Subnet:
        sub = self.net.extract(cfg)
        calibrate_bn(sub, self.calibration, world=distributed.SINGLE)
        return sub

    def val_accuracy(self, cfg: SubnetConfig) -> float:
        """Val accuracy of cfg, computed by this process alone (several ranks each score their own configs)."""
        return evaluate(self.calibrated(cfg), self.data, batch_size=self.batch_size, split="val",
                        world=distributed.SINGLE)

    def report(self, c: search.Candidate) -> dict[str, Any]:
        """MACs, predicted latency, params, val and test accuracy of a candidate; keeps its calibrated subnet for
        export."""
        if c.config not in self.kept:
            self.kept[c.config] = self.calibrated(c.config)
            self.test[c.config] = evaluate(self.kept[c.config], self.data, batch_size=self.batch_size,
                                           world=distributed.SINGLE)
        predicted = {} if self.table is None else {"predicted_ms": round(self.table.predict(c.config), 5)}
        return {"config": str(c.config), "macs": self.net.macs(c.config, self.data.input_shape), **predicted,
                "params": self.net.num_params(c.config), "val_accuracy": c.accuracy, "accuracy": self.test[c.config]}


class _Timings:
    """Measured latency on this machine of the exported picks: each ONNX model on onnxruntime (raw pixels in, as
    deployed), and with latency.runtime torch its module too, with latency's threads, batch size and hardware;
    all picks timed together in interleaved rounds, so that a slow spell of the machine falls on one round of
    several of them. (The latency stage measured every uniform config whole: metrics/latency_validation.json.)"""

    def __init__(self, lat: LatencyParams, shape: tuple[int, ...]) -> None:
        self.lat, self.shape = lat, shape

    def of(self, picks: dict[SubnetConfig, tuple[Subnet, Path]]) -> dict[SubnetConfig, dict[str, float]]:
        """Each config's timings, from its subnet and its ONNX model's path."""
        lat, configs = self.lat, list(picks)
        timings = [{"measured_onnx_ms": round(ms, 5)} for ms in measure_onnx_many(
            [picks[c][1] for c in configs], self.shape, batch_size=lat.batch_size, threads=lat.threads)]
        if lat.runtime == "torch":
            for t, ms in zip(timings, measure_many([picks[c][0] for c in configs], self.shape, runtime="torch",
                                                   batch_size=lat.batch_size, threads=lat.threads,
                                                   device=lat.hardware)):
                t["measured_torch_ms"] = round(ms, 5)
        return dict(zip(configs, timings))


def specialize(params: Params, root: Path = Path("."), progress: bool = True) -> dict[str, Any] | None:
    """Search, pick per budget, report on test, export; writes metrics/picks.json, specialize.json, search.json and
    models/specialized.

    Returns the picks (metrics/picks.json) on rank 0, None on the other ranks of a job.
    """
    table = load_table(params, root)  # before any work: the budgets in ms fit it, the runtimes are here
    # evaluate_space's calibration images: a uniform config here scores on test as in its Table 2
    ctx = StageContext.open(params, root, "specialize")
    ctx.load("shrink_width")
    net, data, w = ctx.net.eval(), ctx.data, ctx.world
    budgets = params.specialize.budget_values()  # each within the space (MACs: the context checks; ms: above)
    stored = strategy.keys(params, ctx, md5_file(root / TABLE) if params.specialize.cost == "latency" else None)
    subnets = _Subnets(net, data, ctx.calibration, params.train.eval_batch_size, table)
    if not w.main:  # score the configs rank 0 sends, until the search ends
        distributed.serve(subnets.val_accuracy, w)
        return None
    cost = table.predict if params.specialize.cost == "latency" else (lambda cfg: net.macs(cfg, data.input_shape))
    found = strategy.find(params, root, w, net, cost, cost_label(params.specialize.cost), budgets,
                          subnets.val_accuracy, stored, progress)
    if params.specialize.cost == "latency" and any(search.best_within(found.candidates, b) is None for b in budgets):
        fastest = table.fastest()[0]  # a budget no scored config fits: the fastest subnet does (checked above)
        found.add(search.Candidate(fastest, table.predict(fastest), subnets.val_accuracy(fastest),
                                   len(found.candidates)))
    summary = _pick_and_write(params, root, net, data, found, budgets, subnets, progress)
    ctx.write_timing(ctx.timing(search_s=round(found.search_s, 1), configs_scored=found.scored,
                                configs_reused=len(found.candidates) - found.scored))
    return summary  # the scores and the direct search's trials stay in .resume/specialize.db: see ofa.pipeline.strategy


def load_table(params: Params, root: Path) -> LatencyTable:
    """models/latency_table.json, checked against the architecture; ParamsError naming the first budget below the
    fastest subnet's prediction (specialize.cost latency), ValueError naming a runtime that cannot run here."""
    check_runtime("onnxruntime", "cpu")  # the picks' ONNX models are timed on it
    if params.latency.runtime == "torch":
        check_runtime("torch", params.latency.hardware)
    arch, shape = architecture(params, root)
    table = LatencyTable.load(root / TABLE, arch, shape)
    if params.specialize.cost == "latency":
        fastest_config, fastest = table.fastest()
        for i, b in enumerate(params.specialize.budgets):
            if b < fastest:
                raise ParamsError(f"specialize.budgets[{i}]: {b:g} ms is below the fastest subnet's predicted latency "
                                  f"on {params.latency.device} ({fastest_config}: {fastest:.4f} ms); at least "
                                  f"{fastest:.4f}")
    return table


def _pick_and_write(params: Params, root: Path, net: OFANet, data: DeviceData, found: strategy.Found,
                    budgets: list[float], subnets: _Subnets, progress: bool) -> dict[str, Any]:
    """Pick, test, export and time per budget; writes metrics/search.json, its plot data and figure,
    metrics/predictor.json, metrics/picks.json (returned) and the headline metrics/specialize.json."""
    shape, cost, lat, table = data.input_shape, params.specialize.cost, params.latency, subnets.table
    mean, std = data.mean.flatten().tolist(), data.std.flatten().tolist()
    candidates, predictor = found.candidates, found.predicted and found.predicted.predictor
    picks = export_picks(candidates, budgets, subnets, root / SPECIALIZED, shape, mean, std,
                         check_inputs=data.val.images[:16].float().cpu(), progress=progress, cost=cost,
                         timings=_Timings(lat, shape), predictor=predictor)
    front = search.pareto_front(candidates)
    s = params.specialize
    summary = {
        "input_shape": list(shape),
        "input": {"pixels": "float32 (N, C, H, W) in 0..255", "mean": mean, "std": std},
        "classes": net.arch["classes"],  # output i of every exported model is classes[i]
        "cost": cost,  # what the budgets bound: MACs per image, or predicted ms per batch of latency.batch_size
        # the table predicts for latency.device; the measured_* timings are this machine's
        "latency": {"device": lat.device, "table_host": table.host["cpu"], "runtime": table.runtime_version,
                    "threads": lat.threads, "batch_size": lat.batch_size},
        "strategy": s.strategy,  # direct: NSGA-II on real scores; predictor: on predictions, the best verified
        "trials": s.trials if s.strategy == "direct" else s.predictor.trials,
        "configs_evaluated": len(candidates),  # on val, for real
        "pareto_front": len(front),
        "budgets": picks,
    }
    strategy.write_predictor(root, params, found, {b: budget_name(b, cost) for b in budgets},
                             root / PLOT_DIR / "predictor_held_out.json")
    records = write_search(root, candidates, front, net, shape, table, predictor)
    figures.search_scatter(records, picks, root / PLOT_DIR / "search.png", cost)
    write_json(root / METRICS / "picks.json", summary)
    write_json(root / METRICS / "specialize.json", headline(summary))
    return summary


def headline(summary: dict[str, Any]) -> dict[str, float]:
    """The metrics DVC shows: each budget's pick, its test accuracy (metrics/picks.json holds the rest)."""
    return {name: p["accuracy"] for name, p in summary["budgets"].items()}


def export_picks(candidates: list[search.Candidate], budgets: list[float], subnets: _Subnets, out: Path,
                 shape: tuple[int, ...], mean: list[float], std: list[float], check_inputs: torch.Tensor,
                 progress: bool = True, cost: str = "macs", timings: _Timings | None = None,
                 predictor: AccuracyPredictor | None = None) -> dict[str, Any]:
    """Per budget: the pick and the best uniform config within it (None where none fits), both tested and, with
    `timings`, timed; the pick exported under `out`, and `predictor` as out/predictor.pt.

    The exports go to a staging folder that replaces `out` only once every one of them is written and checked.
    Each subnet picked is exported once (up to two at a time, ``export_onnx_many``); budgets that pick the same
    subnet get copies of its files.
    """
    picks, exported, chosen = {}, {}, {}  # exported: config -> the name it is exported under (its first budget's)
    label = cost_label(cost)
    with replaced_dir(out) as staging:
        for budget in budgets:
            name = budget_name(budget, cost)
            pick = search.best_within(candidates, budget)
            uniform = search.best_within(candidates, budget, uniform_only=True)
            chosen[name] = pick, uniform
            picks[name] = {"budget": int(budget) if cost == "macs" else budget, **subnets.report(pick),
                           "uniform": None if uniform is None else subnets.report(uniform)}
            exported.setdefault(pick.config, name)
        diffs = dict(zip(exported, export_onnx_many([(subnets.kept[c], staging / f"{name}.onnx")
                                                     for c, name in exported.items()], shape, mean=mean, std=std,
                                                    check_inputs=check_inputs)))
        for config, name in exported.items():
            save_subnet(subnets.kept[config], staging / f"{name}.pt")
        for name, (pick, _) in chosen.items():
            picks[name]["onnx_max_abs_diff"] = diffs[pick.config]
            if exported[pick.config] != name:
                for suffix in (".onnx", ".pt"):
                    shutil.copyfile(staging / f"{exported[pick.config]}{suffix}", staging / f"{name}{suffix}")
        if timings is not None:  # every export first, then all of them timed together
            timed = timings.of({c: (subnets.kept[c], staging / f"{name}.onnx") for c, name in exported.items()})
            for name, (pick, _) in chosen.items():
                picks[name].update(timed[pick.config])
        if progress:
            for name, (pick, uniform) in chosen.items():
                best = "no uniform config fits" if uniform is None else (
                    f"best uniform {uniform.config} {label(uniform.cost)}, val {uniform.accuracy:.4f}")
                print(f"{name}: {pick.config} {label(pick.cost)}, val {pick.accuracy:.4f}"
                      f"{_measured(picks[name])} ({best})", file=sys.stderr, flush=True)
        if predictor is not None:
            predictor.save(staging / "predictor.pt")
    return picks


def _measured(report: dict[str, Any]) -> str:
    return f", {report['measured_onnx_ms']:.4f} ms measured" if "measured_onnx_ms" in report else ""


def write_search(root: Path, candidates: list[search.Candidate], front: list[search.Candidate], net: OFANet,
                 shape: tuple[int, ...], table: LatencyTable | None = None,
                 predictor: AccuracyPredictor | None = None) -> list[dict]:
    """metrics/search.json (every evaluated config, its records returned) and the scatter's data: all, the Pareto
    front, the uniform grid; each config with its MACs and, with `table`, its predicted milliseconds, with
    `predictor` its predicted val accuracy."""
    on_front = {c.config for c in front}
    guess = {} if predictor is None else dict(zip((c.config for c in candidates),
                                                  predictor.predict([c.config for c in candidates])))
    records = [{"config": str(c.config), "macs": net.macs(c.config, shape),
                **({} if table is None else {"predicted_ms": round(table.predict(c.config), 5)}),
                **({} if predictor is None else {"predicted_accuracy": round(guess[c.config], 6)}),
                "params": net.num_params(c.config), "val_accuracy": c.accuracy, "pareto": c.config in on_front,
                "uniform": c.uniform, "trial": c.trial, "subnet": c.config.to_dict()} for c in candidates]
    write_json(root / METRICS / "search.json", records)
    plotted = ("macs", "predicted_ms", "val_accuracy", "config")
    for name, subset in (("evaluated", records), ("pareto_front", [r for r in records if r["pareto"]]),
                         ("uniform", [r for r in records if r["uniform"]])):
        write_json(root / PLOT_DIR / f"{name}.json", [{k: r[k] for k in plotted if k in r} for r in subset])
    return records


def table(summary: dict[str, Any]):
    """Per budget: the searched pick (its MACs, predicted and measured ms, val and test accuracy) beside the best
    uniform config within the same budget (MACs, predicted ms, val, test); a pandas DataFrame."""
    import pandas as pd

    def ms(p: dict[str, Any], key: str) -> str:
        return f"{p[key]:.3f}" if key in p else "-"

    rows = []
    for name, p in summary["budgets"].items():
        u = p["uniform"] or {}
        rows.append({
            "budget": name, "searched": p["config"], "MACs": f"{p['macs'] / 1e6:.2f}M",
            "ms pred": ms(p, "predicted_ms"), "ms here": ms(p, "measured_onnx_ms"),
            "val": f"{p['val_accuracy']:.4f}", "test": f"{p['accuracy']:.4f}",
            "best uniform": u.get("config", "(none fits)"), "MACs ": f"{u['macs'] / 1e6:.2f}M" if u else "-",
            "ms pred ": ms(u, "predicted_ms"), "val ": f"{u['val_accuracy']:.4f}" if u else "-",
            "test ": f"{u['accuracy']:.4f}" if u else "-",
        })
    return pd.DataFrame(rows)
