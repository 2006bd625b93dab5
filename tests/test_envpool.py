"""env.backend=envpool (ppo_cli/envs/envpool_backend.py): envpool's NEXT_STEP autoreset turned into the SAME_STEP
transitions the rollout stores, episode statistics, Atari's pipeline and game scores, evaluation's step cap, resume,
and the one-line errors."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ppo_cli.algo.rollout import TorchActor, collect
from ppo_cli.algo.storage import RolloutBuffer
from ppo_cli.algo.timing import Stopwatch
from ppo_cli.envs.envpool_backend import task_and_kwargs
from ppo_cli.envs.make import make_vec_env
from ppo_cli.envs.spaces import describe_space
from ppo_cli.errors import UserError
from ppo_cli.policy.actor_critic import build_policy
from ppo_cli.run import checkpoint
from ppo_cli.run.evaluation import evaluate_random
from ppo_cli.run.runner import Runner

from .conftest import cli, make_cfg, needs_atari

needs_envpool = pytest.mark.skipif(importlib.util.find_spec("envpool") is None,
                                   reason="envpool is not installed (pip install '.[envpool]', Python 3.11+)")


@pytest.fixture
def one_torch_thread():
    """As training runs (torch_threads=1): torch's default thread pool is slow for tiny batches on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _collect(cfg, n_steps: int):
    """One rollout of `n_steps` through envs.make_vec_env, as the trainer collects it (TorchActor, no scaling)."""
    envs = make_vec_env(cfg.env, seed=cfg.seed, training=True)
    policy = build_policy(describe_space(envs.single_observation_space),
                          describe_space(envs.single_action_space, bounds=True), cfg)
    n = cfg.env.num_envs
    buffer = RolloutBuffer(n_steps, n, policy.layout.stored_shape, policy.layout.stored_dtype, policy.action_shape,
                           policy.action_dtype, torch.device("cpu"))
    actor = TorchActor(policy, np.random.default_rng(0), torch.device("cpu"), n)
    obs, _ = envs.reset(seed=cfg.seed)
    done = collect(envs, actor, buffer, obs, None, lambda: False, Stopwatch(("env", "policy", "storage")))
    envs.close()
    return actor, buffer, done


def _replay(task: str, seed: int, actions: np.ndarray, max_steps: int) -> list[list[tuple]]:
    """envpool's own stepping of the same actions, NEXT_STEP autoreset and all: the step after an episode's end is a
    reset that ignores its action, and is not a transition. Per env, every real transition (obs, reward, terminated,
    truncated, next obs) in order; the next obs of an episode's last step is its real final observation."""
    import envpool

    steps, n = actions.shape[:2]
    pool = envpool.make(task, env_type="gymnasium", num_envs=n, seed=seed, max_episode_steps=max_steps)
    obs, _ = pool.reset()
    taken, resetting = np.zeros(n, dtype=int), np.zeros(n, dtype=bool)
    out: list[list[tuple]] = [[] for _ in range(n)]
    while (taken < steps).any():
        nxt, reward, terminated, truncated, _ = pool.step(actions[np.minimum(taken, steps - 1), np.arange(n)])
        for i in np.flatnonzero(~resetting & (taken < steps)):
            out[i].append((obs[i], reward[i], terminated[i], truncated[i], nxt[i]))
            taken[i] += 1
        resetting = ~resetting & (terminated | truncated)
        obs = nxt
    pool.close()
    return out


