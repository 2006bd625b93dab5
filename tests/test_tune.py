"""ppo-cli's own sweepers: hydra/sweeper=ppo_tune (Optuna search, pruning, storage, continuing, seeds) and
hydra/sweeper=ppo_pbt (population-based training), and what ppo-sweep-report makes of them."""

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import torch
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser

from ppo_cli.cli.sweep_report import report
from ppo_cli.cli.tune import _distribution, search_space
from ppo_cli.errors import UserError
from ppo_cli.run.trial import TrialReporter, make_pruner

from .conftest import ROOT, cli, make_cfg

# Tiny jobs: 2 envs x 64 steps per update, evaluated every 256 steps on 2 episodes.
JOB = ["algo.total_timesteps=512", "env.num_envs=2", "algo.n_steps=64", "algo.batch_size=32", "eval.every_steps=256",
       "eval.episodes=2", "checkpoint_interval=0"]
SPACE = "hydra.sweeper.params={algo.clip_range: 'interval(0.05, 0.3)', algo.ent_coef: 'tag(log, interval(1e-5, 0.05))'}"
SMALL = ["~hydra.sweeper.params", "+" + SPACE]  # the space of these tests, instead of the preset's eight keys


def _results(sweep):
    return {d.name: json.loads((d / "result.json").read_text()) for d in sweep.iterdir()
            if d.name.isdigit() and (d / "result.json").is_file()}


def _study(url, name="ppo"):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=url)


def _override(line):
    (override,) = OverridesParser.create().parse_overrides([line])
    return override


def test_the_sweep_syntax_becomes_optuna_distributions():
    d = optuna.distributions
    assert _distribution("k", _override("k=interval(0.1, 0.3)"))[0] == d.FloatDistribution(0.1, 0.3)
    assert _distribution("k", _override("k=tag(log, interval(1e-5, 1e-2))"))[0] == d.FloatDistribution(1e-5, 1e-2,
                                                                                                         log=True)
    assert _distribution("k", _override("k=interval(2, 8)"))[0] == d.FloatDistribution(2.0, 8.0)  # Hydra: floats
    # range includes its end, as the Optuna sweeper read it: the presets' K_epochs range(1, 10) is 1..10.
    dist, grid = _distribution("k", _override("k=range(1, 10)"))
    assert dist == d.IntDistribution(1, 10) and grid == list(range(1, 11))
    dist, grid = _distribution("k", _override("k=choice(32, 64)"))
    assert dist == d.CategoricalDistribution([32, 64]) and grid == [32, 64]
    dist, grid = _distribution("k", _override("k=0.1,0.2"))
    assert dist == d.CategoricalDistribution([0.1, 0.2])


def test_the_search_space_takes_the_command_line_over_the_params_and_checks_every_key():
    cfg = make_cfg()
    params = {"algo.clip_range": "interval(0.05, 0.3)", "algo.n_steps": "choice(256, 512)"}
    space = search_space(params, ["algo.n_steps=128", "algo.gae_lambda=interval(0.8, 0.99)", "env=Acrobot-v1"], cfg)
    assert set(space.distributions) == {"algo.clip_range", "algo.gae_lambda"}  # a fixed n_steps leaves the space
    assert space.fixed == ["algo.n_steps=128", "env=Acrobot-v1"]
    with pytest.raises(UserError, match="'algo.clip_rnage', which is not a config key"):
        search_space({"algo.clip_rnage": "interval(0.05, 0.3)"}, [], cfg)
    with pytest.raises(UserError, match="the search space is empty"):
        search_space({}, ["algo.n_steps=128"], cfg)


