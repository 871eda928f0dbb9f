"""specialize's two strategies at the same number of real evaluations: the predictor search's picks against the
direct search's, per budget, on val and test.

    python benchmarks/strategies.py [--settings 20:3 100:5] [--root .] [-S key=value ...]

Run in a project where shrink_width has run (its checkpoint and data/prepared), with the params it ran with
(`-S` overrides of params.yaml, as `dvc exp run -S` takes them: the Makefile's QUICK_PARAMS for the quick
profile). Each setting SAMPLES:VERIFY runs the predictor strategy (``ofa.deploy.predictor_search``, with
specialize.predictor's kind, held-out share and trials) and counts the configs it scored for real, N; then the
direct search (``ofa.deploy.search``) runs until it has scored N distinct configs. Both score as specialize does
(BN re-calibrated on its images, val accuracy), through one score memo in .resume/strategies_bench.db keyed by
the checkpoint, so a config both strategies see is scored once and a rerun scores nothing twice. Each pick and
the best uniform config within each budget are then evaluated on test. A larger setting's samples and direct
trials extend a smaller one's (the same seed), so only the new ones cost anything.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ofa.deploy import search  # noqa: E402
from ofa.deploy.predictor_search import predictor_search  # noqa: E402
from ofa.io import md5_file  # noqa: E402
from ofa.pipeline import specialize  # noqa: E402
from trained import add_project_options, open_trained  # noqa: E402

STORAGE = Path(".resume") / "strategies_bench.db"


def setting(text: str) -> tuple[int, int]:
    samples, _, verify = text.partition(":")
    try:
        return int(samples), int(verify)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: SAMPLES:VERIFY, two integers (e.g. 100:5)") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", type=setting, nargs="+", default=[(20, 3), (100, 5)],
                        help="SAMPLES:VERIFY of each predictor search (default: 20:3 100:5)")
    add_project_options(parser)
    args = parser.parse_args()
    root = args.root
    trained = open_trained(parser, args)
    params, net, data, subnets = trained.params, trained.ctx.net, trained.ctx.data, trained.subnets
    key = md5_file(trained.checkpoint)
    space, units, p = net.space, net.num_units, params.specialize.predictor
    budgets = params.specialize.budget_values()
    if params.specialize.cost != "macs":
        parser.error("specialize.cost: latency is not compared here (macs: the budgets are MACs)")
    cost = lambda cfg: net.macs(cfg, data.input_shape)  # noqa: E731
    memo = search.ScoreMemo(root / STORAGE, key)
    def scored_with(calls: list):
        def score(cfgs):
            calls.extend(c for c in cfgs if c not in memo)
            return memo.memoised(lambda new: [subnets.val_accuracy(c) for c in new])(cfgs)
        return score

    rows, fits = [], []
    for samples, verify in args.settings:
        start, calls = time.perf_counter(), []
        found = predictor_search(space, units, scored_with(calls), cost, budgets, samples=samples,
                                 held_out=p.held_out, trials=p.trials, verify=verify,
                                 population=p.population(params.search_population()), kind=p.kind,
                                 seed=params.seed, memo=None, progress=True)
        n = len(found.candidates)
        fits.append((f"{samples}:{verify}", n, len(found.fitted), len(found.held_out), found.kendall_tau,
                     found.rmse_points, found.searched, found.search_s))
        print(f"predictor {samples}:{verify}: {n} configs scored for real ({len(calls)} new, "
              f"{time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
        trials, direct = n, []
        while len(direct) < n:  # trials that land on a config seen before score nothing: go on until n configs
            direct = search.search(space, units, None, cost, trials=trials, population=params.search_population(),
                                   seed=params.seed, storage=root / STORAGE, key=f"direct {key}", progress=False,
                                   evaluate_many=scored_with(calls))
            trials += n - len(direct)
        direct = direct[:n]
        for budget in budgets:
            for name, cands in ((f"predictor {samples}:{verify}", found.candidates), ("direct", direct),
                                ("best uniform", [c for c in found.candidates if c.uniform])):
                c = search.best_within(cands, budget)
                rows.append((specialize.budget_name(budget), n, name, str(c.config), c.cost, c.accuracy,
                             subnets.report(c)["accuracy"]))
    print("| samples:verify | real evaluations | fitted on | held out | Kendall tau | RMSE (points) | "
          "configs searched | search s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for setting_, n, fitted, held, tau, rmse, searched, secs in fits:
        tau = "n/a" if tau is None else f"{tau:.3f}"
        print(f"| {setting_} | {n} | {fitted} | {held} | {tau} | {rmse:.2f} | {searched} | {secs:.1f} |")
    print()
    print("| budget | real evaluations | strategy | pick | MACs | val | test |")
    print("|---|---:|---|---|---:|---:|---:|")
    for budget, n, name, config, macs, val, acc in rows:
        print(f"| {budget} | {n} | {name} | `{config}` | {macs / 1e6:.2f}M | {val:.4f} | {acc:.4f} |")
    memo.close()


if __name__ == "__main__":
    main()
