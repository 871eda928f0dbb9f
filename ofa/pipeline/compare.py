"""Stage compare: the baseline's configs trained alone beside the same configs taken from the trained supernet,
and the supernet's whole training beside training every Table 2 config alone.

Per config of metrics/baseline_alone.json: its MACs; its test accuracy trained alone; the supernet subnet's test
accuracy after BN re-calibration (evaluate_space's figure where it evaluated the config, else measured here the
same way, on the same calibration images) and after fine-tuning (where evaluate_space has it); the training
seconds and images of each. The totals set the four training stages' seconds (metrics/timing/) against training
all of Table 2's uniform configs alone: measured for those the baseline trained, projected for the rest
(``PROJECTION``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..data import DataError
from ..io import md5_file, write_json
from ..model import SubnetConfig, macs
from ..train import subnet_accuracy
from . import baseline, figures
from .checkpoint import CheckpointError
from .config import Params
from .context import METRICS, TRAINING_STAGES, StageContext

PROJECTION = ("seconds per training image of the configs trained alone, linear in MACs (least squares; "
              "proportional to MACs when they have one MACs figure), times the images each config trains on")


def compare(params: Params, root: Path = Path("."),
            progress: bool = True) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Write metrics/baseline.json (every config and the totals), its plot's data and figure, and the headline
    metrics/compare.json (the max and min config's accuracy trained alone: `dvc metrics show` sets them under
    evaluate_space's); return both on rank 0, None on the other ranks."""
    alone = _read(root / baseline.RECORDS, "the baseline stage's records (run it first: dvc repro baseline)")
    _check_teacher(alone, root)
    space = {r["config"]: r for r in _read(root / METRICS / "space.json", "evaluate_space's records")}
    timing = {s: _read(root / METRICS / "timing" / f"{s}.json", f"{s}'s timing") for s in TRAINING_STAGES}
    ctx = StageContext.open(params, root, "compare")  # evaluate_space's calibration images
    ctx.load("shrink_width")
    for path in (root / baseline.RECORDS, root / METRICS / "space.json"):
        ctx.depend_on(path)
    ctx.key()  # before any collective: a rank with other params or inputs is named
    supernet = {"train_s": round(sum(t["train_s"] for t in timing.values()), 1),
                "images": alone["schedule"]["images"]}
    rows = []
    for r in alone["records"]:
        cfg = SubnetConfig.from_dict(r["subnet"])
        evaluated = space.get(r["config"])
        accuracy = evaluated["accuracy"] if evaluated else subnet_accuracy(
            ctx.net, cfg, ctx.data, ctx.calibration, params.train.eval_batch_size)  # on every rank: collectives
        rows.append({
            "config": r["config"], "name": r["name"], "macs": r["macs"], "params": r["params"],
            "alone": {k: r[k] for k in ("accuracy", "val_accuracy", "train_s", "images", "epochs")},
            "supernet": {"accuracy": accuracy,
                         "accuracy_finetuned": evaluated["accuracy_finetuned"] if evaluated else None,
                         "from": "evaluate_space" if evaluated else "compare", **supernet},
            "alone_minus_supernet": round(r["accuracy"] - accuracy, 4),
        })
    if not ctx.world.main:
        return None
    table2 = [(str(c), macs(ctx.net.arch, c, ctx.data.input_shape)) for c in ctx.net.uniform_configs()]
    result = {"kd": alone["kd"], "configs": rows, "totals": totals(rows, table2, alone, supernet)}
    write_json(root / METRICS / "baseline.json", result)
    write_json(root / METRICS / "baseline_plot.json", [  # dvc plots' series: a plain list
        {"config": r["config"], "macs": r["macs"], "trained_alone": r["alone"]["accuracy"],
         "supernet_subnet": r["supernet"]["accuracy"]} for r in rows])
    figures.baseline_scatter(rows, root / METRICS / "baseline.png")
    headline = _headline(rows, str(ctx.net.max_config()), str(ctx.net.min_config()))
    write_json(root / METRICS / "compare.json", headline)
    ctx.write_timing(ctx.timing(evaluated_here=sum(r["supernet"]["from"] == "compare" for r in rows)))
    return result, headline


def table(result: dict[str, Any]):
    """metrics/baseline.json's configs for a person (a pandas DataFrame): test accuracy trained alone and as the
    supernet's subnet, the gap, and the seconds and images of training alone."""
    import pandas as pd

    return pd.DataFrame([{
        "config": r["config"] if len(r["config"]) <= 16 else r["config"][:15] + "...",
        "MACs": f"{r['macs'] / 1e6:.2f}M",
        "alone": f"{r['alone']['accuracy']:.4f}",
        "supernet": f"{r['supernet']['accuracy']:.4f}",
        "fine-tuned": "" if (tuned := r["supernet"]["accuracy_finetuned"]) is None else f"{tuned:.4f}",
        "alone - supernet": f"{r['alone_minus_supernet']:+.4f}",
        "alone s": f"{r['alone']['train_s']:.0f}",
        "alone images": r["alone"]["images"],
    } for r in result["configs"]], columns=["config", "MACs", "alone", "supernet", "fine-tuned", "alone - supernet",
                                            "alone s", "alone images"])


