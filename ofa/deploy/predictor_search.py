"""A search on an accuracy predictor: score a sample for real, fit, search thousands of configs on the predictions,
verify the few that matter.

1. The uniform grid and `samples` random configs (distinct, none uniform; drawn from `seed`) are scored for real.
2. An ``AccuracyPredictor`` is fitted on the grid and the random configs but a held-out share of them, whose real
   scores give its Kendall tau and RMSE; the held-out configs are never fitted on.
3. NSGA-II (``search.search``, in memory) runs `trials` trials on (predicted accuracy, cost).
4. Per budget, the `verify` configs NSGA-II saw with the highest predicted accuracy within it are scored for real.
5. Per budget, the pick is the most accurate config scored for real within it (``search.best_within`` on
   ``candidates``): a verified one, or a sample or uniform config that scored higher. So it is never worse on
   the search split than the best uniform config within the budget.

Real scores go through ``score_many``; the stage memoises them (``search.ScoreMemo``), so a killed search resumes
without scoring a finished config again, and every step after the scoring is deterministic from `seed`: a resumed
search fits the same predictor, proposes the same configs and picks the same.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..model import ConfigSpace, SubnetConfig
from . import search
from .latency import kendall_tau
from .predictor import AccuracyPredictor

DRAWS_PER_SAMPLE = 100  # random draws per wanted sample before a small space is taken to hold no more


@dataclass
class PredictorSearch:
    """What a predictor search found: every config scored for real, the predictor and how well it did."""

    candidates: list[search.Candidate]  # every config scored for real, in scoring order (`trial` its index)
    predictor: AccuracyPredictor
    fitted: list[SubnetConfig]
    held_out: list[dict[str, Any]]  # config, predicted and measured accuracy of each held-out config
    kendall_tau: float | None  # on the held-out configs (None for fewer than 2)
    rmse_points: float  # on the held-out configs, in accuracy points
    searched: int  # distinct configs NSGA-II predicted
    search_s: float  # the NSGA-II search on predictions, seconds
    verified: dict[float, list[dict[str, Any]]] = field(default_factory=dict)  # per budget: config, predicted, measured

    def predicted(self, cfg: SubnetConfig) -> float:
        return self.predictor.predict([cfg])[0]


def held_out_count(samples: int, share: float) -> int:
    """Random samples held out of the fit: `share` of them, at least 1, leaving at least 1 to fit on."""
    return min(max(1, round(share * samples)), samples - 1)


def draw_samples(space: ConfigSpace, num_units: int, samples: int, seed: int) -> list[SubnetConfig]:
    """`samples` distinct random configs, none uniform (fewer if the space holds fewer), the same for a seed."""
    rng, drawn = random.Random(seed), {}
    for _ in range(DRAWS_PER_SAMPLE * samples):
        if len(drawn) == samples:
            break
        cfg = space.sample(num_units, rng)
        if cfg.uniform_values() is None:
            drawn.setdefault(cfg, None)
    return list(drawn)


def predictor_search(
    space: ConfigSpace,
    num_units: int,
    score_many: Callable[[list[SubnetConfig]], list[float]],
    cost: Callable[[SubnetConfig], float],
    budgets: Sequence[float],
    *,
    samples: int,
    held_out: float,
    trials: int,
    verify: int,
    population: int,
    kind: str = "ridge",
    seed: int = 0,
    batch: int = 1,
    memo: search.ScoreMemo | None = None,
    progress: bool = True,
    cost_label: Callable[[float], str] = lambda c: f"{c / 1e6:.2f}M MACs",
) -> PredictorSearch:
    """Score, fit, search on predictions, verify per budget (the module's steps); `score_many` scores configs
    for real, `batch` at a time (several processes: one each), those in `memo` not again."""
    uniform = space.uniform_grid(num_units)
    drawn = draw_samples(space, num_units, samples, seed)
    if len(drawn) < 2:
        raise ValueError(f"samples: the space holds {len(drawn)} non-uniform configs; at least 2 to fit and hold out")
    n_held = held_out_count(len(drawn), held_out)
    scored: dict[SubnetConfig, float] = {}
    real = _RealScores(score_many, cost, batch, memo if memo is not None else search.ScoreMemo(None, ""), progress, cost_label, scored)
    real.score(uniform + drawn, "sample")
    fitted, held = uniform + drawn[:-n_held], drawn[-n_held:]
    predictor = AccuracyPredictor(space, num_units, kind, seed=seed).fit(fitted, [scored[c] for c in fitted])
    predictions = predictor.predict(held)
    records = [{"config": str(c), "predicted": round(p, 6), "measured": scored[c], "subnet": c.to_dict()}
               for c, p in zip(held, predictions)]
    errors = [(p - scored[c]) ** 2 for c, p in zip(held, predictions)]
    tau = kendall_tau(predictions, [scored[c] for c in held]) if len(held) >= 2 else None
    rmse = 100 * (sum(errors) / len(errors)) ** 0.5
    if progress:
        print(f"predictor: {kind} fitted on {len(fitted)} configs; on {len(held)} held out: Kendall tau "
              f"{'-' if tau is None else f'{tau:.3f}'}, RMSE {rmse:.2f} points", file=sys.stderr, flush=True)
    start = time.perf_counter()
    on_predictions = nsga2_on(predictor, space, num_units, cost, trials=trials, population=population, seed=seed)
    search_s = time.perf_counter() - start
    if progress:
        print(f"predictor: NSGA-II on predictions, {trials} trials, {len(on_predictions)} distinct configs in "
              f"{search_s:.1f} s", file=sys.stderr, flush=True)
    result = PredictorSearch([], predictor, fitted, records, tau, rmse, len(on_predictions), search_s)
    for budget in budgets:
        best = sorted((c for c in on_predictions if c.cost <= budget), key=lambda c: (-c.accuracy, c.cost, c.trial))
        chosen = [c.config for c in best[:verify]]
        real.score(chosen, f"verify {cost_label(budget)}")
        result.verified[budget] = [{"config": str(c), "predicted": round(p.accuracy, 6), "measured": scored[c],
                                    "subnet": c.to_dict()} for c, p in zip(chosen, best)]
    result.candidates = real.candidates
    return result


def nsga2_on(predictor: AccuracyPredictor, space: ConfigSpace, num_units: int, cost: Callable[[SubnetConfig], float],
             *, trials: int, population: int, seed: int) -> list[search.Candidate]:
    """`trials` NSGA-II trials on (predicted accuracy, cost), the uniform configs first, in memory with one sampler
    (``search.search`` seeds a sampler per trial so that a stored search resumes exactly; over thousands of
    trials that recomputes the search space each time); every distinct config, its accuracy the prediction."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=optuna.samplers.NSGAIISampler(population_size=population, seed=seed))
    for cfg in space.uniform_grid(num_units):
        study.enqueue_trial(search.to_params(cfg, space))
    dists = search.distributions(space, num_units)
    seen: dict[SubnetConfig, search.Candidate] = {}
    for n in range(trials):
        trial = study.ask(dists)
        cfg = search.from_params(trial.params, space, num_units)
        if cfg not in seen:
            seen[cfg] = search.Candidate(cfg, float(cost(cfg)), predictor.predict([cfg])[0], n)
        study.tell(trial, [seen[cfg].accuracy, seen[cfg].cost])
    return list(seen.values())


class _RealScores:
    """Real scores, `batch` new configs a `score_many` call, each config once, those in `memo` from it; the
    candidates in the order asked."""

    def __init__(self, score_many: Callable[[list[SubnetConfig]], list[float]], cost: Callable[[SubnetConfig], float],
                 batch: int, memo: search.ScoreMemo, progress: bool, cost_label: Callable[[float], str],
                 scored: dict[SubnetConfig, float]):
        self.score_many, self.cost, self.batch, self.memo = memo.memoised(score_many), cost, batch, memo
        self.progress, self.label, self.scored, self.candidates = progress, cost_label, scored, []

    def score(self, cfgs: list[SubnetConfig], what: str) -> None:
        todo = [c for c in dict.fromkeys(cfgs) if c not in self.scored]
        new = [c for c in todo if c not in self.memo]
        if self.progress and todo:
            print(f"{what}: {len(todo)} configs to score for real, {len(todo) - len(new)} of them stored",
                  file=sys.stderr, flush=True)
        start = time.perf_counter()
        for i in range(0, len(new), self.batch):
            part = new[i:i + self.batch]
            for j, (cfg, accuracy) in enumerate(zip(part, self.score_many(part)), i + 1):
                if self.progress:
                    rate = (time.perf_counter() - start) / j
                    print(f"{what} {j}/{len(new)}: {cfg} {self.label(self.cost(cfg))}, accuracy {accuracy:.4f} "
                          f"[{rate:.1f} s/config]", file=sys.stderr, flush=True)
        for cfg, accuracy in zip(todo, self.score_many(todo)):  # in the order asked: the same after a resume
            self.scored[cfg] = float(accuracy)
            self.candidates.append(search.Candidate(cfg, float(self.cost(cfg)), float(accuracy), len(self.candidates)))
