"""benchmarks/returns.py's Atari comparison with SB3 (--peer sb3): that SB3 trains on the same frames as ppo-cli,
on ppo-cli's hyperparameters, and is evaluated by ppo-cli's protocol at ppo-cli's steps; and the script's one-line
refusals. The SB3 tests need the bench extra and skip without it."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import HAVE_ATARI, needs_atari

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import returns  # noqa: E402
from _common import atari_overrides, compose  # noqa: E402


def _sb3():
    return pytest.importorskip("stable_baselines3", reason="SB3 not installed: pip install '.[bench]'")


@needs_atari
def test_sb3_trains_on_the_frames_ppo_cli_trains_on():
    """Same seeds and actions: the newest frame, the (clipped) reward and the episode end (a lost life) are identical
    in ppo-cli's training envs and SB3's make_atari_env + VecFrameStack; the stacks differ only in the 3 steps after
    an end (SB3 pads a fresh stack with zeros, gymnasium with the first frame)."""
    _sb3()
    from _common import sb3_atari_ppo

    from ppo_cli.envs import make_vec_env

    cfg = compose([*atari_overrides("Breakout"), "env.num_envs=2"])
    theirs = sb3_atari_ppo(cfg).get_env()
    ours = make_vec_env(cfg.env, seed=cfg.seed, training=True)  # reset with the seeds
    theirs.reset()  # the same seeded reset on SB3's side; then both take EpisodicLife's second reset (a no-op step)
    theirs_obs, (ours_obs, _) = theirs.reset(), ours.reset()
    assert theirs_obs.shape == ours_obs.shape == (2, 4, 84, 84)
    rng = np.random.default_rng(0)
    since_end = np.zeros(2, dtype=int)  # both stacks are fresh
    ends = 0
    for _ in range(120):
        actions = rng.integers(4, size=2)
        theirs_obs, theirs_r, theirs_done, _ = theirs.step(actions)
        ours_obs, ours_r, terminated, truncated, _ = ours.step(actions)
        np.testing.assert_array_equal(theirs_obs[:, -1], ours_obs[:, -1])
        np.testing.assert_array_equal(theirs_r, ours_r)
        np.testing.assert_array_equal(theirs_done, terminated | truncated)
        since_end = np.where(theirs_done, 0, since_end + 1)
        stacks_differ = (theirs_obs != ours_obs).any(axis=(1, 2, 3))
        assert not (stacks_differ & (since_end >= 3)).any()
        ends += int(theirs_done.sum())
    assert ends >= 2  # lives were lost, so the life splitting and resets were compared too
    ours.close()


def test_sb3_gets_ppo_cli_hyperparameters():
    _sb3()
    from _common import sb3_atari_ppo

    if not HAVE_ATARI:
        pytest.skip("ale-py / opencv not installed")
    model = sb3_atari_ppo(compose([*atari_overrides("Pong"), "env.num_envs=3"]))
    assert (model.n_envs, model.n_steps, model.batch_size, model.n_epochs) == (3, 128, 256, 4)
    assert (model.gamma, model.gae_lambda, model.ent_coef, model.vf_coef, model.max_grad_norm) == (
        0.99, 0.95, 0.01, 0.5, 0.5)
    assert model.clip_range(1.0) == 0.1 and model.policy.optimizer.defaults["eps"] == 1e-5
    assert model.lr_schedule(1.0) == pytest.approx(2.5e-4) and model.lr_schedule(0.5) == pytest.approx(1.25e-4)
    assert model.env.get_attr("spec")[0].id == "ALE/Pong-v5"
    ale = model.env.unwrapped.envs[0].unwrapped
    assert ale._frameskip == 1 and ale.ale.getFloat("repeat_action_probability") == 0.25 and ale.action_space.n == 6


@needs_atari
def test_ppo_cli_updates_the_policy_exactly_as_sb3_does_from_the_same_weights_and_rollout():
    """SB3 collects a Breakout rollout; ppo-cli's policy gets SB3's weights and its Updater the same samples. With
    minibatches of the whole rollout (so the tools' shuffles cannot matter), four epochs leave the same
    parameters and losses: the Atari learning comparison differs by its random streams, not by its algorithm."""
    _sb3()
    import torch
    from _common import sb3_atari_ppo

    from ppo_cli.envs import describe_space
    from ppo_cli.policy import build_policy
    from ppo_cli.ppo import Updater, UpdateSettings, make_optimizer
    from ppo_cli.rollout import Batch

    cfg = compose([*atari_overrides("Breakout"), "env.num_envs=4", "algo.n_steps=32"])
    model = sb3_atari_ppo(cfg)
    model.batch_size = n = 4 * 32
    _, callback = model._setup_learn(n, callback=None, progress_bar=False)
    model.collect_rollouts(model.env, callback, model.rollout_buffer, n_rollout_steps=model.n_steps)
    # SB3's spaces are ppo-cli's: uint8 [4, 84, 84] frames (channels first) and the game's minimal action set
    policy = build_policy(describe_space(model.observation_space), describe_space(model.action_space), cfg)
    theirs = list(model.policy.parameters())
    with torch.no_grad():
        for mine, their in zip(policy.parameters(), theirs, strict=True):
            mine.copy_(their)
    buf = model.rollout_buffer

    def rows(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a.reshape(n, *a.shape[2:]))

    batch = Batch(rows(buf.observations).to(torch.uint8), rows(buf.actions).reshape(-1).long(),
                  *(rows(x).reshape(-1).float() for x in (buf.log_probs, buf.values, buf.advantages, buf.returns)))
    a = cfg.algo
    optimizer = make_optimizer(policy, "adam", a.lr_actor, a.lr_critic, a.eps, 0.0)
    updater, _ = Updater.build(policy, optimizer, torch.Generator().manual_seed(0))
    ours = updater.update(batch, UpdateSettings(a.clip_range, None, a.ent_coef, a.vf_coef, a.max_grad_norm,
                                                a.K_epochs, n, a.normalize_advantage, None))
    before = [p.detach().clone() for p in theirs]
    model.train()
    logged = model.logger.name_to_value
    moved = max(float((p - b).abs().max()) for p, b in zip(theirs, before, strict=True))
    differ = max(float((p - q).abs().max()) for p, q in zip(policy.parameters(), theirs, strict=True))
    assert moved > 1e-4 and differ < 1e-3 * moved  # both took the same four steps
    assert ours["value_loss"] == pytest.approx(logged["train/value_loss"], rel=1e-4)
    assert ours["entropy"] == pytest.approx(-logged["train/entropy_loss"], rel=1e-4)
    assert ours["policy_loss"] == pytest.approx(logged["train/policy_gradient_loss"], rel=1e-3, abs=1e-7)


def test_sb3_refuses_a_setting_it_has_no_equal_for():
    from _common import _sb3_gaps

    assert _sb3_gaps(compose(atari_overrides("Breakout"))) == []
    assert _sb3_gaps(compose([*atari_overrides("Breakout"), "network.shared_trunk=false", "algo.target_kl=0.02"])) == [
        "network.shared_trunk=False", "algo.target_kl=0.02"]


@needs_atari
def test_sb3_is_evaluated_at_ppo_clis_steps_by_ppo_clis_protocol(tmp_path):
    """Evaluations after the updates that cross a multiple of eval.every_steps (PeriodicEvaluator.due's rule), whole
    games on ppo-cli's evaluation envs, cut at eval.max_episode_steps."""
    _sb3()
    from ppo_cli.evaluation import PeriodicEvaluator

    overrides = [*atari_overrides("Breakout"), "env.num_envs=2", "algo.n_steps=16", "algo.batch_size=32",
                 "algo.K_epochs=1", "algo.total_timesteps=96", "eval.every_steps=40", "eval.episodes=1",
                 "eval.max_episode_steps=30"]
    result = returns.sb3_worker(overrides, tmp_path, "cpu", 1)
    due = PeriodicEvaluator(compose(overrides), *[None] * 5).due
    ends = range(32, 96 + 1, 32)  # each update's last step
    assert [p["step"] for p in result["curve"]] == [s for s in ends if due(s - 32, s)] == [64, 96]
    assert result["steps"] == 96
    # A Breakout game lasts far more than 30 steps: every evaluation game was cut, and said so.
    assert all(p["cut"] == 1 for p in result["curve"])


@pytest.mark.parametrize(("args", "says"), [
    (["--tasks", "nosuch"], "unknown task 'nosuch'"),
    (["--tasks", "pendulum", "--peer", "sb3"], "compares Atari tasks only; 'pendulum'"),
])
def test_returns_refuses_bad_tasks_in_one_line(args, says):
    proc = subprocess.run([sys.executable, str(BENCH / "returns.py"), *args], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert says in proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr


def test_atari_tasks_are_the_conf_env_presets():
    beamrider = returns.resolve("beamrider")
    assert beamrider.atari and beamrider.target == 1916.0
    assert beamrider.overrides == ["env=BeamRider", "network=cnn", "algo=ppo_atari", "eval.max_episode_steps=27000"]
    assert returns.resolve("qbert").target is None
    assert returns.resolve("pendulum").atari is False
    assert returns.resolve("nosuch") is None