def totals_line(result: dict[str, Any]) -> str:
    """metrics/baseline.json's totals in one sentence: the supernet's training against Table 2 trained alone."""
    t = result["totals"]
    s, a = t["supernet"], t["alone"]
    line = f"Training time: the supernet's four stages {s['train_s']:.0f} s ({s['images']} images)"
    if "train_s" not in a:
        return f"{line}; no config trained alone (baseline.configs: [])"
    how = ("from seconds per image linear in MACs" if len({r["macs"] for r in result["configs"]}) > 1
           else "in proportion to MACs")  # one config measured: no line to fit (seconds_per_image)
    return (f"{line}; Table 2's {t['table2_configs']} configs trained alone {a['train_s']:.0f} s "
            f"({a['images_each']} images each; {len(a['measured_s'])} measured, {len(a['projected_s'])} projected "
            f"{how})"
            + (f": {t['alone_over_supernet']:g}x the supernet's" if t.get("alone_over_supernet") else ""))


def totals(rows: list[dict], table2: list[tuple[str, int]], alone: dict, supernet: dict) -> dict[str, Any]:
    """The supernet's four training stages against every Table 2 config (`table2`: config, MACs) trained alone:
    measured where the baseline trained it, projected (``PROJECTION``) for the rest."""
    # the images a config trains on (an epoch's last partial batch is dropped): as measured, else as planned
    images = rows[0]["alone"]["images"] if rows else alone["epochs"] * alone["images_per_epoch"]
    measured = {r["config"]: r["alone"]["train_s"] for r in rows}
    rate = seconds_per_image([(r["macs"], r["alone"]["train_s"] / r["alone"]["images"])
                              for r in rows if r["alone"]["images"]])
    projected = {c: round(rate(m) * images, 1) for c, m in table2 if c not in measured} if rate else None
    out: dict[str, Any] = {
        "table2_configs": len(table2),
        "supernet": {**supernet, "stages": list(TRAINING_STAGES)},
        "alone": {"images_each": images, "measured_s": {c: measured[c] for c, _ in table2 if c in measured},
                  "projected_s": projected, "projection": PROJECTION},
    }
    if projected is not None:
        total = sum(out["alone"]["measured_s"].values()) + sum(projected.values())
        out["alone"]["train_s"] = round(total, 1)
        out["alone_over_supernet"] = round(total / supernet["train_s"], 2) if supernet["train_s"] else None
    return out


def seconds_per_image(points: list[tuple[int, float]]):
    """MACs -> seconds per training image, fitted on (MACs, seconds per image) points: a least-squares line, or
    proportional to MACs through the mean ratio when the points have one MACs figure or the line would give a
    non-positive time; None without points."""
    if not points:
        return None
    xs, ys = [float(m) for m, _ in points], [s for _, s in points]
    ratio = sum(y / x for x, y in points) / len(points)
    proportional = lambda m: ratio * m  # noqa: E731
    if len(set(xs)) < 2:
        return proportional
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    line = lambda m: my + slope * (m - mx)  # noqa: E731
    return line if slope > 0 and line(0) > 0 else proportional


def _headline(rows: list[dict], largest: str, smallest: str) -> dict[str, Any]:
    """metrics/compare.json, what `dvc metrics show` shows: the test accuracy of the space's max and min config
    trained alone, where the baseline trained them, under the names evaluate_space's row gives the supernet's."""
    alone = {r["config"]: r["alone"]["accuracy"] for r in rows}
    return {name: alone[c] for name, c in (("accuracy_max", largest), ("accuracy_min", smallest)) if c in alone}


def _read(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: not found ({what})") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable ({type(e).__name__}; {what})") from None


def _check_teacher(alone: dict, root: Path) -> None:
    """A distilled baseline compared with a supernet trained from another teacher is refused: DVC does not rerun
    the baseline stage when models/train_supernet.pt changes (dvc.yaml says why)."""
    if not alone["kd"]:
        return
    teacher = root / baseline.TEACHER
    if not teacher.is_file() or md5_file(teacher) != alone["teacher_md5"]:
        raise CheckpointError(f"{baseline.RECORDS}: distilled from another {baseline.TEACHER} than the one here "
                              "(baseline.kd: true); rerun it: dvc repro --force --single-item baseline")
