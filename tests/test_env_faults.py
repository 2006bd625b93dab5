"""Broken custom envs (issue 19, item 11): NaN or infinite observations and rewards, observations of the wrong shape,
reset() or step() raising (sync and async), each end the run with exit 2 and one line naming the env, the call and
the step: no traceback, no numpy or gymnasium warning. Huge but finite rewards that make the update diverge are
blamed on the rewards, with env.normalize_reward as the remedy. (Training a healthy env is unchanged bit for bit:
the wrapper only reads what passes through it.)"""

import json
import re

import gymnasium as gym
import numpy as np
import pytest
import torch

from ppo_cli.algo.update import divergence_message
from ppo_cli.envs.faults import EnvFaults, count_steps, largest_reward
from ppo_cli.envs.make import make_vec_env
from ppo_cli.errors import UserError

from .conftest import TINY, cli, make_cfg

ENV = "env 'tests.custom_env:Faulty'"
# Faulty goes wrong at its 5th step; 2 envs step together, so 8 steps were taken before the failing one.
RAISED_STEP = r"step\(\) raised RuntimeError at custom_env\.py:\d+: the simulator lost its connection \(at step 8\)"
RAISED_RESET = r"reset\(\) raised RuntimeError at custom_env\.py:\d+: the simulator did not start \(at step {}\)"
NAN_OBS = r"step\(\) returned a NaN observation \(at step 8\)"
SHAPE = (r"step\(\) returned an observation of shape \(3,\) where its observation space Box\(0\.0, 1\.0, \(1,\), "
         r"float32\) has shape \(1,\) \(at step 8\)")
ASYNC = ["env.vectorization=async"]
SLOW = pytest.mark.slow  # a variant whose code path a default case or an in-process test below covers too


@pytest.mark.parametrize("fault,at,extra,message", [
    pytest.param("nan_obs", 5, [], NAN_OBS, id="nan-obs"),
    pytest.param("nan_obs", 5, ["env.normalize_obs=true"], NAN_OBS, id="nan-obs-normalize-obs"),
    # the torch rollout: was "probability tensor contains either inf, nan or element < 0"
    pytest.param("nan_obs", 5, ["fast_rollout=false"], NAN_OBS, id="nan-obs-torch-rollout"),
    pytest.param("inf_obs", 5, [], r"step\(\) returned an infinite observation \(at step 8\)", id="inf-obs",
                 marks=SLOW),
    pytest.param("shape", 5, [], SHAPE, id="wrong-shape"),
    pytest.param("shape", 5, ASYNC, SHAPE, id="wrong-shape-async", marks=SLOW),
    pytest.param("raise_reset", 1, [], RAISED_RESET.format(0), id="reset-raises"),
    # inside step(): the autoreset's reset() is named
    pytest.param("raise_reset", 2, [], RAISED_RESET.format(r"\d+"), id="autoreset-raises"),
    pytest.param("raise_reset", 1, ASYNC, RAISED_RESET.format(0), id="reset-raises-async"),
    pytest.param("raise_reset", 2, ASYNC, RAISED_RESET.format(r"\d+"), id="autoreset-raises-async", marks=SLOW),
    pytest.param("raise_step", 5, [], RAISED_STEP, id="step-raises"),
    pytest.param("raise_step", 5, ASYNC, RAISED_STEP, id="step-raises-async"),
    pytest.param("nan_reward", 5, [], r"step\(\) returned a NaN reward \(at step 8\)", id="nan-reward"),
    pytest.param("inf_reward", 5, ["env.normalize_reward=true"], r"step\(\) returned an infinite reward \(at step 8\)",
                 id="inf-reward"),
])
def test_a_broken_env_is_one_line_naming_env_call_and_step(tmp_path, fault, at, extra, message):
    proc = cli("ppo-train", *TINY, *extra, "env.entry_point=tests.custom_env:Faulty", f"+env.kwargs.fault={fault}",
               f"+env.kwargs.at={at}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
               env={"PYTHONWARNINGS": "default"})  # so that a numpy or gymnasium warning would show
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert re.fullmatch(f"ppo-train: error: {ENV}: {message}", lines[0]), lines[0]


def _huge_rewards(tmp_path):
    proc = cli("ppo-train", *TINY, "env.entry_point=tests.custom_env:Faulty", "+env.kwargs.fault=huge_reward",
               f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, env={"PYTHONWARNINGS": "default"})
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr  # numpy's overflow warnings stay quiet
    assert lines[0].startswith("ppo-train: error: training diverged in the update at step 128"), lines[0]
    return lines[0]


def test_huge_rewards_stop_the_run_in_one_line_without_numpy_warnings(tmp_path):
    _huge_rewards(tmp_path)