def test_a_job_reports_to_its_trial_and_the_median_pruner_stops_it(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="ppo", storage=url, direction="maximize")
    study.set_user_attr("ppo_cli.pruner", {"name": "median", "startup_trials": 1})
    for value in (100.0, 200.0):  # two finished trials that reached 100 and 200 at step 256
        study.add_trial(optuna.trial.create_trial(value=value, intermediate_values={256: value},
                                                  distributions={}, params={}))
    trial = study.ask()
    cfg = make_cfg(f"tune.storage={url}", "tune.study=ppo", f"tune.trial={trial.number}", "seed=3")
    reporter = TrialReporter.from_cfg(cfg)
    assert isinstance(reporter.pruner, optuna.pruners.MedianPruner)
    assert reporter.report(256, 150.0) is False  # the median of 100 and 200 is 150: not below it
    assert reporter.report(512, 10.0) is False  # no finished trial reached step 512: nothing to compare
    fresh = study.ask()
    low = TrialReporter.from_cfg(make_cfg(f"tune.storage={url}", "tune.study=ppo", f"tune.trial={fresh.number}"))
    assert low.report(256, 120.0) is True and low.pruned_at == 256
    stored = study.get_trials()[fresh.number]
    assert stored.intermediate_values == {256: 120.0} and stored.user_attrs["pruned_at"] == 256
    assert stored.user_attrs["eval:seed=1:step=256"] == 120.0


def test_seeds_of_one_trial_are_judged_by_their_mean(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="ppo", storage=url, direction="maximize")
    study.set_user_attr("ppo_cli.pruner", {"name": "none"})
    trial = study.ask()
    for seed, value in ((1, 10.0), (2, 30.0)):
        cfg = make_cfg(f"tune.storage={url}", "tune.study=ppo", f"tune.trial={trial.number}", f"seed={seed}")
        TrialReporter.from_cfg(cfg).report(256, value)
    assert study.get_trials()[0].intermediate_values == {256: 20.0}


def test_pruners_by_name_and_a_wrong_one_is_one_line():
    assert isinstance(make_pruner({"name": "sha"}), optuna.pruners.SuccessiveHalvingPruner)
    assert isinstance(make_pruner({"name": "hyperband"}), optuna.pruners.HyperbandPruner)
    assert isinstance(make_pruner({"name": "none"}), optuna.pruners.NopPruner)
    with pytest.raises(UserError, match="'medain' is not a pruner; choose one of median, sha, hyperband, none"):
        make_pruner({"name": "medain"})


def test_a_pruned_trial_stops_early_keeps_its_checkpoint_and_the_report_shows_it(tmp_path):
    sweep = tmp_path / "sweep"
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="ppo", storage=url, direction="maximize")
    # A finished trial that did better than CartPole allows at every step: the next one is pruned at its first report.
    study.add_trial(optuna.trial.create_trial(value=1e9, intermediate_values={256: 1e9, 512: 1e9}, distributions={},
                                              params={}))
    proc = cli("ppo-train", "-m", "hydra/sweeper=ppo_tune", "hydra.sweeper.n_trials=2",
               "hydra.sweeper.pruner_startup_trials=1", f"hydra.sweeper.storage={url}", *SMALL, *JOB,
               f"hydra.sweep.dir={sweep}", cwd=tmp_path, check=True)
    assert "ppo_tune: trial 1 (job 1): pruned at step 256" in proc.stdout, proc.stdout
    (result,) = _results(sweep).values()
    assert result["status"] == "pruned" and result["global_step"] == 256 and result["final_eval"] is None
    assert (sweep / "1" / "checkpoints" / "checkpoint.pt").is_file()
    assert [t.state for t in _study(url).get_trials()] == [optuna.trial.TrialState.COMPLETE,
                                                         optuna.trial.TrialState.PRUNED]
    assert "sweep: 1 jobs, 0 done, 1 pruned, 0 failed" in proc.stdout
    out = report(sweep)
    assert [j.status for j in out["ranked"]] == ["pruned"]


def _tpe_search(tmp_path, name: str):
    sweep = tmp_path / name
    cli("ppo-train", "-m", "hydra/sweeper=ppo_tune", "hydra.sweeper.n_trials=3", "hydra.sweeper.pruner=none",
        "hydra.sweeper.startup_trials=2", *SMALL, *JOB, "eval.every_steps=0", f"hydra.sweep.dir={sweep}",
        cwd=tmp_path, check=True)
    return sweep


