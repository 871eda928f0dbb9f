"""Multi-objective search over per-block subnet configs: maximise an accuracy, minimise a cost (MACs, latency).

Built on optuna's NSGA-II sampler through its ask-and-tell interface. Optuna rather than pymoo because its
SQLite storage keeps every finished trial on disk as it completes, so a killed search resumes where it
stopped (pymoo would need its whole algorithm object pickled), and because enqueued trials put every
uniform config into the first generation. Each block's kernel and width and each unit's depth is one
categorical parameter; the first generation holds every uniform config, the rest comes from NSGA-II's
crossover and mutation. A config is evaluated once: trials that land on a config already scored (inactive
slots of a shallower unit do not change the subnet) reuse its score.

Deterministic from `seed` even across a resume: the sampler of the n-th trial is seeded with (seed, n), so
the same finished trials lead to the same next proposal, and trials asked before a kill are scored when the
search resumes rather than asked again, so a batch (one trial per process) that a kill cut short ends as it
would have.
"""

from __future__ import annotations

import contextlib
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..model import ConfigSpace, SubnetConfig


@dataclass(frozen=True)
class Candidate:
    """One evaluated subnet: its config, cost (MACs, predicted ms), accuracy (on the search split), and whether it is
    uniform."""

    config: SubnetConfig
    cost: float
    accuracy: float
    trial: int  # the first trial that evaluated it (counting completed trials from 0)

    @property
    def uniform(self) -> bool:
        return self.config.uniform_values() is not None


def _name(unit: int, block: int | None, what: str) -> str:
    return f"u{unit}.{what}" if block is None else f"u{unit}.b{block}.{what}"


def distributions(space: ConfigSpace, num_units: int) -> dict[str, Any]:
    """The optuna search space: a categorical depth per unit, kernel and width per block slot."""
    from optuna.distributions import CategoricalDistribution

    dists = {}
    for u in range(num_units):
        dists[_name(u, None, "depth")] = CategoricalDistribution(space.depth)
        for b in range(space.max_depth):
            dists[_name(u, b, "kernel")] = CategoricalDistribution(space.kernel)
            dists[_name(u, b, "width")] = CategoricalDistribution(space.width)
    return dists


def to_params(config: SubnetConfig, space: ConfigSpace) -> dict[str, Any]:
    """Optuna parameters of a config (inactive slots take the smallest choice)."""
    params = {}
    for u in range(config.num_units):
        params[_name(u, None, "depth")] = config.depth[u]
        for b in range(space.max_depth):
            active = b < config.depth[u]
            params[_name(u, b, "kernel")] = config.kernel[u][b] if active else space.kernel[0]
            params[_name(u, b, "width")] = config.width[u][b] if active else space.width[0]
    return params


def from_params(params: dict[str, Any], space: ConfigSpace, num_units: int) -> SubnetConfig:
    """The config an optuna trial's parameters describe."""
    slots = range(space.max_depth)
    return SubnetConfig(
        kernel=[[params[_name(u, b, "kernel")] for b in slots] for u in range(num_units)],
        depth=[params[_name(u, None, "depth")] for u in range(num_units)],
        width=[[params[_name(u, b, "width")] for b in slots] for u in range(num_units)],
    )


