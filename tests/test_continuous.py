"""Box, MultiDiscrete and MultiBinary actions; observation and reward normalization; the continuous presets."""

import json
import math

import numpy as np
import pytest
import torch

from ppo_cli.cli.evaluate import load_policy
from ppo_cli.envs import atari
from ppo_cli.envs.make import _missing_extra, make_vec_env
from ppo_cli.policy.actor_critic import ActorCritic
from ppo_cli.policy.normalize import ObsNormalizer, RewardScaler
from ppo_cli.run import checkpoint
from ppo_cli.run.evaluation import evaluate
from ppo_cli.run.runner import Interrupted, Runner

from .conftest import ROOT, cli, make_cfg
from .test_resume_and_signals import _train

OBS = {"type": "Box", "shape": [3]}
BOX = {"type": "Box", "shape": [2], "low": [-1.0, -2.0], "high": [1.0, 2.0]}


def test_gaussian_head_matches_torch_normal_and_logp_is_on_the_unclipped_sample():
    torch.manual_seed(0)
    pol = ActorCritic(OBS, BOX, [16], log_std_init=0.7)
    assert torch.equal(pol.dist.log_std.detach(), torch.full((2,), 0.7))
    obs = torch.randn(4000, 3)
    actions, logp, _ = pol.act(obs, np.random.default_rng(0))
    mean = pol.policy_head(pol.actor_encoder(obs))
    dist = torch.distributions.Normal(mean, pol.dist.log_std.exp())
    torch.testing.assert_close(logp, dist.log_prob(actions).sum(-1))
    logp2, entropy, _ = pol.evaluate(pol.prepare(obs), actions)
    torch.testing.assert_close(logp2, logp)
    torch.testing.assert_close(entropy, dist.entropy().sum(-1))
    # std e^0.7 ~ 2: many samples fall outside [-1, 1]; they are stored as sampled and only clipped for the env.
    assert (actions[:, 0].abs() > 1).float().mean() > 0.3
    sent = pol.env_action(actions)
    assert sent.shape == (4000, 2) and (np.abs(sent[:, 0]) <= 1).all() and (np.abs(sent[:, 1]) <= 2).all()
    np.testing.assert_array_equal(sent, np.clip(actions.numpy(), [-1, -2], [1, 2]))
    det, _, _ = pol.act(obs[:5], deterministic=True)
    torch.testing.assert_close(det, mean[:5])
    assert any(p is pol.dist.log_std for p in pol.actor_parameters())


def test_multidiscrete_head_is_a_product_of_categoricals():
    torch.manual_seed(0)
    space = {"type": "MultiDiscrete", "shape": [2], "nvec": [3, 4], "start": [1, 5]}
    pol = ActorCritic(OBS, space, [16])
    pol.policy_head.weight.data.normal_()  # away from the near-uniform init, so the check has teeth
    obs = torch.randn(50, 3)
    actions, logp, _ = pol.act(obs, np.random.default_rng(0))
    out = pol.policy_head(pol.actor_encoder(obs))
    d1, d2 = torch.distributions.Categorical(logits=out[:, :3]), torch.distributions.Categorical(logits=out[:, 3:])
    torch.testing.assert_close(logp, d1.log_prob(actions[:, 0]) + d2.log_prob(actions[:, 1]))
    _, entropy, _ = pol.evaluate(pol.prepare(obs), actions)
    torch.testing.assert_close(entropy, d1.entropy() + d2.entropy())
    assert actions[:, 0].max() <= 2 and actions[:, 1].max() <= 3
    np.testing.assert_array_equal(pol.env_action(actions), actions.numpy() + [1, 5])  # space.start applied
    det, _, _ = pol.act(obs, deterministic=True)
    torch.testing.assert_close(det, torch.stack([out[:, :3].argmax(-1), out[:, 3:].argmax(-1)], -1))


def test_multibinary_head_is_independent_bernoullis():
    torch.manual_seed(0)
    pol = ActorCritic(OBS, {"type": "MultiBinary", "shape": [2, 2]}, [16])
    pol.policy_head.weight.data.normal_()
    obs = torch.randn(50, 3)
    actions, logp, _ = pol.act(obs, np.random.default_rng(0))
    dist = torch.distributions.Bernoulli(logits=pol.policy_head(pol.actor_encoder(obs)))
    torch.testing.assert_close(logp, dist.log_prob(actions).sum(-1))
    _, entropy, _ = pol.evaluate(pol.prepare(obs), actions)
    torch.testing.assert_close(entropy, dist.entropy().sum(-1))
    sent = pol.env_action(actions)
    assert sent.shape == (50, 2, 2) and sent.dtype == np.int8