def _searched(sweep) -> list[list[str]]:
    return [[o for o in r["overrides"] if not o.startswith("tune.")] for _, r in sorted(_results(sweep).items())]


@pytest.mark.slow  # a second whole search
def test_a_tpe_search_is_reproducible(tmp_path):
    assert _searched(_tpe_search(tmp_path, "a")) == _searched(_tpe_search(tmp_path, "b"))  # the sampler's seed


def test_a_tpe_search_report_gives_its_best_and_a_preset(tmp_path):
    sweep = _tpe_search(tmp_path, "a")
    summary = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert summary["n_trials"] == 3 and summary["complete"] == 3 and summary["best_params"].keys() == {
        "algo.clip_range", "algo.ent_coef"}
    assert summary["best_value"] == max(r["objective"] for r in _results(sweep).values())
    assert summary["best_command"].startswith("ppo-train algo.total_timesteps=512 ")
    preset = tmp_path / "my_conf" / "algo" / "tuned.yaml"
    shown = cli("ppo-sweep-report", str(sweep), "--export-preset", str(preset), cwd=tmp_path, check=True)
    assert "parameter importances (Optuna, " in shown.stdout and f"best trial {summary['best_trial']}" in shown.stdout
    written = yaml.safe_load(preset.read_text())
    assert written["algo"]["clip_range"] == summary["best_params"]["algo.clip_range"]
    assert written["algo"]["n_steps"] == 64 and "lr_actor" not in written["algo"]  # defaults are not repeated
    again = cli("ppo-train", "--config-dir", str(tmp_path / "my_conf"), "algo=tuned", "--cfg", "job", cwd=tmp_path,
                check=True)
    assert yaml.safe_load(again.stdout)["algo"]["ent_coef"] == pytest.approx(summary["best_params"]["algo.ent_coef"])


def test_grid_sampler_runs_each_combination_once(tmp_path):
    sweep = tmp_path / "sweep"
    cli("ppo-train", "-m", "hydra/sweeper=ppo_tune", "hydra.sweeper.sampler=grid", "~hydra.sweeper.params",
        "algo.clip_range=choice(0.1, 0.2)", "algo.K_epochs=range(1, 2)", *JOB, "eval.every_steps=0",
        f"hydra.sweep.dir={sweep}", cwd=tmp_path, check=True)
    combos = {tuple(o for o in r["overrides"] if o.startswith(("algo.clip_range", "algo.K_epochs")))
              for r in _results(sweep).values()}
    assert len(_results(sweep)) == 4 and len(combos) == 4


@pytest.mark.parametrize("args, message", [
    (["hydra.sweeper.sampler=bayes"], "hydra.sweeper.sampler='bayes' is not a sampler; choose one of tpe, random, "
                                      "cmaes, grid"),
    (["hydra.sweeper.pruner=early"], "hydra.sweeper.pruner='early' is not a pruner"),
    (["+hydra.sweeper.params.algo.clip_rnage='interval(0.1, 0.2)'"], "unknown config key 'algo.clip_rnage' in "
                                                                      "hydra.sweeper.params"),
    (["hydra.sweeper.storage=postgresql://nobody@127.0.0.1:9/none"], "the study storage 'postgresql://nobody@"),
    (["hydra.sweeper.sampler=grid"], "hydra.sweeper.sampler=grid needs a finite list for every key"),
    (["+hydra.sweeper.n_trails=3"], "hydra.sweeper.n_trails is not a ppo_tune setting (did you mean n_trials?)"),
    (["hydra.sweeper.n_trails=3"], "hydra.sweeper.n_trails is not a ppo_tune setting (did you mean n_trials?)"),
    (["+hydra.sweeper.params={algo.ent_coef: \"tag(log, interval(0, 0.1))\"}"],
     "the search space of algo.ent_coef (tag(log, interval(0, 0.1))) is not one Optuna can sample"),
    (["hydra.sweeper.n_trials=many"], "hydra.sweeper.n_trials='many': must be an integer"),
    (["algo.K_epochs=interval(1, 5)"], "Error merging override algo.K_epochs="),  # a float for an integer key
])
def test_bad_tuning_input_is_one_line_before_any_job(tmp_path, args, message):
    _refused_before_any_job(tmp_path, "ppo_tune", args, message)