def pareto_front(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The candidates no other beats on both objectives (higher accuracy, lower cost), by cost."""
    front: list[Candidate] = []
    for c in sorted(candidates, key=lambda c: (c.cost, -c.accuracy, c.trial)):
        if not front or c.accuracy > front[-1].accuracy:
            front.append(c)
    return front


def best_within(candidates: Sequence[Candidate], budget: float, uniform_only: bool = False) -> Candidate | None:
    """The most accurate candidate costing at most `budget` (ties: the cheaper, then the earlier); None if none fits."""
    fits = [c for c in candidates if c.cost <= budget and (c.uniform or not uniform_only)]
    return min(fits, key=lambda c: (-c.accuracy, c.cost, c.trial), default=None)


BUSY_TIMEOUT_S = 60  # how long a connection to a search's storage waits for another one's lock
KEPT_SEARCHES = 4  # searches one storage holds; opening a new one drops the one used longest ago


def _open_study(storage: Path | None, key: str, fresh: bool = False):
    """The study `key` in `storage` and whether it was stored; a new one (`fresh`: replacing it) otherwise.

    The storage keeps the KEPT_SEARCHES searches used last, so that going back to an earlier experiment's
    checkpoint (other budgets after an experiment in between) finds its search still there.
    """
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    directions = ["maximize", "minimize"]
    if storage is None:
        return optuna.create_study(directions=directions), False
    storage = Path(storage)
    storage.parent.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{storage.resolve()}"
    stored: dict[str, int] = {}  # study name -> when it was last used (a counter)
    if storage.exists():
        try:
            stored = {s.study_name: int(s.user_attrs.get("used", 0))
                      for s in optuna.study.get_all_study_summaries(url, include_best_trial=False)}
        except (SQLAlchemyError, RuntimeError):  # not a database, or another optuna's schema: a lost shortcut
            storage.unlink()
            stored = {}
    used = max(stored.values(), default=0) + 1
    if key in stored and not fresh:
        study, resumed = optuna.load_study(study_name=key, storage=url), True
    else:
        if key in stored:
            optuna.delete_study(study_name=key, storage=url)
            del stored[key]
        for name in sorted(stored, key=stored.get)[: max(0, len(stored) - KEPT_SEARCHES + 1)]:
            optuna.delete_study(study_name=name, storage=url)  # the ones used longest ago
        study, resumed = optuna.create_study(study_name=key, storage=url, directions=directions), False
    study.set_user_attr("used", used)
    return study, resumed


def discard_unreadable(storage: Path) -> str | None:
    """Remove `storage` when it is not a readable SQLite database (a file of something else, a truncated or
    corrupt one): it holds only stored trials and scores, a shortcut, and the search then starts afresh. Why it
    was removed; None when it is readable or absent, or cannot be checked now (locked by another search past
    BUSY_TIMEOUT_S, or not openable: opening it for the search says why)."""
    path = Path(storage).resolve()
    if not path.is_file():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)) as db:
            check = db.execute("PRAGMA quick_check").fetchall()
    except sqlite3.OperationalError:  # locked, or no permission: not evidence of a bad file, so kept
        return None
    except sqlite3.DatabaseError as e:  # "file is not a database", "database disk image is malformed"
        check = [(str(e),)]
    if check == [("ok",)]:
        return None
    path.unlink()
    return "; ".join(str(row[0]) for row in check[:3])


class ScoreMemo:
    """The real scores of configs, kept in a search's SQLite storage beside its trials under `key`: what a score
    depends on, not how the configs were chosen, so a search of another strategy or cost reuses them. Each score
    is committed as it comes, so a killed search scores nothing twice. The storage keeps the scores of the
    KEPT_SEARCHES keys used last; without `storage` they are kept in memory only."""

    def __init__(self, storage: Path | None, key: str) -> None:
        self.key, self.scores = key, {}  # config -> accuracy
        self.db = None
        if storage is None:
            return
        Path(storage).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(Path(storage).resolve(), timeout=BUSY_TIMEOUT_S)
        with self.db:
            self.db.execute("CREATE TABLE IF NOT EXISTS ofa_scores (key TEXT, config TEXT, accuracy REAL, "
                            "PRIMARY KEY (key, config))")
            self.db.execute("CREATE TABLE IF NOT EXISTS ofa_score_keys (key TEXT PRIMARY KEY, used INTEGER)")
            used = self.db.execute("SELECT COALESCE(MAX(used), 0) + 1 FROM ofa_score_keys").fetchone()[0]
            self.db.execute("INSERT OR REPLACE INTO ofa_score_keys VALUES (?, ?)", (key, used))
            old = [k for (k,) in self.db.execute("SELECT key FROM ofa_score_keys ORDER BY used DESC LIMIT -1 OFFSET ?",
                                                   (KEPT_SEARCHES,))]
            for k in old:
                self.db.execute("DELETE FROM ofa_scores WHERE key = ?", (k,))
                self.db.execute("DELETE FROM ofa_score_keys WHERE key = ?", (k,))
        for config, accuracy in self.db.execute("SELECT config, accuracy FROM ofa_scores WHERE key = ?", (key,)):
            self.scores[SubnetConfig.from_json(config)] = accuracy

    def __contains__(self, cfg: SubnetConfig) -> bool:
        return cfg in self.scores

    def __len__(self) -> int:
        return len(self.scores)

    def memoised(self, score_many: Callable[[list[SubnetConfig]], list[float]]
                 ) -> Callable[[list[SubnetConfig]], list[float]]:
        """`score_many`, called only on the configs not scored yet, each new score stored."""

        def scored(cfgs: list[SubnetConfig]) -> list[float]:
            new = list(dict.fromkeys(c for c in cfgs if c not in self.scores))
            if new:
                for cfg, accuracy in zip(new, score_many(new)):
                    self.scores[cfg] = float(accuracy)
                if self.db is not None:
                    with self.db:
                        self.db.executemany("INSERT OR REPLACE INTO ofa_scores VALUES (?, ?, ?)",
                                            [(self.key, c.to_json(), self.scores[c]) for c in new])
            return [self.scores[c] for c in cfgs]

        return scored

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None


def search(
    space: ConfigSpace,
    num_units: int,
    evaluate: Callable[[SubnetConfig], float],
    cost: Callable[[SubnetConfig], float],
    *,
    trials: int,
    population: int,
    seed: int = 0,
    storage: Path | None = None,
    key: str = "search",
    progress: bool = True,
    batch: int = 1,
    evaluate_many: Callable[[list[SubnetConfig]], list[float]] | None = None,
    cost_label: Callable[[float], str] = lambda c: f"{c / 1e6:.2f}M MACs",
) -> list[Candidate]:
    """Run `trials` NSGA-II trials (the first ones every uniform config); every distinct config evaluated, in order.

    `evaluate(cfg)` is the accuracy to maximise, `cost(cfg)` the cost to minimise (`cost_label` prints it). With
    `storage` (an SQLite file) each trial is kept there under `key`, and a later call with the same key continues where the
    last one stopped, with the same result as an uninterrupted call: after a kill; with fewer `trials` (the
    first ones are reused, nothing is evaluated); with more (the search goes on). The n-th trial does not
    depend on `trials`, so `key` need not hold it. With `batch` > 1 that many trials are asked at a time and
    their new configs scored together by `evaluate_many` (several processes: one each); a search of `trials`
    not a multiple of `batch` ended inside a batch, and one with more trials starts afresh.
    """
    uniform = space.uniform_grid(num_units)
    _check_opening(len(uniform), trials, population)
    dists = distributions(space, num_units)
    study, pending, done = _stored_trials(storage, key, dists, trials, batch, progress)
    seen = _completed_candidates(done, space, num_units)
    evaluate_many = evaluate_many or (lambda cfgs: [evaluate(c) for c in cfgs])
    start = time.perf_counter()
    first = len(done)
    while first < trials:
        # a batch is trials [k * batch, (k + 1) * batch): one cut short by a kill is completed, not restarted,
        # so the sampler makes the same proposals as in an uninterrupted run
        asked = _ask_batch(study, pending, first, batch, trials, uniform, space, num_units, dists, population, seed)
        pending = []
        _score_new(asked, first, seen, evaluate_many, cost)
        _tell(study, asked, first, seen, trials, start, len(done), progress, cost_label)
        first += len(asked)
    return sorted(seen.values(), key=lambda c: c.trial)


def _check_opening(uniform_configs: int, trials: int, population: int) -> None:
    """ValueError when `trials` or `population` is smaller than the number of uniform configs opening the search."""
    if trials < uniform_configs:
        raise ValueError(f"trials {trials}: fewer than the {uniform_configs} uniform configs that open the search")
    if population < uniform_configs:
        raise ValueError(f"population {population}: smaller than the {uniform_configs} uniform configs of "
                         "generation 0")


def _completed_candidates(done: list, space: ConfigSpace, num_units: int) -> dict[SubnetConfig, Candidate]:
    """The configs of the completed trials `done`, each with its score under the first trial that asked for it."""
    seen: dict[SubnetConfig, Candidate] = {}
    for i, t in enumerate(done):  # numbered by completed trials: a trial failed by a kill leaves no gap
        cfg = from_params(t.params, space, num_units)
        seen.setdefault(cfg, Candidate(cfg, float(t.values[1]), float(t.values[0]), i))
    return seen


def _ask_batch(study, pending: list, first: int, batch: int, trials: int, uniform: list[SubnetConfig],
               space: ConfigSpace, num_units: int, dists: dict[str, Any], population: int,
               seed: int) -> list[tuple[Any, SubnetConfig]]:
    """The trials of the batch from trial `first` on and their configs: those `pending` first, then newly asked."""
    asked = [(t.number, from_params(t.params, space, num_units)) for t in pending]
    for n in range(first + len(asked), min((first // batch + 1) * batch, trials)):
        trial = _ask(study, n, uniform[n] if n < len(uniform) else None, space, dists, population, seed)
        asked.append((trial, from_params(trial.params, space, num_units)))
    return asked


def _score_new(asked: list[tuple[Any, SubnetConfig]], first: int, seen: dict[SubnetConfig, Candidate],
               evaluate_many: Callable[[list[SubnetConfig]], list[float]],
               cost: Callable[[SubnetConfig], float]) -> None:
    """Score, all in one `evaluate_many` call, the asked configs not in `seen` yet, and add them to it."""
    new: dict[SubnetConfig, int] = {}  # each config not scored yet -> the first trial that asked for it
    for n, (_, cfg) in enumerate(asked, first):
        if cfg not in seen:
            new.setdefault(cfg, n)
    for (cfg, n), accuracy in zip(new.items(), evaluate_many(list(new))):
        seen[cfg] = Candidate(cfg, float(cost(cfg)), float(accuracy), n)


def _tell(study, asked: list[tuple[Any, SubnetConfig]], first: int, seen: dict[SubnetConfig, Candidate],
          trials: int, start: float, resumed: int, progress: bool, cost_label: Callable[[float], str]) -> None:
    """Tell the study each asked trial's score, in order; with `progress` a line per trial on stderr."""
    for n, (trial, cfg) in enumerate(asked, first):
        cand = seen[cfg]
        study.tell(trial, [cand.accuracy, cand.cost])
        if progress:
            rate = (time.perf_counter() - start) / (n + 1 - resumed)
            print(f"search {n + 1}/{trials}: {cfg} {cost_label(cand.cost)}, accuracy {cand.accuracy:.4f}"
                  f"{' (seen)' if cand.trial != n else ''} [{rate:.1f} s/trial]", file=sys.stderr, flush=True)


def _stored_trials(storage: Path | None, key: str, dists: dict[str, Any], trials: int, batch: int,
                   progress: bool) -> tuple[Any, list, list]:
    """The study under `key` in `storage` (new if none), the trials a kill left asked, the completed ones to use."""
    from optuna.trial import TrialState

    study, resumed = _open_study(storage, key)
    pending = _asked_before_a_kill(study, dists)
    done = study.get_trials(deepcopy=False, states=[TrialState.COMPLETE])
    if len(done) < trials and not pending and len(done) % batch:  # ended inside a batch: cannot go on exactly
        (study, resumed), pending, done = _open_study(storage, key, fresh=True), [], []
    stored = len(done)
    if stored >= trials:  # the first `trials` of a longer search are this search
        pending, done = [], done[:trials]
    if resumed and progress:
        print(f"search: reusing the first {trials} of {stored} trials in {storage}" if stored >= trials else
              f"search: resuming after {stored}/{trials} trials from {storage}", file=sys.stderr, flush=True)
    return study, pending, done


def _ask(study, n: int, uniform: SubnetConfig | None, space: ConfigSpace, dists: dict[str, Any], population: int,
         seed: int):
    """Ask for trial `n`: `uniform` (an opening one) unless already queued, else NSGA-II's proposal seeded by (seed, n)."""
    import optuna
    from optuna.trial import TrialState

    if uniform is not None and not study.get_trials(deepcopy=False, states=[TrialState.WAITING]):
        study.enqueue_trial(to_params(uniform, space))
    study.sampler = optuna.samplers.NSGAIISampler(  # numpy's seeds: 0 to 2**32 - 1
        population_size=population, seed=(seed * 1_000_003 + n) % 2**32)
    return study.ask(dists)


def _asked_before_a_kill(study, dists: dict[str, Any]) -> list:
    """The trials a killed search had asked but not told, in order; one killed while being asked is failed."""
    from optuna.trial import TrialState

    asked = []
    for t in sorted(study.get_trials(deepcopy=False, states=[TrialState.RUNNING]), key=lambda t: t.number):
        if set(t.params) == set(dists):
            asked.append(t)
        else:
            study.tell(t.number, state=TrialState.FAIL)
    return asked