def test_obs_normalizer_matches_numpy_over_all_batches_and_clips():
    rng = np.random.default_rng(0)
    batches = [rng.normal(5.0, 3.0, size=(n, 2)) for n in (1, 7, 64, 3)]
    norm = ObsNormalizer(2, clip=1.5)
    for b in batches:
        norm.update(torch.as_tensor(b))
    seen = np.concatenate(batches)
    np.testing.assert_allclose(norm.mean.numpy(), seen.mean(0), rtol=1e-6)
    np.testing.assert_allclose(norm.var.numpy(), seen.var(0), rtol=1e-5)
    x = torch.tensor([[5.0, 5.0], [100.0, -100.0]])
    expected = np.clip((x.numpy() - seen.mean(0)) / np.sqrt(seen.var(0) + 1e-8), -1.5, 1.5)
    np.testing.assert_allclose(norm(x).numpy(), expected, rtol=1e-5)
    again = ObsNormalizer(2, clip=1.5)
    again.load_state_dict(norm.state_dict())  # the float32 copies used by forward follow a load
    torch.testing.assert_close(again(x), norm(x))


def test_reward_scaler_divides_by_the_std_of_the_discounted_return():
    scaler = RewardScaler(num_envs=2, gamma=0.5, clip=100.0, eps=0.0)
    r1, r2 = np.array([1.0, 2.0]), np.array([4.0, 0.0])
    out1 = scaler(r1, np.array([True, False]))  # env 0's episode ends: its return restarts
    # returns after step 1: [1, 2]; after step 2: [0*0.5 + 4, 2*0.5 + 0] = [4, 1]
    np.testing.assert_allclose(out1, r1 / math.sqrt(np.var([1, 2])), rtol=1e-6)
    out2 = scaler(r2, np.array([False, False]))
    np.testing.assert_allclose(out2, r2 / math.sqrt(np.var([1, 2, 4, 1])), rtol=1e-6)
    clipped = RewardScaler(1, 0.99, clip=0.5)
    assert clipped(np.array([3.0]), np.array([False]))[0] == 0.5


NORM_CFG = ["env=Pendulum-v1", "algo=ppo_pendulum", "env.num_envs=2", "algo.n_steps=32", "algo.batch_size=32",
            "algo.total_timesteps=256", "algo.K_epochs=2", "eval.final=false", "eval.every_steps=0",
            "eval.objective=train", "checkpoint_interval=0"]


def test_normalization_stats_are_checkpointed_and_resume_is_bitwise(tmp_path):
    straight = _train(make_cfg(*NORM_CFG), tmp_path / "straight").algo
    assert straight.policy.obs_norm.count > 256  # every training observation was counted
    with pytest.raises(Interrupted) as stop:
        _train(make_cfg(*NORM_CFG), tmp_path / "split", interrupt_after=2)
    data = checkpoint.load(stop.value.path)
    assert "obs_norm.mean" in data["policy"] and data["reward_scaler"]["count"] > 128
    resumed = _train(make_cfg(*NORM_CFG), tmp_path / "split", resume=data).algo
    for (name, a), b in zip(straight.policy.state_dict().items(), resumed.policy.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert straight.reward_scaler.state_dict()["var"] == resumed.reward_scaler.state_dict()["var"]


def test_evaluation_uses_frozen_statistics(tmp_path):
    trainer = _train(make_cfg(*NORM_CFG), tmp_path / "run")
    policy, cfg = load_policy(checkpoint.load(tmp_path / "run" / "checkpoints" / "checkpoint.pt"))
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    assert torch.equal(before["obs_norm.mean"], trainer.algo.policy.obs_norm.mean)
    envs = make_vec_env(cfg.env, seed=3, num_envs=2)
    try:
        evaluate(policy, envs, episodes=2, seed=3)
    finally:
        envs.close()
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())


ENV_PRESETS = sorted(p.stem for p in (ROOT / "ppo_cli" / "conf" / "env").glob("*.yaml"))


