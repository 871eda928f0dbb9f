"""The stages' figures as PNG files, which ``dvc plots show`` (image plots) and any image viewer show without a
network: a training stage's curves, evaluate_space's MACs-vs-accuracy scatter, the latency table's check,
specialize's search, the baseline beside the supernet's subnets.

Every axis is zoomed to its data, every series has a colour of its own. Drawn with matplotlib's Agg backend:
the same data gives the same bytes.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402 - after the backend is chosen

from ..io import atomic_write  # noqa: E402

COLOURS = {"train": "#1f77b4", "val": "#d62728", "finetuned": "#2ca02c", "evaluated": "#9e9e9e",
           "uniform": "#1f77b4", "front": "#ff7f0e", "pick": "#d62728", "budget": "#bdbdbd", "alone": "#9467bd"}


def training_curves(points: Sequence[dict], title: str, path: Path) -> None:
    """Loss, and accuracy (training, and the max config's on val at each epoch's end), against the step."""
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 3.4))
    steps = [p["step"] for p in points]
    loss_ax.plot(steps, [p["train/loss"] for p in points], color=COLOURS["train"], marker=".", label="train")
    loss_ax.set(title=f"{title}: loss", xlabel="step", ylabel="cross entropy (+ distillation)")
    acc_ax.plot(steps, [p["train/accuracy"] for p in points], color=COLOURS["train"], marker=".",
                label="train (first sampled config)")
    val = [(p["step"], p["val/accuracy_max"]) for p in points if "val/accuracy_max" in p]
    if val:
        acc_ax.plot(*zip(*val), color=COLOURS["val"], marker="o", label="val, max config (epoch end)")
    acc_ax.set(title=f"{title}: accuracy", xlabel="step", ylabel="accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)


def space_scatter(records: Sequence[dict], finetune_epochs: int, path: Path) -> None:
    """Every evaluated config: MACs against test accuracy after BN calibration and after fine-tuning."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    macs = [r["macs"] / 1e6 for r in records]
    ax.scatter(macs, [r["accuracy"] for r in records], color=COLOURS["train"], label="BN re-calibrated")
    ax.scatter(macs, [r["accuracy_finetuned"] for r in records], color=COLOURS["finetuned"], marker="^",
               label=f"after {finetune_epochs} fine-tuning epoch{'s' * (finetune_epochs != 1)}")
    for r, x in zip(records, macs):
        if r["kernel"] is not None:  # the uniform grid, named as in Table 2
            ax.annotate(f"({r['kernel']}, {r['depth']}, {r['width']:g})", (x, r["accuracy"]), fontsize=7,
                        xytext=(3, -9), textcoords="offset points")
    ax.set(title="evaluate_space: MACs vs test accuracy", xlabel="MACs (millions)", ylabel="test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def latency_scatter(records: Sequence[dict], runtime: str, path: Path) -> None:
    """Each checked config's predicted against measured milliseconds, the diagonal and its +-10% band."""
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    if records:
        values = [r[k] for r in records for k in ("predicted_ms", "measured_ms")]
        lo, hi = min(values), max(values)
        line = [lo * 0.95, hi * 1.05]
        ax.plot(line, line, color=COLOURS["front"], linewidth=1, label="predicted = measured")
        ax.fill_between(line, [v / 1.1 for v in line], [v / 0.9 for v in line], color=COLOURS["budget"], alpha=0.3,
                        label="within 10%")
        for uniform, colour, label in ((False, COLOURS["evaluated"], "random per-block configs"),
                                       (True, COLOURS["uniform"], "uniform configs")):
            some = [r for r in records if r["uniform"] == uniform]
            if not some:
                continue
            ax.scatter([r["predicted_ms"] for r in some], [r["measured_ms"] for r in some], s=20, color=colour,
                       label=label, zorder=3)
        ax.set(xlim=line, ylim=line)
        ax.legend(fontsize=8, loc="upper left")
    else:
        ax.text(0.5, 0.5, "table built on another machine: checked there", ha="center", transform=ax.transAxes)
    ax.set(title=f"latency table: predicted vs measured\n{runtime}", xlabel="predicted ms", ylabel="measured ms")
    ax.grid(alpha=0.3)
    _save(fig, path)


def search_scatter(records: Sequence[dict], picks: dict[str, dict], path: Path, cost: str = "macs") -> None:
    """Every config the search scored, the uniform grid, the Pareto front as a line, and each budget's pick,
    against the search's cost: MACs, or the latency table's predicted ms (`cost` latency)."""
    if cost == "latency":
        x, label = (lambda r: r["predicted_ms"]), "predicted latency (ms)"
        at = lambda b: b  # noqa: E731 - a budget, in the cost's own unit
    else:
        x, label = (lambda r: r["macs"] / 1e6), "MACs (millions)"
        at = lambda b: b / 1e6  # noqa: E731
    fig, ax = plt.subplots(figsize=(8, 4.6))
    for name, p in picks.items():
        ax.axvline(at(p["budget"]), color=COLOURS["budget"], linestyle="--", linewidth=1)
        ax.annotate(name, (at(p["budget"]), 0), xycoords=("data", "axes fraction"), fontsize=7, rotation=90,
                    xytext=(-9, 4), textcoords="offset points", color="#757575")
    searched = [r for r in records if not r["uniform"]]
    uniform = [r for r in records if r["uniform"]]
    front = sorted((r for r in records if r["pareto"]), key=x)
    ax.scatter([x(r) for r in searched], [r["val_accuracy"] for r in searched], s=14,
               color=COLOURS["evaluated"], label="per-block configs scored")
    ax.scatter([x(r) for r in uniform], [r["val_accuracy"] for r in uniform], s=28,
               color=COLOURS["uniform"], label="uniform configs")
    ax.plot([x(r) for r in front], [r["val_accuracy"] for r in front], color=COLOURS["front"],
            drawstyle="steps-post", marker="o", markersize=4, label="Pareto front")
    chosen = {p["config"]: p for p in picks.values()}
    ax.scatter([x(p) for p in chosen.values()], [p["val_accuracy"] for p in chosen.values()], s=90,
               marker="*", color=COLOURS["pick"], zorder=3, label="picks")
    ax.set(title=f"specialize: {label.split(' (')[0]} vs val accuracy", xlabel=label, ylabel="val accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)


def baseline_scatter(rows: Sequence[dict], path: Path) -> None:
    """Each baseline config: MACs against test accuracy trained alone and as the supernet's subnet (BN
    re-calibrated, and fine-tuned where evaluate_space has it), each pair joined by a line."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in rows:
        x, ys = r["macs"] / 1e6, [r["alone"]["accuracy"], r["supernet"]["accuracy"]]
        ax.plot([x, x], ys, color=COLOURS["budget"], zorder=1)
        label = r["config"] if len(r["config"]) <= 12 else "per-block"
        ax.annotate(f"{label} ({r['name']})" if r["name"] in ("min", "max") else label, (x, max(ys)), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    macs = [r["macs"] / 1e6 for r in rows]
    ax.scatter(macs, [r["alone"]["accuracy"] for r in rows], color=COLOURS["alone"], zorder=2,
               label="trained alone (baseline)")
    ax.scatter(macs, [r["supernet"]["accuracy"] for r in rows], color=COLOURS["train"], zorder=2,
               label="supernet subnet, BN re-calibrated")
    tuned = [(x, r["supernet"]["accuracy_finetuned"]) for x, r in zip(macs, rows)
             if r["supernet"]["accuracy_finetuned"] is not None]
    if tuned:
        ax.scatter(*zip(*tuned), color=COLOURS["finetuned"], marker="^", zorder=2, label="supernet subnet, fine-tuned")
    ax.set(title="compare: trained alone (baseline) vs the supernet's subnets", xlabel="MACs (millions)",
           ylabel="test accuracy")
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(fontsize=8)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buffer.getvalue()), binary=True)
