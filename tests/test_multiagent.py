"""Several agents in one env (envs/agents.py, envs/selfplay.py): per-agent GAE and truncation with an agent that
leaves early, MAPPO's global-state critic against IPPO's, resume, the bad-input lines, and the CLI end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ppo_cli.algo.rollout import collect
from ppo_cli.algo.storage import RolloutBuffer
from ppo_cli.algo.timing import Stopwatch
from ppo_cli.config import EnvConfig
from ppo_cli.envs.make import make_vec_env
from ppo_cli.run import checkpoint
from ppo_cli.run.runner import STAGES, Runner
from tests.conftest import check_resume_is_bitwise, cli, make_cfg

pytest.importorskip("pettingzoo")

SIGNAL = ["algo=mappo", "env.id=tests.ma_envs:signal_game", "env.num_envs=4", "algo.n_steps=16",
          "algo.batch_size=64", "algo.K_epochs=4", "algo.lr_actor=3e-3", "algo.lr_critic=3e-3", "eval.every_steps=0",
          "eval.final=false", "eval.objective=train", "checkpoint_interval=0", "log_interval=1000"]


def _env(env_id: str, num_envs: int = 1, **kwargs: object) -> object:
    cfg = OmegaConf.structured(EnvConfig)
    cfg.id, cfg.num_envs = env_id, num_envs
    cfg.kwargs = kwargs
    return cfg


class ScriptedActor:
    """Always action 0; V(x) = 0.2 + 0.1 x for the row's observation x (its step count)."""

    state = starts = None

    def inputs(self, obs: dict, update_stats: bool = True, rows: np.ndarray | None = None) -> np.ndarray:
        return obs["obs"].astype(np.float32)

    def act(self, x: np.ndarray, mask: np.ndarray | None = None) -> tuple:
        n = x.shape[0]
        return np.zeros(n, np.int64), np.zeros(n, np.float32), self.value(x)

    def value(self, x: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        return (0.2 + 0.1 * x[:, 0]).astype(np.float32)

    def env_action(self, action: np.ndarray) -> np.ndarray:
        return action

    def end_episodes(self, ended: np.ndarray) -> None:
        pass


def test_gae_per_agent_with_an_agent_that_leaves_early():
    """Rows: "stays" (reward 1, truncated after 4 steps) and "leaves" (reward 2, terminated after 2 steps, its row
    idle until the copy resets at step 4). gamma 0.9, lambda 0.8, so gamma * lambda = 0.72."""
    envs = make_vec_env(_env("tests.ma_envs:leaves_early"), seed=0)
    obs, _ = envs.reset(seed=0)
    buffer = RolloutBuffer(5, 2, (1,), torch.float32, (), torch.int64, torch.device("cpu"), idle_rows=True)
    done = collect(envs, ScriptedActor(), buffer, obs, None, lambda: False, Stopwatch(STAGES))
    batch = buffer.advantages(torch.tensor([0.3, 0.3]), 0.9, 0.8)  # both rows' next observation counts 1 step
    v = lambda steps: 0.2 + 0.1 * steps  # noqa: E731
    # stays: steps 0-3 of an episode truncated with final observation 4, then step 0 of the next
    d = [1 + 0.9 * v(1) - v(0), 1 + 0.9 * v(2) - v(1), 1 + 0.9 * v(3) - v(2), 1 + 0.9 * v(4) - v(3),
         1 + 0.9 * v(1) - v(0)]
    stays = [d[0] + 0.72 * (d[1] + 0.72 * (d[2] + 0.72 * d[3])), d[1] + 0.72 * (d[2] + 0.72 * d[3]),
             d[2] + 0.72 * d[3], d[3], d[4]]
    # leaves: steps 0-1, terminated (no bootstrap), idle at rollout steps 2 and 3, then step 0 of the next episode
    leaves = [2 + 0.9 * v(1) - v(0) + 0.72 * (2 - v(1)), 2 - v(1), 2 + 0.9 * v(1) - v(0)]
    # The batch holds the alive rows only, in order t * rows + row.
    expected = [stays[0], leaves[0], stays[1], leaves[1], stays[2], stays[3], stays[4], leaves[2]]
    assert batch.advantages.tolist() == pytest.approx(expected, abs=1e-6)
    assert batch.returns.tolist() == pytest.approx(
        [a + v(s) for a, s in zip(expected, [0, 0, 1, 1, 2, 3, 0, 0], strict=True)], abs=1e-6)
    # The copy's team episode (rollout step 3): 4 x 1 + 2 x 2, and each agent's own return.
    assert done.returns == [8.0] and done.lengths == [4] and done.agent_returns == [[4.0, 4.0]]
    envs.close()


def test_mappos_global_state_critic_learns_what_ippos_cannot(tmp_path):
    """SignalGame (tests/ma_envs.py), one step an episode: the team reward carries noise 2 z, z shown only in the
    global state. At the same budget (768 frames, 3 seeds), MAPPO's critic explains about half of the return's
    variance and IPPO's none of it: the advantages MAPPO's actor learns from are that much less noisy."""
    def explained(algo: str, seed: int) -> float:
        run = Runner(make_cfg(*SIGNAL, f"algo={algo}", f"seed={seed}", "algo.total_timesteps=768",
                              "+env.kwargs.length=1"), tmp_path / f"{algo}{seed}", rich_progress=False)
        scalars, learn = [], run.algo.learn
        run.algo.learn = lambda progress: scalars.append(learn(progress)) or scalars[-1]
        run.run()
        run.close()
        return float(np.mean([s["losses/explained_variance"] for s in scalars[-3:]]))

    ippo = [explained("ippo", s) for s in (1, 2, 3)]
    mappo = [explained("mappo", s) for s in (1, 2, 3)]
    print(f"explained variance over the last 3 updates of 768 frames: ippo {ippo}, mappo {mappo}")
    assert max(ippo) < 0.05 and min(mappo) > 0.3, (ippo, mappo)


def test_resume_is_bitwise(tmp_path):
    check_resume_is_bitwise([*SIGNAL, "checkpoint_interval=1"], tmp_path, total=4 * 64 * 2, split=64 * 2)


def test_resume_of_mpe_is_bitwise_through_its_world_of_objects(tmp_path):
    """MPE's state lives in objects (the world, its agents and landmarks, their states): the checkpoint saves their
    plain fields (make._snapshot_tree), so a resumed run continues the episodes in progress, bit for bit. The split
    falls after the first episode's end, in the middle of the second (25 steps an episode, 16 a rollout)."""
    pytest.importorskip("mpe2")
    data = check_resume_is_bitwise(["algo=mappo", "env=simple_spread_v3", "env.kwargs.max_cycles=25",
                                    "env.num_envs=2", "algo.n_steps=16", "algo.batch_size=48", "algo.K_epochs=2",
                                    "eval.every_steps=0", "eval.final=false", "eval.objective=train",
                                    "checkpoint_interval=1"], tmp_path, total=16 * 2 * 3, split=16 * 2 * 2)
    assert data["env_state"] is not None


def test_an_aec_env_under_ippo_gets_the_conversion_to_use(tmp_path):
    proc = cli("ppo-train", "algo=ippo", "env.id=pettingzoo.classic:tictactoe_v3", f"hydra.run.dir={tmp_path}/r",
               cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "AEC" in line and "aec_to_parallel" in line and "algo=selfplay" in line, line


def test_agents_with_different_spaces_under_one_shared_policy_get_one_line(tmp_path):
    proc = cli("ppo-train", "algo=ippo", "env.id=tests.ma_envs:mixed", f"hydra.run.dir={tmp_path}/r", cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "small" in line and "large" in line and "(2,)" in line and "(3,)" in line, line
    assert "network.share=false" in line, line


@pytest.mark.parametrize(("args", "words"), [
    (["env.id=tests.ma_envs:signal_game"], ["PettingZoo env", "algo=ippo"]),
    (["algo=mappo", "env=CartPole-v1"], ["gymnasium env", "algo=ppo"]),
    (["algo=selfplay", "env.id=tests.ma_envs:signal_game"], ["parallel env", "algo=mappo"]),
])
def test_an_algorithm_that_does_not_fit_the_env_gets_one_line(args, words):
    # In process (the two tests above run ppo-train as a user does): Runner runs this check before anything else.
    from ppo_cli.config import choice
    from ppo_cli.envs.agents import check_algorithm
    from ppo_cli.errors import UserError

    cfg = make_cfg(*args)
    with pytest.raises(UserError) as err:
        check_algorithm(cfg.env, None if cfg.algo.multi_agent is None else choice(cfg.algo.multi_agent))
    assert all(w in str(err.value) for w in words) and "\n" not in str(err.value), err.value


def test_ippo_on_simple_spread_logs_agents_evaluates_and_exports(tmp_path):
    pytest.importorskip("mpe2")
    run = tmp_path / "run"
    cli("ppo-train", "algo=ippo", "env=simple_spread_v3", "env.num_envs=2", "algo.n_steps=50",
        "algo.batch_size=100", "algo.total_timesteps=400", "eval.every_steps=0", "eval.episodes=2",
        "network.agent_id=true", f"hydra.run.dir={run}", cwd=tmp_path, check=True)
    result = json.loads((run / "result.json").read_text())
    assert result["final_eval"]["episodes"] == 2
    out = cli("ppo-eval", str(run / "checkpoints" / "checkpoint.pt"), "--episodes", "2", "--json", cwd=tmp_path,
              check=True)
    report = json.loads(out.stdout)
    assert set(report["agent_returns"]) == {"agent_0", "agent_1", "agent_2"}
    assert report["mean_return"] == pytest.approx(sum(report["agent_returns"].values()), rel=1e-6)
    data = checkpoint.load(run / "checkpoints" / "checkpoint.pt")
    assert data["global_step"] == 400  # frames: steps of the copies, whatever the number of agents


def test_selfplay_on_tictactoe_reports_win_draw_loss_per_seat(tmp_path):
    run = tmp_path / "run"
    cli("ppo-train", "algo=selfplay", "env=tictactoe_v3", "env.num_envs=2", "algo.n_steps=32", "algo.batch_size=64",
        "algo.total_timesteps=128", "eval.every_steps=0", "eval.episodes=4", f"hydra.run.dir={run}", cwd=tmp_path,
        check=True)
    out = cli("ppo-eval", str(run / "checkpoints" / "checkpoint.pt"), "--episodes", "20", "--opponent", "random",
              "--json", cwd=tmp_path, check=True)
    r = json.loads(out.stdout)
    assert r["win_rate"] + r["draw_rate"] + r["loss_rate"] == pytest.approx(1.0)
    assert r["first_player"]["games"] == 10 and r["second_player"]["games"] == 10
    versus = cli("ppo-eval", str(run / "checkpoints" / "checkpoint.pt"), "--episodes", "4", "--opponent",
                 str(run / "checkpoints" / "checkpoint.pt"), "--json", cwd=tmp_path, check=True)
    assert json.loads(versus.stdout)["opponent"].endswith("checkpoint.pt")
    # An opponent file is a file from elsewhere: its config is checked as the evaluated checkpoint's is.
    data = checkpoint.load(run / "checkpoints" / "checkpoint.pt")
    data["config_yaml"] = data["config_yaml"].replace("id: pettingzoo.classic:tictactoe_v3",
                                                      "id: ${oc.env:HOME}")
    checkpoint.save(data, tmp_path / "crafted.pt")
    crafted = cli("ppo-eval", str(run / "checkpoints" / "checkpoint.pt"), "--episodes", "2", "--opponent",
                  str(tmp_path / "crafted.pt"), cwd=tmp_path)
    assert crafted.returncode != 0 and "Traceback" not in crafted.stderr
    assert "refused" in crafted.stderr.strip().splitlines()[-1] and "crafted.pt" in crafted.stderr


def test_export_of_a_mappo_actor_takes_its_own_observation_and_agent_id_alone(tmp_path):
    """Decentralized execution: the exported actor's inputs are the agent's observation and its id, not the global
    state its critic read in training; ppo-eval plays the export as the checkpoint."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    run = tmp_path / "run"
    cli("ppo-train", *SIGNAL, "network.agent_id=true", "algo.total_timesteps=128", f"hydra.run.dir={run}",
        cwd=tmp_path, check=True)
    ckpt = run / "checkpoints" / "checkpoint.pt"
    out = tmp_path / "actor.pt"
    proc = subprocess.run([sys.executable, "-m", "ppo_cli.cli.export", str(ckpt), "--format", "torchscript",
                           "--out", str(out), "--trust-env-code"], cwd=tmp_path, capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "actor.pt.json").read_text())
    assert [p["name"] for p in meta["inputs"]] == ["obs.agent_id", "obs.obs"]
    played = cli("ppo-eval", str(out), "--episodes", "4", "--json", "--trust-env-code", "--no-random-baseline",
                 cwd=tmp_path, check=True)
    direct = cli("ppo-eval", str(ckpt), "--episodes", "4", "--json", "--trust-env-code", "--no-random-baseline",
                 cwd=tmp_path, check=True)
    assert json.loads(played.stdout)["mean_return"] == pytest.approx(json.loads(direct.stdout)["mean_return"])


def test_a_checkpoint_may_import_the_allowlisted_env_modules_but_never_call_what_they_hold():
    from ppo_cli.envs.agents import pettingzoo_source

    assert pettingzoo_source("gymnasium_robotics:register") is None  # an allowlisted module's callable: no factory
    assert pettingzoo_source("pettingzoo.classic:tictactoe_v3")[1] == "aec"
    assert pettingzoo_source("tests.ma_envs:signal_game")[1] == "factory"  # the user's own (the recipe asks)


@pytest.mark.parametrize(("args", "words"), [
    (["algo=selfplay", "env=tictactoe_v3", "network.recurrent=lstm"], ["network.recurrent", "algo=selfplay"]),
    (["algo=mappo", "env.id=tests.ma_envs:signal_game", "network.recurrent=gru", "network.rnn_shared=true"],
     ["network.rnn_shared", "algo=mappo"]),
    (["algo=mappo", "env.id=tests.ma_envs:signal_game", "network.shared_trunk=true"], ["network.shared_trunk"]),
    (["network.share=false"], ["network.share", "algo=ippo"]),
    (["algo=ippo", "env.id=tests.ma_envs:roles", "network.share=false", "network.recurrent=lstm"],
     ["network.share", "network.recurrent=null"]),
])
def test_settings_that_would_defeat_the_algorithm_are_refused(args, words):
    from ppo_cli.config import validate
    from ppo_cli.errors import UserError

    with pytest.raises(UserError) as err:
        validate(make_cfg(*args))
    assert all(w in str(err.value) for w in words), err.value


ROLES = [*SIGNAL, "algo=ippo", "env.id=tests.ma_envs:roles", "algo.ent_coef=0.0"]


def test_a_policy_per_group_learns_two_roles_that_one_shared_policy_cannot(tmp_path):
    """Roles (tests/ma_envs.py): a copier and a flipper see the same bit and must answer it and its opposite, 4 steps
    an episode, so a team scores 8 at best. One shared policy without the agent id cannot tell them apart (4 at
    best); network.share=false gives each group its own policy. 1,536 frames, 2 seeds each."""
    def score(share: bool, seed: int) -> float:
        run = Runner(make_cfg(*ROLES, f"network.share={str(share).lower()}", f"seed={seed}",
                              "algo.total_timesteps=1536", "eval.final=true"), tmp_path / f"{share}{seed}",
                     rich_progress=False)
        result = run.run()
        run.close()
        return result.final_eval.mean_return

    shared, grouped = [score(True, s) for s in (1, 2)], [score(False, s) for s in (1, 2)]
    print(f"final team return (8 at best): shared {shared}, a policy per group {grouped}")
    assert max(shared) <= 4.0 and min(grouped) >= 7.0, (shared, grouped)


def test_each_group_reads_its_own_keys_and_its_rows_train_only_its_own_policy():
    from ppo_cli.envs.spaces import describe_space
    from ppo_cli.policy.actor_critic import build_policy

    envs = make_vec_env(_env("tests.ma_envs:roles", 2, wide=True), seed=0)
    obs, _ = envs.reset(seed=0)
    space = describe_space(envs.single_observation_space)
    assert set(space["spaces"]) == {"copier/obs", "flipper/obs", "agent_id", "group", "state"}
    cfg = make_cfg("algo=ippo", "network.share=false", "env.normalize_obs=true")
    policy = build_policy(space, describe_space(envs.single_action_space, bounds=True), cfg)
    envs.close()
    copier, flipper = policy.members
    assert copier.layout.dim == 2 and flipper.layout.dim == 3  # its own observation alone (no id, group, state)
    tensors = {k: torch.as_tensor(v) for k, v in obs.items()}
    group = tensors["group"].argmax(-1)
    assert group.tolist() == [0, 1, 0, 1]
    policy.update_obs_stats(tensors)
    assert copier.obs_norm.count.item() == pytest.approx(2 + 1e-4, rel=1e-3)  # its own two rows, not the flippers'
    x = policy.prepare(tensors)
    actions = torch.tensor([1, 0, 0, 1])
    logp, entropy, value = policy.evaluate(x, actions)
    for g, member in enumerate(policy.members):
        a, b = policy.slices[g]
        own = member.evaluate(x[group == g, a:b], actions[group == g])
        for got, want in zip((logp, entropy, value), own, strict=True):
            torch.testing.assert_close(got[group == g], want)  # to rounding: a batch of 4 rows against 2
    rows = group == 0  # a loss of the copiers' rows alone
    (logp[rows].sum() + value[rows].sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in copier.actor_encoder.parameters())
    assert all(p.grad is None or not p.grad.any() for p in flipper.parameters())


def test_simple_tag_trains_a_policy_per_group_evaluates_and_exports(tmp_path):
    """MPE's simple_tag: adversaries and the good agent see observations of different sizes (one shared policy is
    refused in one line: the Mixed case above), network.share=false trains one per group; the export plays as the
    checkpoint."""
    pytest.importorskip("mpe2")
    pytest.importorskip("onnxruntime")
    run = tmp_path / "run"
    cli("ppo-train", "algo=mappo", "env=simple_tag_v3", "network.share=false", "env.num_envs=2", "algo.n_steps=25",
        "algo.batch_size=50", "algo.total_timesteps=100", "eval.every_steps=0", "eval.episodes=2",
        f"hydra.run.dir={run}", cwd=tmp_path, check=True)
    ckpt = run / "checkpoints" / "checkpoint.pt"
    cli("ppo-export", str(ckpt), cwd=tmp_path, check=True)
    meta = json.loads((run / "checkpoints" / "checkpoint.onnx.json").read_text())
    assert [p["name"] for p in meta["inputs"]] == ["obs.adversary/obs", "obs.agent/obs", "obs.group"]
    reports = [json.loads(cli("ppo-eval", str(f), "--episodes", "3", "--json", "--no-random-baseline",
                              cwd=tmp_path, check=True).stdout) for f in (ckpt, ckpt.with_suffix(".onnx"))]
    assert set(reports[0]["agent_returns"]) == {"adversary_0", "adversary_1", "adversary_2", "agent_0"}
    assert reports[1]["returns"] == pytest.approx(reports[0]["returns"], abs=1e-4)


def test_pistonball_trains_with_the_cnn_through_supersuit_and_evaluates_from_the_checkpoint_alone(tmp_path):
    """The butterfly preset: SuperSuit's wrappers (on the allowlist: a checkpoint naming them evaluates without
    --trust-env-code) give each piston 84x84x3 frames, network=auto picks the CNN; MAPPO, whose state would be the
    screen, is refused in one line."""
    pytest.importorskip("pymunk")
    pytest.importorskip("supersuit")
    run = tmp_path / "run"
    small = ["env=pistonball_v6", "env.kwargs.n_pistons=3", "env.kwargs.max_cycles=10"]
    proc = cli("ppo-train", "algo=ippo", *small, "algo.n_steps=10", "algo.batch_size=30", "algo.K_epochs=1",
               "algo.total_timesteps=20", "eval.every_steps=0", "eval.episodes=1", f"hydra.run.dir={run}",
               cwd=tmp_path, check=True)
    assert "network:    cnn" in proc.stdout and "84x84 images" in proc.stdout, proc.stdout
    report = json.loads(cli("ppo-eval", str(run / "checkpoints" / "checkpoint.pt"), "--episodes", "1", "--json",
                            "--no-random-baseline", cwd=tmp_path, check=True).stdout)
    assert set(report["agent_returns"]) == {"piston_0", "piston_1", "piston_2"}
    refused = cli("ppo-train", "algo=mappo", *small, "network.shared_trunk=false", f"hydra.run.dir={tmp_path}/m",
                  cwd=tmp_path)
    assert refused.returncode != 0 and "algo=ippo" in refused.stderr.strip().splitlines()[-1], refused.stderr


def test_video_records_each_evaluated_episode_of_a_parallel_env_and_of_a_game(tmp_path):
    """ppo-eval --video: copy 0 of a parallel env (all its agents in one frame), and the learner's seat of a
    self-play game, one mp4 per evaluated episode, every frame of it."""
    pytest.importorskip("mpe2")
    pytest.importorskip("moviepy")
    from moviepy import VideoFileClip

    for name, args, frames in (("spread", ["algo=ippo", "env=simple_spread_v3", "env.kwargs.max_cycles=5",
                                           "algo.n_steps=5", "algo.batch_size=15"], 6),
                               ("game", ["algo=selfplay", "env=tictactoe_v3", "algo.n_steps=8",
                                         "algo.batch_size=8"], None)):
        run = tmp_path / name
        cli("ppo-train", *args, "env.num_envs=1", "algo.total_timesteps=10", "eval.every_steps=0", "eval.final=false",
            "eval.objective=train", f"hydra.run.dir={run}", cwd=tmp_path, check=True)
        report = json.loads(cli("ppo-eval", str(run / "checkpoints" / "checkpoint.pt"), "--episodes", "2", "--json",
                                "--no-random-baseline", "--video", str(tmp_path / f"{name}_video"), cwd=tmp_path,
                                check=True).stdout)
        files = [tmp_path / f"{name}_video" / f"eval-episode-{e}.mp4" for e in (1, 2)]
        assert report["videos"] == [str(f) for f in files]
        for f in files:
            clip = VideoFileClip(str(f))
            # The reset's frame and one a step: 5 steps of MPE; a game's learner moves 2 to 5 times.
            assert clip.n_frames == frames if frames else 3 <= clip.n_frames <= 6, (f, clip.n_frames)
            clip.close()


def test_groups_where_only_some_agents_mask_and_keys_with_a_slash_elsewhere():
    """Under groups of different spaces, a group whose observation has no action mask gets an all-true one (every
    action allowed), so the rows stack; and a "/" in a plain env's Dict keys is not taken for a group's key."""
    import gymnasium as gym

    from ppo_cli.envs.spaces import describe_space
    from ppo_cli.policy.actor_critic import build_policy

    envs = make_vec_env(_env("tests.ma_envs:roles", 1, wide=True, masked=True), seed=0)
    obs, _ = envs.reset(seed=0)
    assert set(obs) == {"copier/obs", "flipper/obs", "action_mask", "agent_id", "group", "state"}
    assert obs["action_mask"].tolist() == [[1, 1], [1, 1]]
    envs.close()
    plain = gym.spaces.Dict({"sensors/pos": gym.spaces.Box(-1, 1, (3,)), "sensors/vel": gym.spaces.Box(-1, 1, (3,))})
    policy = build_policy(describe_space(plain), describe_space(gym.spaces.Discrete(2), bounds=True), make_cfg())
    assert policy.layout.dim == 6