@pytest.mark.parametrize("env", ENV_PRESETS)
def test_every_env_preset_trains_a_few_updates(env, tmp_path):
    discrete = {"CartPole-v1", "Acrobot-v1", "MountainCar-v0", "LunarLander-v3", "MaskedGrid-v0", "GoalReach-v0"}
    algo = "ppo_pendulum" if env == "Pendulum-v1" else ("ppo" if env in discrete else "ppo_mujoco")
    multi_agent = {"simple_spread_v3": "mappo", "simple_reference_v3": "ippo", "simple_tag_v3": "mappo",
                   "pistonball_v6": "ippo", "tictactoe_v3": "selfplay",
                   "connect_four_v3": "selfplay"}  # PettingZoo presets (tests/test_multiagent.py has the rest)
    more = {"simple_tag_v3": ["network.share=false"], "pistonball_v6": ["env.kwargs.n_pistons=3"]}.get(env, [])
    if env in multi_agent:
        pytest.importorskip("mpe2" if "simple" in env else "pettingzoo")
        if env == "pistonball_v6":
            pytest.importorskip("pymunk")
            pytest.importorskip("supersuit")
        algo = multi_agent[env]
    pixels = env in atari.GAMES  # the Atari presets (tests/test_pixels.py has the rest)
    if pixels:
        pytest.importorskip("ale_py", reason="the 'atari' extra is not installed")
        algo = "ppo_atari"
    cfg = make_cfg(f"env={env}", f"algo={algo}", *(["network=cnn"] if pixels else []), *more, "env.num_envs=2",
                   "algo.n_steps=16", "algo.batch_size=16",
                   "algo.total_timesteps=64", "eval.final=false", "eval.every_steps=0", "eval.objective=train",
                   "checkpoint_interval=0")
    trainer = Runner(cfg, tmp_path / "run", rich_progress=False)
    try:
        result = trainer.run()
    finally:
        trainer.close()
    assert result.global_step == 64
    data = checkpoint.load(result.checkpoint)
    assert data["update"] == 2
    assert ("obs_norm.mean" in data["policy"]) == bool(cfg.env.normalize_obs)
    assert (cfg.algo.multi_agent is not None) == (env in multi_agent)
    if algo == "ppo_mujoco":
        assert cfg.algo.K_epochs == 10 and cfg.env.normalize_obs and cfg.env.normalize_reward


def test_missing_extras_are_named():
    assert _missing_extra('MuJoCo is not installed, run `pip install "gymnasium[mujoco]"`') == \
        "MuJoCo is not installed; install the 'mujoco' extra: pip install \".[mujoco]\" in the ppo-cli folder"
    assert _missing_extra("Box2D is not installed, you can install it by run `pip install swig` followed by "
                          '`pip install "gymnasium[box2d]"`').endswith("pip install \".[box2d]\" in the ppo-cli folder")


def test_continuous_reach_learns_and_evaluates(tmp_path):
    """Reach: random ~ -11 per episode; the learned policy must get close to the target and hold it."""
    run = tmp_path / "run"
    cli("ppo-train", "env.id=tests.custom_env:Reach-v0", "algo=ppo_mujoco", "env.num_envs=4", "algo.n_steps=256",
        "algo.total_timesteps=40960", "algo.lr_schedule=constant", "eval.every_steps=0", "eval.episodes=20",
        f"hydra.run.dir={run}", cwd=tmp_path, check=True, timeout=600)
    result = json.loads((run / "result.json").read_text())
    assert result["final_eval"]["mean_return"] > -3.0, result
    proc = cli("ppo-eval", str(run / "checkpoints" / "checkpoint.pt"), "--episodes", "20", "--json", "--trust-env-code",
               cwd=tmp_path, check=True)
    scored = json.loads(proc.stdout)
    assert scored["mean_return"] > -3.0 and scored["random_mean_return"] < -7.0, scored


@pytest.mark.parametrize("entry_point,optimum", [("MatchBits", 3.0), ("MatchDigits", 2.0)])
def test_multibinary_and_multidiscrete_learn_the_optimum(entry_point, optimum, tmp_path):
    run = tmp_path / "run"
    cli("ppo-train", f"env.entry_point=tests.custom_env:{entry_point}", "env.num_envs=4", "algo.n_steps=128",
        "algo.total_timesteps=16384", "algo.K_epochs=10", "algo.lr_actor=1e-3", "algo.lr_critic=1e-3",
        "algo.lr_schedule=linear",
        "eval.every_steps=0", "eval.episodes=20", f"hydra.run.dir={run}", cwd=tmp_path, check=True)
    result = json.loads((run / "result.json").read_text())
    assert result["final_eval"]["mean_return"] == optimum, result
