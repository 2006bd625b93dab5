"""Hydra multirun sweeps: grid, Optuna, joblib and submitit launchers, failed trials, and ppo-sweep-report."""

import csv
import json
import math

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ppo_cli.cli.sweep_report import report

from .conftest import cli

# Tiny jobs: 2 envs x 128 steps, 2 updates, a 4-episode final evaluation.
JOB = ["algo.total_timesteps=512", "env.num_envs=2", "algo.n_steps=128", "algo.batch_size=64",
       "eval.every_steps=256", "eval.episodes=4", "checkpoint_interval=0"]


def _results(sweep):
    # Job folders are numbered; submitit keeps its own files in .submitit/.
    return {d.name: json.loads((d / "result.json").read_text()) for d in sweep.iterdir() if d.name.isdigit()}


def test_grid_sweep_then_report_ranks_the_best_job(tmp_path):
    sweep = tmp_path / "sweep"
    proc = cli("ppo-train", "-m", "algo.lr_actor=0.0001,0.003", "algo.gae_lambda=0.8,0.95", *JOB,
               f"hydra.sweep.dir={sweep}", cwd=tmp_path, check=True, timeout=600)
    results = _results(sweep)
    assert sorted(results) == ["0", "1", "2", "3"], proc.stdout
    combos = {(r["overrides"][0], r["overrides"][1]) for r in results.values()}
    grid = {(f"algo.lr_actor={a}", f"algo.gae_lambda={g}") for a in ("0.0001", "0.003") for g in ("0.8", "0.95")}
    assert combos == grid
    assert all(r["status"] == "ok" and r["global_step"] == 512 for r in results.values())
    top = max(r["objective"] for r in results.values())
    best_names = {n for n, r in results.items() if r["objective"] == top}

    out = report(sweep)
    assert out["best"].name in best_names and out["best"].objective == top
    assert [j.objective for j in out["ranked"]] == sorted((r["objective"] for r in results.values()), reverse=True)
    assert out["keys"] == ["algo.gae_lambda", "algo.lr_actor"]  # the fixed overrides are not columns
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert rows[0]["job"] == out["best"].name and rows[0]["rank"] == "1" and len(rows) == 4
    assert (sweep / "curves.png").stat().st_size > 1000
    # Each job logged its hyperparameters and objective for TensorBoard's HPARAMS tab.
    events = EventAccumulator(str(sweep / out["best"].name), size_guidance={"scalars": 0})
    events.Reload()
    assert "_hparams_/experiment" in events.summary_metadata
    assert events.Scalars("hparam/objective")[-1].value == pytest.approx(top)

    shown = cli("ppo-sweep-report", str(sweep), cwd=tmp_path, check=True, env={"COLUMNS": "200"})
    assert "4 jobs, ranked by objective" in shown.stdout and "summary.csv" in shown.stdout


def test_seeds_are_aggregated_and_failures_reported_while_the_sweep_goes_on(tmp_path):
    sweep = tmp_path / "sweep"
    # batch_size=100 does not divide the 256-sample rollout: that job fails, the others run.
    cli("ppo-train", "-m", "seed=1,2", "algo.batch_size=64,100", *[a for a in JOB if "batch_size" not in a],
        f"hydra.sweep.dir={sweep}", cwd=tmp_path, check=True, timeout=600)
    results = _results(sweep)
    failed = [r for r in results.values() if r["status"] == "failed"]
    assert len(failed) == 2 and all("must divide the rollout" in r["error"] for r in failed)
    out = report(sweep)
    assert [j.status for j in out["ranked"]] == ["ok", "ok", "failed", "failed"]
    (group,) = out["groups"]
    ok = [r["objective"] for r in results.values() if r["status"] == "ok"]
    assert group["count"] == 2 and group["mean"] == pytest.approx(sum(ok) / 2)
    assert group["std"] == pytest.approx(abs(ok[0] - ok[1]) / 2)


