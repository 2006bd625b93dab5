"""What ppo-sweep-report adds for the tuning sweepers: a ppo_tune study (its trials, the best one's command line,
Optuna's parameter importances, the steps pruning saved), a ppo_pbt population (its lineage and the schedule
each surviving member followed), and the best configuration written as an algo preset (--export-preset)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from rich.console import Console

from ppo_cli.errors import UserError, first_line

RESULTS = "optimization_results.yaml"  # written by cli/tune.py
LINEAGE = "pbt_lineage.json"  # written by cli/pbt.py


def _say(console: Console, text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _read(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise UserError(f"{path} ({what}) is unreadable ({first_line(exc)})") from None


def report(sweep_dir: Path, jobs: list[Any], console: Console, export_preset: Path | None = None) -> dict[str, Any]:
    """Print the study's part of the report; what it found (best_params, best_job, importances, lineage)."""
    found: dict[str, Any] = {}
    if (sweep_dir / RESULTS).is_file():
        found = _study(sweep_dir, _read(sweep_dir / RESULTS, "the ppo_tune study's summary") or {}, jobs, console)
    if (sweep_dir / LINEAGE).is_file():
        found = _population(sweep_dir, _read(sweep_dir / LINEAGE, "the PBT lineage"), console)
    if export_preset is not None:
        best = found.get("best_job")
        if best is None:
            raise UserError(f"--export-preset: {sweep_dir} has no best configuration to export (no ppo_tune trial or "
                            f"PBT member finished)")
        write_preset(sweep_dir / str(best), found.get("best_params") or {}, export_preset, sweep_dir,
                     found.get("best_value"))
        _say(console, f"preset: {export_preset} (ppo-train --config-dir {export_preset.parent.parent} "
                      f"algo={export_preset.stem})")
    return found


def _study(sweep_dir: Path, summary: dict[str, Any], jobs: list[Any], console: Console) -> dict[str, Any]:
    _say(console, f"study {summary.get('name')!r}: {summary.get('n_trials')} trials ({summary.get('complete')} "
                  f"complete, {summary.get('pruned')} pruned, {summary.get('failed')} failed); sampler "
                  f"{summary.get('sampler')}, pruner {summary.get('pruner')}; storage {summary.get('storage')}")
    steps = [j.steps for j in jobs if j.steps]
    finished = [j.steps for j in jobs if j.status == "ok" and j.steps]
    if steps and finished and summary.get("pruned"):
        budget = max(finished) * len(steps)
        _say(console, f"steps trained: {sum(steps):,}, {100 * sum(steps) / budget:.0f}% of {len(steps)} jobs x "
                      f"{max(finished):,} (pruning saved the rest)")
    found: dict[str, Any] = {"best_params": summary.get("best_params"), "best_value": summary.get("best_value")}
    if summary.get("best_trial") is None:
        return found
    best_jobs = [j.name for j in jobs if j.params.get("tune.trial") == str(summary["best_trial"])]
    seeds = max(1, len(best_jobs))
    found["best_job"] = best_jobs[0] if best_jobs else None
    _say(console, f"best trial {summary['best_trial']}: objective {summary['best_value']:.2f}"
                  + (f" (mean of {seeds} seeds)" if seeds > 1 else "") + f"; alone: {summary.get('best_command')}")
    found["importances"] = importances(str(summary.get("storage")), str(summary.get("name")))
    if isinstance(found["importances"], dict) and found["importances"]:
        how = found["importances"].pop("_how")
        shown = ", ".join(f"{k} {v:.2f}" for k, v in found["importances"].items())
        _say(console, f"parameter importances (Optuna, {how}): {shown}")
    elif isinstance(found["importances"], str):
        _say(console, f"parameter importances: {found['importances']}")
    _say(console, f"dashboard: optuna-dashboard {summary.get('storage')}")
    return found


def importances(storage: str, name: str) -> dict[str, float] | str:
    """Optuna's parameter importances for the study, or why there are none."""
    try:
        import optuna

        from ppo_cli.run.trial import open_storage

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(study_name=name, storage=open_storage(storage))
        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if len(complete) < 2:
            return "need 2 complete trials"
        try:  # fANOVA (Optuna's default) where scikit-learn is installed; PED-ANOVA, which needs nothing more, else
            import sklearn  # noqa: F401

            evaluator, how = optuna.importance.FanovaImportanceEvaluator(seed=0), "fANOVA"
        except ImportError:
            evaluator, how = optuna.importance.PedAnovaImportanceEvaluator(), "PED-ANOVA"
        with warnings.catch_warnings():  # PED-ANOVA warns where few trials make its quantiles coincide
            warnings.simplefilter("ignore")
            values = optuna.importance.get_param_importances(study, evaluator=evaluator)
        return {**{k: float(v) for k, v in values.items()}, "_how": how}  # type: ignore[dict-item]
    except ImportError:
        return 'Optuna is not installed (pip install ".[sweep]")'
    except Exception as exc:  # noqa: BLE001 - a storage gone, a study with one value for a parameter...
        return f"not computed ({first_line(exc)})"