@needs_envpool
@pytest.mark.filterwarnings("ignore:.*precision lowered by casting")  # _replay's raw envpool spaces
def test_stored_transitions_are_envpools_own_with_same_step_resets_and_real_final_observations(one_torch_thread):
    """CartPole with a 20-step limit under a fresh policy: episodes both terminate (the pole falls) and truncate.
    Every stored step is one of envpool's real transitions (none crosses a reset), the step after a done flag holds a
    reset observation, truncations bootstrap from V(real final observation), and the episode statistics are right."""
    cfg = make_cfg("env.backend=envpool", "env.max_episode_steps=20", "env.num_envs=4", "seed=3")
    steps = 100
    actor, buffer, done = _collect(cfg, steps)
    actions = buffer.actions.numpy()
    replay = _replay("CartPole-v1", 3, actions, 20)
    terminated, ended = buffer.terminated.bool().numpy(), buffer.episode_end.bool().numpy()
    truncated = ended & ~terminated
    assert terminated.sum() >= 5 and truncated.sum() >= 5  # both kinds of end occur
    for i in range(4):
        real = replay[i]
        np.testing.assert_array_equal(buffer.obs[:, i].numpy(), np.stack([r[0] for r in real]))
        np.testing.assert_array_equal(buffer.rewards[:, i].numpy(), [r[1] for r in real])
        np.testing.assert_array_equal(terminated[:, i], [r[2] for r in real])
        np.testing.assert_array_equal(truncated[:, i], [r[3] for r in real])
        for t in np.flatnonzero(ended[:-1, i]):
            following = buffer.obs[t + 1, i].numpy()
            assert np.abs(following).max() <= 0.05  # CartPole's reset draws every entry from [-0.05, 0.05]
            assert not np.array_equal(following, real[t][4])  # ... and is not the episode's final observation
        for t in np.flatnonzero(truncated[:, i]):
            x = actor.inputs(real[t][4][None], update_stats=False)
            assert buffer.final_values[t, i].item() == pytest.approx(actor.value(x).item(), abs=1e-6)
        assert (buffer.final_values[:, i][torch.from_numpy(terminated[:, i])] == 0).all()
    # Episode statistics (RecordEpisodeStatistics on the SAME_STEP pool): the episodes that ended, from envpool's own.
    expected = []
    for real in replay:
        total, length = 0.0, 0
        for _, reward, term, trunc, _ in real:
            total, length = total + reward, length + 1
            if term or trunc:
                expected.append((total, length))
                total, length = 0.0, 0
    assert sorted(zip(done.returns, done.lengths, strict=True)) == sorted(expected)


@needs_envpool
def test_the_same_short_cartpole_training_runs_through_both_backends(tmp_path: Path):
    """The same config through gymnasium's and envpool's envs: the same spaces (so the same policy and checkpoint),
    episode statistics, learning as judged by periodic evaluation (on envpool's envs, with its step cap), and envpool
    runs as deterministic as gymnasium's (same seed, same parameters)."""
    overrides = ["algo.n_steps=128", "algo.batch_size=256", "algo.total_timesteps=4096", "eval.every_steps=2048",
                 "eval.episodes=4", "checkpoint_interval=0", "eval.final=false"]
    runs = {}
    for name, backend in (("gymnasium", "gymnasium"), ("envpool", "envpool"), ("envpool again", "envpool")):
        trainer = Runner(make_cfg(*overrides, f"env.backend={backend}"), tmp_path / name, rich_progress=False)
        result = trainer.run()
        runs[name] = (trainer, result)
        trainer.close()
    gym_run, pool_run = runs["gymnasium"][0], runs["envpool"][0]
    assert pool_run.algo.obs_space == gym_run.algo.obs_space and pool_run.algo.action_space == gym_run.algo.action_space
    for trainer, result in (runs["gymnasium"], runs["envpool"]):
        assert result.global_step == 4096
        best = trainer.evaluator.best
        assert best is not None and best["mean_return"] > 50 and best["cut_episodes"] == 0  # random play: 22
        assert len(trainer.recent_returns) > 20
    for a, b in zip(pool_run.algo.policy.parameters(), runs["envpool again"][0].algo.policy.parameters(), strict=True):
        assert torch.equal(a, b)


@needs_envpool
def test_resume_restarts_envpools_episodes_from_a_reset_and_says_so(tmp_path: Path):
    overrides = ["env.backend=envpool", "env.num_envs=2", "algo.n_steps=64", "algo.batch_size=64",
                 "eval.every_steps=0", "eval.final=false", "checkpoint_interval=1"]
    first = Runner(make_cfg(*overrides, "algo.total_timesteps=256"), tmp_path, rich_progress=False)
    first.run()
    first.close()
    data = checkpoint.load(tmp_path / "checkpoints" / "checkpoint.pt")
    assert data["env_state"] is None  # envpool's C++ envs hold no state a checkpoint can keep
    resumed = Runner(make_cfg(*overrides, "algo.total_timesteps=512"), tmp_path, resume=data, rich_progress=False)
    said = "restart from a reset (envpool's envs live in C++ and cannot be saved)"
    assert any(said in note for note in resumed.notes), resumed.notes
    assert resumed.run().global_step == 512
    resumed.close()


@needs_envpool
def test_envpools_envs_report_faults_in_one_line_as_gymnasiums_do():
    """wrappers.EnvFaults sits under the statistics on this backend too: a NaN action makes Pendulum's state NaN."""
    envs = make_vec_env(make_cfg("env=Pendulum-v1", "env.backend=envpool").env, seed=0, num_envs=2, training=True)
    envs.reset(seed=0)
    envs.step(np.zeros((2, 1), dtype=np.float32))
    with pytest.raises(UserError, match=r"^env 'Pendulum-v1': step\(\) returned a NaN observation \(at step 2\)$"):
        envs.step(np.full((2, 1), np.nan, dtype=np.float32))
    envs.close()


