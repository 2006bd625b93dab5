"""ppo-sweep-report's statistics over seeds (cli/stats.py: the rliable protocol): for every configuration of a sweep
(its jobs that differ only in seed), the IQM, mean and median of the objective with 95% stratified bootstrap
intervals (and the optimality gap where a target is given); the probability that one configuration's run beats
another's; performance profiles. A table on the console, aggregate.csv and improvement.csv, aggregate.png and
profiles.png (docs/sweeps.md#comparing-settings-over-seeds)."""

from __future__ import annotations

import csv
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from ppo_cli.cli import stats
from ppo_cli.errors import extra_hint

METRICS = ("iqm", "mean", "median")


def _name(params: dict[str, Any], keys: list[str], digits: int | None = None) -> str:
    """A configuration's name: its varying keys, sampled floats at `digits` significant digits (None: as given)."""
    def shown(value: Any) -> str:
        try:
            number = float(value)
        except (TypeError, ValueError):
            return str(value)
        return str(value) if digits is None or len(str(value)) <= 8 else f"{number:.{digits}g}"

    return " ".join(f"{k.rsplit('.', 1)[-1]}={shown(params.get(k))}" for k in keys) or "all jobs"


def _names(groups: list[dict[str, Any]], keys: list[str]) -> list[str]:
    """The groups' names: short (4 significant digits, as the sweep table shows them) where that keeps them apart,
    in full otherwise (a tuning sweep's sampled values run to 17 digits)."""
    short = [_name(g["params"], keys, 4) for g in groups]
    return short if len(set(short)) == len(short) else [_name(g["params"], keys) for g in groups]


def report(groups: list[dict[str, Any]], keys: list[str], out: Path, console: Console, target: float | None = None,
           reps: int | None = None) -> list[dict[str, Any]]:
    """The statistics of `groups` (sweep_report.aggregate's, each with its `scores`, one per seed), printed and
    written into `out`; the rows of aggregate.csv. `reps`: bootstrap resamples (None: stats.REPS)."""
    reps = reps or stats.REPS
    metrics = (*METRICS, "optimality_gap") if target is not None else METRICS
    rows = []
    names = _names(groups, keys)
    for g, name in zip(groups, names, strict=True):
        scores = np.asarray(g["scores"], dtype=float)[:, None]  # runs x 1 task: a sweep's configuration on its env
        rows.append({"config": name, **{k: g["params"].get(k) for k in keys},
                     "runs": len(g["scores"]), **stats.summary(scores, target, reps)})
    rows.sort(key=lambda r: -r["iqm"])
    console.print(f"over seeds ({len(rows)} configurations; 95% stratified bootstrap intervals over {reps:,} "
                  f"resamples, the rliable protocol):", soft_wrap=True)
    table = Table()
    for col in ("configuration", "runs", *(m.replace("_", " ") for m in metrics)):
        table.add_column(col, justify="left" if col == "configuration" else "right")
    for r in rows:
        table.add_row(r["config"], str(r["runs"]),
                      *(f"{r[m]:.2f} [{r[f'{m}_low']:.2f}, {r[f'{m}_high']:.2f}]" for m in metrics))
    console.print(table)
    columns = ["config", *keys, "runs", *(f"{m}{end}" for m in metrics for end in ("", "_low", "_high"))]
    with open(out / "aggregate.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    console.print(f"aggregate: {out / 'aggregate.csv'}", soft_wrap=True, markup=False)
    by_name = {name: np.asarray(g["scores"], dtype=float)[:, None] for g, name in zip(groups, names, strict=True)}
    pairs = []
    for a, b in combinations([r["config"] for r in rows], 2):  # the better IQM first: P(a run of a beats one of b)
        low, high = stats.improvement_interval(by_name[a], by_name[b], reps=min(reps, 2_000))
        pairs.append({"x": a, "y": b, "probability": stats.probability_of_improvement(by_name[a], by_name[b]),
                      "low": low, "high": high})
    if pairs:
        console.print("probability of improvement, P(a run of X scores above a run of Y), 95% interval:")
        for p in pairs:
            console.print(f"  P({p['x']} > {p['y']}) = {p['probability']:.2f} [{p['low']:.2f}, {p['high']:.2f}]",
                          soft_wrap=True, markup=False, highlight=False)
        with open(out / "improvement.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["x", "y", "probability", "low", "high"])
            writer.writeheader()
            writer.writerows(pairs)
    console.print(_plot(rows, by_name, metrics, out), soft_wrap=True, markup=False, highlight=False)
    return rows


def _plot(rows: list[dict[str, Any]], by_name: dict[str, np.ndarray], metrics: tuple[str, ...], out: Path) -> str:
    try:
        import matplotlib
    except ImportError:
        return f"no statistics plots: matplotlib is not installed ({extra_hint('sweep')})"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["config"] for r in rows]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 0.5 * len(names) + 1.5), sharey=True)
    for ax, metric in zip(np.atleast_1d(axes), metrics, strict=True):
        for y, r in enumerate(rows):
            ax.plot([r[f"{metric}_low"], r[f"{metric}_high"]], [y, y], linewidth=6, alpha=0.5)
            ax.plot([r[metric]], [y], "k|", markersize=12)
        ax.set_title(metric.replace("_", " "))
        ax.set_yticks(range(len(names)), [n[:40] for n in names])
    fig.suptitle("objective over seeds, 95% stratified bootstrap intervals", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "aggregate.png", dpi=100)
    plt.close(fig)
    everything = np.concatenate(list(by_name.values()))
    taus = np.linspace(everything.min(), everything.max(), 101)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, scores in by_name.items():
        low, high = stats.profile_interval(scores, taus)
        line = ax.plot(taus, stats.performance_profile(scores[None], taus)[0], label=name[:60])[0]
        ax.fill_between(taus, low, high, alpha=0.2, color=line.get_color())
    ax.set_xlabel("objective tau")
    ax.set_ylabel("fraction of runs scoring above tau")
    ax.set_title("performance profiles, 95% bootstrap bands")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "profiles.png", dpi=100)
    plt.close(fig)
    return f"statistics plots: {out / 'aggregate.png'}, {out / 'profiles.png'}"
