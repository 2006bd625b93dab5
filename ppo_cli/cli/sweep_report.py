"""`ppo-sweep-report DIR`: rank the jobs of a multirun directory (grid, ppo_tune, ppo_pbt), aggregate seeds, plot.

Reads each job's result.json (written whole by ppo-train, so a sweep still running is fine to read: jobs
without one are listed as running), its overrides, and its TensorBoard events for the curves. Writes
summary.csv and curves.png into DIR (or --out); where jobs differ only in seed, the statistics over seeds
(seed_report.py: IQM, mean, median with bootstrap intervals, aggregate.csv, improvement.csv and their plots);
for a tuning or PBT sweep, what study_report.py adds (the study, importances, lineage, the best as a preset).
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from rich.console import Console
from rich.table import Table

from ppo_cli.cli import study_report
from ppo_cli.errors import OneLineParser, UserError, extra_hint


class RecordSweepDir(Callback):
    """Hydra callback (conf/config.yaml): remembers the folder of the sweep this process runs, so ppo-train can
    summarize the sweep when it ends (Hydra forgets its config by then)."""

    last: Path | None = None

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        RecordSweepDir.last = Path(str(config.hydra.sweep.dir)).absolute()


@dataclass
class Job:
    name: str
    path: Path
    status: str  # ok | failed | pruned | interrupted (Ctrl-C; its checkpoint resumes) | running
    overrides: list[str]
    objective: float | None = None
    steps: int | None = None
    wall_time: float | None = None
    error: str | None = None
    params: dict[str, str] = field(default_factory=dict)
    unreadable: bool = False  # result.json is there but not a JSON object in UTF-8


def _parse_overrides(overrides: list[str]) -> dict[str, str]:
    return dict(o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def read_job(path: Path) -> Job:
    """A job folder's result; a result.json that is not a JSON object in UTF-8 makes the job failed, with the
    reason in `error` and `unreadable` set (report() warns about it)."""
    result = path / "result.json"
    overrides_file = path / ".hydra" / "overrides.yaml"
    overrides: list[str] = []
    if overrides_file.is_file():
        try:
            loaded = yaml.safe_load(overrides_file.read_text(encoding="utf-8"))
            overrides = [str(o) for o in loaded] if isinstance(loaded, list) else []
        except (yaml.YAMLError, UnicodeDecodeError, OSError):
            overrides = []
    if not result.is_file():
        return Job(path.name, path, "running", overrides, params=_parse_overrides(overrides))
    try:
        data = json.loads(result.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        return _unreadable(path, overrides, "is not UTF-8 text")
    except (json.JSONDecodeError, OSError):  # being written (ppo-train renames it into place whole) or unreadable
        return Job(path.name, path, "running", overrides, params=_parse_overrides(overrides))
    if not isinstance(data, dict):
        return _unreadable(path, overrides, f"holds a JSON {type(data).__name__}, not an object")
    if isinstance(data.get("overrides"), list):
        overrides = [str(o) for o in data["overrides"]]
    objective = _number(data.get("objective"))
    status = data.get("status", "ok")
    error = data.get("error")
    if status == "ok" and (objective is None or not math.isfinite(objective)):
        status, error = "failed", error or "no objective (nan)"
    steps = _number(data.get("global_step"))
    # pruned: a tuning sweep's pruner stopped it (cli/tune.py); ranked below the finished jobs, with no objective
    return Job(path.name, path, status if status in ("ok", "failed", "pruned", "interrupted") else "failed", overrides,
               objective if status == "ok" else None, int(steps) if steps is not None else None,
               _number(data.get("wall_time")), None if error is None else str(error), _parse_overrides(overrides))


def _unreadable(path: Path, overrides: list[str], why: str) -> Job:
    job = Job(path.name, path, "failed", overrides, error=f"result.json {why}", params=_parse_overrides(overrides))
    job.unreadable = True
    return job


def find_jobs(sweep_dir: Path, quiet: bool = False) -> list[Job]:
    """Every job folder of a multirun directory: numbered subfolders (Hydra's default subdir) or any folder
    holding a Hydra record or a result. Unless `quiet`, one warning line on stderr for each unreadable result."""
    if not sweep_dir.is_dir():
        raise UserError(f"{sweep_dir} is not a directory (give the multirun folder, e.g. runs/multirun/<date>/<time>)")
    try:
        dirs = [d for d in sweep_dir.iterdir()
                if d.is_dir() and ((d / ".hydra").is_dir() or (d / "result.json").is_file())]
    except OSError as exc:
        raise UserError(f"cannot read {sweep_dir} ({exc.strerror or exc})") from None
    if not dirs:
        raise UserError(f"{sweep_dir} holds no sweep jobs (no subfolder with .hydra/ or result.json)")
    jobs = [read_job(d) for d in sorted(dirs, key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit()
                                                             else 0, d.name))]
    if not quiet:
        for job in jobs:
            if job.unreadable:
                print(f"ppo-sweep-report: warning: {job.path / 'result.json'} {job.error.split(' ', 1)[1]}; job "
                      f"{job.name} counts as failed", file=sys.stderr)
    return jobs


def varying_keys(jobs: list[Job]) -> list[str]:
    """Keys whose value differs between jobs: what the sweep is about (fixed overrides are noise here, and so are
    the tune.* keys and checkpoints the tuning sweepers give each job)."""
    keys = sorted({k for j in jobs for k in j.params if not k.startswith("tune.") and k != "resume"})
    return [k for k in keys if len({j.params.get(k) for j in jobs}) > 1]


def aggregate(jobs: list[Job], keys: list[str]) -> list[dict]:
    """Mean, std and count of the objective over jobs that differ only in seed."""
    groups: dict[tuple, list[Job]] = {}
    for j in jobs:
        if j.status == "ok":
            groups.setdefault(tuple((k, j.params.get(k)) for k in keys if k != "seed"), []).append(j)
    rows = []
    for key, members in groups.items():
        values = [m.objective for m in members]  # type: ignore[misc]
        rows.append({"params": dict(key), "mean": statistics.fmean(values),  # type: ignore[arg-type]
                     "std": statistics.pstdev(values) if len(values) > 1 else 0.0,  # type: ignore[arg-type]
                     "count": len(values), "jobs": [m.name for m in members], "scores": values})
    return sorted(rows, key=lambda r: -r["mean"])


def plot(jobs: list[Job], keys: list[str], path: Path, top: int) -> str:
    try:
        import matplotlib
    except ImportError:
        return f"no plot: matplotlib is not installed ({extra_hint('sweep')})"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    tags = set()
    for job in [j for j in jobs if j.status == "ok"][:top]:
        curve = study_report.return_curve(job.path)
        if curve is None:
            continue
        steps, values, tag = curve
        tags.add(tag)
        label = f"#{job.name} " + " ".join(f"{k.split('.')[-1]}={job.params.get(k)}" for k in keys)
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, label=label[:80])
    if not tags:
        plt.close(fig)
        return "no plot: no finished job has return curves yet"
    ax.set_xlabel("environment steps")
    ax.set_ylabel(" / ".join(sorted(tags)))
    ax.set_title(f"top {min(top, len(jobs))} jobs by objective")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"plot: {path}"


def _headers(keys: list[str]) -> list[str]:
    """Column titles: the last part of each key (clip_range), unless two keys would then look the same."""
    short = [k.rsplit(".", 1)[-1] for k in keys]
    return short if len(set(short)) == len(short) else keys


def _short(value: str | None) -> str:
    """Sampled floats at 4 significant digits (full precision stays in summary.csv)."""
    if value is None:
        return ""
    try:
        number = float(value)
    except ValueError:
        return value
    return value if len(value) <= 8 or not math.isfinite(number) else f"{number:.4g}"


def _fmt(value: float | int | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def report(sweep_dir: Path, out: Path | None = None, top: int = 5, console: Console | None = None,
           target: float | None = None, reps: int | None = None, export_preset: Path | None = None) -> dict:
    console = console or Console()
    jobs = find_jobs(sweep_dir)
    keys = varying_keys(jobs)
    ranked = sorted(jobs, key=lambda j: (j.status != "ok", -(j.objective or 0.0) if j.status == "ok" else 0.0))
    out = out or sweep_dir

    console.print(f"{sweep_dir}: {len(jobs)} jobs, ranked by objective", soft_wrap=True, markup=False)
    table = Table()
    for col in ("rank", "job", *_headers(keys), "objective", "steps", "wall s", "status"):
        table.add_column(col, justify="right" if col in ("rank", "objective", "steps", "wall s") else "left")
    for i, j in enumerate(ranked, 1):
        table.add_row(str(i) if j.status == "ok" else "-", j.name, *(_short(j.params.get(k)) for k in keys),
                      _fmt(j.objective, ".2f"), _fmt(j.steps, ","), _fmt(j.wall_time, ".1f"), j.status)
    console.print(table)


    failed = [j for j in jobs if j.status == "failed"]
    for j in failed:
        console.print(f"failed: job {j.name}: {j.error}", markup=False, highlight=False, soft_wrap=True)
    running = [j.name for j in jobs if j.status == "running"]
    if running:
        console.print(f"still running or crashed without a result: jobs {', '.join(running)}", soft_wrap=True)
    for j in [j for j in jobs if j.status == "interrupted"]:
        console.print(f"interrupted: job {j.name}: {j.error}", markup=False, highlight=False, soft_wrap=True)
    pruned = [j.name for j in jobs if j.status == "pruned"]
    if pruned:
        console.print(f"pruned by the study's pruner: jobs {', '.join(pruned)}", soft_wrap=True, highlight=False)
    study = study_report.report(sweep_dir, jobs, console, export_preset)

    try:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "summary.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["rank", "job", *keys, "objective", "steps", "wall_time", "status", "error",
                             "overrides"])
            for i, j in enumerate(ranked, 1):
                writer.writerow([i if j.status == "ok" else "", j.name, *(j.params.get(k, "") for k in keys),
                                 j.objective, j.steps, j.wall_time, j.status, j.error or "", " ".join(j.overrides)])
        console.print(f"table: {out / 'summary.csv'}", soft_wrap=True, markup=False)
        console.print(plot(ranked, keys, out / "curves.png", top), soft_wrap=True, markup=False, highlight=False)
        groups = aggregate(jobs, keys)
        if any(g["count"] > 1 for g in groups):  # jobs whose overrides differ only in seed
            from ppo_cli.cli import seed_report  # numpy: not for ppo-train's start, which imports this module

            seed_report.report(groups, [k for k in keys if k != "seed"], out, console, target, reps)
    except OSError as exc:
        raise UserError(f"cannot write the report into {out} ({exc.strerror or exc}); choose another folder with "
                        f"--out DIR") from None
    best_job = ranked[0] if ranked and ranked[0].status == "ok" else None
    return {"jobs": jobs, "ranked": ranked, "keys": keys, "groups": groups, "best": best_job,
            "optuna_best_params": study.get("best_params"), "study": study}


def main(argv: list[str] | None = None) -> None:
    p = OneLineParser(prog="ppo-sweep-report", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_dir", type=Path, help="a multirun folder, e.g. runs/multirun/2026-11-27/10-00-00")
    p.add_argument("--out", type=Path, help="where summary.csv and curves.png go (default: the sweep folder)")
    p.add_argument("--top", type=int, default=5, help="jobs to plot (default: 5 best)")
    p.add_argument("--target", type=float, help="over seeds: also the optimality gap, how far the objective falls "
                                                 "short of this value (CartPole's 500, say)")
    p.add_argument("--reps", type=int, help="bootstrap resamples for the intervals over seeds (default 50,000)")
    p.add_argument("--export-preset", type=Path, metavar="FILE",
                   help="a tuning sweep's best configuration as an algo preset, e.g. my_conf/algo/tuned.yaml (then "
                        "ppo-train --config-dir my_conf algo=tuned)")
    args = p.parse_args(argv)
    if args.reps is not None and args.reps < 100:
        p.error(f"--reps={args.reps}: must be >= 100")
    try:
        # A pipe or a file gets a wide table instead of rich's 80-column default.
        report(args.sweep_dir, args.out, args.top, Console(width=None if sys.stdout.isatty() else 160), args.target,
               args.reps, args.export_preset)
    except UserError as exc:
        print(f"ppo-sweep-report: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