def _refused_before_any_job(tmp_path, sweeper, args, message):
    sweep = tmp_path / "sweep"
    proc = cli("ppo-train", "-m", f"hydra/sweeper={sweeper}", *args, *JOB, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert message in lines[0]
    assert not sweep.exists() or not _results(sweep)


def test_two_sweepers_on_one_storage_complete_one_study_without_a_duplicate_or_a_lost_trial(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([sys.executable, "-m", "ppo_cli.cli.train", "-m", "hydra/sweeper=ppo_tune",
                               "hydra.sweeper.n_trials=6", "hydra.sweeper.pruner=none", f"hydra.sweeper.storage={url}",
                               *SMALL, *JOB, "eval.every_steps=0", f"hydra.sweep.dir={tmp_path / name}"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in ("one", "two")]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    trials = _study(url).get_trials()
    assert len(trials) == 6 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    jobs = {**{f"one/{k}": r for k, r in _results(tmp_path / "one").items()},
            **{f"two/{k}": r for k, r in _results(tmp_path / "two").items()}}
    numbers = sorted(int(k.split("/")[1]) for k in jobs)
    assert numbers == list(range(6))  # each trial ran once, in the folder of its number
    assert _results(tmp_path / "one") and _results(tmp_path / "two")  # both sweepers did work
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 6  # and never drew the same configuration


def test_a_sweep_interrupted_with_ctrl_c_and_continued_ends_with_n_trials(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["hydra/sweeper=ppo_tune", "hydra.sweeper.n_trials=3", "hydra.sweeper.pruner=none", *SMALL,
            "algo.total_timesteps=100000", *JOB[1:], "eval.every_steps=0", "eval.final=false",
            "eval.objective=train", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "ppo_cli.cli.train", "-m", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not list(sweep.glob("0/events.*")):  # trial 0 is training
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    time.sleep(2.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    url = f"sqlite:///{sweep / 'study.db'}"
    (first, retry) = _study(url).get_trials()
    assert first.user_attrs["interrupted"] and retry.state == optuna.trial.TrialState.WAITING
    assert retry.system_attrs["fixed_params"] == first.params  # queued: run first when the sweep goes on
    assert json.loads((sweep / "0" / "result.json").read_text())["status"] == "interrupted"
    # Continued, with a budget that ends: the interrupted configuration runs again, and 3 trials finish.
    cli("ppo-train", "-m", *[a if not a.startswith("algo.total_timesteps") else "algo.total_timesteps=256"
                             for a in args], cwd=tmp_path, check=True)
    trials = _study(url).get_trials()
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 3 and done[0].params == first.params and done[0].user_attrs["retry_of"] == 0
    assert len({tuple(sorted(t.params.items())) for t in done}) == 3  # the continued sweep drew new ones


def test_tune_seeds_run_each_configuration_on_several_seeds_and_score_the_mean(tmp_path):
    sweep = tmp_path / "sweep"
    cli("ppo-train", "-m", "hydra/sweeper=ppo_tune", "hydra.sweeper.n_trials=1", "hydra.sweeper.pruner=none", *SMALL,
        "tune.seeds=2", *JOB, "eval.every_steps=0", f"hydra.sweep.dir={sweep}", cwd=tmp_path, check=True)
    results = _results(sweep)
    assert sorted(results) == ["0", "1"]
    assert {o for r in results.values() for o in r["overrides"] if o.startswith("seed=")} == {"seed=1", "seed=2"}
    (trial,) = _study(f"sqlite:///{sweep / 'study.db'}").get_trials()
    assert trial.value == pytest.approx(sum(r["objective"] for r in results.values()) / 2)
    (group,) = report(sweep)["groups"]  # the report aggregates the two seeds as one configuration
    assert group["count"] == 2


# --- PBT -------------------------------------------------------------------------------------------------------


def test_pbt_exploits_explores_and_each_member_retrains_from_its_lineage_bitwise(tmp_path):
    sweep = tmp_path / "sweep"
    pbt = ["hydra/sweeper=ppo_pbt", "hydra.sweeper.population=2", "hydra.sweeper.interval=256",
           "hydra.sweeper.quantile=0.5", "hydra.sweeper.resample_probability=0", "~hydra.sweeper.params",
           "+hydra.sweeper.params={algo.lr_actor: 'tag(log, interval(1e-4, 3e-3))', algo.clip_range: "
           "'interval(0.1, 0.3)'}"]
    proc = cli("ppo-train", "-m", *pbt, "env=CartPole-v1", *JOB, "eval.every_steps=0", f"hydra.sweep.dir={sweep}",
               cwd=tmp_path, check=True)
    lineage = json.loads((sweep / "pbt_lineage.json").read_text())
    assert lineage["population"] == 2 and lineage["generations"] == 2 and len(_results(sweep)) == 4
    (event,) = lineage["events"]  # of 2 members, the worse copies the better once
    first = _results(sweep)
    worse, better = sorted(("0", "1"), key=lambda k: first[k]["objective"])
    assert event["member"] == int(worse) and event["source_job"] == better and event["job"] == str(2 + int(worse))
    old = yaml.safe_load((sweep / better / ".hydra" / "overrides.yaml").read_text())
    bounds = {"algo.lr_actor": (1e-4, 3e-3), "algo.clip_range": (0.1, 0.3)}
    for key, value in event["values"].items():  # explored: the better member's value times 0.8 or 1.25, in bounds
        before = float(next(o.split("=", 1)[1] for o in old if o.startswith(key + "=")))
        low, high = bounds[key]
        assert value in (pytest.approx(min(max(before * f, low), high)) for f in (0.8, 1.25))
    resumed = yaml.safe_load((sweep / event["job"] / ".hydra" / "overrides.yaml").read_text())
    assert f"resume={(sweep / better / 'checkpoints' / 'checkpoint.pt').resolve()}" in resumed
    # The member's command trains its final policy again on its own: the same parameters, bit for bit.
    member = lineage["members"][int(worse)]
    assert member["chain"] == [better, event["job"]]
    for step in member["command"].split(" && "):
        cli("ppo-train", *step.split()[1:], cwd=tmp_path, check=True)
    alone = torch.load(tmp_path / "runs" / f"pbt_member_{worse}" / "checkpoints" / "checkpoint.pt",
                       weights_only=False)
    swept = torch.load(sweep / event["job"] / "checkpoints" / "checkpoint.pt", weights_only=False)
    assert alone["global_step"] == swept["global_step"] == 512
    for name, tensor in swept["policy"].items():
        assert torch.equal(tensor, alone["policy"][name]), name
    shown = cli("ppo-sweep-report", str(sweep), cwd=tmp_path, check=True)
    assert f"member {worse} (job {event['job']}) copied member {better}" in shown.stdout, proc.stdout
    assert (sweep / "pbt_best.png").stat().st_size > 1000


@pytest.mark.parametrize("args, message", [
    (["hydra.sweeper.interval=256", "+hydra.sweeper.params.algo.lr_schedule='choice(constant, linear)'"],
     "PBT mutates numbers only"),
    (["hydra.sweeper.interval=0"], "hydra.sweeper.interval=0: must be between 1 and algo.total_timesteps"),
    (["hydra.sweeper.interval=200"], "hydra.sweeper.interval=200: must be a multiple of the rollout, algo.n_steps x "
                                     "env.num_envs = 128 (say 256)"),
    (["hydra.sweeper.interval=256", "algo.ent_schedule=linear"], "algo.ent_schedule must be constant under PBT"),
    (["hydra.sweeper.interval=256", "algo.lr_schedule=linear"], "algo.lr_schedule must be constant under PBT"),
    (["+hydra.sweeper.params.algo.clip_rnage='interval(0.1, 0.2)'"], "unknown config key 'algo.clip_rnage'"),
    (["hydra.sweeper.interval=256", "+hydra.sweeper.params={algo.clip_rnage: \"interval(0.1, 0.2)\"}"],
     "algo.clip_rnage is not a config key"),
    (["hydra.sweeper.populaton=2"], "hydra.sweeper.populaton is not a ppo_pbt setting (did you mean population?)"),
])
def test_bad_pbt_input_is_one_line_before_any_job(tmp_path, args, message):
    _refused_before_any_job(tmp_path, "ppo_pbt", args, message)


def test_trials_in_joblib_workers_report_through_a_journal_file(tmp_path):
    # The jobs run in joblib's worker processes and reach the study themselves: here through Optuna's journal file.
    sweep = tmp_path / "sweep"
    journal = tmp_path / "shared" / "study.log"
    cli("ppo-train", "-m", "hydra/sweeper=ppo_tune", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
        "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_trials=2", "hydra.sweeper.pruner=sha",
        f"hydra.sweeper.storage=journal:{journal}", *SMALL, *JOB, f"hydra.sweep.dir={sweep}", cwd=tmp_path, check=True)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    trials = optuna.load_study(study_name="ppo", storage=storage).get_trials()
    assert len(trials) == 2 and all(t.intermediate_values for t in trials)  # each reported its evaluations
    assert {t.state for t in trials} <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    assert sorted(_results(sweep)) == ["0", "1"]


def test_a_finished_trial_is_told_nothing_when_its_job_is_resumed_on_its_own(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="ppo", storage=url, direction="maximize")
    study.set_user_attr("ppo_cli.pruner", {"name": "median", "startup_trials": 0})
    trial = study.ask()
    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    reporter = TrialReporter.from_cfg(make_cfg(f"tune.storage={url}", "tune.study=ppo", f"tune.trial={trial.number}"))
    assert reporter.report(256, 1.0) is False and study.get_trials()[0].intermediate_values == {}


def test_pbt_explores_a_choice_among_its_values():
    from ppo_cli.cli.pbt import PopulationTraining

    pbt = PopulationTraining.__new__(PopulationTraining)
    pbt.rng, pbt.resample, pbt.perturb = __import__("random").Random(0), 0.0, [0.8, 1.25]
    space = {"algo.n_steps": optuna.distributions.CategoricalDistribution([256, 512, 1024])}
    seen = {pbt.explore({"algo.n_steps": 512}, space)["algo.n_steps"] for _ in range(50)}
    assert seen == {256, 1024}  # a neighbour, never 512 x 0.8


def test_a_continued_study_keeps_each_keys_kind_of_range(tmp_path):
    sweep = tmp_path / "sweep"
    base = ["hydra/sweeper=ppo_tune", "hydra.sweeper.pruner=none", *SMALL, *JOB, "eval.every_steps=0",
            f"hydra.sweep.dir={sweep}"]
    cli("ppo-train", "-m", *base, "hydra.sweeper.n_trials=1", "algo.K_epochs=range(1, 4)", cwd=tmp_path, check=True)
    proc = cli("ppo-train", "-m", *base, "hydra.sweeper.n_trials=2", "algo.K_epochs=choice(3, 5)", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "sampled algo.K_epochs from IntDistribution, this sweep from CategoricalDistribution" in proc.stderr
    assert len(_study(f"sqlite:///{sweep / 'study.db'}").get_trials()) == 1  # nothing asked, nothing left running