@needs_envpool
def test_evaluation_step_cap_cuts_episodes_on_envpools_envs():
    """evaluation.StepCap's cut, counted by the pool: cut episodes are reported as cut with their partial returns, and
    a cut env starts a new episode (envpool's forced reset: it knew of no end)."""
    cfg = make_cfg("env.backend=envpool")
    envs = make_vec_env(cfg.env, seed=0, num_envs=2, step_cap=5)
    envs.reset(seed=0)
    for t in range(1, 11):
        obs, _, terminated, truncated, info = envs.step(np.zeros(2, dtype=np.int64))
        assert not terminated.any() and truncated.all() == (t % 5 == 0)
        if t % 5 == 0:
            assert (info["final_info"]["_eval_cut"] == [True, True]).all()
            assert info["final_info"]["eval_cut"]["l"].tolist() == [5, 5]
            assert np.abs(obs).max() <= 0.05 and np.abs(np.stack(info["final_obs"])).max() > 0.05  # reset vs final
    capped = evaluate_random(envs, 4, seed=0)
    envs.close()
    assert capped.cut == 4 and capped.lengths == [5] * 4 and capped.returns == [5.0] * 4
    envs = make_vec_env(cfg.env, seed=0, num_envs=2, step_cap=1000)
    whole = evaluate_random(envs, 4, seed=0)
    envs.close()
    assert whole.cut == 0 and whole.returns == [float(n) for n in whole.lengths] and max(whole.lengths) > 5


@needs_envpool
def test_recording_plays_on_gymnasiums_env_without_envpools_pool_settings():
    """ppo-eval --video renders one env per frame through gymnasium's recorder: those envs are gymnasium's."""
    import gymnasium as gym

    envs = make_vec_env(make_cfg("env.backend=envpool", "+env.kwargs.num_threads=1").env, seed=0, num_envs=1,
                        render_mode="rgb_array")
    assert isinstance(envs.unwrapped, gym.vector.SyncVectorEnv) and envs.unwrapped.envs[0].render_mode == "rgb_array"
    envs.close()


@needs_envpool
def test_atari_options_follow_ppo_clis_pipeline():
    task, kwargs = task_and_kwargs(make_cfg("env=Breakout", "env.backend=envpool").env, training=True)
    assert task == "Breakout-v5"
    assert {k: kwargs[k] for k in (
        "noop_max", "frame_skip", "img_height", "img_width", "gray_scale", "stack_num", "episodic_life", "reward_clip",
        "repeat_action_probability", "full_action_space")} == {
        "noop_max": 30, "frame_skip": 4, "img_height": 84, "img_width": 84, "gray_scale": True, "stack_num": 4,
        "episodic_life": True, "reward_clip": True, "repeat_action_probability": 0.25, "full_action_space": False}
    task, evaluation = task_and_kwargs(make_cfg("env=Breakout", "env.backend=envpool", "env.max_episode_steps=1000",
                                                "+env.kwargs.repeat_action_probability=0.0").env, training=False)
    assert evaluation["reward_clip"] is False and evaluation["repeat_action_probability"] == 0.0
    assert evaluation["max_episode_steps"] == 250  # env.max_episode_steps counts frames on Atari, envpool steps
    task, kwargs = task_and_kwargs(make_cfg("env=LunarLanderContinuous-v3", "env.backend=envpool").env, training=True)
    assert task == "LunarLanderContinuous-v3" and "continuous" not in kwargs


@needs_envpool
def test_atari_training_episodes_are_lives_with_clipped_rewards_and_statistics_are_whole_raw_games():
    """Asterix (3 lives, 50 points an object), the same actions in training and evaluation envs: training ends an
    episode at each lost life and clips rewards; evaluation plays whole games; both report the same games with their
    raw scores."""
    cfg = make_cfg("env.id=ALE/Asterix-v5", "env.atari=true", "env.backend=envpool")
    actions = np.random.default_rng(0).integers(0, 9, (300, 2))
    seen = {}
    for training in (True, False):
        envs = make_vec_env(cfg.env, seed=0, num_envs=2, training=training)
        envs.reset(seed=0)
        ends, games, rewards = 0, [], []
        for t, a in enumerate(actions):
            _, reward, terminated, truncated, info = envs.step(a)
            ends += int((terminated | truncated).sum())
            rewards.append(reward)
            if "_episode" in info:
                games += [(t, i, info["episode"]["r"][i], info["episode"]["l"][i])
                          for i in np.flatnonzero(info["_episode"])]
        envs.close()
        seen[training] = (ends, games, np.stack(rewards))
    (train_ends, train_games, train_rewards), (eval_ends, eval_games, eval_rewards) = seen[True], seen[False]
    assert len(eval_games) >= 2 and train_games == eval_games  # the same games, with the same raw scores
    assert eval_ends == len(eval_games) and train_ends >= 3 * len(train_games)  # a life lost ends a training episode
    assert set(np.unique(train_rewards)) <= {0.0, 1.0} and eval_rewards.max() == 50
    for i in (0, 1):  # each env's games add up to its raw rewards and agent steps until its last game ended
        own = [(t, score, length) for t, env, score, length in eval_games if env == i]
        last = own[-1][0]
        assert sum(score for _, score, _ in own) == eval_rewards[:last + 1, i].sum()
        assert sum(length for _, _, length in own) == last + 1


