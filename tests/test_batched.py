"""Many runs in one process (hydra/launcher=ppo_batched; algo/batched.py, run/batched.py): a member computes what
its single run computes, members never interact, and each member's folder is a run's folder."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ppo_cli.run.batched import BatchedRunner
from ppo_cli.run.runner import Runner
from ppo_cli.run.signals import Interrupted
from tests.conftest import ROOT, cli, make_cfg

QUIET = ["eval.final=false", "eval.objective=train", "eval.every_steps=0", "log_interval=1000"]
SMALL = ["env.num_envs=2", "algo.n_steps=64", "algo.batch_size=32"]
# Measured over all 4 members and their first 10 updates (python benchmarks/batched.py --tolerance): CartPole
# members equal their single runs to the bit for the first 4 updates (2 on the native envs), then differ by at most
# 6e-8; Pendulum with both normalizations by 6e-8 after 1 update and 6e-7 after 3, then growing as any two runs one
# rounding apart do (1e-5 after 5, 4e-3 after 10). The actions of the first rollout are identical.
TOLERANCE = 1e-5
CASES = {
    "discrete": ["env=CartPole-v1", "env.vectorization=sync", *SMALL],
    "continuous-normalized": ["env=Pendulum-v1", "algo=ppo_pendulum", *SMALL],
    "discrete-native-env": ["env=CartPole-v1", "env.vectorization=native", *SMALL],
}


def _never() -> bool:
    return False


@pytest.mark.parametrize("case", CASES)
def test_a_member_of_a_batch_of_4_computes_what_its_single_run_computes(case, tmp_path):
    seeds = [3, 4, 5, 6]
    cfgs = [make_cfg(*CASES[case], *QUIET, f"seed={s}", "algo.lr_actor=1e-3") for s in seeds]
    cfgs[2].algo.clip_range = 0.25  # members differ in a knob too: member 1 must not care
    batch = BatchedRunner([(c, tmp_path / f"b{i}") for i, c in enumerate(cfgs)])
    single = Runner(make_cfg(*CASES[case], *QUIET, "seed=4", "algo.lr_actor=1e-3"), tmp_path / "single",
                    rich_progress=False)
    try:
        e = cfgs[0].env.num_envs
        for update in range(3):
            batch.algo.collect(batch.envs, _never, np.ones(4, dtype=bool))
            single.algo.collect(single.envs, _never, 0)
            if update == 0:
                mine = batch.algo.buffer.actions[:, e:2 * e]
                assert torch.equal(mine, single.algo.buffer.actions)
            batch.algo.learn([0.0] * 4, np.ones(4, dtype=bool))
            single.algo.learn(0.0)
            if update == 0 and case.startswith("discrete"):  # to the bit
                mine = batch.runners[1].algo.policy.state_dict()
                assert all(torch.equal(mine[n], v) for n, v in single.algo.policy.state_dict().items())
        member = batch.runners[1].algo
        for name, value in single.algo.policy.state_dict().items():
            assert float((member.policy.state_dict()[name] - value).abs().max()) <= TOLERANCE, name
        for a, b in zip(member.optimizer.state.values(), single.algo.optimizer.state.values(), strict=True):
            assert float(a["step"]) == float(b["step"])
            assert float((a["exp_avg"] - b["exp_avg"]).abs().max()) <= TOLERANCE
        # Members really differ: member 0 (another seed) is not member 1.
        other = batch.runners[0].algo.policy.state_dict()
        assert any(not torch.equal(other[n], v) for n, v in member.policy.state_dict().items())
    finally:
        batch.close()
        single.close()


def _run_batch(jobs: list) -> list:
    runner = BatchedRunner(jobs)
    try:
        return runner.run()
    finally:
        runner.close()


def test_a_member_that_diverges_stops_alone_and_the_others_finish(tmp_path):
    # vf_coef 1e38 overflows member 2's value gradients to inf; the clip then makes them NaN
    jobs = [(make_cfg(*SMALL, *QUIET, f"seed={s}", "algo.total_timesteps=512", f"algo.vf_coef={vf}"),
             tmp_path / str(s)) for s, vf in ((1, 0.5), (2, 1e38), (3, 0.5))]
    outcomes = _run_batch(jobs)
    assert "training diverged" in str(outcomes[1])
    assert [o.global_step for o in (outcomes[0], outcomes[2])] == [512, 512]
    assert (tmp_path / "1" / "checkpoints" / "checkpoint.pt").is_file()


def test_a_continuous_member_that_diverges_stops_alone_and_never_acts_nan(tmp_path):
    # Its NaN parameters would send NaN actions into the shared envs (a NaN observation fault for all) and into the
    # evaluation: a member that diverged acts 0 and is evaluated no more.
    jobs = [(make_cfg("env=Pendulum-v1", "algo=ppo_pendulum", *SMALL, "eval.every_steps=128", "eval.episodes=2",
                      "eval.final=true", "algo.total_timesteps=768", f"seed={s}", f"algo.vf_coef={vf}"),
             tmp_path / str(s)) for s, vf in ((1, 0.5), (2, 1e38))]
    outcomes = _run_batch(jobs)
    assert "training diverged" in str(outcomes[1])
    assert outcomes[0].global_step == 768 and outcomes[0].final_eval is not None


def test_an_env_that_breaks_saves_every_member_where_the_rollout_began(tmp_path):
    # Each sub-env raises at its 100th step: in the second rollout (2 envs x 64 steps per member and update).
    jobs = [(make_cfg("env.entry_point=tests.custom_env:Faulty", "+env.kwargs.fault=raise_step", "+env.kwargs.at=100",
                      *SMALL, *QUIET, f"seed={s}", "algo.total_timesteps=1024"), tmp_path / str(s)) for s in (1, 2)]
    outcomes = _run_batch(jobs)
    for s, outcome in zip((1, 2), outcomes, strict=True):
        assert "the simulator lost its connection" in str(outcome) and "is saved: ppo-train resume=" in str(outcome)
        saved = torch.load(tmp_path / str(s) / "checkpoints" / "checkpoint.pt", weights_only=False)
        assert saved["global_step"] == 128


def test_a_stop_during_the_last_update_saves_every_member_as_interrupted(tmp_path):
    jobs = [(make_cfg(*SMALL, *QUIET, f"seed={s}", "algo.total_timesteps=256"), tmp_path / str(s)) for s in (1, 2)]
    runner = BatchedRunner(jobs)
    learn = runner.algo.learn

    def learn_then_signal(progress, active):
        out = learn(progress, active)
        if runner.runners[0].global_step == 128:  # the last update: a Ctrl-C arrives while it runs
            runner.stops.handle(signal.SIGINT, None)
        return out

    runner.algo.learn = learn_then_signal
    try:
        outcomes = runner.run()
    finally:
        runner.close()
    assert all(isinstance(o, Interrupted) and o.step == 256 for o in outcomes), outcomes
    for s in (1, 2):
        assert torch.load(tmp_path / str(s) / "checkpoints" / "checkpoint.pt", weights_only=False)["global_step"] == 256


def _params(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "checkpoint.pt", weights_only=False)["policy"]


def test_a_grid_as_one_batched_process_and_as_separate_processes_gives_the_same_runs(tmp_path):
    grid = ["algo.clip_range=0.1,0.2", "seed=1,2,3", *SMALL, "algo.total_timesteps=1024", "eval.episodes=3"]
    batched = cli("ppo-train", "-m", *grid, "hydra/launcher=ppo_batched", f"hydra.sweep.dir={tmp_path / 'b'}",
                  cwd=tmp_path, check=True)
    assert "batch: 6 runs in one process" in batched.stdout
    cli("ppo-train", "-m", *grid, f"hydra.sweep.dir={tmp_path / 's'}", cwd=tmp_path, check=True)
    for job in range(6):
        b, s = (json.loads((tmp_path / d / str(job) / "result.json").read_text()) for d in "bs")
        assert b["overrides"] == s["overrides"] and b["batched_with"] == 6 and b["status"] == "ok"
        pb, ps = _params(tmp_path / "b" / str(job)), _params(tmp_path / "s" / str(job))
        assert max(float((pb[k] - ps[k]).abs().max()) for k in ps) <= TOLERANCE
    reports = [cli("ppo-sweep-report", str(tmp_path / d), cwd=tmp_path, check=True).stdout for d in "bs"]
    # The same configurations, the same runs per configuration (the figures differ only with the final evaluations'
    # float rounding, so the table's first columns are compared).
    lines = [[line.split("│")[1:3] for line in r.splitlines() if "clip_range" in line and "│" in line] for r in reports]
    assert lines[0] == lines[1] and len(lines[0]) == 2


def test_a_member_checkpoint_is_a_run_of_its_own(tmp_path):
    sweep = tmp_path / "sw"
    cli("ppo-train", "-m", "seed=1,2", *SMALL, "algo.total_timesteps=256", "hydra/launcher=ppo_batched",
        f"hydra.sweep.dir={sweep}", cwd=tmp_path, check=True)
    member = sweep / "1" / "checkpoints" / "checkpoint.pt"
    data = torch.load(member, weights_only=False)
    # Its own tensors only: not views of every member's stacked storage.
    weight = data["policy"]["actor_encoder.0.weight"]
    assert weight.untyped_storage().nbytes() == weight.numel() * weight.element_size()
    shown = cli("ppo-eval", str(member), "--episodes", "2", "--json", cwd=tmp_path, check=True)
    assert json.loads(shown.stdout)["episodes"] == 2
    resumed = cli("ppo-train", f"resume={member}", "algo.total_timesteps=384", cwd=tmp_path, check=True)
    assert "384" in resumed.stdout


def test_what_cannot_batch_trains_one_by_one_and_says_why(tmp_path):
    sweep = tmp_path / "sw"
    # Two env counts: two batches of one, each trained as a plain run.
    proc = cli("ppo-train", "-m", "env.num_envs=1,2", "algo.n_steps=64", "algo.batch_size=32",
               "algo.total_timesteps=128", "hydra/launcher=ppo_batched", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
               check=True)
    assert "batch:" not in proc.stdout
    assert [json.loads((sweep / j / "result.json").read_text())["batched_with"] for j in "01"] == [1, 1]
    # A recurrent policy: the batched path does not cover it, so the members train one after another, saying why.
    proc = cli("ppo-train", "-m", "seed=1,2", "algo=ppo_lstm", "algo.n_steps=32", "algo.batch_size=32",
               "env.num_envs=2", "algo.total_timesteps=64", "hydra/launcher=ppo_batched",
               f"hydra.sweep.dir={tmp_path / 'lstm'}", cwd=tmp_path, check=True)
    assert "train one after another" in proc.stdout and "numpy fast path" in proc.stdout


def test_resumed_members_train_as_a_batch_as_each_resumes_alone(tmp_path):
    first = tmp_path / "first"
    cli("ppo-train", "-m", "seed=1,2", *SMALL, *QUIET, "algo.total_timesteps=256", "hydra/launcher=ppo_batched",
        f"hydra.sweep.dir={first}", cwd=tmp_path, check=True)
    ckpts = [first / j / "checkpoints" / "checkpoint.pt" for j in "01"]
    more = ["algo.total_timesteps=512", "algo.lr_actor=1e-3", *QUIET]
    proc = cli("ppo-train", "-m", f"resume={ckpts[0]},{ckpts[1]}", *more, "hydra/launcher=ppo_batched",
               f"hydra.sweep.dir={tmp_path / 'again'}", cwd=tmp_path, check=True)
    assert "batch: 2 runs in one process" in proc.stdout
    alone = tmp_path / "alone"
    cli("ppo-train", f"resume={ckpts[1]}", *more, f"hydra.run.dir={alone}", cwd=tmp_path, check=True)
    batched, single = _params(tmp_path / "again" / "1"), _params(alone)
    assert max(float((batched[k] - single[k]).abs().max()) for k in single) <= TOLERANCE
    assert torch.load(alone / "checkpoints" / "checkpoint.pt", weights_only=False)["global_step"] == 512


def test_population_based_training_runs_its_population_in_one_process(tmp_path):
    sweep = tmp_path / "pbt"
    proc = cli("ppo-train", "-m", "hydra/sweeper=ppo_pbt", "hydra.sweeper.population=3", "hydra.sweeper.interval=256",
               *SMALL, "algo.total_timesteps=768", "eval.episodes=2", "hydra/launcher=ppo_batched",
               f"hydra.sweep.dir={sweep}", cwd=tmp_path, check=True)
    assert proc.stdout.count("batch: 3 runs in one process") == 3  # one batch per generation
    results = [json.loads(p.read_text()) for p in sweep.glob("*/result.json")]
    assert len(results) == 9 and {r["batched_with"] for r in results} == {3}


def test_ctrl_c_saves_every_member_at_the_same_boundary(tmp_path):
    sweep = tmp_path / "sw"
    proc = subprocess.Popen([sys.executable, "-m", "ppo_cli.cli.train", "-m", "seed=1,2,3", "env.num_envs=2",
                             "algo.n_steps=256", "algo.total_timesteps=10000000", "hydra/launcher=ppo_batched",
                             f"hydra.sweep.dir={sweep}"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin"})
    deadline = time.time() + 120
    while time.time() < deadline and not list(sweep.glob("*/events.out.tfevents.*")):
        time.sleep(0.2)
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    results = [json.loads((sweep / str(j) / "result.json").read_text()) for j in range(3)]
    assert {r["status"] for r in results} == {"interrupted"}
    steps = {torch.load(sweep / str(j) / "checkpoints" / "checkpoint.pt", weights_only=False)["global_step"]
             for j in range(3)}
    assert len(steps) == 1 and steps == {r["global_step"] for r in results}