def test_huge_rewards_are_blamed_on_the_rewards(tmp_path):
    line = _huge_rewards(tmp_path)
    assert "the env's rewards reached 1e+30 in magnitude" in line and "env.normalize_reward=true" in line, line


def test_the_divergence_message_blames_huge_unscaled_rewards_only():
    huge = divergence_message(128, ["value_loss", "grad_norm"], 1e30, normalize_reward=False)
    assert huge == ("training diverged in the update at step 128: value_loss, grad_norm became non-finite; the env's "
                    "rewards reached 1e+30 in magnitude, too large for the losses: set env.normalize_reward=true "
                    "(checkpoints written before it are kept)")
    for peak, scaled in ((1e30, True), (10.0, False), (None, False)):
        line = divergence_message(128, ["value_loss"], peak, normalize_reward=scaled)
        assert "lower algo.lr_actor / algo.lr_critic" in line and "normalize_reward" not in line


# --- in-process: what the wrapper sees, and the evaluation envs ---------------------------------------------------

def _envs(fault: str, vectorization: str = "sync", training: bool = True, at: int = 1) -> gym.vector.VectorEnv:
    cfg = make_cfg("env.entry_point=tests.custom_env:Faulty", f"+env.kwargs.fault={fault}", f"+env.kwargs.at={at}",
                   "env.num_envs=2", f"env.vectorization={vectorization}")
    return make_vec_env(cfg.env, seed=0, training=training)


def test_the_final_observation_of_a_truncated_episode_is_checked():
    envs = _envs("nan_final", at=3)  # the reset observation that replaces it is fine
    envs.step(np.ones(2, dtype=np.int64))
    envs.step(np.ones(2, dtype=np.int64))
    with pytest.raises(UserError, match=re.escape(f"{ENV}: step() returned a NaN final observation "
                                                  "(info['final_obs']) (at step 4)")):
        envs.step(np.ones(2, dtype=np.int64))
    envs.close()


def test_evaluation_envs_say_so_and_count_from_their_reset():
    envs = _envs("raise_step", training=False, at=3)
    envs.step(np.ones(2, dtype=np.int64))
    envs.reset(seed=1)  # an evaluation starts
    envs.step(np.ones(2, dtype=np.int64))
    with pytest.raises(UserError, match=r"^evaluation env 'tests\.custom_env:Faulty': step\(\) raised RuntimeError "
                                        r"at custom_env\.py:\d+: the simulator lost its connection \(at step 2\)$"):
        envs.step(np.ones(2, dtype=np.int64))
    envs.close()


def test_count_steps_numbers_messages_as_the_trainer_does():
    envs = _envs("raise_step", at=2)
    count_steps(envs, 1000, world=2)  # a resumed run of 2 processes at step 1,000
    envs.step(np.ones(2, dtype=np.int64))
    with pytest.raises(UserError, match=r"\(at step 1,004\)$"):
        envs.step(np.ones(2, dtype=np.int64))
    envs.close()


def test_largest_reward_is_what_the_env_returned():
    envs = _envs("huge_reward", at=100)
    assert largest_reward(envs) == 0.0
    envs.step(np.ones(2, dtype=np.int64))
    assert largest_reward(envs) == 1e30
    assert largest_reward(gym.vector.SyncVectorEnv([lambda: gym.make("CartPole-v1")])) is None
    envs.close()


class _DictObs(gym.Env):
    """A Dict observation whose float key turns NaN at the second step, beside an integer key."""

    observation_space = gym.spaces.Dict({"count": gym.spaces.Discrete(10),
                                         "pos": gym.spaces.Box(-1.0, 1.0, (2,), np.float32)})
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        self.t = 0
        return {"count": 0, "pos": np.zeros(2, np.float32)}, {}

    def step(self, action):
        self.t += 1
        return {"count": self.t, "pos": np.full(2, np.nan if self.t >= 2 else 0.0, np.float32)}, 0.0, False, False, {}