@needs_envpool
@needs_atari
def test_atari_spaces_are_gymnasiums_pipelines():
    cfg = make_cfg("env=Breakout", "env.backend=envpool")
    pool = make_vec_env(cfg.env, seed=0, num_envs=1)
    gym_envs = make_vec_env(make_cfg("env=Breakout").env, seed=0, num_envs=1)
    assert describe_space(pool.single_observation_space) == describe_space(gym_envs.single_observation_space)
    assert describe_space(pool.single_action_space, True) == describe_space(gym_envs.single_action_space, True)
    pool.close()
    gym_envs.close()


@needs_envpool
def test_mujoco_actions_are_float32_as_on_gymnasium():
    envs = make_vec_env(make_cfg("env=HalfCheetah-v5", "env.backend=envpool").env, seed=0, num_envs=2)
    assert describe_space(envs.single_action_space, bounds=True) == {
        "type": "Box", "shape": [6], "low": [-1.0] * 6, "high": [1.0] * 6}
    obs, _ = envs.reset(seed=0)
    assert obs.shape == (2, 17)
    envs.step(np.zeros((2, 6), dtype=np.float32))
    envs.close()


@needs_envpool
@pytest.mark.parametrize("overrides, words", [
    (["env.id=CartPol-v1"], ["env.id='CartPol-v1'", "does not provide", "CartPole-v1", "env.backend=gymnasium"]),
    (["env.id=Taxi-v3"], ["not envpool.toy_text", "env.backend=gymnasium"]),
    (["env.id=ALE/Breakout-v5"], ["env.id=ALE/Breakout-v5 env.atari=true"]),
    (["+env.kwargs.continuous_typo=true"], ["env.kwargs.continuous_typo", "env.backend=gymnasium"]),
    (["env=Breakout", "+env.kwargs.noop_max=10"], ["env.kwargs.noop_max", "env.atari=true sets it"]),
    (["env.entry_point=tests.custom_env:DictActions"], ["env.entry_point", "env.backend=gymnasium"]),
    (["env.wrappers=[{_target_: ppo_cli.wrappers.KeepObservationIndices, indices: [0]}]"],
     ["env.wrappers", "env.backend=gymnasium"]),
])
def test_what_envpool_does_not_cover_is_refused_in_one_line(overrides, words):
    with pytest.raises(UserError) as err:
        make_vec_env(make_cfg("env.backend=envpool", *overrides).env, seed=0, num_envs=1)
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_missing_envpool_is_one_line_naming_the_extra_and_the_alternative(monkeypatch):
    monkeypatch.setitem(sys.modules, "envpool", None)  # what `import envpool` does when it is not installed
    with pytest.raises(UserError) as err:
        make_vec_env(make_cfg("env.backend=envpool").env, seed=0, num_envs=1)
    message = str(err.value)
    assert "\n" not in message
    assert 'pip install ".[envpool]"' in message and "env.backend=gymnasium" in message


def test_ppo_train_without_envpool_exits_2_with_one_line(tmp_path: Path):
    """Through the CLI, envpool missing (a stand-in package that fails to import, first on the path): exit 2, one line
    on stderr naming the extra and the alternative, no traceback, no checkpoint. (An unknown task takes the same path
    from its UserError: test_what_envpool_does_not_cover_is_refused_in_one_line.)"""
    (tmp_path / "shim" / "envpool").mkdir(parents=True)
    (tmp_path / "shim" / "envpool" / "__init__.py").write_text("raise ImportError(\"No module named 'envpool'\")\n")
    env = {"PYTHONPATH": f"{tmp_path / 'shim'}:{Path(__file__).resolve().parents[1]}"}
    proc = cli("ppo-train", "env.backend=envpool", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert 'pip install ".[envpool]"' in lines[0] and "env.backend=gymnasium" in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()
