"""How specialize finds its candidates (specialize.strategy): every scored config a real score, or a predictor's.

- ``direct``: NSGA-II (``ofa.deploy.search``) scores every trial's config for real on val. Its trials are stored
  in .resume/specialize.db under ``search_key``: other budgets or more trials reuse them.
- ``predictor``: ``ofa.deploy.predictor_search``: a sample scored for real, an ``AccuracyPredictor`` fitted on
  it, NSGA-II on the predictions for thousands of trials, the best predicted configs per budget verified.

Both score through a ``search.ScoreMemo`` in the same storage, keyed by what a real score depends on
(``score_values``): a switch of strategy, or of cost, scores none of the configs either has scored again, and a
killed search resumes without scoring a finished config twice. With several processes each batch of new configs
is dealt out, one config per rank (``distributed.lead``); rank 0 runs the strategy.
"""

from __future__ import annotations

import functools
import hashlib
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..deploy import search
from ..deploy.predictor_search import PredictorSearch, predictor_search
from ..io import write_json
from ..model import OFANet, SubnetConfig
from ..train import distributed, select_device
from .config import Params
from .context import METRICS, RESUME, StageContext, resume_key

STORAGE = RESUME / "specialize.db"  # the direct search's trials and every real score
PREDICTOR = METRICS / "predictor.json"  # the predictor's counts, held-out tau and RMSE, its held-out records


@dataclass
class Found:
    """A strategy's result: every config scored for real (a `Candidate` each, its accuracy on val), how many this
    run scored, the search's seconds, and with the predictor strategy its search."""

    candidates: list[search.Candidate]
    scored: int
    search_s: float
    predicted: PredictorSearch | None = None

    def add(self, candidate: search.Candidate) -> None:
        """A config scored after the search (the fastest subnet where no scored config fits a latency budget)."""
        self.candidates.append(candidate)
        self.scored += 1


def keys(params: Params, ctx: StageContext, table_md5: str | None) -> tuple[str, str]:
    """The stored scores' key and the direct search's (``score_values``, ``search_values``), checked the same on
    every rank: call it on every rank, before any serves."""
    return ctx.key(score_values(params)), ctx.key(search_values(params, table_md5))


def find(params: Params, root: Path, w: distributed.World, net: OFANet, cost: Callable[[SubnetConfig], float],
         cost_label: Callable[[float], str], budgets: list[float], val_accuracy: Callable[[SubnetConfig], float],
         stored: tuple[str, str], progress: bool) -> Found:
    """Rank 0's search by specialize.strategy, the scores and trials `stored` under the two ``keys``; each batch of
    new configs is scored by every rank (their ``distributed.serve`` ends here)."""
    s = params.specialize
    why = search.discard_unreadable(root / STORAGE)
    if why is not None:
        print(f"specialize: {STORAGE} was unreadable ({why}); removed, the search starts afresh", file=sys.stderr,
              flush=True)
    memo = search.ScoreMemo(root / STORAGE, stored[0])
    scored: list[SubnetConfig] = []  # by this run

    def score(cfgs: list[SubnetConfig]) -> list[float]:
        scored.extend(cfgs)
        return distributed.lead(val_accuracy, cfgs, w)

    start = time.perf_counter()
    try:
        if s.strategy == "predictor":
            p = s.predictor
            predicted = predictor_search(
                net.space, net.num_units, score, cost, budgets, samples=p.samples, held_out=p.held_out,
                trials=p.trials, verify=p.verify, population=p.population(params.search_population()), kind=p.kind,
                seed=params.seed, batch=w.size, memo=memo, progress=progress, cost_label=cost_label)
            candidates = predicted.candidates
        else:
            predicted = None
            candidates = search.search(
                net.space, net.num_units, val_accuracy, cost, cost_label=cost_label, trials=s.trials,
                population=params.search_population(), seed=params.seed, storage=root / STORAGE,
                progress=progress, key=stored[1], batch=w.size,
                evaluate_many=memo.memoised(score))
    finally:
        memo.close()
    distributed.dismiss(w)  # (were the search to fail, rank 0's exit would make the launcher stop the others)
    return Found(candidates, len(scored), time.perf_counter() - start, predicted)


def write_predictor(root: Path, params: Params, found: Found, budget_names: dict[float, str],
                    plot: Path) -> dict[str, Any]:
    """metrics/predictor.json: with the predictor strategy its counts, held-out tau and RMSE and records, and per
    budget the verified configs (predicted, measured); with direct, the strategy alone and no records. `plot`
    gets the held-out records as a plain list, the scatter's series (empty with direct: DVC shows no plot for an
    empty list, where an empty list inside an object is an error)."""
    p = found.predicted
    if p is None:
        summary: dict[str, Any] = {"strategy": "direct", "records": []}
    else:
        q = params.specialize.predictor
        summary = {
            "strategy": "predictor", "kind": q.kind, "fitted": len(p.fitted), "held_out": len(p.held_out),
            "kendall_tau": None if p.kendall_tau is None else round(p.kendall_tau, 4),
            "rmse_points": round(p.rmse_points, 3), "search_trials": q.trials, "searched_configs": p.searched,
            "search_s": round(p.search_s, 2), "real_evaluations": len(found.candidates),
            "verified": {budget_names[b]: v for b, v in p.verified.items()},
            "records": p.held_out,  # every held-out config: predicted and measured val accuracy
        }
    write_json(plot, summary["records"])
    write_json(root / PREDICTOR, summary)
    return summary


def score_values(params: Params) -> dict[str, Any]:
    """What a config's real score depends on besides the stage's inputs (the data and the checkpoint, which
    carry what the other stages' params did to them): the key of the stored scores. Not the strategy, the cost
    or the search's settings, which choose configs without changing a score. The code that scores is in it too
    (``code_version``): a changed library scores afresh."""
    t = params.train
    return {"seed": params.seed, "space": asdict(params.space), "net": asdict(params.net),
            "device": select_device(t.device).type, "eval_batch_size": t.eval_batch_size,  # auto: the one it was
            "bn_calibration_images": params.evaluate.bn_calibration_images, "code": code_version()}


def search_values(params: Params, table_md5: str | None = None) -> dict[str, Any]:
    """What the direct search's stored trials are keyed by: ``score_values``, the sampler's population and the
    cost (with specialize.cost latency the table's, `table_md5`).

    Not specialize.budgets or .trials (neither changes a trial), nor the params of other stages: a search
    survives, say, a change of evaluate.finetune that leaves the checkpoint as it was.
    """
    return {**score_values(params), "population": params.search_population(), "cost": params.specialize.cost,
            "table": table_md5}


def search_key(params: Params, inputs: list[Path]) -> str:
    """The stored direct search's key for these inputs (``search_values``)."""
    return resume_key(search_values(params), "specialize", inputs)


@functools.cache
def code_version() -> str:
    """Digest of this library's sources and the torch and optuna versions: what a stored trial's score and the
    sampler's proposals were computed with."""
    import optuna

    h = hashlib.sha256(f"torch {torch.__version__} optuna {optuna.__version__}".encode())
    library = Path(__file__).parents[1]  # the whole ofa package
    for source in sorted(library.rglob("*.py")):
        h.update(str(source.relative_to(library)).encode() + b"\0" + source.read_bytes())
    return h.hexdigest()