class _OneElement(gym.Env):
    """Observes one number where its space declares two: an async env's shared memory would broadcast it."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        return np.zeros(1, np.float32), {}

    def step(self, action):
        return np.zeros(1, np.float32), 0.0, False, False, {}


def test_dict_observations_are_checked_key_by_key():
    envs = EnvFaults(gym.vector.SyncVectorEnv([_DictObs, _DictObs]), "dict-env")
    envs.reset(seed=0)
    envs.step(np.zeros(2, dtype=np.int64))
    with pytest.raises(UserError, match=re.escape("env 'dict-env': step() returned a NaN observation (observation "
                                                  "key 'pos') (at step 2)")):
        envs.step(np.zeros(2, dtype=np.int64))
    envs.close()


@pytest.mark.filterwarnings("ignore:.*not within the observation space")  # gymnasium's env checker agrees
@pytest.mark.parametrize("vectorization", ["sync", "async"])
def test_an_observation_that_numpy_would_broadcast_is_refused(vectorization):
    cfg = make_cfg("env.entry_point=tests.test_env_faults:_OneElement", "env.num_envs=2",
                   f"env.vectorization={vectorization}")
    with pytest.raises(UserError, match=re.escape("env 'tests.test_env_faults:_OneElement': reset() returned an "
                                                  "observation of shape (1,) where its observation space Box(-1.0, "
                                                  "1.0, (2,), float32) has shape (2,) (at step 0)")):
        make_vec_env(cfg.env, seed=0)


# --- workers that die or hang (issue 30, item 11), and a run folder that says why (item 12) -----------------------

DIE = ["env.entry_point=tests.signal_envs:DieAt", "env.vectorization=async", "algo.n_steps=32", "algo.batch_size=32",
       "algo.total_timesteps=256", "eval.final=false", "eval.objective=train", "checkpoint_interval=0"]


@pytest.mark.parametrize("at", [10, 40])
def test_an_async_worker_that_dies_is_one_line_with_its_exit_and_what_was_trained_is_kept(tmp_path, at):
    """The worker's process ends (a simulator's crash): one line naming the sub-envs and their exit codes instead
    of gymnasium's 110-line EOFError; result.json says why; after an update, the rollout's start is saved."""
    run = tmp_path / "run"
    proc = cli("ppo-train", *TINY, *DIE, f"+env.kwargs.at={at}", f"hydra.run.dir={run}", cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert re.fullmatch(r"ppo-train: error: env 'tests\.signal_envs:DieAt': the worker process of sub-env 0 \(exit "
                        r"code 3\), sub-env 1 \(exit code 3\) ended during step\(\) \(at step \d+\).*", lines[0])
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "failed" and "exit code 3" in result["error"]
    saved = run / "checkpoints" / "checkpoint.pt"
    if at == 10:  # in the first rollout: nothing trained, nothing to keep
        assert not saved.exists()
    else:  # 2 envs x 32 steps an update: the 40th step is in the second rollout; the first update is kept
        assert lines[0].endswith(f"the run until step 64 is saved: ppo-train resume={saved} continues")
        assert torch.load(saved, weights_only=True)["global_step"] == 64


def test_an_async_call_slower_than_step_timeout_is_one_line_naming_the_sub_env(tmp_path):
    proc = cli("ppo-train", *TINY, "env.entry_point=tests.signal_envs:HangAt", "+env.kwargs.at=40",
               "env.vectorization=async", "env.step_timeout=2", "algo.n_steps=32", "algo.batch_size=32",
               f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert re.fullmatch(r"ppo-train: error: env 'tests\.signal_envs:HangAt': sub-env 0, 1 did not return from "
                        r"step\(\) within env\.step_timeout=2 s; the workers were stopped \(at step 78\); the run "
                        r"until step 64 is saved: .*", lines[0]), lines


def test_step_timeout_needs_async_workers(tmp_path):
    proc = cli("ppo-train", *TINY, "env.step_timeout=5", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2 and "env.step_timeout=5.0: applies to async envs" in proc.stderr, proc.stderr


def test_a_call_that_does_not_return_gets_a_note_once(monkeypatch, capfd):
    """Stalls: a reset() or step() in progress for STALL_SECONDS is told on stderr once, with how to stop it."""
    import time

    from ppo_cli.run.stalls import Stalls

    envs = make_vec_env(make_cfg(*TINY).env, seed=0, training=True)
    faults = next(e for e in (envs, envs.env) if isinstance(e, EnvFaults))
    faults.call = ("step", time.monotonic())
    stalls = Stalls(lambda: (envs, None), after=0.2)
    time.sleep(0.6)
    faults.call = None
    stalls.close()
    envs.close()
    err = capfd.readouterr().err
    assert err.count("note: env 'CartPole-v1' has not returned from step() for") == 1, err
    assert "Ctrl-C stops the run" in err and "env.step_timeout=SECONDS" in err


def test_an_evaluation_env_that_breaks_keeps_the_updates_trained(tmp_path):
    run = tmp_path / "run"
    proc = cli("ppo-train", *TINY, "env.entry_point=tests.signal_envs:FailsInEvaluation", "algo.n_steps=32",
               "algo.batch_size=32", "eval.every_steps=128", "checkpoint_interval=0", f"hydra.run.dir={run}",
               cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("ppo-train: error: evaluation env 'tests.signal_envs:FailsInEvaluation': reset() "
                               "raised RuntimeError"), lines
    saved = run / "checkpoints" / "checkpoint.pt"
    assert lines[0].endswith(f"the run until step 128 is saved: ppo-train resume={saved} continues")
    assert torch.load(saved, weights_only=True)["global_step"] == 128