def test_report_reads_a_sweep_still_being_written(tmp_path):
    sweep = tmp_path / "sweep"
    cli("ppo-train", "-m", "seed=1,2", *JOB, f"hydra.sweep.dir={sweep}", cwd=tmp_path, check=True)
    (sweep / "1" / "result.json").unlink()  # job 1 not finished yet
    (sweep / "2" / ".hydra").mkdir(parents=True)  # job 2 just started
    out = report(sweep)
    assert [j.status for j in out["ranked"]] == ["ok", "running", "running"]


def test_diverging_trial_fails_with_its_reason(tmp_path):
    sweep = tmp_path / "sweep"
    cli("ppo-train", "-m", "algo.lr_critic=3e-4,1e30", *JOB, f"hydra.sweep.dir={sweep}",
        cwd=tmp_path, check=True)
    results = _results(sweep)
    assert results["1"]["status"] == "failed" and "diverged" in results["1"]["error"]


def test_optuna_bayes_sweep_completes_and_reports_best_params(tmp_path):
    sweep = tmp_path / "sweep"
    proc = cli("ppo-train", "-m", "hydra/sweeper=ppo_bayes", "hydra.sweeper.n_trials=3", *JOB[:1], "env.num_envs=2",
               "eval.every_steps=0", "eval.episodes=2", f"hydra.sweep.dir={sweep}", cwd=tmp_path, check=True,
               timeout=600)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"algo.lr_actor", "algo.lr_critic", "algo.clip_range", "algo.gae_lambda",
                                        "algo.ent_coef", "algo.K_epochs", "algo.n_steps", "algo.batch_size"}
    results = _results(sweep)
    assert len(results) == 3
    assert best["best_value"] == max(r["objective"] for r in results.values()), proc.stderr
    out = report(sweep)
    assert out["optuna_best_params"] == best["best_params"]


@pytest.mark.slow  # the Optuna path runs in test_optuna_bayes_sweep
def test_random_sweeper_preset_samples_the_space(tmp_path):
    sweep = tmp_path / "sweep"
    cli("ppo-train", "-m", "hydra/sweeper=ppo_random", "hydra.sweeper.n_trials=2", *JOB[:1], "env.num_envs=2",
        "eval.every_steps=0", "eval.episodes=2", f"hydra.sweep.dir={sweep}", cwd=tmp_path, check=True)
    params = [dict(o.split("=", 1) for o in r["overrides"]) for r in _results(sweep).values()]
    for p in params:
        assert 1e-5 <= float(p["algo.lr_actor"]) <= 3e-3 and 0.05 <= float(p["algo.clip_range"]) <= 0.3
        assert int(p["algo.n_steps"]) * 2 % int(p["algo.batch_size"]) == 0
    assert params[0] != params[1]


@pytest.mark.parametrize("launcher", ["joblib", pytest.param("submitit_local", marks=pytest.mark.slow)])
def test_parallel_launchers_run_two_jobs(launcher, tmp_path):
    sweep = tmp_path / "sweep"
    extra = ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else []
    cli("ppo-train", "-m", f"hydra/launcher={launcher}", *extra, "algo.clip_range=0.1,0.2", *JOB,
        f"hydra.sweep.dir={sweep}", cwd=tmp_path, check=True, timeout=600)
    results = _results(sweep)
    assert sorted(n for n in results if n.isdigit()) == ["0", "1"]
    assert all(r["status"] == "ok" and math.isfinite(r["objective"]) for n, r in results.items() if n.isdigit())


def test_missing_sweep_plugin_names_the_extra(tmp_path):
    sitecustomize = tmp_path / "hide" / "sitecustomize.py"
    sitecustomize.parent.mkdir()
    # Make the plugins unimportable, as on an install without the extra.
    sitecustomize.write_text("import sys\nsys.modules['optuna'] = None\n")
    proc = cli("ppo-train", "-m", "hydra/sweeper=ppo_bayes", cwd=tmp_path,
               env={"PYTHONPATH": f"{sitecustomize.parent}:{__import__('tests.conftest').conftest.ROOT}"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "pip install \".[sweep]\"" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_slurm_launcher_without_slurm_is_one_line(tmp_path):
    proc = cli("ppo-train", "-m", "hydra/launcher=submitit_slurm", cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "srun is not on this machine's PATH" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