def _population(sweep_dir: Path, lineage: dict[str, Any], console: Console) -> dict[str, Any]:
    members = lineage.get("members") or []
    events = lineage.get("events") or []
    _say(console, f"PBT: population {lineage.get('population')}, {lineage.get('generations')} generations of "
                  f"{lineage.get('interval'):,} steps; {sum(e['kind'] == 'exploit' for e in events)} exploit steps")
    for e in events:
        if e["kind"] == "exploit":
            changed = ", ".join(f"{k}={v:.4g}" for k, v in e["values"].items())
            _say(console, f"  generation {e['generation']} @ {e['step']:,}: member {e['member']} (job {e['job']}) "
                          f"copied member {e['source']} (job {e['source_job']}) and explores {changed}")
    if not members:
        return {}
    best = max(members, key=lambda m: m["objective"] if m.get("objective") is not None else float("-inf"))
    score = "failed" if best.get("objective") is None else f"{best['objective']:.2f}"
    _say(console, f"best member {best['member']}: objective {score} (job {best['job']}); its schedule as one run: "
                  f"{best.get('command')}")
    _say(console, best_curve(sweep_dir, best, sweep_dir / "pbt_best.png"))
    return {"best_job": best["job"], "best_params": best.get("values"), "best_value": best.get("objective"),
            "lineage": lineage}


def return_curve(folder: Path) -> tuple[list[int], list[float], str] | None:
    """A job's return curve from its TensorBoard events: eval/mean_return, else the training episodes' return."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    try:
        events.Reload()
    except Exception:  # noqa: BLE001 - an event file being written may end mid-record
        return None
    tags = events.Tags().get("scalars", [])
    for tag in ("eval/mean_return", "charts/episodic_return"):
        if tag in tags:
            points = events.Scalars(tag)
            return [p.step for p in points], [p.value for p in points], tag
    return None


def best_curve(sweep_dir: Path, member: dict[str, Any], path: Path) -> str:
    """The best member's return curve, stitched from the jobs its policy went through (a job's curve from where
    the previous one ended), with the generations marked."""
    try:
        import matplotlib
    except ImportError:
        return "no PBT plot: matplotlib is not installed"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs: list[int] = []
    ys: list[float] = []
    tag = None
    for name in member.get("chain") or []:
        curve = return_curve(sweep_dir / str(name))
        if curve is None:
            continue
        start = xs[-1] if xs else -1
        for x, y in zip(curve[0], curve[1], strict=True):
            if x > start:
                xs.append(x)
                ys.append(y)
        tag = curve[2]
    if not xs:
        return "no PBT plot: the best member's jobs have no return curves"
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(xs, ys)
    ax.set_xlabel("environment steps")
    ax.set_ylabel(str(tag))
    ax.set_title(f"best PBT member {member['member']}: jobs {', '.join(map(str, member.get('chain') or []))}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"best member's curve: {path}"


def write_preset(job_dir: Path, best_params: dict[str, Any], path: Path, sweep_dir: Path, value: Any) -> None:
    """The best job's config as an algo preset: every algo key that differs from the defaults (whatever preset the
    sweep started from), and the tuned keys of other groups at the top level (`# @package _global_`)."""
    from ppo_cli.config import TrainConfig

    # The config the job trained: its checkpoint's (a resumed job's composed config lacks the groups its first
    # generation chose), else Hydra's record of it.
    ckpt, config_file = job_dir / "checkpoints" / "checkpoint.pt", job_dir / ".hydra" / "config.yaml"
    if ckpt.is_file():
        from ppo_cli.run import checkpoint  # torch: only for this

        text = checkpoint.load(ckpt)["config_yaml"]
    elif config_file.is_file():
        text = config_file.read_text(encoding="utf-8")
    else:
        raise UserError(f"--export-preset: {job_dir} has neither a checkpoint nor .hydra/config.yaml to read")
    trained = OmegaConf.to_container(OmegaConf.create(text), resolve=False, enum_to_str=True)
    defaults = OmegaConf.to_container(OmegaConf.structured(TrainConfig), enum_to_str=True)
    body: dict[str, Any] = {"algo": {k: v for k, v in trained["algo"].items()  # type: ignore[index, union-attr]
                                     if defaults["algo"].get(k) != v}}  # type: ignore[index, union-attr]
    for key in best_params:
        group, _, name = str(key).partition(".")
        if group != "algo" and name:
            node = OmegaConf.select(OmegaConf.create(trained), str(key))
            body.setdefault(group, {})[name] = OmegaConf.to_container(node) if OmegaConf.is_config(node) else node
    header = (f"# @package _global_\n# The best configuration of the sweep {sweep_dir} (job {job_dir.name}, objective "
              f"{value}), written by ppo-sweep-report --export-preset.\n")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(header + yaml.safe_dump(body, sort_keys=False))
    except OSError as exc:
        raise UserError(f"--export-preset: cannot write {path} ({exc.strerror or exc})") from None
