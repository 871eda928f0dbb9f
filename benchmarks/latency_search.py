"""Latency budgets: the latency search's pick against the MACs search's and the best uniform config, all timed here.

    python benchmarks/latency_search.py --macs-search saved/search.json [--root .]

Run in a project where specialize has just run with ``specialize.cost: latency`` (its metrics/picks.json holds
the latency picks), after a run with ``specialize.cost: macs`` whose metrics/search.json was saved aside
(`--macs-search`). For each latency budget it sets side by side, each with its measured latency (its ONNX
model on onnxruntime, with latency's threads and batch size), val and test accuracy:

- the latency search's pick (metrics/picks.json; its prediction fits the budget, its measurement may not);
- the MACs search's most accurate config whose measured latency fits: every config on its Pareto front is
  timed here, whole, as deployed;
- the best uniform config whose measured latency fits (the latency stage timed each one:
  metrics/latency_validation.json).

Test accuracies come from the trained supernet as specialize computes them (the same BN calibration images),
so the rows compare with the stage's own.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ofa.deploy import export_onnx, measure_onnx, search  # noqa: E402
from ofa.model import SubnetConfig  # noqa: E402
from trained import add_project_options, open_trained  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--macs-search", type=Path, required=True, help="metrics/search.json of a MACs search")
    add_project_options(parser, overrides=False)
    args = parser.parse_args()
    root = args.root
    picks = json.loads((root / "metrics" / "picks.json").read_text())
    if picks["cost"] != "latency":
        sys.exit(f"error: {root / 'metrics/picks.json'}: a MACs search's picks; run specialize with "
                 "specialize.cost latency first")
    checked = json.loads((root / "metrics" / "latency_validation.json").read_text())
    uniform_ms = {r["config"]: r["measured_ms"] for r in checked["records"] if r["uniform"]}
    macs_search = json.loads(args.macs_search.read_text())
    searched = {r["config"]: r for r in macs_search}  # config string -> its record (MACs, val, per-block config)

    trained = open_trained(parser, args)
    params, ctx, subnets = trained.params, trained.ctx, trained.subnets
    shape, lat = ctx.data.input_shape, params.latency
    mean, std = ctx.data.mean.flatten().tolist(), ctx.data.std.flatten().tolist()

    def measured(config: str) -> float:
        sub = ctx.net.extract(SubnetConfig.from_dict(searched[config]["subnet"]))
        with tempfile.TemporaryDirectory() as tmp:
            export_onnx(sub.eval(), Path(tmp) / "m.onnx", shape, mean=mean, std=std)
            return measure_onnx(Path(tmp) / "m.onnx", shape, batch_size=lat.batch_size, threads=lat.threads)

    front = [r for r in macs_search if r["pareto"]]
    front_ms = {r["config"]: measured(r["config"]) for r in front}
    print(f"{checked['runtime']}, {lat.threads} thread(s), batch {lat.batch_size}, {checked['host']}; the MACs "
          f"search's Pareto front: {len(front)} configs timed whole")

    def test(config: str) -> float:
        cfg = SubnetConfig.from_dict(searched[config]["subnet"])
        return subnets.report(search.Candidate(cfg, 0.0, searched[config]["val_accuracy"], 0))["accuracy"]

    print("| budget (ms) | what | config | MACs | measured ms | fits, measured | val | test |")
    print("|---|---|---|---:|---:|---|---:|---:|")
    for name, p in picks["budgets"].items():
        budget = p["budget"]
        rows = [("latency search", p["config"], p["macs"], p["measured_onnx_ms"], p["val_accuracy"], p["accuracy"])]
        fits = [r for r in front if front_ms[r["config"]] <= budget]
        best = max(fits, key=lambda r: r["val_accuracy"], default=None)
        rows.append(("MACs search, fits measured", *((best["config"], best["macs"], front_ms[best["config"]],
                     best["val_accuracy"], test(best["config"])) if best else ("(none fits)", 0, 0, 0, 0))))
        best_u = max((c for c, ms in uniform_ms.items() if ms <= budget),
                     key=lambda c: searched[c]["val_accuracy"], default=None)
        rows.append(("best uniform, fits measured", *((best_u, searched[best_u]["macs"], uniform_ms[best_u],
                                                        searched[best_u]["val_accuracy"], test(best_u))
                                                       if best_u else ("(none fits)", 0, 0, 0, 0))))
        for what, config, macs, ms, v, t in rows:
            fits = "yes" if 0 < ms <= budget else "no" if ms else ""
            print(f"| {budget:g} | {what} | `{config}` | {macs / 1e6:.2f}M | {ms:.4f} | {fits} | {v:.4f} | {t:.4f} |")


if __name__ == "__main__":
    main()
