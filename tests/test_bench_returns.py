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

    from ppo_cli.envs.make import make_vec_env

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
def test_ppo_cli_trains_in_lockstep_with_sb3_given_the_same_weights_noise_shuffles_and_frames(tmp_path, monkeypatch):
    """ppo-cli's Runner and SB3's learn() on Breakout, from the same weights, sampling actions from the same noise
    (one numpy stream each, ppo-cli's inverse-CDF sampling on each tool's logits), with the same shuffles, env seeds
    and frame-stack padding (SB3 pads a new episode's stack with zeros, gymnasium with its first frame: the one
    difference between the tools' envs, patched away here). Two updates of 4 envs x 64 steps, lives lost on the
    way: every stored observation and action is the same, the advantages (GAE over the terminations) and log-probs
    agree to float rounding, and so do the parameters. What differs between the tools' learning curves is then
    their random streams and that padding, not the rollout, GAE or update.

    The gradient is not clipped here (max_grad_norm 1000): clipped at 0.5, float rounding grows from 1e-7 to 1e-4 -
    1e-3 within a few minibatch steps in either tool alone (ppo-cli against itself from weights 1e-7 apart diverged
    as far as against SB3), so only unclipped steps can be compared this tightly; clip_grad_norm is tested against
    torch's in test_fastpath.py."""
    _sb3()
    import contextlib
    import io

    import gymnasium as gym
    import torch
    from _common import sb3_atari_ppo

    from ppo_cli.algo.update import Updater
    from ppo_cli.run.runner import Runner

    envs, steps, minibatch, epochs, updates = 4, 64, 64, 2, 2
    n = envs * steps
    cfg = compose([*atari_overrides("Breakout"), f"env.num_envs={envs}", f"algo.n_steps={steps}",
                   f"algo.batch_size={minibatch}", f"algo.K_epochs={epochs}", f"algo.total_timesteps={n * updates}",
                   "algo.lr_schedule=constant", "algo.max_grad_norm=1000", "eval.every_steps=0", "eval.final=false",
                   "eval.objective=train", "checkpoint_interval=0", "device=cpu", "torch_threads=1"])
    stack = gym.wrappers.FrameStackObservation
    monkeypatch.setattr(gym.wrappers, "FrameStackObservation", lambda env, k: stack(env, k, padding_type="zero"))
    model = sb3_atari_ppo(cfg)
    trainer = Runner(cfg, tmp_path / "run", rich_progress=False)
    policy, theirs = trainer.algo.policy, list(model.policy.parameters())
    with torch.no_grad():
        for mine, their in zip(policy.parameters(), theirs, strict=True):
            mine.copy_(their)
    start = [p.detach().clone() for p in theirs]

    trainer.algo.actor.rng, their_rng = np.random.default_rng(7), np.random.default_rng(7)
    dist = policy.dist

    def sb3_forward(obs, deterministic=False):
        latent_pi, latent_vf = model.policy.mlp_extractor(model.policy.extract_features(obs))
        logits = model.policy.action_net(latent_pi)
        actions = dist.sample(logits, torch.from_numpy(dist.noise(their_rng, obs.shape[0])))
        return actions, model.policy.value_net(latent_vf), dist.log_prob_entropy(logits, actions)[0]

    monkeypatch.setattr(model.policy, "forward", sb3_forward)
    # SB3 shuffles its env-major rows (env * steps + t) with np.random.permutation; ppo-cli its step-major ones.
    perms = [np.random.default_rng(5).permutation(n) for _ in range(updates * epochs)]
    theirs_perm, ours_perm = iter(perms), iter([torch.as_tensor(p % steps * envs + p // steps) for p in perms])
    permutation = np.random.permutation
    monkeypatch.setattr(np.random, "permutation", lambda k: next(theirs_perm) if k == n else permutation(k))
    monkeypatch.setattr(Updater, "_permutation", lambda self, batch: next(ours_perm))
    ours, sb3_rollouts = [], []
    update = trainer.algo.updater.update
    monkeypatch.setattr(trainer.algo.updater, "update", lambda batch, s: ours.append(batch[torch.arange(n)]) or
                        update(batch, s))
    train = model.train

    def sb3_train():
        buf = model.rollout_buffer
        sb3_rollouts.append({k: torch.as_tensor(getattr(buf, k).reshape(n, *getattr(buf, k).shape[2:]))
                             for k in ("observations", "actions", "advantages", "log_probs", "episode_starts")})
        train()

    monkeypatch.setattr(model, "train", sb3_train)
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.run()
    trainer.close()
    model.learn(total_timesteps=n * updates)

    assert len(ours) == len(sb3_rollouts) == updates
    assert sum(int(r["episode_starts"].sum()) for r in sb3_rollouts) >= 5  # lives were lost: GAE cut episodes
    for mine, their in zip(ours, sb3_rollouts, strict=True):
        assert torch.equal(mine.obs, their["observations"].to(torch.uint8))
        assert torch.equal(mine.actions, their["actions"].reshape(-1).long())
        torch.testing.assert_close(mine.advantages, their["advantages"].reshape(-1).float(), rtol=0, atol=1e-4)
        torch.testing.assert_close(mine.logp, their["log_probs"].reshape(-1).float(), rtol=0, atol=1e-4)
    moved = max(float((p.detach() - b).abs().max()) for p, b in zip(theirs, start, strict=True))
    differ = max(float((p.detach() - q.detach()).abs().max()) for p, q in zip(policy.parameters(), theirs,
                                                                             strict=True))
    assert moved > 1e-3 and differ < 1e-3 * moved


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
    from ppo_cli.run.evaluation import PeriodicEvaluator

    overrides = [*atari_overrides("Breakout"), "env.num_envs=2", "algo.n_steps=16", "algo.batch_size=32",
                 "algo.K_epochs=1", "algo.total_timesteps=96", "eval.every_steps=40", "eval.episodes=1",
                 "eval.max_episode_steps=30"]
    result = returns.sb3_worker(overrides, tmp_path, "cpu", 1)
    due = PeriodicEvaluator(compose(overrides), *[None] * 3).due
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
