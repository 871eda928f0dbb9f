"""What a run produced, for a person: the stages (accuracy, time, speed), Table 2, the picks per budget, and where
the files are. ``make quick`` ends with it; ``python -m ofa.pipeline.summary`` prints it for any project root.

It reads the stages' outputs only; a stage that has not run yet is left out.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path
from typing import Any

from . import compare, evaluate_space, specialize
from .context import METRICS, MODELS, TRAINING_STAGES


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def stage_rows(root: Path) -> list[dict[str, str]]:
    """One row per training stage that has run: epochs, wall and training seconds, images/s, accuracies."""
    rows = []
    for stage in TRAINING_STAGES:
        metrics, timing = _read(root / METRICS / f"{stage}.json"), _read(root / METRICS / "timing" / f"{stage}.json")
        if metrics is None or timing is None:
            continue
        rows.append({
            "stage": stage, "epochs": str(timing.get("epochs", "")), "wall s": f"{timing['wall_s']:.0f}",
            "images/s": f"{timing['images_per_s']:.0f}" if timing.get("images_per_s") else "",
            "max config (test)": f"{metrics['accuracy_max']:.4f}",
            "min config (test)": f"{metrics['accuracy_min']:.4f}" if "accuracy_min" in metrics else "",
        })
    for stage in ("latency", "evaluate_space", "baseline", "compare", "specialize"):
        timing = _read(root / METRICS / "timing" / f"{stage}.json")
        if timing is not None:
            rows.append({"stage": stage, "epochs": "", "wall s": f"{timing['wall_s']:.0f}", "images/s": "",
                         "max config (test)": "", "min config (test)": ""})
    return rows


def summary(root: Path = Path(".")) -> str:
    """The whole summary as text."""
    parts = []
    rows = stage_rows(root)
    if rows:
        total = sum(float(r["wall s"]) for r in rows)
        widths = {name: max(len(name), *(len(r[name]) for r in rows)) for name in rows[0]}
        lines = ["  ".join(name.ljust(w) if name == "stage" else name.rjust(w) for name, w in widths.items())]
        lines += ["  ".join(r[name].ljust(w) if name == "stage" else r[name].rjust(w) for name, w in widths.items())
                  for r in rows]
        parts.append(f"Stages ({total:.0f} s in all; metrics/<stage>.json, metrics/timing/<stage>.json):\n"
                     + "\n".join(lines))
    space = _read(root / METRICS / "space.json")
    if space:
        parts.append("Table 2, test accuracy (metrics/space.json, metrics/space.png):\n"
                     + evaluate_space.table(space).to_string(index=False))
    trained_alone = _read(root / METRICS / "baseline.json")
    if trained_alone and trained_alone["configs"]:
        parts.append("Trained alone (baseline) vs the supernet's subnets, test accuracy (metrics/baseline.json, "
                     "metrics/baseline.png;\n  the models in models/baseline/):\n"
                     + compare.table(trained_alone).to_string(index=False) + "\n"
                     + textwrap.fill(compare.totals_line(trained_alone), width=118, subsequent_indent="  "))
    latency = _read(root / METRICS / "latency_validation.json")
    if latency:
        parts.append(textwrap.fill(latency_line(latency), width=118, subsequent_indent="  "))
    picks = _read(root / METRICS / "picks.json")
    if picks:
        parts.append(f"Picks per budget, val picks, test reports (metrics/picks.json; the models in "
                     f"{MODELS / 'specialized'}/):\n" + specialize.table(picks).to_string(index=False))
    parts.append("Curves and figures: dvc plots show (metrics/live/<stage>/curves.png, metrics/space.png,\n"
                 "  metrics/latency.png, metrics/search_plot/search.png, metrics/baseline.png)")
    return "\n\n".join(parts)


def latency_line(latency: dict[str, Any]) -> str:
    """The latency table's check in one sentence (metrics/latency_validation.json)."""
    where = f"Latency table for {latency['device']} ({latency['host']}; models/latency_table.json)"
    if "kendall_tau" not in latency:
        return f"{where}: built there, not checked here"
    return (f"{where}: {latency['configs']} subnets measured whole against its prediction: Kendall tau "
            f"{latency['kendall_tau']:.3f}, mean abs error {latency['mape_pct']:.1f}%, "
            f"{100 * latency['within_10pct']:.0f}% within 10% (MACs' tau {latency['macs_kendall_tau']:.3f}); "
            f"{latency['fastest_ms']:.4f}-{latency['max_config_ms']:.4f} ms per batch (metrics/latency.png)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", type=Path, default=Path("."), help="the project root (default: here)")
    print(summary(parser.parse_args().root))


if __name__ == "__main__":
    main()
